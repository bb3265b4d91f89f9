"""Benchmark 1: overhead ratio = plain PyTorch loop time / ``fedpeft simulate`` wall time.

The job (default: 100 clients, cohort 10, 3 rounds, default model/adapter/data, test split
capped at ``--max-test-examples``) is run twice, back to back, each as a fresh subprocess
measured end to end (imports, model/data loading, training, evaluation, shutdown):

* ``fedpeft``: ``fedpeft simulate`` on the Ray backend (2 client actors x 1 torch thread on
  this 2-core host; the driver evaluates with 2 threads);
* ``plain``: this file's :func:`plain_job`: no Flower, no Ray — 2 ``multiprocessing`` worker
  processes x 1 torch thread (the same total cores as the 2 Ray actors), each building the
  workspace once, and a main process that samples, averages and evaluates. It does exactly
  the client training work of the fedpeft run: the same clients each round (fedpeft's own
  ``PoissonSampler`` over client ids, seed and rate), the same partitions (the workspace's
  ``Partitions``), the same per-client seed (``client_seed``), batches
  (``shuffled_batches``), optimizer and loop (``fedpeft.training.local.train_local``), and
  the same central evaluation after every round (``fedpeft.training.evaluate``) on the
  same test split with 2 threads.

ratio = plain wall / fedpeft wall (target >= 0.9). Process-tree CPU seconds are reported as
well: the host is shared, and CPU time is less sensitive to other jobs than wall time.

    python benchmarks/bench_overhead.py [--clients 100 --cohort 10 --rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, bench_env, run_measured, write_result  # noqa: E402

FEDPEFT = str(Path(PYTHON).with_name("fedpeft"))
_WS = None


def _job_cfg(args: argparse.Namespace):  # noqa: ANN202 - RunConfig
    from fedpeft.config import RunConfig

    return RunConfig(clients=args.clients, cohort=args.cohort, rounds=args.rounds,
                     max_test_examples=args.max_test_examples, max_client_examples=args.max_client_examples,
                     seed=args.seed)


def _init_worker(cfg) -> None:  # noqa: ANN001
    global _WS
    import torch

    from fedpeft.engine.workspace import get_workspace

    torch.set_num_threads(1)
    _WS = get_workspace(cfg)


def _train_one(task):  # noqa: ANN001, ANN202
    """One client's round, written out as plain PyTorch around fedpeft's data helpers."""
    import numpy as np
    import torch

    from fedpeft.data.tokenized import shuffled_batches
    from fedpeft.training.local import train_local

    cfg, client_id, server_round, broadcast = task
    ws = _WS
    rows = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed).indices(client_id)
    if cfg.max_client_examples:
        rows = rows[: cfg.max_client_examples]
    ws.adapter.load_state(ws.model, broadcast)
    rng = np.random.default_rng([cfg.seed, server_round, client_id])  # = client.client_seed
    torch.manual_seed(int(rng.integers(2**31)))
    epochs = (shuffled_batches(ws.train, rows, cfg.batch_size, rng, ws.pad_id) for _ in range(cfg.local_epochs))
    result = train_local(ws.model, epochs, cfg.lr)
    return ws.adapter.trainable_state(ws.model), len(rows), result.steps


def plain_job(args: argparse.Namespace) -> dict:
    import multiprocessing as mp

    import torch

    from fedpeft.data.tokenized import eval_batches
    from fedpeft.engine.sampling import PoissonSampler
    from fedpeft.privacy.randomness import SeededStreams
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.training.evaluate import evaluate

    t0 = time.perf_counter()
    cfg = _job_cfg(args)
    pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(cfg,))
    torch.set_num_threads(args.workers)
    ws = get_workspace(cfg)
    sampler = PoissonSampler(cfg.clients, cfg.cohort / cfg.clients, SeededStreams(cfg.seed))
    state = ws.initial_state
    rounds = []
    t_loop = time.perf_counter()
    for r in range(1, cfg.rounds + 1):
        ids = sampler.sample(r)
        outs = pool.map(_train_one, [(cfg, cid, r, state) for cid in ids], chunksize=1)
        total = sum(n for _, n, _ in outs)
        if total:
            state = {k: sum(s[k] * (n / total) for s, n, _ in outs) for k in state}
        ws.adapter.load_state(ws.model, state)
        ev = evaluate(ws.model, eval_batches(ws.test, 64, ws.pad_id))
        rounds.append({"round": r, "clients": len(ids), "examples": total,
                       "steps": sum(s for *_, s in outs), "accuracy": ev.accuracy})
    pool.close()
    pool.join()
    return {"rounds": rounds, "loop_s": time.perf_counter() - t_loop, "total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-test-examples", type=int, default=300)
    ap.add_argument("--max-client-examples", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="plain side: processes x 1 thread")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)  # internal: run the plain job
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.cohort, args.rounds, args.max_test_examples, args.max_client_examples = 4, 2, 1, 20, 16
    if args.plain_worker:
        Path(args.plain_worker).write_text(json.dumps(plain_job(args)))
        return None

    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-overhead-"))
    job = ["--clients", str(args.clients), "--cohort", str(args.cohort), "--rounds", str(args.rounds),
           "--max-client-examples", str(args.max_client_examples), "--seed", str(args.seed)]
    (tmp / "job.toml").write_text(f"max-test-examples = {args.max_test_examples}\n")  # config-file only key
    env, tag = bench_env()
    fed = run_measured([FEDPEFT, "simulate", *job, "--config", str(tmp / "job.toml"), "--output", str(tmp / "run")],
                       env=env, tag=tag, log=tmp / "fedpeft.log")
    env, tag = bench_env()
    plain = run_measured([PYTHON, str(Path(__file__).resolve()), *job, "--workers", str(args.workers),
                          "--max-test-examples", str(args.max_test_examples),
                          "--plain-worker", str(tmp / "plain.json")], env=env, tag=tag, log=tmp / "plain.log")
    if fed["returncode"] != 0 or plain["returncode"] != 0:
        raise SystemExit(f"a run failed; logs in {tmp}")
    res = json.loads((tmp / "run" / "results.json").read_text())
    inner = json.loads((tmp / "plain.json").read_text())
    fed_clients = [r["clients_sampled"] for r in res["rounds"]]
    plain_clients = [r["clients"] for r in inner["rounds"]]
    assert fed_clients == plain_clients, (fed_clients, plain_clients)
    payload = {
        "what": "plain PyTorch loop (2 processes x 1 thread, same clients/partitions/batches/eval) "
                "vs `fedpeft simulate` (Ray backend), both end-to-end subprocesses, back to back",
        "job": {"args": job, "max_test_examples": args.max_test_examples, "clients_per_round": fed_clients,
                "examples_per_round": [r["examples"] for r in inner["rounds"]],
                "steps_per_round": [r["steps"] for r in inner["rounds"]]},
        "fedpeft": {**fed, "final": res["final"], "round_wall_s": [r["wall_s"] for r in res["rounds"]],
                    "accuracy": [r["eval_accuracy"] for r in res["rounds"]]},
        "plain": {**plain, "inner": inner},
        "ratio_wall": plain["wall_s"] / fed["wall_s"],
        "ratio_tree_cpu": fed["tree_cpu_s"] and plain["tree_cpu_s"] / fed["tree_cpu_s"],
        "ratio_loop_only": inner["loop_s"] / res["final"]["wall_s"],
        "target_ratio_min": 0.9,
    }
    print(f"plain {plain['wall_s']:.1f} s, fedpeft {fed['wall_s']:.1f} s: ratio {payload['ratio_wall']:.3f} "
          f"(cpu {payload['ratio_tree_cpu']:.3f}, loop-only {payload['ratio_loop_only']:.3f})")
    return write_result("overhead", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
