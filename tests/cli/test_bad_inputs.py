"""Every out-of-range, unknown, contradictory or unreadable input: exit code 2, a one-line
message naming the value, and no output directory (issue: reliability)."""

from __future__ import annotations

import pytest

from fedpeft.cli import main

FLAGS = [
    (["--clients", "0"], "--clients 0"),
    (["--clients", "-5"], "--clients -5"),
    (["--clients", "ten"], "ten"),
    (["--cohort", "0"], "--cohort 0"),
    (["--clients", "10", "--cohort", "11"], "--cohort 11"),
    (["--rounds", "0"], "--rounds 0"),
    (["--local-epochs", "0"], "--local-epochs 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--lr", "0"], "--lr 0.0"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--adapter", "qlora"], "--adapter 'qlora'"),
    (["--rank", "0"], "--rank 0"),
    (["--rank", "4", "--min-rank", "5"], "--min-rank 5"),
    (["--alpha", "-1"], "--alpha -1.0"),
    (["--target-modules", ","], "--target-modules"),
    (["--strategy", "fedprox2"], "--strategy 'fedprox2'"),
    (["--partition", "zipf"], "--partition 'zipf'"),
    (["--fair-solver", "newton"], "--fair-solver 'newton'"),
    (["--fair-lambda", "-1"], "--fair-lambda -1.0"),
    (["--dirichlet-alpha", "-0.1"], "--dirichlet-alpha -0.1"),
    (["--model", "embedded:gpt5"], "embedded:gpt5"),
    (["--dataset", "/no/such/file.csv"], "/no/such/file.csv"),
    (["--dataset", "/etc/hostname"], "unsupported file type"),
    (["--max-length", "4"], "--max-length 4"),
    (["--epsilon", "0"], "--epsilon 0.0"),
    (["--epsilon", "-2"], "--epsilon -2.0"),
    (["--epsilon", "2", "--noise-multiplier", "1"], "alternatives"),
    (["--epsilon", "2", "--delta", "0.5"], "--delta 0.5"),
    (["--epsilon", "2", "--dp", "none"], "contradict --dp none"),
    (["--dp", "user"], "needs a budget"),
    (["--dp", "global", "--epsilon", "1"], "--dp 'global'"),
    (["--epsilon", "2", "--strategy", "lora-fair"], "lora-fair"),
    (["--epsilon", "2", "--clip", "0"], "--clip 0.0"),
    (["--epsilon", "2", "--accountant", "gdp"], "--accountant 'gdp'"),
    (["--noise-multiplier", "-1"], "--noise-multiplier -1.0"),
    (["--adaptive-clip"], "--adaptive-clip applies to --dp user"),
    (["--compression", "gzip"], "--compression 'gzip'"),
    (["--density", "0"], "--density 0.0"),
    (["--density", "1.5"], "--density 1.5"),
    (["--gamma", "0"], "--gamma 0.0"),
    (["--dropout", "1"], "--dropout 1.0"),
    (["--compress-down"], "allowed: --compression compeft or stc"),
    (["--deadline", "-1"], "--deadline -1.0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every -1"),
    (["--backend", "dask"], "--backend 'dask'"),
    (["--cpus-per-client", "0"], "--cpus-per-client 0.0"),
    (["--config", "/no/such.toml"], "/no/such.toml"),
    (["--bogus-flag", "1"], "bogus-flag"),
    (["--server-opt", "adam"], "--server-opt 'adam'"),
    (["--server-lr", "-1"], "--server-lr -1.0"),
    (["--server-opt", "fedadam", "--server-beta2", "1"], "--server-beta2 1.0"),
    (["--server-opt", "fedadam", "--strategy", "flora"], "--server-opt fedadam cannot drive"),
    (["--lora-layers", "x"], "--lora-layers 'x'"),
    (["--lora-layers", "9"], "layers 9 matches no module"),
    (["--insecure-reproducible-noise"], "applies to DP runs only"),
    (["--ray-address", "nonsense"], "--ray-address 'nonsense' is invalid"),
    (["--ray-address", "127.0.0.1:1"], "no Ray head answers there"),  # port 1: nothing listens
    (["--dataset", "synthetic:0"], "row count must be an integer"),
]

CONFIG_FILES = [
    ("clients = 0\n", "--clients 0"),
    ("clients = 'many'\n", "wrong type"),
    ("clients = 1.5\n", "wrong type"),
    ("adapter = 3\n", "wrong type"),
    ("compress-down = 'yes'\n", "wrong type"),
    ("cohort = true\n", "wrong type"),
    ("unknown-key = 1\n", "unknown key 'unknown-key'"),
    ("[section]\nclients = 1\n", "unknown key 'section'"),
    ("clients = \n", "not valid TOML"),
    ("epsilon = 2.0\nnoise-multiplier = 1.0\n", "alternatives"),
    ("strategy = 'nope'\n", "--strategy 'nope'"),
]


def _one_line_exit_2(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["simulate", *argv, "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_bad_flag(argv, needle, tmp_path, capsys):
    _one_line_exit_2(argv, needle, tmp_path, capsys)


@pytest.mark.parametrize("text,needle", CONFIG_FILES, ids=[t.strip() for t, _ in CONFIG_FILES])
def test_bad_config_file(text, needle, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _one_line_exit_2(["--config", str(path)], needle, tmp_path, capsys)


def test_unreadable_config_file(tmp_path, capsys):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00clients")
    _one_line_exit_2(["--config", str(path)], "not valid TOML", tmp_path, capsys)


def test_resume_missing_run_dir(capsys):
    assert main(["simulate", "--resume", "/no/such/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "/no/such/run" in err and len(err.splitlines()) == 1


def test_resume_refuses_extra_settings(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"config": {"clients": 4}}')
    code = main(["simulate", "--resume", str(run), "--rounds", "9"])
    assert code == 2 and "drop --rounds" in capsys.readouterr().err


def test_resume_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"config": {"clients": 4, "cohort": 2, "output": "%s"}}' % run)
    code = main(["simulate", "--resume", str(run)])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_compare_bad_file(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
