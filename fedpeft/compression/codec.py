"""The update codec interface, its ``--compression`` registry and the payload container.

A codec turns one update (``dict[str, Tensor]``, SPEC §2.3's ``τ``) into a real byte
string and back. Everything a decoder needs is inside the payload, so the server decodes
with :func:`decode_payload` without knowing which codec or options a client used.

Container (little endian)::

    b"FPC1" | u32 header length | header (zlib-compressed UTF-8 JSON) | codec body

The header holds the codec name, and the key names, shapes and dtypes of the update in
its (deterministic) key order. It is zlib-compressed because peft key names are long and
repetitive: for a RoBERTa-base q/v LoRA (49 tensors) the JSON is ~5 kB, ~15% of a
density-0.2 ComPEFT body, and ~0.3 kB compressed; the body is codec specific (see ``lossless.py``,
``compeft.py``). :meth:`Codec.compress` is, by contract, bit-identical to
``decode(encode(update))`` — the dense tensor the server will reconstruct — so a client
can compute its error-feedback residual without decoding its own payload.
"""

from __future__ import annotations

import json
import struct
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedpeft.options import Option
from fedpeft.registry import Registry

State = dict[str, torch.Tensor]

MAGIC = b"FPC1"
_PREFIX = struct.Struct("<4sI")

#: Floating dtypes an update may have (by their torch name without the ``torch.`` prefix).
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64,
    "float16": torch.float16, "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Layout:
    """Key order, shapes and dtypes of an update: what the flattened vector means."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, update: State) -> Layout:
        keys = tuple(update)
        dtypes = []
        for k in keys:
            name = str(update[k].dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise TypeError(f"update tensor {k!r} has unsupported dtype {update[k].dtype}")
            dtypes.append(name)
        return cls(keys, tuple(tuple(update[k].shape) for k in keys), tuple(dtypes))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, update: State) -> np.ndarray:
        """All tensors, in key order, as one float64 vector (exact for every dtype above)."""
        if not self.keys:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([
            update[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in self.keys
        ])

    def unflatten(self, flat: np.ndarray) -> State:
        """Split a float32 vector back into tensors of the original shapes and dtypes."""
        out: State = {}
        offset = 0
        for key, shape, dtype, size in zip(self.keys, self.shapes, self.dtypes, self.sizes):
            part = torch.from_numpy(np.array(flat[offset:offset + size], dtype=np.float32))
            out[key] = part.reshape(shape).to(_DTYPES[dtype])
            offset += size
        return out

    def to_json(self, codec: str) -> dict:
        return {"codec": codec, "keys": list(self.keys),
                "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}

    @classmethod
    def from_json(cls, header: dict) -> Layout:
        return cls(tuple(header["keys"]), tuple(tuple(s) for s in header["shapes"]),
                   tuple(header["dtypes"]))


def pack(codec: str, layout: Layout, body: bytes) -> bytes:
    header = zlib.compress(json.dumps(layout.to_json(codec), separators=(",", ":")).encode(), 9)
    return _PREFIX.pack(MAGIC, len(header)) + header + body


def unpack(payload: bytes) -> tuple[str, Layout, memoryview]:
    """``(codec name, layout, body)`` of a payload; raises ``ValueError`` if not one."""
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise ValueError("not a fedpeft compression payload (too short)")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not a fedpeft compression payload (magic {bytes(magic)!r})")
    start = _PREFIX.size
    try:
        header = json.loads(zlib.decompress(view[start:start + header_len]))
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"corrupt compression payload header: {exc}") from None
    return header["codec"], Layout.from_json(header), view[start + header_len:]


def header_size(payload: bytes) -> int:
    """Bytes of the container prefix + JSON header (the part that is not the code itself)."""
    _, header_len = _PREFIX.unpack_from(payload)
    return _PREFIX.size + header_len


class Codec(ABC):
    """Encodes one update to bytes and back (SPEC §2.3)."""

    name: ClassVar[str]
    #: The run settings passed to the constructor (:class:`fedpeft.options.Option`); a payload
    #: is decoded without them, so each must have a default.
    options: ClassVar[tuple[Option, ...]] = ()

    def encode(self, update: State) -> bytes:
        layout = Layout.of(update)
        return pack(self.name, layout, self._encode_body(layout.flatten(update)))

    def decode(self, payload: bytes) -> State:
        name, layout, body = unpack(payload)
        if name != self.name:
            raise ValueError(f"payload was encoded by codec {name!r}, not {self.name!r}")
        return layout.unflatten(self._decode_body(body, layout.numel))

    def compress(self, update: State) -> State:
        """The dense reconstruction the receiver gets: ``decode(encode(update))``, bit-exact."""
        layout = Layout.of(update)
        return layout.unflatten(self._reconstruct(layout.flatten(update)))

    # -- to implement ------------------------------------------------------------------
    @abstractmethod
    def _encode_body(self, flat: np.ndarray) -> bytes:
        """Body bytes for the float64 concatenation ``flat`` of the update."""

    @abstractmethod
    def _decode_body(self, body: memoryview, numel: int) -> np.ndarray:
        """Float32 dense vector of length ``numel`` from the body."""

    @abstractmethod
    def _reconstruct(self, flat: np.ndarray) -> np.ndarray:
        """Float32 dense vector equal to ``_decode_body(_encode_body(flat))``."""


CODECS: Registry[type[Codec]] = Registry("compression codec")


def decode_payload(payload: bytes) -> State:
    """Decode any payload: the codec is named in its header (server side)."""
    name, _, _ = unpack(payload)
    return CODECS.get(name)().decode(payload)
