"""Benchmark 6: achieved FLOP/s of client training / measured matmul FLOP/s of this machine.

FLOPs of one client training step (forward + backward of the default workspace model on a
batch of ``--batch-size`` rows, padded as the simulator pads) are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmul/attention FLOPs, the standard
convention; elementwise ops are not counted). The same step (plus the AdamW update, as in
:func:`fedpeft.training.local.train_local`) is then timed; achieved FLOP/s = FLOPs / step
time. The reference is a timed ``torch.mm`` of two ``--mm-size``² float32 matrices
(2n³ FLOPs) at the same torch thread count. Because the host is shared, rates are given
per wall second and per process-CPU second (1 thread: CPU time is not inflated by other
jobs' time slices); the ratio of the two CPU-second rates is the headline.

    python benchmarks/bench_flops.py [--threads 1 --steps 8] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timer, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mm-size", type=int, default=2048)
    ap.add_argument("--mm-repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.mm_size, args.mm_repeats = 2, 512, 2

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedpeft.config import RunConfig
    from fedpeft.data.tokenized import shuffled_batches
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.training.local import train_local

    torch.set_num_threads(args.threads)
    # matmul reference first (model not yet in cache: nothing else competing in-process)
    n = args.mm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    mm = []
    for _ in range(args.mm_repeats):
        with timer() as t:
            torch.mm(a, b)
        mm.append(t)
    mm_flops = 2 * n**3
    mm_wall = statistics.median(r["wall_s"] for r in mm)
    mm_cpu = statistics.median(r["cpu_s"] for r in mm)

    cfg = RunConfig(batch_size=args.batch_size)
    ws = get_workspace(cfg)
    rows = np.random.default_rng(0).choice(len(ws.train), args.steps * args.batch_size, replace=False)
    batches = list(shuffled_batches(ws.train, rows, args.batch_size, np.random.default_rng(1), ws.pad_id))
    state0 = {k: v.clone() for k, v in ws.adapter.trainable_state(ws.model).items()}

    flops = []
    ws.model.train()
    for batch in batches:
        counter = FlopCounterMode(display=False)
        with counter:
            ws.model(**batch).loss.backward()
        flops.append(counter.get_total_flops())
        ws.model.zero_grad(set_to_none=True)
    ws.model.eval()
    total_flops = sum(flops)
    train_local(ws.model, [batches[:1]], lr=cfg.lr)  # warm-up
    ws.adapter.load_state(ws.model, state0)
    with timer() as t:
        result = train_local(ws.model, [batches], lr=cfg.lr)
    ws.adapter.load_state(ws.model, state0)
    assert result.steps == len(batches)
    achieved_wall = total_flops / t["wall_s"]
    achieved_cpu = total_flops / t["cpu_s"]
    peak_wall, peak_cpu = mm_flops / mm_wall, mm_flops / mm_cpu
    payload = {
        "what": "FlopCounterMode FLOPs of client training steps / their time, vs timed torch.mm",
        "config": {"steps": args.steps, "batch_size": args.batch_size, "torch_threads": args.threads,
                   "mm_size": n, "mm_repeats": args.mm_repeats,
                   "mean_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in batches),
                   "mean_padded_width": statistics.mean(int(b["input_ids"].shape[1]) for b in batches)},
        "train_flops_per_step": total_flops / len(batches),
        "train_step_wall_s": t["wall_s"] / len(batches), "train_step_cpu_s": t["cpu_s"] / len(batches),
        "achieved_flops_per_wall_s": achieved_wall, "achieved_flops_per_cpu_s": achieved_cpu,
        "matmul_flops_per_wall_s": peak_wall, "matmul_flops_per_cpu_s": peak_cpu,
        "fraction_of_matmul_wall": achieved_wall / peak_wall,
        "fraction_of_matmul_cpu": achieved_cpu / peak_cpu,
    }
    print(f"train {achieved_cpu / 1e9:.1f} GFLOP/cpu-s vs mm {peak_cpu / 1e9:.1f}: "
          f"{payload['fraction_of_matmul_cpu']:.2f} (wall: {payload['fraction_of_matmul_wall']:.2f})")
    return write_result("flops", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
