"""Client updates as differences on exactly the uploaded coordinates.

An upload may be a rank prefix of the global tensor (DP-DyLoRA, SPEC §1.3), so the global
is sliced to the upload's shape. Compression (SPEC §2.3) and user-level DP clipping
(SPEC §3.1) both act on these deltas, never on the raw states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def prefix_slice(shape: Sequence[int]) -> tuple[slice, ...]:
    """Index of the leading block of that shape."""
    return tuple(slice(0, int(s)) for s in shape)


def client_delta(global_state: State, upload: State) -> State:
    """``Δ = upload − global`` on the uploaded coordinates (float64)."""
    delta: State = {}
    for key, value in upload.items():
        if key not in global_state:
            raise ValueError(f"client uploaded {key!r}, which is not in the global state")
        g = global_state[key]
        if value.dim() != g.dim() or any(s > t for s, t in zip(value.shape, g.shape)):
            raise ValueError(f"upload {key!r} of shape {tuple(value.shape)} is not a prefix of "
                             f"the global shape {tuple(g.shape)}")
        delta[key] = value.to(torch.float64) - g[prefix_slice(value.shape)].to(torch.float64)
    return delta


def apply_update(global_state: State, delta: State) -> State:
    """``global_slice + Δ`` per key, in the global tensor's dtype (inverse of client_delta)."""
    out: State = {}
    for key, d in delta.items():
        g = global_state[key]
        out[key] = (g[prefix_slice(d.shape)].to(torch.float64) + d.to(torch.float64)).to(g.dtype)
    return out
