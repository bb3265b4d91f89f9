"""The exported model (``<run>/model/``) loads with transformers + peft alone and reproduces the
run: the accuracy it reported and the logits its server evaluated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fedpeft.settings import resolve
from fedpeft.data.tokenized import collate
from fedpeft.export import replace_dir, saved_name, svd_factors
from fedpeft.engine.checkpoint import load_checkpoint
from fedpeft.engine.workspace import get_workspace
from fedpeft.results import ResultsWriter
from fedpeft.simulation import simulate

LOADER = Path(__file__).with_name("plain_peft_loader.py")
TINY = dict(backend="inprocess", clients=4, cohort=2, rounds=2, max_client_examples=16, max_test_examples=64,
            batch_size=8)
#: name -> settings; the head runs on a 240-row csv (its encoder features are computed up front)
VARIANTS = {"lora": {}, "ffa-lora": {"adapter": "ffa-lora"}, "flora": {"strategy": "flora"},
            "head": {"adapter": "head", "max_test_examples": 24}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_csv):
    """Each variant trained for 2 tiny rounds, then every export scored by one plain-peft process."""
    root = tmp_path_factory.mktemp("export")
    runs = {}
    for name, settings in VARIANTS.items():
        data = {"dataset": str(small_csv)} if settings.get("adapter") == "head" else {}
        # the final checkpoint holds the global state the server evaluated last
        cfg = resolve({**TINY, **settings, **data, "checkpoint_every": 2, "output": str(root / name)})
        simulate(cfg, [ResultsWriter(cfg.output)])
        ws = get_workspace(cfg)
        ws.adapter.load_state(ws.model, load_checkpoint(root / name).global_state)
        batch = collate(ws.test, np.arange(len(ws.test)), ws.pad_id)
        with torch.no_grad():
            reference = ws.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        examples = root / f"{name}.json"
        examples.write_text(json.dumps({"texts": list(ws.splits.test[cfg.text_column]),
                                        "labels": [int(x) for x in ws.test.labels]}))
        reported = json.loads((root / name / "results.json").read_text())["final"]["accuracy"]
        runs[name] = {"dir": root / name / "model", "examples": examples, "reference": reference,
                      "reported": reported}
    argv = [str(a) for r in runs.values() for a in (r["dir"], r["examples"])]
    out = subprocess.run([sys.executable, str(LOADER), *argv], capture_output=True, text=True, check=False,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for run, loaded in zip(runs.values(), json.loads(out.stdout)):
        run["loaded"] = loaded
    return runs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_plain_peft_reload_gives_the_reported_accuracy_and_logits(exported, name):
    run = exported[name]
    loaded = run["loaded"]
    assert loaded["fedpeft_imported"] is False
    assert abs(loaded["correct"] - round(run["reported"] * loaded["examples"])) <= 1
    torch.testing.assert_close(torch.tensor(loaded["logits"]), run["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lora", "ffa-lora", "flora"])
def test_exported_lora_is_not_a_no_op(exported, name):
    with safe_open(str(exported[name]["dir"] / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # safe_open is not a dict
        b_norm = sum(float(f.get_tensor(k).norm()) for k in keys if ".lora_B." in k)
    assert b_norm > 0  # the reload above only proves something if the LoRA changes the model


def test_export_layout_names_labels_pooling_and_truncation(exported):
    model = exported["lora"]["dir"]
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer_config.json",
            "README.md"} <= {p.name for p in model.iterdir()}
    config = json.loads((model / "config.json").read_text())
    assert config["id2label"] == {"0": "rotten", "1": "fresh"} and config["classifier_pooling"] == "mean"
    assert config["architectures"] == ["BertForTokenClassification"]
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and adapter["modules_to_save"] == ["classifier"]
    # the base by its name, not this machine's venv path (issue 24 #10)
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    for f in model.iterdir():
        assert "site-packages" not in f.read_text(errors="replace") and str(Path.home()) + "/" not in \
            f.read_text(errors="replace"), f.name
    assert json.loads((model / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert "PeftModel.from_pretrained" in (model / "README.md").read_text()
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".model")]  # no temp leftovers
    flora = json.loads((exported["flora"]["dir"] / "adapter_config.json").read_text())
    assert flora["lora_alpha"] == flora["r"]  # folded update at scale 1
    with safe_open(str(exported["flora"]["dir"] / "adapter_model.safetensors"), "pt") as f:
        assert "folds" in f.metadata()["fedpeft_note"]


def test_svd_factors_rebuild_a_low_rank_update_at_its_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    noisy = delta + 1e-12 * torch.randn(20, 16, generator=g, dtype=torch.float64)  # float rounding of a fold
    a, b = svd_factors(noisy)
    assert a.shape == (3, 16) and b.shape == (20, 3)
    torch.testing.assert_close((b @ a).double(), delta, atol=1e-5, rtol=1e-5)
    assert svd_factors(torch.zeros(4, 5, dtype=torch.float64))[0].shape == (0, 5)


def test_saved_names_follow_peft_and_rename_the_mean_pool_backbone():
    assert saved_name("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
                      ("bert", "roberta")) == "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight"
    assert saved_name("base_model.model.classifier.modules_to_save.default.bias", None) == \
        "base_model.model.classifier.bias"
    assert saved_name("classifier.weight", ("bert", "bert")) == "base_model.model.classifier.weight"


def test_replace_dir_keeps_the_old_model_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    replace_dir(out, lambda d: (d / "weights").write_text("old"))

    def half_written(d):
        (d / "weights").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_dir(out, half_written)
    assert (out / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    replace_dir(out, lambda d: (d / "weights").write_text("new"))
    assert (out / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_model_card_of_an_insecure_noise_run_claims_no_guarantee():
    """Issue 24 #10: an --insecure-reproducible-noise run's weights are not covered against anyone
    who knows the seed; its card must not say they are."""
    from fedpeft.export import HEAD_LAYOUTS, model_card

    insecure = resolve({**TINY, "epsilon": 2.0, "insecure_reproducible_noise": True})
    card = model_card(insecure, HEAD_LAYOUTS.get("mean"), "sentence-transformers/all-MiniLM-L6-v2", ["a", "b"], "")
    assert "NO privacy guarantee against anyone who knows the seed" in card
    assert "covered by the run's (ε, δ) guarantee" not in card
    secret = resolve({**TINY, "epsilon": 2.0})
    assert "covered by the run's (ε, δ) guarantee" in model_card(secret, HEAD_LAYOUTS.get("mean"), "x", ["a"], "")
    plain = resolve(TINY)
    assert "no privacy guarantee" in model_card(plain, HEAD_LAYOUTS.get("mean"), "x", ["a"], "")
