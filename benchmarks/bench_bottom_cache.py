"""Benchmark 10: what computing the frozen bottom once saves (``--train-top-k k``, issue #23).

A client visit of the headline's shape (N = 1000 clients of the embedded Rotten Tomatoes data,
~11.5 rows each, batch 8, ``--epochs`` local epochs, LoRA r8 on query/value) is timed in this
process with 1 torch thread (what one pool worker uses) through fedpeft's own client code
(:func:`fedpeft.engine.client.train_client`) for:

* ``full``: LoRA on all 6 layers, the whole encoder every step (the default adapter);
* ``top{k}-uncached``: LoRA on the top k layers, the whole encoder forward every step;
* ``top{k}-cached``: LoRA on the top k layers on the cached input of layer L-k;
* ``…-bf16``: the same with ``--precision bf16`` (opt-in autocast; same workspace, other numerics).

Each configuration's workspace is built once (the cache build is timed separately: its
one-time cost per machine); visits alternate between configurations ``--repeats`` times on the
same ``--visits`` clients, and the median CPU seconds per visit are compared as ratios.

    python benchmarks/bench_bottom_cache.py [--visits 20 --repeats 3 --epochs 1] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timer, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--visits", type=int, default=20, help="client visits per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.visits, args.repeats = 2, 1

    import torch

    from fedpeft.config import RunConfig
    from fedpeft.engine.client import ClientRound, train_client
    from fedpeft.engine.workspace import _build
    from fedpeft.settings import validate

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    base = {"clients": 1000, "backend": "inprocess", "local_epochs": args.epochs}
    if args.quick:
        base.update(dataset="synthetic:400", clients=40, max_test_examples=16)
    configs = {"full": {}, "top1-uncached": {"train_top_k": 1, "bottom_cache": False},
               "top1-cached": {"train_top_k": 1}, "top2-uncached": {"train_top_k": 2, "bottom_cache": False},
               "top2-cached": {"train_top_k": 2}, "full-bf16": {"precision": "bf16"},
               "top1-cached-bf16": {"train_top_k": 1, "precision": "bf16"}}
    spaces, build_s = {}, {}
    for name, extra in configs.items():
        cfg = validate(RunConfig(**base, **extra))
        fp32_twin = name.removesuffix("-bf16")
        if fp32_twin != name:  # the precision changes training only: reuse the fp32 workspace
            spaces[name] = (cfg, spaces[fp32_twin][1])
            continue
        with timer() as t:
            spaces[name] = (cfg, _build(cfg))
        build_s[name] = {"wall_s": t["wall_s"], "cpu_s": t["cpu_s"], "phases": spaces[name][1].build_timings}
        assert spaces[name][1].cached_layers == (6 - extra["train_top_k"] if extra.get("bottom_cache", True)
                                                 and "train_top_k" in extra else 0), name
    state_dir = tempfile.mkdtemp(prefix="bench-bottom-")
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (cfg, ws) in spaces.items():
            with timer() as t:
                for client in range(args.visits):
                    train_client(ws, cfg, ClientRound(client, cfg.clients, 1, None), ws.initial_state, state_dir)
            times[name].append(t["cpu_s"] / args.visits)
    per_visit = {k: statistics.median(v) for k, v in times.items()}
    payload = {
        "config": {**base, "visits": args.visits, "repeats": args.repeats, "threads": 1, "adapter": "lora r8 query,value",
                   "batch_size": 8},
        "load_average_before": load_before,
        "visit_cpu_s": per_visit, "visit_cpu_s_all": times, "workspace_build": build_s,
        "speedup_vs_full": {k: per_visit["full"] / v for k, v in per_visit.items()},
        "speedup_vs_uncached_same_k": {f"top{k}": per_visit[f"top{k}-uncached"] / per_visit[f"top{k}-cached"]
                                       for k in (1, 2)},
        "speedup_bf16_vs_fp32": {k: per_visit[k] / per_visit[f"{k}-bf16"] for k in ("full", "top1-cached")},
        "load_average_after": os.getloadavg()[0],
    }
    for k, v in per_visit.items():
        print(f"{k:15s} {v:.4f} CPU-s per visit ({payload['speedup_vs_full'][k]:.2f}x vs full)")
    return write_result("bottom_cache", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
