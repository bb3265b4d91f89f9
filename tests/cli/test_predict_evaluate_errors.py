"""Bad input to ``fedpeft predict`` / ``fedpeft evaluate``: exit code 2, a one-line message
naming the bad value, and nothing written. The run directories are fabricated: every check
happens before a model is loaded."""

from __future__ import annotations

import json

import pytest

from fedpeft.cli import main


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as far as the input checks look: results.json and model/ metadata."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "adapter_config.json").write_text("{}")
    (run / "model" / "config.json").write_text(json.dumps({"id2label": {"0": "rotten", "1": "fresh"}}))
    config = {"dataset": "rotten-tomatoes", "text_column": "text", "label_column": "label",
              "test_fraction": 0.1, "max_test_examples": 64}
    (run / "results.json").write_text(json.dumps({"config": config}))
    (tmp_path / "standalone").mkdir()  # a model directory outside any run
    (tmp_path / "standalone" / "adapter_config.json").write_text("{}")
    (tmp_path / "texts.csv").write_text("body,other\nfine film,x\n,y\n")
    (tmp_path / "texts.jsonl").write_text('{"body": "ok"}\nnot json\n')
    (tmp_path / "texts.txt").write_text("a text\n")
    (tmp_path / "labels.csv").write_text("text,label\n" + "".join(f"t{i},{'good' if i % 2 else 'bad'}\n" for i in range(20)))
    return run


PREDICT = [
    (["{tmp}/none", "text"], "does not exist"),
    (["{tmp}", "text"], "has no exported model"),
    (["{run}"], "no text to classify"),
    (["{run}", ""], "text 1 is empty"),
    (["{run}", "good", "   "], "text 2 is empty"),
    (["{run}", "--column", "body"], "--column 'body' needs --file"),
    (["{run}", "--file", "{tmp}/missing.csv"], "missing.csv' does not exist"),
    (["{run}", "--file", "{tmp}/texts.txt"], "unsupported file type '.txt'"),
    (["{run}", "--file", "{tmp}/texts.csv"], "--column 'text' is not a column"),
    (["{run}", "--file", "{tmp}/texts.csv", "--column", "nope"], "--column 'nope' is not a column"),
    (["{run}", "--file", "{tmp}/texts.csv", "--column", "body"], "text 2 is empty"),
    (["{run}", "--file", "{tmp}/texts.jsonl", "--column", "body"], "is not valid jsonl"),
    (["{run}", "a text"], "is not a loadable exported model"),
]

EVALUATE = [
    (["{tmp}/none"], "does not exist"),
    (["{tmp}"], "has no exported model"),
    (["{tmp}/standalone"], "not a fedpeft run directory"),
    (["{run}/model"], "is not a loadable exported model"),  # results.json found beside it; model broken
    (["{run}", "--split", "train"], "--split 'train'"),
    (["{run}", "--dataset", "/no/such.csv"], "/no/such.csv"),
    (["{run}", "--text-column", "body"], "no column 'body'"),
    (["{run}", "--dataset", "{tmp}/labels.csv", "--split", "all"], "labels bad, good that the model does not know"),
]


def _one_line_exit_2(argv, needle, run_dir, capsys):
    tmp = run_dir.parent
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code = main([a.format(tmp=tmp, run=run_dir) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert captured.out == ""
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("argv,needle", PREDICT, ids=[n for _, n in PREDICT])
def test_bad_predict_input(argv, needle, run_dir, capsys):
    _one_line_exit_2(["predict", *argv], needle, run_dir, capsys)


@pytest.mark.parametrize("argv,needle", EVALUATE, ids=[n for _, n in EVALUATE])
def test_bad_evaluate_input(argv, needle, run_dir, capsys):
    _one_line_exit_2(["evaluate", *argv], needle, run_dir, capsys)
