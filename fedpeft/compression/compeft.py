"""ComPEFT sparse-ternary compression and its STC variant (SPEC §2.3).

ComPEFT (Yadav et al. 2023, arXiv 2311.13171, §3): keep the top-k fraction ``density`` of
the entries of the WHOLE update ``τ`` (all tensors jointly) by magnitude, and replace each
kept entry by ``γ · σ(τ) · sign(τ)``, ``σ`` the standard deviation of the full update.
STC (Sattler et al. 2019, "sparse ternary compression") uses the mean magnitude of the
kept entries instead of ``γσ``.

What is sent per update: one float32 magnitude, the kept positions in the flattened
concatenation Golomb-coded as gaps (``golomb.py``) and one sign bit per kept entry. Body
layout (little endian)::

    f32 magnitude | u64 count | u64 Golomb b | u64 Golomb nbits | Golomb bytes | sign bytes

Conventions, fixed so a test can check them:

- ``k = floor(density · numel + 1/2)`` (round half up), clipped to ``[0, numel]``;
- ties in ``|τ|`` at the k-th magnitude are broken towards the lower flat index;
- ``σ`` is the population standard deviation (``ddof = 0``) of the full update, computed
  in float64, and ``γσ`` is rounded once to float32 — every kept entry is exactly that
  float32 with a sign, then cast to the tensor's dtype;
- a kept entry that is exactly 0 carries no sign, so it is dropped: the number of coded
  positions is ``min(k, nnz(τ))`` (an all-zero update codes nothing);
- ``density = 1`` keeps every non-zero entry (still ternarized); ``density = 0`` sends
  only the header and a zero magnitude.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from fedpeft.compression import golomb
from fedpeft.options import Option, positive
from fedpeft.compression.codec import CODECS, Codec

_BODY = struct.Struct("<fQQQ")


def kept_count(density: float, numel: int) -> int:
    """``k = round(density · numel)`` with halves rounded up, clipped to ``[0, numel]``."""
    return min(numel, max(0, math.floor(density * numel + 0.5)))


def top_k_positions(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest ``|flat|``; ties go to the lower index. O(n)."""
    n = flat.size
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    mag = np.abs(flat)
    threshold = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    keep = mag > threshold
    ties = np.flatnonzero(mag == threshold)[: k - int(keep.sum())]
    keep[ties] = True
    return np.flatnonzero(keep).astype(np.int64, copy=False)


@CODECS.register("compeft")
class ComPEFTCodec(Codec):
    """Top-k by magnitude over the whole update, kept entries ``±γσ(τ)``."""

    name = "compeft"
    options = (Option("density", lambda v: 0 < v <= 1, "a number in (0, 1]"), positive("gamma"))

    def __init__(self, density: float = 0.2, gamma: float = 1.0) -> None:
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        self.density = float(density)
        self.gamma = float(gamma)

    def magnitude(self, flat: np.ndarray, positions: np.ndarray) -> np.float32:
        """``γ · σ(τ)`` over the full update (population std), as float32."""
        if flat.size == 0:
            return np.float32(0.0)
        return np.float32(self.gamma * float(flat.std()))

    # -- the shared sparse-ternary core ------------------------------------------------
    def _select(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
        """``(positions, negative, magnitude)``: what the payload carries."""
        if not np.isfinite(flat).all():
            raise ValueError("cannot compress an update with NaN or infinite entries")
        positions = top_k_positions(flat, kept_count(self.density, flat.size))
        values = flat[positions]
        nonzero = values != 0
        positions, values = positions[nonzero], values[nonzero]
        return positions, values < 0, self.magnitude(flat, positions)

    @staticmethod
    def _dense(numel: int, positions: np.ndarray, negative: np.ndarray,
               magnitude: np.float32) -> np.ndarray:
        out = np.zeros(numel, dtype=np.float32)
        out[positions] = np.where(negative, -magnitude, magnitude).astype(np.float32)
        return out

    def _reconstruct(self, flat: np.ndarray) -> np.ndarray:
        return self._dense(flat.size, *self._select(flat))

    def _encode_body(self, flat: np.ndarray) -> bytes:
        positions, negative, magnitude = self._select(flat)
        p = positions.size / flat.size if flat.size else 0.0
        code = golomb.encode(positions, golomb.optimal_parameter(p))
        head = _BODY.pack(float(magnitude), code.count, code.b, code.nbits)
        return head + code.data + np.packbits(negative).tobytes()

    def _decode_body(self, body: memoryview, numel: int) -> np.ndarray:
        # every count the body declares is checked against numel (the expected layout's) and
        # against the bytes that are really there before it sizes anything
        if len(body) < _BODY.size:
            raise ValueError("corrupt payload: body shorter than its fixed header")
        magnitude, count, b, nbits = _BODY.unpack_from(body)
        if count > numel:
            raise ValueError(f"corrupt payload: {count} positions declared for {numel} elements")
        if not 1 <= b <= max(1, numel):
            raise ValueError(f"corrupt payload: Golomb parameter {b} outside [1, {max(1, numel)}]")
        start = _BODY.size
        code_bytes = (nbits + 7) // 8
        sign_bytes_needed = (count + 7) // 8
        if nbits < count or start + code_bytes + sign_bytes_needed != len(body):
            raise ValueError(f"corrupt payload: {nbits} code bits and {count} sign bits do not fit "
                             f"the {len(body)}-byte body")
        if not math.isfinite(magnitude):
            raise ValueError("corrupt payload: magnitude is not finite")
        code_end = start + code_bytes
        code = golomb.GolombCode(bytes(body[start:code_end]), nbits, count, b)
        positions = golomb.decode(code, limit=numel)
        sign_bytes = np.frombuffer(body[code_end:], dtype=np.uint8)
        negative = np.unpackbits(sign_bytes, count=count).astype(bool)
        return self._dense(numel, positions, negative, np.float32(magnitude))


@CODECS.register("stc")
class STCCodec(ComPEFTCodec):
    """Sparse ternary compression: kept entries ``±mean|kept entries|`` (``gamma`` unused)."""

    name = "stc"
    options = (Option("density", lambda v: 0 < v <= 1, "a number in (0, 1]"),)

    def magnitude(self, flat: np.ndarray, positions: np.ndarray) -> np.float32:
        if positions.size == 0:
            return np.float32(0.0)
        return np.float32(np.abs(flat[positions]).mean())
