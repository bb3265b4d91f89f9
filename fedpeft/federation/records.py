"""Conversions between tensor states and Flower records, and real payload sizes."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

State = dict[str, torch.Tensor]


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays (their ``.npy`` buffers as Flower ships them) plus keys."""
    return sum(len(arr.data) + len(key.encode()) for key, arr in record.items())
