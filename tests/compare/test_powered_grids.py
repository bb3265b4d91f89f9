"""The committed grids of issue 25 load, name their baseline, have >= 5 seeds on the full test
split, and expand to the runs their estimated times were computed for; reproduce.sh runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedpeft.compare import load_experiment

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
#: name -> (runs, baseline, estimated or measured minutes stated in the config)
POWERED = {
    "ffa_lora_sample_dp_powered": (30, {"adapter": "lora"}, 46),
    "ffa_lora_sample_dp_powered_nodp": (10, {"adapter": "lora"}, 16),
    "lora_fair_powered": (100, {"strategy": "fedavg"}, 55),
    "compeft_powered": (5 + 4 * 4 * 5, {"compression": "none"}, 50),
    "dp_dylora_powered": (15, {"adapter": "lora"}, 51),
}


@pytest.mark.parametrize("name", sorted(POWERED))
def test_a_powered_grid_is_what_its_estimate_was_made_for(name):
    runs, baseline, minutes = POWERED[name]
    exp = load_experiment(EXPERIMENTS / f"{name}.toml")
    assert len(exp.runs()) == runs
    assert exp.baseline == baseline
    assert len(exp.grid["seed"]) >= 5
    assert all(r.cfg.max_test_examples >= 1281 for r in exp.runs())  # the whole held-out split
    text = (EXPERIMENTS / f"{name}.toml").read_text()
    assert re.search(rf"(Estimated|Measured) {minutes} min", text)


def test_compeft_grid_chooses_gamma_on_validation_per_density():
    exp = load_experiment(EXPERIMENTS / "compeft_powered.toml")
    assert exp.tune == {"gamma": [1.0, 2.0, 4.0, 8.0]} and exp.grid["density"] == [0.05, 0.1, 0.2, 0.5]
    assert {r.cfg.validation_fraction for r in exp.runs()} == {0.1}
    # uncompressed reads neither density nor gamma: one run per seed
    assert sum(r.cfg.compression == "none" for r in exp.runs()) == 5


def test_reproduce_sh_runs_the_powered_grids_by_default():
    script = (EXPERIMENTS / "reproduce.sh").read_text()
    default = re.search(r"^powered=\((.*?)\)", script, re.M).group(1).split()
    assert default == list(POWERED)
    for name, (_, _, minutes) in POWERED.items():
        assert f"[{name}]={minutes}" in script
    assert sum(m for _, _, m in POWERED.values()) <= 240  # the 4 h on 2 cores
