"""LoRA-FAIR against FedAvg on identical inputs: the first round in which FedAvg's product has an
error. Until then both strategies sent the same model (a round with one contributing client, or
none, has no aggregation error and nothing to correct), and without DP the seed fixes the cohorts
and the data, so in that round both servers aggregate the same client factors. There the ratio
LoRA-FAIR error / FedAvg error is the correction's effect alone, and its floor is
sqrt(share outside Ā's row space) (README, "Results files"); later rounds differ in their inputs.

    python experiments/fair_paired_round.py experiments/results/lora_fair_powered
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def _parse(name: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in name.split("__"))


def _rows(path: Path) -> list[dict]:
    return json.loads((path / "results.json").read_text())["rounds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid_dir", type=Path)
    args = ap.parse_args()
    runs = {d.name: d for d in (args.grid_dir / "runs").iterdir() if (d / "results.json").exists()}
    cells: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for name, path in sorted(runs.items()):
        keys = _parse(name)
        if keys.get("strategy") != "lora-fair":
            continue
        base = f"dataset={keys['dataset']}__dirichlet_alpha={keys['dirichlet_alpha']}__strategy=fedavg__seed={keys['seed']}"
        fair, fedavg = _rows(path), _rows(runs[base])
        for f, a in zip(fair, fedavg):
            if a.get("aggregation_error"):  # the first round FedAvg's product misses ΔW
                assert f["clients_sampled"] == a["clients_sampled"], (name, f["round"])
                ratio = f["aggregation_error"] / a["aggregation_error"]
                floor = math.sqrt(f["aggregation_error_outside_span"])
                cells.setdefault((keys["dataset"], keys["dirichlet_alpha"], keys["fair_solver"]), []).append(
                    (ratio, floor))
                break
    print("dataset, alpha, solver: LoRA-FAIR / FedAvg error in the first paired round (mean over seeds, "
          "min-max) | floor sqrt(share outside span)")
    for (ds, alpha, solver), pairs in cells.items():
        ratios, floors = [p[0] for p in pairs], [p[1] for p in pairs]
        print(f"{ds:<16} {alpha:<4} {solver:<6} {statistics.fmean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
              f"| floor {statistics.fmean(floors):.3f} ({min(floors):.3f}-{max(floors):.3f})  n={len(pairs)}")


if __name__ == "__main__":
    main()
