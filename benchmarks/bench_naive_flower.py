"""Benchmark 2: ``fedpeft simulate`` vs a naive Flower + Ray simulation of the same job.

The naive side is what a standard Flower tutorial app looks like: a ``ClientApp`` whose
``train`` handler builds everything it needs on every call — the tokenizer
(``AutoTokenizer.from_pretrained``), the backbone (``AutoModelForSequenceClassification``
from the same files) with a fresh peft LoRA injected, and the client's tokenised examples —
then loads the received arrays, trains, and replies. Like the Flower tutorials, the raw
dataset and the partitioner are cached at module level (``FederatedDataset`` is a global
there). Everything else is kept equal so that the difference is the per-call rebuild:
the same LoRA (r=8, query,value, head in modules_to_save), same training loop
(``fedpeft.training.local.train_local``, AdamW, batch 16, 1 epoch), only the trainable
tensors travel (a quickstart app that ships the whole ``state_dict`` would be slower
still), ``flwr.simulation.run_simulation`` with the same Ray backend config (2 actors x
1 CPU, 1 torch thread), Flower's own ``FedAvg`` strategy with a central ``evaluate_fn``
on the same test split every round, and the same number of clients per round as
fedpeft's Poisson draw (FedAvg is told that count each round; which nodes it picks is
Flower's random choice — iid partitions differ in size by at most one example).

speedup = naive wall / fedpeft wall (target >= 5), both end-to-end subprocesses, back to back.

    python benchmarks/bench_naive_flower.py [--clients 1000 --cohort 10 --rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, bench_env, run_measured, write_result  # noqa: E402

FEDPEFT = str(Path(PYTHON).with_name("fedpeft"))
_PARTS: dict = {}


def _naive_client_app():  # noqa: ANN202 - ClientApp
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import numpy as np
        import torch
        from transformers import AutoTokenizer

        from fedpeft.adapters import build_adapter
        from fedpeft.config import RunConfig
        from fedpeft.data.partition import Partitions
        from fedpeft.data.sources import load_splits
        from fedpeft.data.tokenized import shuffled_batches, tokenize
        from fedpeft.records import from_record, to_record
        from fedpeft.engine.workspace import adapter_spec
        from fedpeft.model.loading import load_classifier, resolve_model_path
        from fedpeft.training.local import train_local

        torch.set_num_threads(1)
        cfg = RunConfig.from_flat(dict(msg.content["config"]))
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        # module-level data cache, as in Flower's tutorials (their global FederatedDataset)
        splits = load_splits(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_fraction,
                             cfg.max_test_examples)
        if n not in _PARTS:
            _PARTS[n] = Partitions(splits.train, cfg.partition, n, "label", cfg.dirichlet_alpha, cfg.seed)
        rows = _PARTS[n].indices(pid)
        if cfg.max_client_examples:
            rows = rows[: cfg.max_client_examples]
        # the naive part: build tokenizer, model + adapter, and tokenise, on every call
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
        part = splits.train.select(rows)
        data = tokenize(part[cfg.text_column], part["label"], tokenizer, cfg.max_length)
        adapter = build_adapter(cfg.adapter, adapter_spec(cfg))
        model = adapter.inject(load_classifier(cfg.model, splits.num_labels, cfg.seed, cfg.pooling))
        adapter.load_state(model, from_record(msg.content["arrays"]))
        rng = np.random.default_rng([cfg.seed, int(msg.content["config"].get("server-round", 0)), pid])
        torch.manual_seed(int(rng.integers(2**31)))
        pad = tokenizer.pad_token_id or 0
        epochs = (shuffled_batches(data, np.arange(len(data)), cfg.batch_size, rng, pad)
                  for _ in range(cfg.local_epochs))
        result = train_local(model, epochs, cfg.lr)
        metrics = MetricRecord({"num-examples": len(data), "train-loss": result.mean_loss})
        return Message(RecordDict({"arrays": to_record(adapter.trainable_state(model)),
                                   "metrics": metrics}), reply_to=msg)

    return app


def naive_job(args: argparse.Namespace) -> dict:
    import os

    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedpeft.config import RunConfig
    from fedpeft.data.tokenized import eval_batches
    from fedpeft.records import from_record, to_record
    from fedpeft.engine.sampling import PoissonSampler
    from fedpeft.privacy.randomness import SeededStreams
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.simulation import quiet_environment
    from fedpeft.training.evaluate import evaluate

    quiet_environment()
    FLOWER_LOGGER.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    cfg = RunConfig(clients=args.clients, cohort=args.cohort, rounds=args.rounds, seed=args.seed,
                    max_test_examples=args.max_test_examples, max_client_examples=args.max_client_examples)
    sampler = PoissonSampler(cfg.clients, cfg.cohort / cfg.clients, SeededStreams(cfg.seed))
    counts = [len(sampler.sample(r)) for r in range(1, cfg.rounds + 1)]

    class SameCountFedAvg(FedAvg):
        """Flower's FedAvg, told how many nodes to sample each round (fedpeft's Poisson count)."""

        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
            self.fraction_train, self.min_train_nodes = 1e-12, counts[server_round - 1]
            return super().configure_train(server_round, arrays, config, grid)

    evals: list[dict] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ws = get_workspace(cfg)  # the server's model and test split, built once (standard)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            ws.adapter.load_state(ws.model, from_record(arrays))
            ev = evaluate(ws.model, eval_batches(ws.test, 64, ws.pad_id))
            evals.append({"round": server_round, "accuracy": ev.accuracy, "t": time.perf_counter() - t0})
            return MetricRecord({"accuracy": ev.accuracy, "loss": ev.loss})

        strategy = SameCountFedAvg(fraction_train=0.01, fraction_evaluate=0.0, min_available_nodes=cfg.clients)
        strategy.start(grid=grid, initial_arrays=to_record(ws.initial_state), num_rounds=cfg.rounds,
                       train_config=ConfigRecord(cfg.to_flat()), evaluate_fn=central)

    cpus = os.cpu_count() or 1
    backend_config = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                      "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                    "log_to_driver": False, "logging_level": logging.ERROR}}
    run_simulation(server_app=server_app, client_app=_naive_client_app(), num_supernodes=cfg.clients,
                   backend_config=backend_config)
    return {"clients_per_round": counts, "evals": evals, "total_s": time.perf_counter() - t0}


def _compare(args: argparse.Namespace, clients: int, tmp: Path) -> dict:
    """One back-to-back pair (fedpeft, then the naive app) at ``clients``."""
    job = ["--clients", str(clients), "--cohort", str(args.cohort), "--rounds", str(args.rounds),
           "--max-client-examples", str(args.max_client_examples), "--seed", str(args.seed)]
    (tmp / "job.toml").write_text(f"max-test-examples = {args.max_test_examples}\n")
    env, tag = bench_env()
    run_dir = tmp / f"run-{clients}"
    fed = run_measured([FEDPEFT, "simulate", *job, "--config", str(tmp / "job.toml"), "--output", str(run_dir)],
                       env=env, tag=tag, log=tmp / f"fedpeft-{clients}.log")
    env, tag = bench_env()
    naive = run_measured([PYTHON, str(Path(__file__).resolve()), *job, "--max-test-examples",
                          str(args.max_test_examples), "--naive-worker", str(tmp / f"naive-{clients}.json")],
                         env=env, tag=tag, log=tmp / f"naive-{clients}.log", timeout=args.timeout)
    if fed["returncode"] != 0:
        raise SystemExit(f"the fedpeft run failed; logs in {tmp}")
    res = json.loads((run_dir / "results.json").read_text())
    fed_counts = [r["clients_sampled"] for r in res["rounds"]]
    out = {"clients": clients, "job": {"args": job, "max_test_examples": args.max_test_examples,
                                       "clients_per_round": fed_counts},
           "fedpeft": {**fed, "final": res["final"], "round_wall_s": [r["wall_s"] for r in res["rounds"]],
                       "accuracy": [r["eval_accuracy"] for r in res["rounds"]]},
           "naive": dict(naive), "naive_finished": naive["returncode"] == 0}
    if naive["returncode"] == 0:
        inner = json.loads((tmp / f"naive-{clients}.json").read_text())
        assert fed_counts == inner["clients_per_round"], (fed_counts, inner)
        out["naive"]["inner"] = inner
    # a naive run stopped at the timeout still gives a lower bound on the speed-up
    out["speedup_wall"] = naive["wall_s"] / fed["wall_s"]
    out["speedup_is_lower_bound"] = naive["returncode"] != 0
    out["speedup_tree_cpu"] = naive["tree_cpu_s"] / fed["tree_cpu_s"] if fed["tree_cpu_s"] else None
    print(f"{clients} clients: naive {naive['wall_s']:.1f} s{' (stopped)' if out['speedup_is_lower_bound'] else ''}, "
          f"fedpeft {fed['wall_s']:.1f} s: speedup {out['speedup_wall']:.2f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-test-examples", type=int, default=300)
    ap.add_argument("--max-client-examples", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a naive run after this many seconds")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    ap.add_argument("--naive-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.cohort, args.rounds, args.max_test_examples, args.max_client_examples = [4], 2, 1, 20, 16
    if args.naive_worker:
        args.clients = args.clients[0]
        Path(args.naive_worker).write_text(json.dumps(naive_job(args)))
        return None
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-naive-"))
    runs = [_compare(args, n, tmp) for n in args.clients]
    payload = {
        "what": "naive Flower+Ray simulation (one SuperNode per client; ClientApp rebuilds tokenizer/model/"
                "adapter and tokenises each call) vs `fedpeft simulate` (virtual clients), same job, "
                "end-to-end subprocesses back to back",
        "runs": runs,
        "speedup_wall_by_clients": {str(r["clients"]): r["speedup_wall"] for r in runs},
        "target_speedup_min": 5.0,
    }
    return write_result("naive_flower", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
