"""Golomb coding of kept positions: optimal parameter, exact layout, round trips, speed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeft.compression import golomb


# -- an independent, bit-by-bit reference of the documented code ---------------------------
def reference_codewords(positions: list[int], b: int) -> list[tuple[str, str, str]]:
    """Per gap: (unary part, first c-1 remainder bits, extra bit or '') as bit strings.

    Written from the textbook definition (Golomb 1966; truncated binary remainder), one
    gap at a time, with Python ints and string formatting only.
    """
    words = []
    prev = -1
    c = math.ceil(math.log2(b)) if b > 1 else 0
    u = 2**c - b
    for pos in positions:
        n = pos - prev - 1
        prev = pos
        q, r = divmod(n, b)
        unary = "1" * q + "0"
        if b == 1:
            words.append((unary, "", ""))
        elif r < u:
            words.append((unary, format(r, f"0{c - 1}b") if c > 1 else "", ""))
        else:
            full = format(r + u, f"0{c}b")
            words.append((unary, full[:-1], full[-1]))
    return words


def reference_bytes(positions: list[int], b: int) -> tuple[bytes, int]:
    words = reference_codewords(positions, b)
    bits = "".join(w[0] for w in words) + "".join(w[1] for w in words) + "".join(w[2] for w in words)
    padded = bits + "0" * (-len(bits) % 8)
    return bytes(int(padded[i:i + 8], 2) for i in range(0, len(padded), 8)), len(bits)


def expected_gap_bits(p: float, b: int, terms: int = 20000) -> float:
    """E[codeword length] for geometric gaps P(n) = (1-p)^n p, by direct summation."""
    n = np.arange(terms)
    prob = (1 - p) ** n * p
    c = math.ceil(math.log2(b)) if b > 1 else 0
    u = 2**c - b
    r = n % b
    rbits = np.where(r < u, c - 1, c) if b > 1 else np.zeros_like(n)
    return float((prob * (n // b + 1 + rbits)).sum())


# -- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("p, b", [(0.05, 14), (0.1, 7), (0.2, 3), (0.3, 2), (0.5, 1), (0.01, 69)])
def test_optimal_parameter_matches_hand_computed_formula(p, b):
    # b = ceil(log(2-p) / -log(1-p)): e.g. p=0.2 -> 0.5878/0.2231 = 2.63 -> 3
    assert golomb.optimal_parameter(p) == b


@pytest.mark.parametrize("p", [0.02, 0.05, 0.1, 0.2, 0.3])
def test_optimal_parameter_minimises_expected_length_for_geometric_gaps(p):
    b = golomb.optimal_parameter(p)
    best = expected_gap_bits(p, b)
    for other in (b - 1, b + 1, 2 * b):
        if other >= 1:
            assert best <= expected_gap_bits(p, other) + 1e-12


def test_optimal_parameter_edge_densities():
    assert golomb.optimal_parameter(0.0) == 1
    assert golomb.optimal_parameter(1.0) == 1
    with pytest.raises(ValueError):
        golomb.optimal_parameter(1.5)


def test_hand_encoded_example():
    # positions 0,3,4,10 -> gaps 0,2,0,5; b=3: c=2, u=1.
    # unary: 0 | 0 | 0 | 10 ; remainders 0,2,0,2 -> '0', '11', '0', '11'
    # streams: "00010" + prefixes "0101" + extras "11" = 00010010 111(00000)
    code = golomb.encode(np.array([0, 3, 4, 10]), 3)
    assert code.nbits == 11
    assert code.data == bytes([0b00010010, 0b11100000])
    np.testing.assert_array_equal(golomb.decode(code), [0, 3, 4, 10])


@pytest.mark.parametrize("b", [1, 2, 3, 4, 5, 7, 8, 14, 100, 1024])
def test_layout_equals_bitwise_reference(b):
    rng = np.random.default_rng(b)
    positions = np.sort(rng.choice(5000, size=400, replace=False))
    data, nbits = reference_bytes(positions.tolist(), b)
    code = golomb.encode(positions, b)
    assert code.nbits == nbits == golomb.code_length(positions, b)
    assert code.data == data
    # same total length as the classic interleaved Golomb code
    assert nbits == sum(len("".join(w)) for w in reference_codewords(positions.tolist(), b))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("density", [0.001, 0.05, 0.2, 0.5, 0.9])
def test_round_trip_random_position_sets(seed, density):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20000))
    positions = np.flatnonzero(rng.random(n) < density)
    b = golomb.optimal_parameter(density)
    np.testing.assert_array_equal(golomb.decode(golomb.encode(positions, b)), positions)


@pytest.mark.parametrize("positions", [
    [], [0], [7], [10**9], [0, 1, 2, 3, 4], list(range(1000)), [5, 10**6, 10**6 + 1],
])
@pytest.mark.parametrize("b", [1, 2, 3, 64, 1000])
def test_round_trip_edge_cases(positions, b):
    pos = np.array(positions, dtype=np.int64)
    if pos.size and pos.max() // b > 2 * 10**6:
        pytest.skip("the unary quotient of this gap alone would take > 2M bits")
    code = golomb.encode(pos, b)
    assert code.count == len(positions)
    np.testing.assert_array_equal(golomb.decode(code), pos)


@pytest.mark.parametrize("bad", [[3, 3], [4, 2], [-1, 2]])
def test_rejects_positions_that_are_not_strictly_increasing_non_negative(bad):
    with pytest.raises(ValueError):
        golomb.encode(np.array(bad), 3)


def test_a_million_positions_round_trip_at_the_expected_code_length():
    # speed is benchmarks/bench_compression.py's job (encode_s/decode_s), not a unit test's
    rng = np.random.default_rng(0)
    positions = np.flatnonzero(rng.random(5_000_000) < 0.2)  # ~1M positions
    b = golomb.optimal_parameter(0.2)
    code = golomb.encode(positions, b)
    np.testing.assert_array_equal(golomb.decode(code), positions)
    # Golomb with truncated-binary remainders: gap g costs g // b + 1 unary bits, then
    # ceil(log2 b) - 1 bits if g % b < 2^ceil(log2 b) - b, else ceil(log2 b)
    gaps = np.diff(positions, prepend=-1) - 1
    k = int(np.ceil(np.log2(b)))
    short = (gaps % b) < (2**k - b)
    assert code.count == positions.size
    assert code.nbits == int((gaps // b + 1).sum() + np.where(short, k - 1, k).sum())
