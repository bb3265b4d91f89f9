"""Server-side checks of every client upload before it can touch the global model.

A malformed update (NaN/Inf, wrong keys, shapes or dtypes, an oversized payload, bytes that
do not decode) is rejected with a reason and counted in ``rounds[].rejected``; it never
crashes the run or enters the aggregate. Shapes are checked against what an honest client
uploads this round (``Adapter.upload`` of the server's own model at the round's rank).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Layout = dict[str, tuple[int, ...]]


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    return {k: tuple(int(s) for s in v.shape) for k, v in state.items()}


def check_update(state: Mapping[str, torch.Tensor], expected: Layout | None) -> str | None:
    """Why ``state`` is not an acceptable upload for ``expected``, or None. Without an
    expected layout only emptiness, dtypes and finiteness are checked."""
    if not state:
        return "empty upload"
    if expected is None:
        expected = layout_of(state)
    missing = sorted(set(expected) - set(state))
    if missing:
        return f"missing keys ({len(missing)}, e.g. {missing[0]})"
    extra = sorted(set(state) - set(expected))
    if extra:
        return f"unexpected keys ({len(extra)}, e.g. {extra[0]})"
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            return f"{key}: shape {tuple(t.shape)} != expected {shape}"
        if not t.dtype.is_floating_point:
            return f"{key}: dtype {t.dtype} is not floating point"
        if not bool(torch.isfinite(t).all()):
            return f"{key}: contains NaN or Inf"
    return None


def honest_upload_layout(adapter, model) -> Callable[[int | None], Layout]:  # noqa: ANN001 - Adapter, nn.Module
    """``round_rank -> layout`` of what the adapter uploads (computed, not trained), before
    the update pipeline's stages (:meth:`fedpeft.pipeline.Pipeline.client_layout`)."""
    cache: dict[int | None, Layout] = {}

    def layout(round_rank: int | None) -> Layout:
        if round_rank not in cache:
            cache[round_rank] = layout_of(adapter.upload(model, round_rank))
        return cache[round_rank]

    return layout
