"""Benchmark 4: start-up, round time and peak memory of ``fedpeft simulate`` vs N clients.

Each run is exactly ``fedpeft simulate --clients N --cohort 20 --rounds 3`` (the issue's
command: embedded default model and data, full test split evaluated every round) in a fresh
subprocess whose whole process tree — driver, Ray's gcs/raylet, the client actors — is
sampled every 0.5 s (``common.TreeSampler``: summed RSS, the conservative number, and PSS).
The client work per round is the same in expectation at every N (20 clients; beyond ~11.5k
clients most of them have no rows of the embedded data and send zero updates, so the work
per round shrinks — the plan says so).

* start-up = process wall time − the rounds' own wall time (model/data load, Ray start,
  actor pool; independent of N with virtual clients, see federation/virtual_grid.py)
* rounds/s = rounds / their summed wall time

targets (issue #15): wall(100k) / wall(1k) <= 1.5; start-up at 1M < 30 s;
peak RSS(1M) / peak RSS(1k) <= 1.2.

    python benchmarks/bench_scale.py [--clients 1000 10000 100000 1000000] [--timeout 900] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, bench_env, run_measured, write_result  # noqa: E402

FEDPEFT = str(Path(PYTHON).with_name("fedpeft"))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    ap.add_argument("--cohort", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further fedpeft simulate flags, e.g. --extra --backend inprocess")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    extra = list(args.extra)
    if args.quick:
        args.clients, args.cohort, args.rounds = [20, 2000], 2, 1
        extra += ["--max-test-examples", "50", "--max-client-examples", "4"]
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    runs = []
    for n in args.clients:
        out = tmp / f"run-{n}"
        cmd = [FEDPEFT, "simulate", "--clients", str(n), "--cohort", str(args.cohort), "--rounds",
               str(args.rounds), "--output", str(out), *extra]
        env, tag = bench_env()
        res = run_measured(cmd, env=env, tag=tag, log=tmp / f"run-{n}.log", interval=0.5, timeout=args.timeout)
        res["clients"] = n
        res["timed_out"] = res["returncode"] != 0 and res["wall_s"] >= args.timeout
        results = out / "results.json"
        if results.exists():
            doc = json.loads(results.read_text())
            round_s = sum(r["wall_s"] or 0.0 for r in doc["rounds"])
            res["rounds_wall_s"] = [r["wall_s"] for r in doc["rounds"]]
            res["startup_s"] = res["wall_s"] - round_s
            res["rounds_per_s"] = len(doc["rounds"]) / round_s if round_s else None
            res["clients_sampled"] = [r["clients_sampled"] for r in doc["rounds"]]
            res["accuracy"] = doc["final"]["accuracy"] if doc.get("final") else None
        res["log_tail"] = (tmp / f"run-{n}.log").read_text(errors="replace")[-600:]
        print(f"{n} clients: rc {res['returncode']}, {res['wall_s']:.0f} s "
              f"(start-up {res.get('startup_s', float('nan')):.1f} s), peak RSS {res['peak_rss_gib']:.2f} GiB, "
              f"PSS {res['peak_pss_gib']:.2f} GiB, load {res['load_average_before'][0]:.1f}", flush=True)
        runs.append(res)
    by_n = {r["clients"]: r for r in runs}
    base, ok = args.clients[0], lambda k: k in by_n and by_n[k]["returncode"] == 0

    def ratio(k: int, key: str) -> float | None:
        return by_n[k][key] / by_n[base][key] if ok(k) and ok(base) else None

    payload = {
        "what": "fedpeft simulate --clients N --cohort C --rounds R: wall, start-up, rounds/s, peak tree memory",
        "config": {"cohort": args.cohort, "rounds": args.rounds, "extra": extra, "timeout_s": args.timeout},
        "runs": runs,
        "wall_ratio_vs_first": {str(k): ratio(k, "wall_s") for k in args.clients},
        "rss_ratio_vs_first": {str(k): ratio(k, "peak_rss_bytes") for k in args.clients},
        "pss_ratio_vs_first": {str(k): ratio(k, "peak_pss_bytes") for k in args.clients},
        "targets": {"wall_100k_over_1k_max": 1.5, "startup_1M_max_s": 30, "rss_1M_over_1k_max": 1.2},
    }
    return write_result("scale", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
