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

A payload from someone else is hostile until checked (issue 24, finding 5: a 105-byte payload
declaring 2e9 elements made the server allocate gigabytes). Decoding therefore takes the
layout the receiver EXPECTS for the sender (``expected``: key -> shape) and checks, before
anything is allocated from a declared size: the header decompresses to at most a bound
derived from that layout (``zlib`` with ``max_length``, never an unbounded inflate); the
header is well formed (unique string keys, non-negative integer dimensions, known dtypes);
its keys and shapes are exactly the expected ones. Only then does a codec read its body,
and each codec checks the body's own declared counts against the (now trusted) element
count and the body's real length (``compeft.py``, ``golomb.py``, ``lossless.py``).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedpeft.options import Option
from fedpeft.registry import Registry

State = dict[str, torch.Tensor]

MAGIC = b"FPC1"
_PREFIX = struct.Struct("<4sI")
#: Largest decompressed header accepted when no expected layout bounds it (1 MiB: a 400-tensor
#: peft update's header is ~50 kB).
MAX_HEADER_BYTES = 1 << 20
_MAX_CODEC_NAME = 64

#: What a receiver expects from one sender: key -> shape (e.g. the server's honest upload
#: layout for that client, :func:`fedpeft.layout.honest_upload_layout`).
ExpectedLayout = Mapping[str, Sequence[int]]

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
        # exact Python integers: a declared shape can never wrap around as an int64 product would
        return [math.prod(s) for s in self.shapes]

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
    def from_json(cls, header: Any) -> Layout:  # noqa: ANN401 - parsed JSON, checked here
        """The layout a header declares; ``ValueError`` unless it is well formed (a list of
        unique string keys, one shape of non-negative integers and one known dtype each)."""
        if not isinstance(header, dict):
            raise ValueError("corrupt compression payload header: not an object")
        keys, shapes, dtypes = header.get("keys"), header.get("shapes"), header.get("dtypes")
        if not (isinstance(keys, list) and isinstance(shapes, list) and isinstance(dtypes, list)
                and len(keys) == len(shapes) == len(dtypes)):
            raise ValueError("corrupt compression payload header: keys, shapes and dtypes do not match")
        if not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise ValueError("corrupt compression payload header: keys must be unique strings")
        for shape in shapes:
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise ValueError(f"corrupt compression payload header: bad shape {str(shape)[:80]}")
        bad = [d for d in dtypes if d not in _DTYPES]
        if bad:
            raise ValueError(f"corrupt compression payload header: unsupported dtype {str(bad[0])[:40]}")
        return cls(tuple(keys), tuple(tuple(s) for s in shapes), tuple(dtypes))

    def check_expected(self, expected: ExpectedLayout) -> None:
        """``ValueError`` unless this declared layout has exactly the keys and shapes of
        ``expected`` (key order and dtypes are the sender's choice)."""
        declared = dict(zip(self.keys, self.shapes))
        missing = sorted(set(expected) - set(declared))
        extra = sorted(set(declared) - set(expected))
        if missing or extra:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0][:80]!r}"
            raise ValueError(f"payload declares keys that are not the expected layout ({what})")
        for key, shape in declared.items():
            want = tuple(int(d) for d in expected[key])
            if shape != want:
                raise ValueError(f"payload declares {key}: shape {str(shape)[:80]} "
                                 f"({math.prod(shape)} elements), expected {want}")


def header_limit(expected: ExpectedLayout | None) -> int:
    """Largest decompressed header accepted for ``expected``: twice the size of an honest
    header for it (longest dtype name, a long codec name) plus 1 kB; without a layout,
    :data:`MAX_HEADER_BYTES`."""
    if expected is None:
        return MAX_HEADER_BYTES
    honest = {"codec": "x" * _MAX_CODEC_NAME, "keys": list(expected),
              "shapes": [[int(d) for d in s] for s in expected.values()],
              "dtypes": ["bfloat16"] * len(expected)}
    return 2 * len(json.dumps(honest, separators=(",", ":")).encode()) + 1024


def _inflate(data: memoryview, limit: int) -> bytes:
    """zlib-decompress ``data`` to at most ``limit`` bytes (``ValueError`` beyond: a
    decompression bomb never gets past ``limit`` bytes of memory)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
        if inflater.unconsumed_tail:
            raise ValueError(f"corrupt compression payload header: more than {limit} bytes decompressed")
        out += inflater.flush(1)
    except zlib.error as exc:
        raise ValueError(f"corrupt compression payload header: {exc}") from None
    if not inflater.eof or len(out) > limit:
        raise ValueError("corrupt compression payload header: truncated or oversized")
    return out


def pack(codec: str, layout: Layout, body: bytes) -> bytes:
    header = zlib.compress(json.dumps(layout.to_json(codec), separators=(",", ":")).encode(), 9)
    return _PREFIX.pack(MAGIC, len(header)) + header + body


def unpack(payload: bytes, expected: ExpectedLayout | None = None) -> tuple[str, Layout, memoryview]:
    """``(codec name, layout, body)`` of a payload; raises ``ValueError`` if not one, or if
    its declared layout is not ``expected`` (when given). Nothing is allocated from a size
    the payload declares: the header is inflated to at most :func:`header_limit` bytes."""
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise ValueError("not a fedpeft compression payload (too short)")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ValueError(f"not a fedpeft compression payload (magic {bytes(magic)!r})")
    start = _PREFIX.size
    if header_len > len(view) - start:
        raise ValueError("corrupt compression payload header: longer than the payload")
    try:
        header = json.loads(_inflate(view[start:start + header_len], header_limit(expected)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt compression payload header: {exc}") from None
    layout = Layout.from_json(header)
    codec = header.get("codec")
    if not (isinstance(codec, str) and len(codec) <= _MAX_CODEC_NAME):
        raise ValueError("corrupt compression payload header: no codec name")
    if expected is not None:
        layout.check_expected(expected)
    return codec, layout, view[start + header_len:]


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

    def decode(self, payload: bytes, expected: ExpectedLayout | None = None) -> State:
        """The update a payload carries. Pass ``expected`` (key -> shape) for every payload
        this process did not encode itself: its declared layout is checked against it before
        anything is allocated (``None`` trusts the payload's own sizes)."""
        name, layout, body = unpack(payload, expected)
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
        """Float32 dense vector of length ``numel`` from the body. ``numel`` is checked (the
        expected layout's); every count the body itself declares must be checked against it
        and against ``len(body)`` before it sizes an allocation."""

    @abstractmethod
    def _reconstruct(self, flat: np.ndarray) -> np.ndarray:
        """Float32 dense vector equal to ``_decode_body(_encode_body(flat))``."""


CODECS: Registry[type[Codec]] = Registry("compression codec")


def decode_payload(payload: bytes, *, expected: ExpectedLayout) -> State:
    """Decode a received payload (server side): the codec is named in its header, the layout
    must be ``expected`` (key -> shape the receiver expects from this sender), checked before
    anything is allocated."""
    name, _, _ = unpack(payload, expected)
    return CODECS.get(name)().decode(payload, expected)
