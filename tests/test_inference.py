"""``fedpeft predict`` and ``fedpeft evaluate`` on a run's exported model."""

from __future__ import annotations

import csv
import json

import pytest

from fedpeft.cli import main

TINY = ["--backend", "inprocess", "--clients", "4", "--cohort", "2", "--rounds", "2", "--max-client-examples", "16",
        "--max-test-examples", "64", "--batch-size", "8"]
POSITIVE = ["A masterpiece: moving, funny and beautifully acted.", "One of the best films of the year, a joy to watch."]
NEGATIVE = ["Dull, boring and far too long; a complete waste of time."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-round LoRA run through the CLI (results.json + model/)."""
    run = tmp_path_factory.mktemp("inference") / "run"
    assert main(["simulate", *TINY, "--output", str(run)]) == 0
    return run


def test_evaluate_reproduces_the_reported_accuracy_and_loss(tiny_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run)]) == 0
    assert "accuracy" in capsys.readouterr().out
    saved = json.loads((tiny_run / "evaluations.json").read_text())["rotten-tomatoes [test]"]
    last = json.loads((tiny_run / "results.json").read_text())["rounds"][-1]
    assert saved["examples"] == 64
    assert saved["accuracy"] == pytest.approx(last["eval_accuracy"], abs=1 / 64 + 1e-9)
    assert saved["loss"] == pytest.approx(last["eval_loss"], abs=1e-4)


def test_evaluate_json_prints_the_result_and_writes_nothing(tiny_run, capsys, tmp_path):
    data = tmp_path / "reviews.csv"  # another dataset, labels by name
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([["review", "verdict"], *[[t, "fresh"] for t in POSITIVE],
                                  *[[t, "rotten"] for t in NEGATIVE]])
    before = sorted(p.name for p in tiny_run.iterdir())
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), "--dataset", str(data), "--text-column", "review",
                 "--label-column", "verdict", "--split", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 3 and result["split"] == "all" and 0 <= result["accuracy"] <= 1
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_predict_prints_one_label_and_probability_per_text(tiny_run, capsys, tmp_path):
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in NEGATIVE))
    capsys.readouterr()
    assert main(["predict", str(tiny_run / "model"), *POSITIVE, "--file", str(jsonl), "--column", "body"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == POSITIVE + NEGATIVE
    for line in lines:
        label, prob, _ = line.split("\t")
        assert label in ("rotten", "fresh") and 0.5 <= float(prob) <= 1.0
    assert main(["predict", str(tiny_run), POSITIVE[0], "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["text"] == POSITIVE[0] and only["label"] == lines[0].split("\t")[0]


def test_predict_labels_obvious_reviews_with_a_model_above_70_percent(tmp_path, capsys):
    """The head recipe (planning.RECIPES) on 600 Rotten Tomatoes snippets, labels by name
    (~25 s on 2 idle cores, most of it computing the encoder features)."""
    from fedpeft.data.embedded import EMBEDDED

    data = tmp_path / "reviews.csv"
    ds = EMBEDDED["rotten-tomatoes"]().shuffle(seed=11).select(range(600))
    names = ds.features["label"].names
    with data.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["text", "label"], *[[t, names[y]] for t, y in zip(ds["text"], ds["label"])]])
    run = tmp_path / "run"
    assert main(["simulate", "--backend", "inprocess", "--adapter", "head", "--dataset", str(data), "--clients", "10",
                 "--cohort", "10", "--rounds", "3", "--local-epochs", "5", "--lr", "0.03", "--server-opt", "fedadam",
                 "--server-lr", "0.1", "--output", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["final"]["accuracy"] >= 0.70
    capsys.readouterr()
    assert main(["predict", str(run), *POSITIVE, *NEGATIVE, "--json"]) == 0
    labels = [p["label"] for p in json.loads(capsys.readouterr().out)]
    assert labels == ["fresh"] * len(POSITIVE) + ["rotten"] * len(NEGATIVE)
