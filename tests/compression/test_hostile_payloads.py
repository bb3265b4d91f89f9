"""A received payload is hostile until checked (issue 24, finding 5).

A 105-byte compressed upload whose header declared 2e9 elements made the server allocate
~7.5 GiB (tracemalloc; ~570 MiB resident for 1.5e8): the codec trusted the header's element
count before comparing it with the layout the server expects. Every decoding layer on the
server's path is fed a crafted payload here and must refuse it with a clear error after
allocating less than 10 MB. The decoding runs in a subprocess (fresh tracemalloc, its own
peak RSS) under a 3 GiB data limit, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fedpeft.compression import build_codec, decode_payload

LIMIT = 10 * 2**20

_PROBE = textwrap.dedent(r'''
    import json, resource, struct, sys, tracemalloc, zlib
    cap = 3 << 30
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord
    from fedpeft.compression import build_codec, wire
    from fedpeft.records import from_record
    from fedpeft.pipeline import ServerContext
    from fedpeft.stages.compression import ErrorFeedbackCompression

    EXPECTED = {"w": (1000,)}            # what the server expects from this client
    glob = {"w": torch.zeros(1000)}
    stage = ErrorFeedbackCompression(build_codec("compeft"), "compeft")
    ctx = ServerContext(1, None, glob, EXPECTED)

    def container(header, body):
        h = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
        return b"FPC1" + struct.pack("<I", len(h)) + h + body

    def server_decode(payload):
        # the server's path: Flower record -> bytes -> the compression stage's decode
        record = wire.to_record(payload)
        return stage.decode(from_record(record), ctx)

    honest = build_codec("compeft").encode({"w": torch.randn(1000)})
    cases = {
        # the audit's payload: 2e9 elements declared, an empty sparse body
        "declares_2e9": container({"codec": "compeft", "keys": ["w"], "shapes": [[2000000000]],
                                   "dtypes": ["float32"]}, struct.pack("<fQQQ", 0.0, 0, 1, 0)),
        # the right layout, but the body declares 2^40 positions in 2^43 bits
        "body_counts": container({"codec": "compeft", "keys": ["w"], "shapes": [[1000]],
                                  "dtypes": ["float32"]}, struct.pack("<fQQQ", 1.0, 2**40, 1, 2**43)),
        # the lossless codec declaring 2e9 floats with 4 bytes of body
        "lossless_2e9": container({"codec": "none", "keys": ["w"], "shapes": [[2000000000]],
                                   "dtypes": ["float32"]}, b"\0" * 4),
    }
    # a zlib bomb as header: ~100 kB that inflate to 100 MB
    bomb = zlib.compress(b'{"codec":"compeft","keys":["' + b"a" * (100 << 20) + b'"]}', 9)
    cases["header_bomb"] = b"FPC1" + struct.pack("<I", len(bomb)) + bomb
    # a Flower array whose .npy header declares 2e9 float64 and carries none of them
    npy_array = Array(np.zeros(1, dtype=np.float64))
    hdr = b"{'descr': '<f8', 'fortran_order': False, 'shape': (2000000000,), }"
    hdr = hdr + b" " * (118 - len(hdr) - 1) + b"\n"
    npy_array.data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr

    server_decode(honest)                 # warm: imports and first-call allocations
    results = {}
    def measure(name, fn):
        tracemalloc.start()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            fn()
            error = None
        except BaseException as exc:       # noqa: BLE001 - report whatever happened
            error = f"{type(exc).__name__}: {exc}"
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[name] = {"error": error, "peak": peak,
                         "rss": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024,
                         "size": None}
    for name, payload in cases.items():
        measure(name, lambda: server_decode(payload))
        results[name]["size"] = len(payload)
    measure("npy_2e9", lambda: from_record(ArrayRecord({"w": npy_array})))
    results["npy_2e9"]["size"] = len(npy_array.data)
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, message", [
    ("declares_2e9", "expected (1000,)"),
    ("body_counts", "positions declared for 1000 elements"),
    ("header_bomb", "header"),
    ("lossless_2e9", "expected (1000,)"),
    ("npy_2e9", "declares shape (2000000000,)"),
])
def test_crafted_payload_is_refused_with_a_clear_error_and_under_10_mb(probe, case, message):
    r = probe[case]
    assert r["error"] is not None and r["error"].startswith("ValueError") and message in r["error"], r
    assert r["peak"] < LIMIT, f"{case}: tracemalloc peak {r['peak'] / 2**20:.1f} MiB"
    assert r["rss"] < LIMIT, f"{case}: peak RSS grew {r['rss'] / 2**20:.1f} MiB"


def test_the_audits_payload_is_105_bytes(probe):
    assert probe["declares_2e9"]["size"] == 105


def test_honest_payloads_still_decode_against_their_layout():
    update = {"a": torch.randn(40, 30), "b": torch.randn(30), "c": torch.randn(())}
    for name in ("compeft", "stc", "none"):
        codec = build_codec(name)
        got = decode_payload(codec.encode(update), expected={k: v.shape for k, v in update.items()})
        assert all(torch.equal(got[k], codec.compress(update)[k]) for k in update)
        with pytest.raises(ValueError, match="shape"):  # another client's (larger) layout
            decode_payload(codec.encode(update), expected={"a": (40, 31), "b": (30,), "c": ()})
        with pytest.raises(ValueError, match="keys"):
            decode_payload(codec.encode(update), expected={"a": (40, 30), "b": (30,)})
