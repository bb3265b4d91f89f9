"""``--task causal-lm`` on a randomly initialised tiny Llama: answer-only labels, held-out loss
against plain transformers, training that lowers the loss, results files, adapters and DP,
and the refusals."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fedpeft.data.chat import IGNORE, collate_chats
from fedpeft.errors import UsageError
from fedpeft.engine.checkpoint import load_checkpoint
from fedpeft.engine.workspace import get_workspace
from fedpeft.results import ResultsWriter
from fedpeft.settings import resolve
from fedpeft.simulation import simulate


def _settings(tiny_lm, **kw):
    model, data = tiny_lm
    return {"task": "causal-lm", "model": str(model), "dataset": str(data), "backend": "inprocess", "clients": 3,
            "cohort": 3, "rounds": 2, "lr": 1e-2, "local_epochs": 2, "batch_size": 4, "max_client_examples": 0, **kw}


def _loss(ws, state, split):
    ws.adapter.load_state(ws.model, state)
    return ws.task.evaluate(ws.model, split, ws.pad_id)


def test_only_the_answer_tokens_carry_labels(tiny_lm):
    ws = get_workspace(resolve(_settings(tiny_lm)))
    tok_path = tiny_lm[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    for name, split, rows in (("train", ws.train, ws.splits.train), ("test", ws.test, ws.splits.test)):
        if "Say the number 3." in list(rows["prompt"]):
            index = list(rows["prompt"]).index("Say the number 3.")
            break
    batch = collate_chats(split, np.array([index]), ws.pad_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # written out by hand from the ChatML template of the tiny tokenizer
    assert tok.decode(ids[labels == IGNORE]) == "<|im_start|>user\nSay the number 3.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(labels[labels != IGNORE]) == "three<|im_end|>\n"
    assert torch.equal(labels[labels != IGNORE], ids[labels != IGNORE])


def test_initial_eval_loss_equals_plain_transformers_on_the_answer_tokens(tiny_lm):
    """fedpeft's batched, padded evaluation of the initial global model (LoRA B = 0) equals the
    mean cross-entropy of the answer tokens computed one chat at a time with plain
    transformers, the chat tokenised whole by the tokenizer's own apply_chat_template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = get_workspace(resolve(_settings(tiny_lm)))
    ev = _loss(ws, ws.initial_state, ws.test)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm[0]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm[0])
    nll, count = 0.0, 0
    for prompt, response in zip(ws.splits.test["prompt"], ws.splits.test["response"]):
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": response}], return_dict=False)
        assert full[: len(head)] == head
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[len(head) - 1: -1], ids[0, len(head):], reduction="sum"))
        count += len(full) - len(head)
    assert ev.tokens == count and ev.examples == len(ws.splits.test)
    assert ev.loss == pytest.approx(nll / count, abs=1e-5)


def test_two_rounds_lower_the_training_loss_and_report_perplexity(tiny_lm, tmp_path):
    cfg = resolve(_settings(tiny_lm, output=str(tmp_path / "run"), checkpoint_every=2))
    out = simulate(cfg, [ResultsWriter(cfg.output)])
    ws = get_workspace(cfg)
    trained = load_checkpoint(tmp_path / "run").global_state
    before, after = _loss(ws, ws.initial_state, ws.train), _loss(ws, trained, ws.train)
    assert after.loss < before.loss - 0.1, (before.loss, after.loss)
    # what the run reports is the held-out evaluation of that model
    assert out.rounds[-1].eval_loss == pytest.approx(_loss(ws, trained, ws.test).loss, abs=1e-6)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in results["rounds"]:
        assert r["eval_accuracy"] is None and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert results["final"]["perplexity"] == pytest.approx(math.exp(results["final"]["eval_loss"]))
    assert results["final"]["accuracy"] is None and results["config"]["task"] == "causal-lm"
    with (tmp_path / "run" / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["eval_perplexity"]) == pytest.approx(results["rounds"][-1]["eval_perplexity"])


