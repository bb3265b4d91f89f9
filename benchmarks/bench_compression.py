"""Encode/decode time and real bits per parameter of the update codecs (SPEC §2.3).

A 1M-entry update (four LoRA-shaped float32 tensors, i.i.d. normal) is encoded at each
density with ComPEFT and STC; ``none`` is the 32-bit baseline. Times are the median of
``--repeats`` runs. Results go to ``benchmarks/results/compression.json``.

    python benchmarks/bench_compression.py [--repeats 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import struct
import time
from pathlib import Path

import numpy as np
import torch

from fedpeft.compression import build_codec, decode_payload, header_size

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
PAPER_BITS = {0.05: 0.339, 0.1: 0.576, 0.2: 0.939, 0.3: 1.19, 0.5: 1.5}  # ComPEFT, SPEC §2.3


def make_update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q.lora_A": (8, 50_000), "q.lora_B": (50_000, 8),
              "v.lora_A": (8, 12_500), "v.lora_B": (12_500, 8)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(codec_name: str, density: float | None, update: dict, repeats: int) -> dict:
    codec = build_codec(codec_name) if density is None else build_codec(codec_name, density=density)
    numel = sum(v.numel() for v in update.values())
    encode_s, payload = timed(lambda: codec.encode(update), repeats)
    decode_s, decoded = timed(lambda: decode_payload(payload), repeats)
    compress_s, dense = timed(lambda: codec.compress(update), repeats)
    assert all(torch.equal(decoded[k], dense[k]) for k in update), "decode(encode(x)) != compress(x)"
    header = header_size(payload)
    row = {
        "codec": codec_name, "density": density, "numel": numel,
        "payload_bytes": len(payload), "header_bytes": header,
        "bits_per_param": len(payload) * 8 / numel,
        "bits_per_param_excl_header": (len(payload) - header) * 8 / numel,
        "encode_s": encode_s, "decode_s": decode_s, "compress_s": compress_s,
    }
    if density is not None:
        _, count, b, nbits = struct.unpack_from("<fQQQ", payload, header)
        p = count / numel
        row.update({
            "kept": count, "golomb_b": b,
            "position_bits_per_param": nbits / numel, "sign_bits_per_param": count / numel,
            "entropy_bound_bits_per_param": float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)) + p),
            "paper_bits_per_param": PAPER_BITS.get(density),
            "fp16_ratio": 16 / row["bits_per_param"],
        })
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "compression.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    update = make_update()
    assert sum(v.numel() for v in update.values()) == 1_000_000
    rows = [bench("none", None, update, args.repeats)]
    for name in ("compeft", "stc"):
        rows += [bench(name, d, update, args.repeats) for d in DENSITIES]
    result = {
        "benchmark": "update codecs on a 1M-entry i.i.d. normal float32 update",
        "repeats": args.repeats,
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "torch": torch.__version__, "machine": platform.machine(),
                        "processor": platform.processor() or platform.machine()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'codec':8} {'density':>7} {'bits/param':>10} {'paper':>6} {'enc ms':>7} {'dec ms':>7}")
    for r in rows:
        print(f"{r['codec']:8} {r['density'] or '-':>7} {r['bits_per_param']:10.4f} "
              f"{r.get('paper_bits_per_param') or '-':>6} {1e3 * r['encode_s']:7.1f} {1e3 * r['decode_s']:7.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
