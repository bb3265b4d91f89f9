"""Peer benchmark: ``fedpeft simulate`` vs Apple's pfl-research (``pfl``) on the same job.

The job: all-MiniLM-L6-v2 (the embedded default model) with masked mean pooling + LoRA r=8,
alpha 16 on query,value + the classification head, Rotten Tomatoes, iid clients, 1 local
epoch of AdamW at fedpeft's default client lr, batch 8, FedAvg, central evaluation of the
full test split after every round. Configurations:

    A  100 clients,  expected cohort 10, 3 rounds
    B  1000 clients, expected cohort 10, 3 rounds
    C  = B with user-level DP, epsilon 2, delta 1e-5 (fedpeft ``--epsilon 2``; pfl's central
       Gaussian mechanism with its RDP accountant), clip 0.5 (fedpeft's default)

fedpeft runs through its CLI (so a re-run picks up whatever fedpeft main has); pfl runs in
its own venv (``pfl==0.6.0`` pins dp-accounting 0.5.1, fedpeft pins 0.6.0) through
``pfl_peer_worker.py`` under ``torchrun --standalone --nproc_per_node 2`` (pfl's
multi-worker simulation: 2 processes x 1 torch thread, like fedpeft's 2 Ray actors x 1
thread). Before timing, the job is exported from fedpeft's workspace to a JSON file the pfl
side reads: model directory, train texts/labels, every client's rows (fedpeft's
``Partitions``), every round's cohort (fedpeft's seeded Poisson draw), the test split and
fedpeft's initial trainable tensors, so both sides train the same clients on the same rows
from the same initial adapter and are evaluated on the same examples. Under DP fedpeft runs
with ``--insecure-reproducible-noise`` so that its cohorts are the same seeded draw (the
flag changes where the randomness comes from, not the work); the pfl side uses them too.

Measured per run (end-to-end subprocess, imports and start-up included): wall time, CPU
seconds and peak RSS/PSS of the whole process tree (``common.run_measured``), final
accuracy, load average before/after. Sides alternate which goes first per repetition.

    python benchmarks/bench_pfl_peer.py --setup-venv     # once: pfl venv (~1 min, ~1.4 GB)
    python benchmarks/bench_pfl_peer.py                  # A, B, C x 3 repetitions
    python benchmarks/bench_pfl_peer.py --configs A --reps 1
    python benchmarks/bench_pfl_peer.py --quick          # A with 2 rounds, 1 repetition

The venv lives in ``$FEDPEFT_PFL_VENV`` (default ``~/.cache/fedpeft/pfl-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, bench_env, run_measured, write_result

FEDPEFT = str(Path(PYTHON).with_name("fedpeft"))
WORKER = Path(__file__).resolve().parent / "pfl_peer_worker.py"
PFL_VENV = Path(os.environ.get("FEDPEFT_PFL_VENV", Path.home() / ".cache" / "fedpeft" / "pfl-venv"))
#: what the pfl venv gets; torch first and pinned (an unpinned torch resolves to a CUDA build)
PFL_PINS = ("torch==2.13.0", "transformers==5.24.0", "peft==0.21.2")
PFL_PACKAGE = "pfl==0.6.0"


@dataclass(frozen=True)
class PeerConfig:
    name: str
    clients: int
    cohort: int
    rounds: int
    epsilon: float | None = None
    delta: float | None = None


CONFIGS = {
    "A": PeerConfig("A", 100, 10, 3),
    "B": PeerConfig("B", 1000, 10, 3),
    "C": PeerConfig("C", 1000, 10, 3, epsilon=2.0, delta=1e-5),
}


def pfl_python(venv: Path = PFL_VENV) -> Path:
    return venv / "bin" / "python"


def setup_venv(venv: Path = PFL_VENV) -> Path:
    """Create the pfl venv (idempotent): torch 2.13.0 first, then pfl with pins held."""
    py = pfl_python(venv)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(PFL_PINS) + "\n")
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(constraints)]
    subprocess.run([*pip, PFL_PINS[0]], check=True)
    subprocess.run([*pip, PFL_PACKAGE, *PFL_PINS[1:]], check=True)
    print(f"pfl venv ready: {py}")
    return py


def pfl_available(venv: Path = PFL_VENV) -> bool:
    py = pfl_python(venv)
    if not py.exists():
        return False
    probe = subprocess.run([str(py), "-c", "import pfl, torch, peft, transformers"], capture_output=True,
                           check=False)
    return probe.returncode == 0


# -- the job, exported from fedpeft's workspace ----------------------------------------------
def seeded_cohorts(sampler_cls: Any, clients: int, rate: float, streams: Any, rounds: int) -> list[list[int]]:
    """fedpeft's seeded Poisson cohorts (client ids) of rounds 1..``rounds``: the same draw as a
    ``fedpeft simulate`` without DP (or with ``--insecure-reproducible-noise``)."""
    try:  # virtual clients: PoissonSampler(num_clients, rate, streams), ids in O(cohort)
        sampler = sampler_cls(clients, rate, streams)
        return [list(sampler.sample(r)) for r in range(1, rounds + 1)]
    except TypeError:  # before: PoissonSampler(node_ids, rate, streams), one coin per node
        sampler = sampler_cls(list(range(clients)), rate, streams)
        return [list(sampler.sample(r)) for r in range(1, rounds + 1)]


def export_job(pc: PeerConfig, seed: int, out_dir: Path, max_client_examples: int = 0,
               max_test_examples: int = 2000) -> dict[str, Any]:
    """Write ``job.json`` + ``initial_state.pt`` for the pfl worker; return the job summary."""
    import torch

    from fedpeft.config import RunConfig
    from fedpeft.engine.sampling import PoissonSampler
    from fedpeft.engine.workspace import get_workspace
    from fedpeft.model.loading import resolve_model_path
    from fedpeft.privacy.randomness import SeededStreams
    from fedpeft.training.evaluate import evaluate  # noqa: F401 - the accuracy pfl reproduces

    cfg = RunConfig(clients=pc.clients, cohort=pc.cohort, rounds=pc.rounds, seed=seed, pooling="mean",
                    max_client_examples=max_client_examples, max_test_examples=max_test_examples)
    ws = get_workspace(cfg)
    parts = ws.partitions(cfg.partition, cfg.clients, cfg.dirichlet_alpha, cfg.seed)
    rows = []
    for c in range(cfg.clients):
        r = parts.indices(c)
        rows.append((r[: cfg.max_client_examples] if cfg.max_client_examples else r).tolist())
    rate = cfg.cohort / cfg.clients
    cohorts = seeded_cohorts(PoissonSampler, cfg.clients, rate, SeededStreams(cfg.seed), cfg.rounds)
    torch.save({k: v.detach().clone() for k, v in ws.initial_state.items()}, out_dir / "initial_state.pt")
    job = {
        "model_path": resolve_model_path(cfg.model), "max_length": cfg.max_length, "num_labels": ws.splits.num_labels,
        "rank": cfg.rank, "alpha": cfg.alpha, "target_modules": cfg.target_module_list, "seed": cfg.seed,
        "rounds": cfg.rounds, "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "eval_batch_size": 64, "torch_threads": 1,
        "train_texts": list(ws.splits.train[cfg.text_column]), "train_labels": [int(x) for x in ws.splits.train["label"]],
        "test_texts": list(ws.splits.test[cfg.text_column]), "test_labels": [int(x) for x in ws.splits.test["label"]],
        "client_rows": rows, "cohorts": cohorts, "initial_state_path": str(out_dir / "initial_state.pt"),
        "dp": pc.epsilon is not None, "epsilon": pc.epsilon, "delta": pc.delta, "clip": cfg.clip,
        "sample_rate": rate,
    }
    (out_dir / "job.json").write_text(json.dumps(job))
    test_labels = job["test_labels"]
    return {"lr": cfg.lr, "batch_size": cfg.batch_size, "local_epochs": cfg.local_epochs, "clip": cfg.clip,
            "max_client_examples": cfg.max_client_examples, "cohort_sizes": [len(c) for c in cohorts],
            "client_examples_in_cohorts": [sum(len(rows[c]) for c in co) for co in cohorts],
            "train_examples": len(job["train_labels"]), "test_examples": len(test_labels),
            "test_majority_rate": max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels),
            "trainable_parameters": sum(v.numel() for v in ws.initial_state.values())}


def fedpeft_cmd(pc: PeerConfig, seed: int, lr: float, out: Path, max_client_examples: int,
                max_test_examples: int, backend: str = "ray") -> list[str]:
    cmd = [FEDPEFT, "simulate", "--clients", str(pc.clients), "--cohort", str(pc.cohort), "--rounds", str(pc.rounds),
           "--adapter", "lora", "--rank", "8", "--alpha", "16", "--target-modules", "query,value",
           "--pooling", "mean", "--strategy", "fedavg", "--local-epochs", "1", "--batch-size", "8", "--lr", str(lr),
           "--max-client-examples", str(max_client_examples),
           "--max-test-examples", str(max_test_examples), "--seed", str(seed), "--output", str(out),
           "--backend", backend]  # explicit: the default (auto) is processes on Linux since 2026-11-30
    if pc.epsilon is not None:
        # --diagnostics: the realised cohorts and round times, which a DP run does not publish
        cmd += ["--epsilon", str(pc.epsilon), "--delta", str(pc.delta), "--accountant", "rdp",
                "--insecure-reproducible-noise", "--diagnostics"]
    return cmd


def pfl_cmd(job: Path, out: Path, workers: int, venv: Path = PFL_VENV) -> list[str]:
    py = str(pfl_python(venv))
    if workers <= 1:
        return [py, str(WORKER), str(job), str(out)]
    return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
            str(WORKER), str(job), str(out)]


def _pfl_env(workers: int) -> tuple[dict[str, str], str]:
    env, tag = bench_env({"OMP_NUM_THREADS": "1", "PFL_PYTORCH_DEVICE": "cpu"})
    env.pop("PYTHONPATH", None)  # the pfl venv must not see fedpeft's sources
    if workers <= 1:  # one process: give it both threads (the worker reads torch_threads)
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    return env, tag


def side_name(backend: str) -> str:
    """Result key of a fedpeft side: ``fedpeft`` (Ray backend, the key of earlier runs) or
    ``fedpeft-<backend>``."""
    return "fedpeft" if backend == "ray" else f"fedpeft-{backend}"


def run_fedpeft(pc: PeerConfig, seed: int, lr: float, tmp: Path, tag_name: str, mce: int,
                mte: int, backend: str = "ray") -> dict[str, Any]:
    out = tmp / f"{side_name(backend)}-{tag_name}"
    log = tmp / f"{side_name(backend)}-{tag_name}.log"
    env, tag = bench_env()
    res = run_measured(fedpeft_cmd(pc, seed, lr, out, mce, mte, backend), env=env, tag=tag, log=log)
    if res["returncode"] != 0:
        raise SystemExit(f"fedpeft run {tag_name} failed; log: {log}")
    doc = json.loads((out / "results.json").read_text())
    diagnostics = out / "diagnostics_NOT_COVERED_BY_DP.json"
    rounds = json.loads(diagnostics.read_text())["rounds"] if diagnostics.exists() else doc["rounds"]
    return {**res, "final_accuracy": doc["final"]["accuracy"],
            "accuracy": [r["eval_accuracy"] for r in rounds], "round_wall_s": [r["wall_s"] for r in rounds],
            "clients_sampled": [r["clients_sampled"] for r in rounds],
            "in_run_wall_s": doc["final"].get("wall_s"), "noise_multiplier": doc["final"].get("noise_multiplier"),
            "epsilon": doc["final"].get("epsilon"), "delta": doc["final"].get("delta")}


def fedpeft_source() -> str:
    """Where the fedpeft CLI's package comes from under the benchmark's environment (a worktree
    on ``PYTHONPATH`` wins over the venv's install): which code was measured."""
    env, _ = bench_env()
    probe = subprocess.run([PYTHON, "-c", "import fedpeft; print(fedpeft.__file__)"], env=env,
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() or probe.stderr.strip()[-200:]


def run_pfl(job: Path, tmp: Path, tag_name: str, workers: int) -> dict[str, Any]:
    out = tmp / f"pfl-{tag_name}.json"
    env, tag = _pfl_env(workers)
    if workers <= 1:
        doc = json.loads(job.read_text())
        doc["torch_threads"] = os.cpu_count() or 1
        job = tmp / "job-1proc.json"
        job.write_text(json.dumps(doc))
    res = run_measured(pfl_cmd(job, out, workers), env=env, tag=tag, cwd=tmp, log=tmp / f"pfl-{tag_name}.log")
    if res["returncode"] != 0 or not out.exists():
        raise SystemExit(f"pfl run {tag_name} failed; log: {tmp / f'pfl-{tag_name}.log'}")
    inner = json.loads(out.read_text())
    return {**res, "final_accuracy": inner["final_accuracy"], "accuracy": [e["accuracy"] for e in inner["evals"]],
            "round_wall_s": [e["round_s"] for e in inner["evals"]], "inner": inner}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


_KEYS = ("wall_s", "tree_cpu_s", "peak_rss_gib", "peak_pss_gib", "final_accuracy")


def side_summary(fed: list[dict[str, Any]], pfl: list[dict[str, Any]]) -> dict[str, Any]:
    """One fedpeft side against pfl: medians, per-repetition ratios and issue #15's targets
    (wall <= 0.75x pfl's, peak RSS <= pfl's, own max/min wall over the repetitions <= 1.2)."""
    walls = [f["wall_s"] for f in fed]
    # per-repetition ratios (the sides of a repetition ran back to back), then their median
    over_pfl_wall = statistics.median(f["wall_s"] / p["wall_s"] for f, p in zip(fed, pfl))
    over_pfl_rss = statistics.median(f["peak_rss_gib"] / p["peak_rss_gib"] for f, p in zip(fed, pfl))
    # PSS charges a page shared by k processes 1/k to each: the process tree's real memory.
    # Summed RSS counts it k times, so it overstates a forked pool (--backend processes),
    # whose workers share the driver's model pages, and pfl's workers' shared libraries alike
    over_pfl_pss = statistics.median(f["peak_pss_gib"] / p["peak_pss_gib"] for f, p in zip(fed, pfl))
    spread = max(walls) / min(walls)
    return {"median": {k: _median(fed, k) for k in _KEYS},
            "pfl_over_fedpeft_wall": statistics.median(p["wall_s"] / f["wall_s"] for f, p in zip(fed, pfl)),
            "pfl_over_fedpeft_cpu": statistics.median(p["tree_cpu_s"] / f["tree_cpu_s"] for f, p in zip(fed, pfl)),
            "pfl_over_fedpeft_rss": statistics.median(p["peak_rss_gib"] / f["peak_rss_gib"] for f, p in zip(fed, pfl)),
            "fedpeft_over_pfl_wall": over_pfl_wall, "fedpeft_over_pfl_rss": over_pfl_rss,
            "fedpeft_over_pfl_pss": over_pfl_pss,
            "wall_max_over_min": spread,
            "targets_met": {"wall_le_0.75x_pfl": over_pfl_wall <= 0.75, "rss_le_pfl": over_pfl_rss <= 1.0,
                            "pss_le_pfl": over_pfl_pss <= 1.0, "spread_le_1.2": spread <= 1.2},
            "load_average_1min": [r["load_average_before"][0] for r in fed]}


def summarise(fed: list[dict[str, Any]], pfl: list[dict[str, Any]],
              others: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """``fed``: the Ray-backend side (the fields of earlier runs keep their meaning); ``others``:
    further fedpeft sides by name (``fedpeft-inprocess``), each summarised under its name."""
    out: dict[str, Any] = {"pfl_median": {k: _median(pfl, k) for k in _KEYS}}
    sides = {**({"fedpeft": fed} if fed else {}), **(others or {})}
    for name, runs in sides.items():
        s = side_summary(runs, pfl)
        if name == "fedpeft":
            out["fedpeft_median"] = s.pop("median")
            out.update({k: s[k] for k in ("pfl_over_fedpeft_wall", "pfl_over_fedpeft_cpu", "pfl_over_fedpeft_rss")})
        out[name] = s
    out["pfl_wall_max_over_min"] = max(p["wall_s"] for p in pfl) / min(p["wall_s"] for p in pfl)
    out["load_average_1min"] = [r["load_average_before"][0] for runs in [*sides.values(), pfl] for r in runs]
    return out


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="A,B,C", help="comma-separated subset of A,B,C")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-for", default="", help="per-config repetitions overriding --reps, e.g. C=2")
    ap.add_argument("--rounds", type=int, default=None, help="override every config's rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-client-examples", type=int, default=0, help="cap per client (0 = all; smoke tests)")
    ap.add_argument("--max-test-examples", type=int, default=2000, help="test split cap (default: fedpeft's)")
    ap.add_argument("--pfl-workers", type=int, default=2, help="torchrun processes (1 = one process, 2 threads)")
    ap.add_argument("--fedpeft-backends", default="ray",
                    help="comma-separated fedpeft sides: ray (Ray actors, fedpeft's default), processes (forked "
                         "workers sharing one model) and/or inprocess (one process, all cores); every side runs "
                         "in every repetition")
    ap.add_argument("--quick", action="store_true", help="config A, 2 rounds, 1 repetition")
    ap.add_argument("--setup-venv", action="store_true", help="create/update the pfl venv and exit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.setup_venv:
        setup_venv()
        return None
    if not pfl_available():
        raise SystemExit(f"no usable pfl venv at {PFL_VENV}; create it with: "
                         f"python {Path(__file__).name} --setup-venv")
    if args.quick:
        args.configs, args.reps, args.rounds = "A", 1, args.rounds or 2
    names = [n.strip().upper() for n in args.configs.split(",") if n.strip()]
    backends = [b.strip() for b in args.fedpeft_backends.split(",") if b.strip()]
    reps_for = {k.strip().upper(): int(v) for k, v in (x.split("=") for x in args.reps_for.split(",") if x.strip())}
    if not backends or not set(backends) <= {"ray", "inprocess", "processes"}:
        raise SystemExit(f"--fedpeft-backends {args.fedpeft_backends!r}: allowed ray, inprocess, processes")
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-pflpeer-"))
    results: dict[str, Any] = {}
    for name in names:
        base = CONFIGS[name]
        pc = PeerConfig(base.name, base.clients, base.cohort, args.rounds or base.rounds, base.epsilon, base.delta)
        cdir = tmp / name
        cdir.mkdir()
        job = export_job(pc, args.seed, cdir, args.max_client_examples, args.max_test_examples)
        runs: dict[str, list[dict[str, Any]]] = {side_name(b): [] for b in backends}
        pfl_runs: list[dict[str, Any]] = []
        sides = [*(side_name(b) for b in backends), "pfl"]
        for rep in range(reps_for.get(name, args.reps)):
            # each side takes each position in turn (two sides: they alternate, as before)
            order = sides[rep % len(sides):] + sides[: rep % len(sides)]
            for side in order:
                if side != "pfl":
                    backend = "ray" if side == "fedpeft" else side.removeprefix("fedpeft-")
                    r = run_fedpeft(pc, args.seed, job["lr"], cdir, str(rep), args.max_client_examples,
                                    args.max_test_examples, backend)
                    runs[side].append(r)
                else:
                    r = run_pfl(cdir / "job.json", cdir, str(rep), args.pfl_workers)
                    pfl_runs.append(r)
                print(f"[{name} rep {rep}] {side:17s}: {r['wall_s']:6.1f} s wall, {r['tree_cpu_s']:6.1f} CPU-s, "
                      f"{r['peak_rss_gib']:.2f} GiB RSS, accuracy {r['final_accuracy']:.4f} "
                      f"(load {r['load_average_before'][0]:.1f})", flush=True)
        fed_runs = runs.get("fedpeft", [])
        first = next(iter(runs.values()))
        published = [c for c in first[0]["clients_sampled"] if c is not None]
        same_cohorts = (published == job["cohort_sizes"]) if published else None
        if same_cohorts is False:
            print(f"WARNING: fedpeft's cohorts {first[0]['clients_sampled']} differ from the exported "
                  f"{job['cohort_sizes']} (did fedpeft's sampler change?)", flush=True)
        results[name] = {"config": {"clients": pc.clients, "expected_cohort": pc.cohort, "rounds": pc.rounds,
                                    "epsilon": pc.epsilon, "delta": pc.delta},
                         "job": job, "same_cohort_sizes_checked": same_cohorts,
                         **runs, "pfl": pfl_runs,
                         "summary": summarise(fed_runs, pfl_runs, {k: v for k, v in runs.items() if k != "fedpeft"})}
        if name != names[-1]:  # a long run keeps what it measured so far
            write_result("pfl_peer", _payload(args, backends, reps_for, results, tmp), args.out, args.quick)
    _print_summary(results)
    return write_result("pfl_peer", _payload(args, backends, reps_for, results, tmp), args.out, args.quick)


def _payload(args: argparse.Namespace, backends: list[str], reps_for: dict[str, int], results: dict[str, Any],
             tmp: Path) -> dict[str, Any]:
    payload = {
        "what": "fedpeft simulate vs pfl-research (pfl 0.6.0, torchrun x2 gloo workers) on the same job: "
                "MiniLM-L6 + LoRA r8 query,value + mean-pool head, fedpeft's partitions/cohorts/initial adapter, "
                "end-to-end subprocesses back to back (the sides take turns going first); side 'fedpeft' = the Ray "
                "backend (fedpeft's default), 'fedpeft-inprocess' = --backend inprocess (one process, all cores), "
                "'fedpeft-processes' = --backend processes (forked workers sharing the driver's model)",
        "pfl_workers": args.pfl_workers, "reps": args.reps, "reps_for": reps_for, "fedpeft_backends": backends,
        "configs": results,
        "pfl_venv": str(PFL_VENV), "fedpeft_cli": FEDPEFT, "fedpeft_source": fedpeft_source(), "logs": str(tmp),
    }
    return payload


def _print_summary(results: dict[str, Any]) -> None:
    for name, r in results.items():
        s = r["summary"]
        print(f"{name}: pfl {s['pfl_median']['wall_s']:.1f} s / acc {s['pfl_median']['final_accuracy']:.3f}")
        for side in (k for k in s if k == "fedpeft" or k.startswith("fedpeft-")):
            t = s[side]
            med = s["fedpeft_median"] if side == "fedpeft" else t["median"]
            print(f"  {side}: {med['wall_s']:.1f} s / acc {med['final_accuracy']:.3f}; "
                  f"pfl/fedpeft wall {t['pfl_over_fedpeft_wall']:.2f}, CPU {t['pfl_over_fedpeft_cpu']:.2f}, "
                  f"RSS {t['pfl_over_fedpeft_rss']:.2f}, PSS 1/{t['fedpeft_over_pfl_pss']:.2f}; own max/min {t['wall_max_over_min']:.2f}; "
                  f"targets {t['targets_met']}")


if __name__ == "__main__":
    main()
