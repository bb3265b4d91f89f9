"""Bad values exit with code 2 and a one-line message; nothing is written."""

from __future__ import annotations

import pytest

from fedpeft.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "0"], "--clients 0"),
    (["--clients", "10", "--cohort", "11"], "--cohort 11"),
    (["--adapter", "nope"], "--adapter 'nope'"),
    (["--strategy", "nope"], "--strategy 'nope'"),
    (["--partition", "bogus"], "--partition 'bogus'"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--rounds", "0"], "--rounds 0"),
    (["--config", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
    (["--epsilon", "2", "--noise-multiplier", "1"], "alternatives"),
    (["--clients", "abc"], "abc"),
    (["--dirichlet-alpha", "0"], "--dirichlet-alpha 0.0"),
])
def test_bad_values_exit_2_with_one_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", *argv, "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_config_file_contents(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('clients = 5\nbogus-key = 1\n')
    code = main(["simulate", "--config", str(cfg), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "bogus-key" in err and len(err.strip().splitlines()) == 1
    cfg.write_text('clients = "many"\n')
    assert main(["simulate", "--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "wrong type" in capsys.readouterr().err


def test_cli_flag_overrides_config(tmp_path):
    from fedpeft.settings import resolve

    cfg = tmp_path / "c.toml"
    cfg.write_text('clients = 50\ncohort = 5\nlocal-epochs = 2\n')
    resolved = resolve({"clients": 40, "cohort": None}, str(cfg))
    assert (resolved.clients, resolved.cohort, resolved.local_epochs) == (40, 5, 2)


def test_existing_output_dir_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["simulate", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
