"""Benchmark 5: DP-SGD (sample level) step time / non-private step time.

Same workspace model as ``fedpeft simulate`` (all-MiniLM-L6-v2 + LoRA r=8 on query,value +
head), same fixed batches of ``--batch-size`` (16) rows from the train split, padded like the
simulator pads them, 1 torch thread (what each Ray client actor uses). The private side is
fedpeft's own :func:`fedpeft.training.dp_sgd.train_local_dp` (Opacus GradSampleModule hooks +
DPOptimizer: per-example gradients, clipping, Gaussian noise, accountant hook); the
non-private side is :func:`fedpeft.training.local.train_local` (AdamW). Both are timed as
whole calls over the same ``--steps`` batches, alternating private/non-private ``--repeats``
times (so drifting host load hits both), and the medians are compared. Because the host is
shared, per-step process CPU time (1 thread: immune to time-slicing by other jobs) is
reported next to wall time.

    python benchmarks/bench_dp_step.py [--steps 8 --repeats 5] [--quick] [--out PATH]
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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (2 steps x 1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 2, 1

    import numpy as np
    import torch

    from fedpeft.config import RunConfig
    from fedpeft.data.tokenized import shuffled_batches
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.privacy.accounting import make_accountant
    from fedpeft.training.dp_sgd import grad_sample_module, release_grad_sample_module, train_local_dp
    from fedpeft.training.local import train_local

    torch.set_num_threads(args.threads)
    cfg = RunConfig(batch_size=args.batch_size)
    ws = get_workspace(cfg)
    rows = np.random.default_rng(0).choice(len(ws.train), args.steps * args.batch_size, replace=False)
    batches = list(shuffled_batches(ws.train, rows, args.batch_size, np.random.default_rng(1), ws.pad_id))
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    n_client = 115  # a default client's partition size (11,527 rows / 100 clients)
    q = args.batch_size / n_client
    state0 = {k: v.clone() for k, v in ws.adapter.trainable_state(ws.model).items()}

    def plain() -> None:
        train_local(ws.model, [batches], lr=cfg.lr)

    def private() -> None:
        train_local_dp(ws.model, [batches], lr=cfg.lr, noise_multiplier=1.0, sample_clip=1.0,
                       sample_rate=q, expected_batch_size=args.batch_size,
                       accountant=make_accountant("rdp"), generator=torch.Generator().manual_seed(0))

    def timed(fn) -> dict[str, float]:  # noqa: ANN001
        ws.adapter.load_state(ws.model, state0)
        if fn is private:  # wrap outside the timer: a worker wraps its model once
            grad_sample_module(ws.model)
        with timer() as t:
            fn()
        # Opacus' backward hooks stay registered while wrapped (disabled, but PyTorch still
        # routes every backward through them): unwrap so the plain side runs on a clean model
        release_grad_sample_module()
        return t

    timed(plain), timed(private)  # warm-up: allocator, Opacus wrapping (built once per worker)
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "dp_sgd": []}
    for _ in range(args.repeats):
        runs["plain"].append(timed(plain))
        runs["dp_sgd"].append(timed(private))

    def per_step(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name]) / args.steps

    res = {name: {"step_wall_s": per_step(name, "wall_s"), "step_cpu_s": per_step(name, "cpu_s"),
                  "runs": runs[name]} for name in runs}
    payload = {
        "what": "per-step time of sample-level DP-SGD (fedpeft.training.dp_sgd.train_local_dp, "
                "Opacus hooks + DPOptimizer) vs non-private AdamW (train_local) on the default model",
        "config": {"steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
                   "torch_threads": args.threads, "mean_tokens_per_batch": statistics.mean(tokens),
                   "noise_multiplier": 1.0, "sample_clip": 1.0, "adapter": cfg.adapter, "rank": cfg.rank,
                   "trainable_parameters": sum(v.numel() for v in state0.values())},
        "results": res,
        "ratio_wall": res["dp_sgd"]["step_wall_s"] / res["plain"]["step_wall_s"],
        "ratio_cpu": res["dp_sgd"]["step_cpu_s"] / res["plain"]["step_cpu_s"],
        "target_ratio_max": 1.5,
    }
    print(f"plain {res['plain']['step_wall_s']:.3f} s/step, DP-SGD {res['dp_sgd']['step_wall_s']:.3f} s/step: "
          f"ratio wall {payload['ratio_wall']:.2f}, cpu {payload['ratio_cpu']:.2f}")
    return write_result("dp_step", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
