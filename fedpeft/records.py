"""Conversions between tensor states and Flower records, and real payload sizes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

State = dict[str, torch.Tensor]


def to_record(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """The record's arrays as tensors. A received record is untrusted: each array is parsed
    with :func:`array_of` (sizes checked before allocating), never with ``Array.numpy()``."""
    return {k: torch.from_numpy(array_of(a)) for k, a in record.items()}


def array_of(array: Array) -> np.ndarray:
    """A (writable, owned) copy of a Flower ``Array``'s ``.npy`` bytes.

    ``Array.numpy()`` is ``np.load`` on a BytesIO, which allocates the shape the ``.npy``
    header DECLARES before reading the data (numpy's ``read_array``): a few hundred bytes
    declaring 2e9 elements would allocate gigabytes (issue 24, finding 5). Here the header is
    parsed first and the declared element count times the item size must equal the bytes that
    follow it, so nothing larger than the received message is ever allocated; object dtypes
    (pickles) are refused.
    """
    from numpy.lib import format as npy

    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported array serialisation {array.stype!r}")
    data = memoryview(array.data)
    buf = io.BytesIO(data)
    version = npy.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = npy.read_array_header_2_0(buf)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    count = math.prod(shape)
    offset = buf.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise ValueError(f"array declares shape {shape} ({count} x {dtype.itemsize} bytes) but "
                         f"carries {len(data) - offset} bytes")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), copy=True, order="C")


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays (their ``.npy`` buffers as Flower ships them) plus keys."""
    return sum(len(arr.data) + len(key.encode()) for key, arr in record.items())
