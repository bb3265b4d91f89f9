"""Settings declared by their components (fedpeft.options): each is a real setting with a CLI
flag and a TOML key, and a bad value is refused with a one-line error naming the flag."""

from __future__ import annotations

import math

import pytest
import typer

from fedpeft.cli import app
from fedpeft.compression import CODECS
from fedpeft.config import RunConfig, normalize_keys
from fedpeft.errors import UsageError
from fedpeft.pipeline import STAGES
from fedpeft.settings import resolve
from fedpeft.strategy import STRATEGIES


def _declared():
    return [(f"{kind} {name}", option)
            for kind, registry in (("strategy", STRATEGIES), ("codec", CODECS), ("stage", STAGES))
            for name in registry.names() for option in getattr(registry.get(name), "options", ())]


def test_components_declare_their_own_settings():
    owners = {option.name: owner for owner, option in _declared()}
    assert owners["fair_solver"] == "strategy lora-fair" and owners["clip"] == "stage user-dp"
    assert owners["gamma"] == "codec compeft" and owners["sample_clip"] == "stage dp-sgd"


def test_every_declared_setting_has_a_field_a_cli_flag_and_a_toml_key():
    command = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    for owner, option in _declared():
        assert option.name in RunConfig.__dataclass_fields__, owner
        assert option.flag in flags, (owner, option.flag)
        default = getattr(RunConfig(), option.name)
        assert normalize_keys({option.flag[2:]: default}, "t.toml") == {option.name: default}
        assert option.valid(default), (owner, option.name)   # the defaults are allowed


@pytest.mark.parametrize("values, message", [
    ({"fair_solver": "adam"}, "--fair-solver 'adam' is invalid; allowed: sgd, ridge"),
    ({"fair_lambda": -1.0}, "--fair-lambda -1.0 is invalid; allowed: a finite number >= 0"),
    ({"density": 0.0, "compression": "stc"}, "--density 0.0 is invalid; allowed: a number in (0, 1]"),
    ({"gamma": math.inf}, "--gamma inf is invalid; allowed: a finite number > 0"),
    ({"clip": -0.5, "epsilon": 2.0}, "--clip -0.5 is invalid; allowed: a finite number > 0"),
    ({"target_quantile": 1.0}, "--target-quantile 1.0 is invalid; allowed: a number in (0, 1)"),
    ({"sample_clip": 0.0}, "--sample-clip 0.0 is invalid; allowed: a finite number > 0"),
])
def test_a_bad_component_setting_is_refused_even_when_the_component_is_not_selected(values, message):
    with pytest.raises(UsageError) as err:
        resolve(values)
    assert str(err.value) == message


def test_simulate_takes_every_run_option_in_table_order_and_passes_them_by_name(monkeypatch):
    """fedpeft.cli_options.RUN_OPTIONS is the one table of simulate's run flags: each is a
    RunConfig field, simulate's --help lists them in the table's order between --config and
    --resume, and a given flag reaches the command under its field name (None when not given)."""
    from fedpeft.cli_options import RUN_OPTIONS, with_run_options

    command = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    names = [p.name for p in command.params]
    assert names == ["config", *[name for name, *_ in RUN_OPTIONS], "resume", "verbose"]
    assert all(name in RunConfig.__dataclass_fields__ for name, *_ in RUN_OPTIONS)
    seen = {}

    def probe(config: str | None = typer.Option(None, "--config"), values: dict | None = None) -> None:
        seen.update(values, config=config)

    cli = typer.Typer()
    cli.command()(with_run_options(probe))
    cli.command("other")(lambda: None)  # two commands: typer then expects the command's name
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli, ["probe", "--clients", "7", "--dp", "user", "--config", "x.toml"])
    assert result.exit_code == 0, result.output
    assert seen["clients"] == 7 and seen["dp"] == "user" and seen["config"] == "x.toml"
    assert seen["rounds"] is None and len(seen) == len(RUN_OPTIONS) + 1
