"""Print the results table of ``benchmarks/README.md`` from ``benchmarks/results/*.json``.

    python benchmarks/make_table.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(d: Path, name: str) -> dict | None:
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _load_avg(doc: dict, side: str | None = None) -> str:
    la = (doc[side]["load_average_before"] if side else doc.get("load_average_before")
          or doc["machine"]["load_average"])
    return f"{la[0]:.1f}"


def rows(d: Path) -> list[tuple[str, str, str, str, str]]:
    out = []
    if (o := _load(d, "overhead")):
        r = o["ratio_wall"]
        out.append(("1. overhead: plain loop / `fedpeft simulate` (100 clients, cohort 10, 2 rounds)", ">= 0.9",
                    f"{r:.2f} (plain {o['plain']['wall_s']:.0f} s vs fedpeft {o['fedpeft']['wall_s']:.0f} s; "
                    f"tree CPU-s ratio {o['ratio_tree_cpu']:.2f})", "yes" if r >= 0.9 else "no",
                    _load_avg(o, "fedpeft")))
    if (n := _load(d, "naive_flower")):
        for r in n.get("runs", []):
            s = r["speedup_wall"]
            bound = "≥ " if r["speedup_is_lower_bound"] else ""
            out.append((f"2. naive Flower+Ray / fedpeft ({r['clients']:,} clients, cohort 10, 3 rounds)", ">= 5x",
                        f"{bound}{s:.2f}x (naive {r['naive']['wall_s']:.0f} s{' stopped' if bound else ''} vs "
                        f"fedpeft {r['fedpeft']['wall_s']:.0f} s)", "yes" if s >= 5 else "no",
                        _load_avg(r, "fedpeft")))
    if (h := _load(d, "headline")):
        out.append(("3a. headline `--clients 1000 --epsilon 2`: wall time", "<= 300 s",
                    f"{h['wall_s']:.0f} s", "yes" if h["wall_s"] <= 300 else "no", _load_avg(h)))
        out.append(("3b. headline: peak RSS of the process tree", "<= 4 GiB",
                    f"{h['peak_rss_gib']:.2f} GiB summed RSS ({h['peak_pss_gib']:.2f} GiB PSS)",
                    "yes" if h["peak_rss_gib"] <= 4 else "no", _load_avg(h)))
    if (s := _load(d, "scale")):
        runs = {r["clients"]: r for r in s["runs"]}
        first = s["runs"][0]["clients"]

        def _n(k: int) -> str:
            return f"{k // 1_000_000}M" if k >= 1_000_000 else f"{k // 1000}k"

        walls = "; ".join(f"{_n(k)}: {r['wall_s']:.0f} s" + ("" if r["returncode"] == 0 else " (failed)")
                          for k, r in runs.items())
        w = s["wall_ratio_vs_first"].get("100000")
        out.append((f"4a. wall 100k / {_n(first)} clients (`--cohort 20 --rounds 3`)", "<= 1.5",
                    f"{w:.2f} ({walls})" if w else f"n/a ({walls})", "yes" if w and w <= 1.5 else "no",
                    _load_avg(s["runs"][0])))
        big = runs.get(1_000_000)
        st = big.get("startup_s") if big else None
        out.append(("4b. start-up at 1M clients", "< 30 s",
                    f"{st:.1f} s (" + "; ".join(f"{_n(k)}: {r.get('startup_s', float('nan')):.1f} s" for k, r in runs.items()) + ")"
                    if st is not None else "n/a", "yes" if st is not None and st < 30 else "no", _load_avg(big) if big else "—"))
        rr = s["rss_ratio_vs_first"].get("1000000")
        mems = "; ".join(f"{_n(k)}: {r['peak_rss_gib']:.2f} GiB" for k, r in runs.items())
        out.append((f"4c. peak RSS 1M / {_n(first)} clients (same cohort)", "<= 1.2",
                    f"{rr:.2f} ({mems})" if rr else f"n/a ({mems})", "yes" if rr and rr <= 1.2 else "no",
                    _load_avg(s["runs"][0])))
    if (p := _load(d, "dp_step")):
        out.append(("5. DP-SGD step / non-private step (batch 16, 1 thread)", "<= 1.5",
                    f"{p['ratio_cpu']:.2f} CPU-s, {p['ratio_wall']:.2f} wall "
                    f"({p['results']['dp_sgd']['step_cpu_s']:.2f} vs {p['results']['plain']['step_cpu_s']:.2f} CPU-s/step)",
                    "yes" if max(p["ratio_cpu"], p["ratio_wall"]) <= 1.5 else "no", _load_avg(p)))
    if (f := _load(d, "flops")):
        out.append(("6. client-training FLOP/s / matmul FLOP/s (1 thread)", "(report)",
                    f"{f['fraction_of_matmul_cpu']:.2f} ({f['achieved_flops_per_cpu_s'] / 1e9:.0f} vs "
                    f"{f['matmul_flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-s; wall-based {f['fraction_of_matmul_wall']:.2f})",
                    "—", _load_avg(f)))
    if (c := _load(d, "feature_cache")):
        out.append(("7. head-only client visit: encoder every step / cached features (1 thread)", "(report)",
                    f"{c['speedup_cpu']:.0f}x ({c['visit_cpu_s']['uncached']:.3f} vs {c['visit_cpu_s']['cached']:.4f} "
                    f"CPU-s per visit of {c['config']['examples_per_visit']} rows x {c['config']['epochs']} epochs; "
                    f"features once: {c['feature_cpu_s_per_row'] * 1e3:.1f} ms/row)", "—",
                    f"{c['load_average_before']:.1f}"))
    if (pp := _load(d, "pfl_peer")):
        for name, cfg in pp["configs"].items():
            s, c = cfg["summary"], cfg["config"]
            p = s["pfl_median"]
            dp = f", ε {c['epsilon']:g}" if c.get("epsilon") else ""
            if "fedpeft_median" in s:  # the Ray-backend side
                f, reps = s["fedpeft_median"], len(cfg["fedpeft"])
                out.append((f"8{name}. pfl-research / fedpeft wall ({c['clients']} clients, cohort {c['expected_cohort']}, "
                          f"{c['rounds']} rounds{dp}; {reps} rep{'s' if reps > 1 else ''})", "(report)",
                          f"{s['pfl_over_fedpeft_wall']:.2f} (pfl {p['wall_s']:.0f} s vs fedpeft {f['wall_s']:.0f} s; "
                          f"CPU-s {s['pfl_over_fedpeft_cpu']:.2f}, RSS {p['peak_rss_gib']:.2f} vs {f['peak_rss_gib']:.2f} GiB; "
                          f"accuracy {p['final_accuracy']:.3f} vs {f['final_accuracy']:.3f})", "—",
                          "–".join(f"{x:.1f}" for x in (min(s["load_average_1min"]), max(s["load_average_1min"])))))
            for side in (k for k in s if k.startswith("fedpeft-")):  # further fedpeft sides (--backend)
                t, m = s[side], s[side]["median"]
                met = t["targets_met"]
                out.append((f"8{name}. fedpeft {side.removeprefix('fedpeft-')} / pfl-research wall, same run "
                            f"({len(cfg[side])} rep{'s' if len(cfg[side]) > 1 else ''})",
                            "≤ 0.75; memory ≤ pfl; own max/min ≤ 1.2",
                            f"{t['fedpeft_over_pfl_wall']:.2f} ({m['wall_s']:.0f} s vs pfl {p['wall_s']:.0f} s; CPU-s "
                            f"{m['tree_cpu_s']:.0f} vs {p['tree_cpu_s']:.0f}; RSS {m['peak_rss_gib']:.2f} vs "
                            f"{p['peak_rss_gib']:.2f} GiB, PSS {m['peak_pss_gib']:.2f} vs {p['peak_pss_gib']:.2f} GiB; max/min {t['wall_max_over_min']:.2f} (pfl "
                            f"{s['pfl_wall_max_over_min']:.2f}); accuracy {m['final_accuracy']:.3f} vs "
                            f"{p['final_accuracy']:.3f})",
                            "/".join("yes" if met.get(k, met.get("rss_le_pfl")) else "no"
                                     for k in ("wall_le_0.75x_pfl", "pss_le_pfl", "spread_le_1.2")),
                            "–".join(f"{x:.1f}" for x in (min(t["load_average_1min"]), max(t["load_average_1min"])))))
    if (ds := _load(d, "deploy_startup")):
        dep = ds["deployment"]
        if "warm" in dep:
            w = dep["warm"]["summary"]
            worst = w["train_overhead_max_s"]
            text = (f"max {worst:.1f} s (first message {w['train_overhead_building_mean_s']:.1f} s, "
                    f"later {w['train_overhead_cached_mean_s']:.1f} s)")
            if "subprocess" in dep:
                sp = dep["subprocess"]["summary"]
                text += (f" vs ≥ {min(sp['train_overhead_s']):.0f}–{max(sp['train_overhead_s']):.0f} s with a process "
                         f"per message; round {sp['round_wall_mean_s']:.1f} → {w['round_wall_mean_s']:.1f} s "
                         f"({ds['round_wall_ratio_subprocess_over_warm']:.1f}x)")
            loads = [x[0] for m in dep.values() for x in (m["load_average_before"], m["load_average_after"])]
            out.append(("9. real federation (3 SuperNodes + SuperLink on loopback, TLS): overhead per ClientApp "
                        "message", "<= 5 s", text, "yes" if worst <= 5 else "no",
                        f"{min(loads):.1f}–{max(loads):.1f}"))
    return out


def table(d: Path = RESULTS) -> str:
    lines = ["| benchmark | target | measured | met? | load avg (1 min) |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} | {g} |" for a, b, c, e, g in rows(d)]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS))
    print(table(Path(ap.parse_args().results)))
