"""A split as the trained top layers see it: the frozen bottom's output, one row per token.

When only the top k encoder layers (plus the head) are trained, the hidden states entering
the lowest trained layer are the same in every round, for every client visit: they are
computed once (:mod:`fedpeft.model.frozen_bottom`) and stored packed — every example's real
tokens back to back, no padding — with ``offsets[i]:offsets[i+1]`` the rows of example ``i``.
The arrays are memory-mapped from the disk cache, so forked workers share one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.model.packing import packing_of


@dataclass
class HiddenSplit:
    #: (tokens, hidden) float32, every example's tokens back to back (memory-mapped)
    states: np.ndarray
    #: (n + 1,) int64: example i holds rows offsets[i]:offsets[i+1] of ``states``
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def _rows(self, rows: np.ndarray) -> list[np.ndarray]:
        return [self.states[self.offsets[i]:self.offsets[i + 1]] for i in np.asarray(rows, dtype=np.int64)]

    def collate(self, rows: np.ndarray, pad_id: int = 0) -> dict[str, torch.Tensor]:  # noqa: ARG002
        """A padded batch: ``layer_input [batch, width, hidden]`` with its ``attention_mask``
        (what DP-SGD's per-example gradients and evaluation use)."""
        seqs = self._rows(rows)
        width = max(len(s) for s in seqs)
        hidden = np.zeros((len(seqs), width, self.states.shape[1]), dtype=np.float32)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for j, s in enumerate(seqs):
            hidden[j, : len(s)] = s
            mask[j, : len(s)] = 1
        return {"layer_input": torch.from_numpy(hidden), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))}

    def collate_packed(self, rows: np.ndarray) -> dict[str, object]:
        """The same rows as one packed row ``[1, tokens, hidden]`` (no padding tokens;
        :mod:`fedpeft.model.packing`)."""
        seqs = self._rows(rows)
        packing, _ = packing_of(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))
        return {"layer_input": torch.from_numpy(np.concatenate(seqs).astype(np.float32, copy=False))[None],
                "packing": packing, "labels": torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))}


__all__ = ["HiddenSplit"]
