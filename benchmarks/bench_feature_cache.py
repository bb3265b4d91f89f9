"""Benchmark 7: what computing the frozen part once saves (``--adapter head``).

A head-only client visit trains the classifier for ``--epochs`` local epochs on ``--examples``
rows. Uncached, every step runs the frozen encoder forward (no encoder backward: nothing below
the head needs grad); cached, the step reads the stored features (``fedpeft.data.features``).
Both are timed in this process on the same rows, alternating ``--repeats`` times, 1 torch
thread (what a Ray client actor uses); the one-time cost of computing the features of
``--feature-rows`` rows is timed too, and the break-even number of visits follows.

    python benchmarks/bench_feature_cache.py [--examples 12 --epochs 5 --repeats 5] [--quick] [--out PATH]
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
    ap.add_argument("--examples", type=int, default=12, help="rows per client visit (N=1000: ~11.5)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--feature-rows", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.feature_rows, args.epochs = 1, 64, 1

    import os

    import numpy as np
    import torch

    from fedpeft.adapters import AdapterSpec, build_adapter
    from fedpeft.config import RunConfig
    from fedpeft.data.features import FeatureSplit, split_features
    from fedpeft.data.sources import load_splits
    from fedpeft.data.tokenized import shuffled_batches, tokenize
    from fedpeft.model.feature_head import FeatureClassifier, head_dropout
    from fedpeft.model.loading import load_classifier, load_tokenizer
    from fedpeft.training.local import train_local

    torch.set_num_threads(1)
    cfg = RunConfig(adapter="head")
    splits = load_splits(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_fraction, cfg.max_test_examples)
    n = min(args.feature_rows, len(splits.train))
    split = tokenize(splits.train[cfg.text_column][:n], splits.train["label"][:n], load_tokenizer(cfg.model),
                     cfg.max_length)
    model = build_adapter("head", AdapterSpec()).inject(load_classifier(cfg.model, splits.num_labels, 0))
    with timer() as t_feat:
        feats = split_features(model, split, 0, 64)
    cached = FeatureSplit(feats, split.labels)
    head = FeatureClassifier(model.classifier, head_dropout(model))
    rows = np.arange(args.examples)
    state0 = {k: v.clone() for k, v in model.classifier.state_dict().items()}

    def visit(net, data) -> None:  # noqa: ANN001
        model.classifier.load_state_dict(state0)
        rng = np.random.default_rng(0)
        train_local(net, (shuffled_batches(data, rows, args.batch_size, rng, 0) for _ in range(args.epochs)), 0.03)

    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(args.repeats):
        for name, net, data in (("uncached", model, split), ("cached", head, cached)):
            with timer() as t:
                visit(net, data)
            times[name].append(t["cpu_s"])
    per_visit = {k: statistics.median(v) for k, v in times.items()}
    per_row_feature = t_feat["cpu_s"] / n
    saved = per_visit["uncached"] - per_visit["cached"]
    payload = {
        "config": {"examples_per_visit": args.examples, "epochs": args.epochs, "batch_size": args.batch_size,
                   "repeats": args.repeats, "feature_rows": n, "threads": 1},
        "load_average_before": os.getloadavg()[0],
        "visit_cpu_s": per_visit, "visit_cpu_s_all": times,
        "speedup_cpu": per_visit["uncached"] / per_visit["cached"],
        "feature_cpu_s_per_row": per_row_feature, "feature_wall_s": t_feat["wall_s"],
        # visits after which the one-time pass over all 11,527 train rows has paid for itself
        "break_even_visits_full_train": per_row_feature * 11_527 / saved if saved > 0 else None,
    }
    print(f"per visit: uncached {per_visit['uncached']:.3f} CPU-s, cached {per_visit['cached']:.4f} CPU-s "
          f"({payload['speedup_cpu']:.0f}x); features {per_row_feature * 1e3:.1f} ms/row once")
    return write_result("feature_cache", payload, args.out, args.quick)


if __name__ == "__main__":
    main()
