"""Benchmark 4: peak memory of ``fedpeft simulate`` at 1k, 10k and 100k clients, same cohort.

Each run is ``fedpeft simulate --clients N --cohort 10 --rounds 1 --max-client-examples 8``
(test split capped at 100 examples), a fresh subprocess whose whole process tree — driver,
Ray's gcs/raylet/helpers, and the client actors — is sampled every 0.5 s (see
``common.TreeSampler``: summed RSS, the conservative number, and summed PSS). The client
work is identical in size across N (about 10 clients x 8 examples), so any growth is what N
costs: Flower's simulation engine registers one in-memory node (with its Context) per
client, and fedpeft's discovery sends one query message to every node. The driver's share
of the peak (``rss_by_kind_at_peak_gib.driver``) shows where that state lives.
A run longer than ``--timeout`` seconds is stopped and recorded with what was measured.

target: peak RSS at 10k / peak RSS at 1k <= 1.2.

    python benchmarks/bench_scale_rss.py [--clients 1000 10000 100000] [--timeout 900] [--quick]
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
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--cohort", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-client-examples", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.cohort = [20, 40], 2
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-scale-"))
    (tmp / "job.toml").write_text("max-test-examples = 100\n")
    runs = []
    for n in args.clients:
        out = tmp / f"run-{n}"
        cmd = [FEDPEFT, "simulate", "--clients", str(n), "--cohort", str(args.cohort), "--rounds",
               str(args.rounds), "--max-client-examples", str(args.max_client_examples),
               "--config", str(tmp / "job.toml"), "--output", str(out)]
        env, tag = bench_env()
        res = run_measured(cmd, env=env, tag=tag, log=tmp / f"run-{n}.log", interval=0.5, timeout=args.timeout)
        res["clients"] = n
        res["timed_out"] = res["returncode"] != 0 and res["wall_s"] >= args.timeout
        results = out / "results.json"
        if results.exists():
            doc = json.loads(results.read_text())
            res["federation_wall_s"] = doc["final"]["wall_s"] if doc.get("final") else None
            res["clients_sampled"] = [r["clients_sampled"] for r in doc["rounds"]]
        res["log_tail"] = (tmp / f"run-{n}.log").read_text(errors="replace")[-600:]
        print(f"{n} clients: rc {res['returncode']}, {res['wall_s']:.0f} s, peak RSS {res['peak_rss_gib']:.2f} GiB, "
              f"PSS {res['peak_pss_gib']:.2f} GiB, driver {res['rss_by_kind_at_peak_gib'].get('driver', 0):.2f} GiB",
              flush=True)
        runs.append(res)
    by_n = {r["clients"]: r for r in runs}
    a, b = args.clients[0], args.clients[1] if len(args.clients) > 1 else args.clients[0]
    ok = all(by_n[k]["returncode"] == 0 for k in (a, b))
    payload = {
        "what": "peak process-tree memory of fedpeft simulate vs number of clients, same cohort and work",
        "config": {"cohort": args.cohort, "rounds": args.rounds, "max_client_examples": args.max_client_examples,
                   "max_test_examples": 100, "timeout_s": args.timeout},
        "runs": runs,
        "ratio_rss": by_n[b]["peak_rss_bytes"] / by_n[a]["peak_rss_bytes"] if ok else None,
        "ratio_pss": by_n[b]["peak_pss_bytes"] / by_n[a]["peak_pss_bytes"] if ok else None,
        "ratio_between": [a, b],
        "target_ratio_max": 1.2,
    }
    return write_result("scale_rss", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
