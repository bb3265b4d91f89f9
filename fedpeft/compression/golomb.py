"""Golomb coding of the positions of the entries a sparsifier keeps (SPEC §2.3).

ComPEFT (Yadav et al. 2023, arXiv 2311.13171, §3) sends the kept positions of a sparse
update Golomb-coded as *gaps*. If every entry is kept independently with probability
``p`` the gaps are geometric, ``P(g) = (1-p)^g p``, and Golomb's code with parameter

    b = ceil( log(2 - p) / -log(1 - p) )                    (Gallager & Van Voorhis 1975)

is the optimal prefix code for them; it spends within a few hundredths of a bit per gap
of the entropy ``H(p)/p``. A top-k mask of a random update is close to such a source.

Code of one gap ``n >= 0``: the quotient ``q = n // b`` in unary (``q`` ones, then a zero)
and the remainder ``r = n % b`` in truncated binary — with ``c = ceil(log2 b)`` and
``u = 2^c - b``, ``r < u`` takes ``c-1`` bits and ``r >= u`` takes ``c`` bits (it is written
as ``r + u``).

Layout (why it is not interleaved): the bits of all codewords are grouped into three
streams, concatenated and packed MSB-first:

1. all unary quotients, in order (``sum(q) + n`` bits);
2. the first ``c-1`` bits of every truncated-binary remainder (``n·(c-1)`` bits);
3. the one extra bit of those remainders that need ``c`` bits, in order.

This is a permutation of the bits of the classic interleaved Golomb stream — exactly the
same length, so the same bits per parameter — but both encoding and decoding become
whole-array numpy operations instead of a bit-serial loop: the ``n``-th zero ends stream
1, stream 2 is fixed width, and stream 3 is read in order for the entries whose prefix is
``>= u`` (the truncated-binary rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GolombCode:
    """A Golomb-coded, strictly increasing set of non-negative positions."""

    data: bytes  #: packed bits (MSB first), ``ceil(nbits / 8)`` bytes
    nbits: int  #: number of meaningful bits in ``data``
    count: int  #: number of positions coded
    b: int  #: Golomb parameter


def optimal_parameter(density: float) -> int:
    """Optimal Golomb parameter for gaps between Bernoulli(``density``) successes.

    ``b = ceil(log(2-p) / -log(1-p))``; ``b = 1`` for ``p >= (3 - sqrt 5)/2 ≈ 0.382``,
    where plain unary is optimal. ``density <= 0`` (nothing kept) returns 1.
    """
    p = float(density)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    if p <= 0.0 or p >= 1.0:
        return 1
    return max(1, math.ceil(math.log(2.0 - p) / -math.log1p(-p)))


def _remainder_layout(b: int) -> tuple[int, int]:
    """``(c - 1, u)`` of the truncated binary code for remainders in ``[0, b)``."""
    c = (b - 1).bit_length()  # ceil(log2 b) for b >= 1
    return max(c - 1, 0), (1 << c) - b


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Gaps ``n_0 = pos_0``, ``n_i = pos_i - pos_{i-1} - 1`` (all ``>= 0`` when increasing)."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.ndim != 1:
        raise ValueError("positions must be a 1-D array")
    if pos.size == 0:
        return pos.copy()
    gaps = np.diff(pos, prepend=np.int64(-1)) - 1
    if gaps.min() < 0:
        raise ValueError("positions must be non-negative and strictly increasing")
    return gaps


def code_length(positions: np.ndarray, b: int) -> int:
    """Bits the Golomb code of ``positions`` takes (without encoding them)."""
    gaps = gaps_of(positions)
    prefix_bits, u = _remainder_layout(b)
    r = gaps % b
    return int((gaps // b).sum() + gaps.size * (1 + prefix_bits) + (r >= u).sum() * (b > 1))


def encode(positions: np.ndarray, b: int) -> GolombCode:
    """Golomb-code strictly increasing non-negative integer positions with parameter ``b``."""
    if b < 1:
        raise ValueError(f"Golomb parameter must be >= 1, got {b}")
    gaps = gaps_of(positions)
    n = gaps.size
    q = gaps // b
    r = gaps - q * b
    prefix_bits, u = _remainder_layout(b)

    # Stream 1: unary quotients. Codeword i occupies [start_i, start_i + q_i]; its q_i
    # leading bits are ones and the last one is the terminating zero.
    unary_len = q + 1
    unary_end = np.cumsum(unary_len)
    n_unary = int(unary_end[-1]) if n else 0
    if b > 1:
        long_ = r >= u
        value = np.where(long_, r + u, r)  # long remainders are written as r + u in c bits
        n_extra = int(long_.sum())
    else:
        n_extra = 0
    nbits = n_unary + n * prefix_bits + n_extra
    bits = np.zeros(nbits, dtype=np.uint8)
    if n:
        n_ones = n_unary - n
        if n_ones:
            starts = unary_end - unary_len
            within = np.arange(n_ones, dtype=np.int64) - np.repeat(np.cumsum(q) - q, q)
            bits[np.repeat(starts, q) + within] = 1
    if b > 1 and n:
        # Stream 2: first c-1 bits of each remainder (MSB first), fixed width.
        head = np.where(long_, value >> 1, value)
        block = bits[n_unary:n_unary + n * prefix_bits].reshape(n, prefix_bits)
        for j in range(prefix_bits):
            block[:, j] = (head >> (prefix_bits - 1 - j)) & 1
        # Stream 3: the last bit of each long remainder.
        bits[n_unary + n * prefix_bits:] = value[long_] & 1
    return GolombCode(data=np.packbits(bits).tobytes(), nbits=nbits, count=n, b=b)


def decode(code: GolombCode, limit: int | None = None) -> np.ndarray:
    """Exact inverse of :func:`encode`: the sorted positions as ``int64``.

    The code's declared sizes are checked before they size anything (``ValueError``): at
    most ``len(data) · 8`` bits, at least one bit per position, ``1 <= b < 2^32``; with
    ``limit`` every position must be below it (and at most ``limit`` positions)."""
    n, b = code.count, code.b
    if not 1 <= b < 2**32:
        raise ValueError(f"corrupt Golomb stream: parameter {b} outside [1, 2^32)")
    if not 0 <= code.nbits <= 8 * len(code.data) or not 0 <= n <= code.nbits:
        raise ValueError(f"corrupt Golomb stream: {n} positions in {code.nbits} bits of "
                         f"{len(code.data)} bytes")
    if limit is not None and n > limit:
        raise ValueError(f"corrupt Golomb stream: {n} positions for {limit} elements")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(code.data, dtype=np.uint8), count=code.nbits)
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < n:
        raise ValueError("corrupt Golomb stream: too few unary terminators")
    ends = zeros[:n].astype(np.int64)  # position of each quotient's terminating zero
    q = np.diff(ends, prepend=np.int64(-1)) - 1
    n_unary = int(ends[-1]) + 1
    if b > 1:
        prefix_bits, u = _remainder_layout(b)
        block = bits[n_unary:n_unary + n * prefix_bits].reshape(n, prefix_bits).astype(np.int64)
        weights = np.left_shift(np.int64(1), np.arange(prefix_bits - 1, -1, -1, dtype=np.int64))
        head = block @ weights if prefix_bits else np.zeros(n, dtype=np.int64)
        long_ = head >= u
        extra = bits[n_unary + n * prefix_bits:].astype(np.int64)
        if extra.size != int(long_.sum()):
            raise ValueError("corrupt Golomb stream: remainder bits do not match")
        r = head.copy()
        r[long_] = (head[long_] << 1 | extra) - u
    else:
        if code.nbits != n_unary:
            raise ValueError("corrupt Golomb stream: trailing bits")
        r = np.zeros(n, dtype=np.int64)
    # q <= nbits and b < 2^32: a declared position is at most ~2^67; check in Python ints
    # before the int64 arithmetic could wrap around
    if int(q.sum()) * b + int(r.sum()) + n >= 2**62:
        raise ValueError("corrupt Golomb stream: positions out of range")
    gaps = q * b + r
    positions = np.cumsum(gaps + 1) - 1
    if limit is not None and positions.size and positions[-1] >= limit:
        raise ValueError("corrupt payload: position beyond the update's size")
    return positions
