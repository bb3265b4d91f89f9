"""Carrying an encoded update inside Flower's record types.

The payload travels as ONE 1-D ``uint8`` array under :data:`WIRE_KEY` in the reply's
``ArrayRecord``, so the byte count Flower ships (and ``records.payload_bytes`` reports) is
the encoded size plus Flower's fixed per-array overhead (a 128-byte ``.npy`` header and
the key), not the dense float32 size. ``from_record`` of ``fedpeft.records``
turns it into a ``torch.uint8`` tensor, which :func:`from_wire` also accepts.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_KEY = "compressed-update"


def to_wire(payload: bytes) -> np.ndarray:
    """The payload bytes as a fresh 1-D ``uint8`` array."""
    return np.frombuffer(payload, dtype=np.uint8).copy()


def from_wire(array: np.ndarray | torch.Tensor) -> bytes:
    """Inverse of :func:`to_wire` (also for the ``uint8`` tensor ``from_record`` yields)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"a wire payload is a 1-D uint8 array, got {array.dtype} {array.shape}")
    return array.tobytes()


def to_record(payload: bytes) -> ArrayRecord:
    """An ``ArrayRecord`` holding only the payload (client upload side)."""
    return ArrayRecord({WIRE_KEY: Array(to_wire(payload))})


def is_compressed(record: ArrayRecord) -> bool:
    return WIRE_KEY in record


def from_record(record: ArrayRecord) -> bytes:
    """The payload carried by :func:`to_record` (server decode side; the ``.npy`` bytes are
    parsed with their declared size checked, :func:`fedpeft.records.array_of`)."""
    from fedpeft.records import array_of

    return from_wire(array_of(record[WIRE_KEY]))