def test_the_cli_summary_prints_loss_and_perplexity(tiny_lm, tmp_path, capsys):
    from fedpeft.cli import main

    model, data = tiny_lm
    code = main(["simulate", "--task", "causal-lm", "--model", str(model), "--dataset", str(data), "--backend",
                 "inprocess", "--clients", "2", "--cohort", "2", "--rounds", "1", "--output", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    final = json.loads((tmp_path / "cli" / "results.json").read_text())["final"]
    assert code == 0
    assert f"final eval loss {final['eval_loss']:.4f}, perplexity {final['perplexity']:.3f}" in printed
    assert "perplexity" in printed.split("fedpeft run summary")[1].splitlines()[2]  # the table's header


@pytest.mark.parametrize("settings", [
    {"adapter": "ffa-lora"},
    {"adapter": "dylora", "rank": 4},
    {"adapter": "dp-dylora", "rank": 4},
    {"epsilon": 8.0},                      # user-level DP-FedAvg
    {"dp": "sample", "epsilon": 8.0},      # Opacus DP-SGD per client
], ids=["ffa-lora", "dylora", "dp-dylora", "user-dp", "sample-dp"])
def test_adapters_and_dp_run_on_the_causal_lm(tiny_lm, tmp_path, settings):
    cfg = resolve(_settings(tiny_lm, rounds=1, local_epochs=1, output=str(tmp_path / "r"), **settings))
    out = simulate(cfg, [])
    r = out.rounds[0]
    assert math.isfinite(r.eval_loss) and r.eval_perplexity == pytest.approx(math.exp(r.eval_loss))
    if cfg.dp != "none":  # the published record holds only what the guarantee covers
        assert 0 < r.epsilon <= 8.0 and r.train_loss is None and r.clients_sampled is None
    ws = get_workspace(cfg)
    frozen = [n for n, p in ws.model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n or "lora_A" in n for n in frozen)   # nothing but FFA-LoRA's A is frozen LoRA
    assert all(".lora_" in k for k in ws.initial_state)              # no head travels: only adapter tensors


@pytest.mark.parametrize("settings, message", [
    ({"adapter": "head"}, "--adapter head trains a classification head, which --task causal-lm does not have; "
                          "allowed: lora, ffa-lora, dylora, dp-dylora"),
    ({"lora_layers": "1"}, "--train-top-k/--lora-layers 1 compute the frozen bottom once, which is not implemented "
                           "for --task causal-lm; allowed: --no-bottom-cache"),
    ({"strategy": "fedsa-lora"}, "--strategy fedsa-lora reports a personalised classification accuracy"),
    ({"probe_rounds": 1}, "--probe-rounds 1 trains a classification head before the adapter, which --task "
                          "causal-lm does not have; allowed: --probe-rounds 0"),
    ({"validation_fraction": 0.1}, "--validation-fraction 0.1 is invalid; allowed: 0 with --task causal-lm"),
    ({"text_column": "question"}, "--text-column 'question' applies to --task classification"),
    ({"task": "translation"}, "--task 'translation' is invalid; allowed: causal-lm, classification"),
])
def test_what_the_causal_lm_task_cannot_run_is_refused_in_one_line(tiny_lm, settings, message):
    with pytest.raises(UsageError) as err:
        resolve(_settings(tiny_lm, **settings))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lora_on_some_layers_runs_without_the_bottom_cache(tiny_lm, tmp_path):
    cfg = resolve(_settings(tiny_lm, rounds=1, lora_layers="1", bottom_cache=False, output=str(tmp_path / "r")))
    simulate(cfg, [])
    assert {k.split(".layers.")[1].split(".")[0] for k in get_workspace(cfg).initial_state} == {"1"}


def test_a_model_without_a_chat_template_or_data_without_prompts_is_refused(tiny_lm, tmp_path):
    import shutil

    model, data = tiny_lm
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((bare / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(UsageError, match="has no chat template"):
        get_workspace(resolve(_settings(tiny_lm, model=str(bare))))
    texts = tmp_path / "texts.csv"
    texts.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(UsageError, match="has no column 'prompt'; --task causal-lm needs prompt and response"):
        get_workspace(resolve(_settings(tiny_lm, dataset=str(texts))))


def test_sharded_evaluation_combines_to_the_whole_by_answer_tokens(tiny_lm):
    """The process pool evaluates strided shards on its workers; weighting each shard's mean by
    its answer tokens (not its chats) gives the unsharded mean (shards differ in tokens per chat)."""
    from fedpeft.training.evaluate import EvalResult

    ws = get_workspace(resolve(_settings(tiny_lm)))
    whole = _loss(ws, ws.initial_state, ws.train)
    parts = [ws.task.evaluate(ws.model, ws.train, ws.pad_id, (i, 3)) for i in range(3)]
    assert len({p.tokens / p.examples for p in parts}) > 1   # the shards' chats differ in length
    combined = EvalResult.combine(parts)
    assert combined.tokens == whole.tokens and combined.examples == whole.examples
    assert combined.loss == pytest.approx(whole.loss, rel=1e-6)
