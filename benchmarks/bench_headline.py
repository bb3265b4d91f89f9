"""Benchmark 3: headline ``fedpeft simulate --clients 1000 --epsilon 2`` on the defaults.

Runs the CLI exactly as a user would (a fresh subprocess; user-level DP with the settings the
planner picks for these two flags — since issue 14 head-only on cached encoder features, every
client every round, 5 rounds, FedAdam — full Rotten Tomatoes test split evaluated every round;
the feature cache is whatever ``$FEDPEFT_CACHE_DIR`` holds: empty = a fresh machine) and
measures its wall time (target <= 300 s) and the peak memory of its whole process tree
(target <= 4 GiB): the CLI, Ray's gcs_server/raylet/helper processes and the
``ray::ClientAppActor`` workers, found as descendants of the CLI plus any process carrying
the run's tag in its environment (see ``common.TreeSampler``), sampled every 0.25 s.

    python benchmarks/bench_headline.py [--quick] [--out PATH]
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
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-headline-"))
    flags = ["--clients", "1000", "--epsilon", "2"]
    if args.quick:
        flags = ["--clients", "20", "--cohort", "2", "--rounds", "1", "--epsilon", "2",
                 "--max-client-examples", "8"]
    cmd = [FEDPEFT, "simulate", *flags, "--output", str(tmp / "run")]
    env, tag = bench_env()
    res = run_measured(cmd, env=env, tag=tag, log=tmp / "run.log")
    if res["returncode"] != 0:
        raise SystemExit(f"the run failed; log: {tmp / 'run.log'}")
    doc = json.loads((tmp / "run" / "results.json").read_text())
    payload = {
        "what": "fedpeft simulate " + " ".join(flags) + ": end-to-end wall time and process-tree peak memory",
        "flags": flags, **res, "final": doc["final"], "plan": doc.get("plan"),
        "rounds": [{k: r[k] for k in ("round", "clients_sampled", "eval_accuracy", "epsilon", "wall_s")}
                   for r in doc["rounds"]],
        "target_wall_s_max": 300, "target_peak_rss_gib_max": 4.0,
    }
    print(f"wall {res['wall_s']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB (PSS {res['peak_pss_gib']:.2f}), "
          f"accuracy {doc['final']['accuracy']}, epsilon {doc['final']['epsilon']}")
    return write_result("headline", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
