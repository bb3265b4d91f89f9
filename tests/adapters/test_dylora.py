"""DyLoRA / DP-DyLoRA (SPEC §1.3) against plain-torch computations on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.adapters import AdapterSpec, build_adapter
from fedpeft.adapters.dylora import set_rank, train_at_ranks
from fedpeft.records import payload_bytes, to_record
from fedpeft.engine.workspace import frozen_fingerprint
from fedpeft.training.local import train_local

R_MAX, ALPHA, HIDDEN = 8, 16.0, 32
LAYER = "base_model.model.bert.encoder.layer.1.attention.self.query"


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(123)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32, num_labels=2))
    model.requires_grad_(False)
    return model.eval()


def build(name: str, min_rank: int = 1):
    adapter = build_adapter(name, AdapterSpec(rank=R_MAX, alpha=ALPHA, min_rank=min_rank, seed=7))
    model = adapter.inject(tiny_bert())
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)  # B = 0 at init would hide the truncation: make every B non-zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    return adapter, model


def batches(n_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 60, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(n_batches)]


def factors(model: torch.nn.Module, layer: str = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    p = dict(model.named_parameters())
    return (p[f"{layer}.lora_A.default.weight"].detach().clone(),
            p[f"{layer}.lora_B.default.weight"].detach().clone())


def layer_module(model: torch.nn.Module, layer: str = LAYER) -> torch.nn.Module:
    return dict(model.named_modules())[layer]


@pytest.mark.parametrize("b", [1, 3, R_MAX])
def test_layer_forward_at_rank_b_is_first_b_components_scaled_alpha_over_b(b):
    _, model = build("dylora")
    module = layer_module(model)
    A, B = factors(model)
    base = module.base_layer
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(b))
    set_rank(model, b)
    got = module(x)
    # plain torch: W0 x + b0 + (alpha / b) B[:, :b] A[:b] x
    expected = x @ base.weight.T + base.bias + (ALPHA / b) * (x @ A[:b].T) @ B[:, :b].T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert module.scaling["default"] == ALPHA / b
    set_rank(model, None)
    full = x @ base.weight.T + base.bias + (ALPHA / R_MAX) * (x @ A.T) @ B.T
    torch.testing.assert_close(module(x), full, rtol=0, atol=1e-5)
    assert module.scaling["default"] == ALPHA / R_MAX


def test_whole_model_at_rank_b_equals_a_plain_rank_b_lora():
    """Independent model: peft LoRA built at r = b (scale alpha/b) holding A[:b], B[:, :b]."""
    b = 3
    _, dy = build("dylora")
    plain_adapter = build_adapter("lora", AdapterSpec(rank=b, alpha=ALPHA, seed=7))
    plain = plain_adapter.inject(tiny_bert())
    src = dict(dy.named_parameters())
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_A" in n:
                p.copy_(src[n][:b])
            elif "lora_B" in n:
                p.copy_(src[n][:, :b])
            else:
                p.copy_(src[n])
    set_rank(dy, b)
    batch = batches(1)[0]
    torch.testing.assert_close(dy(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-5)


def test_gradients_beyond_rank_b_are_exactly_zero():
    b = 3
    _, model = build("dylora")
    set_rank(model, b)
    model(**batches(1)[0]).loss.backward()
    p = dict(model.named_parameters())
    ga, gb = p[f"{LAYER}.lora_A.default.weight"].grad, p[f"{LAYER}.lora_B.default.weight"].grad
    assert torch.count_nonzero(ga[b:]) == 0 and torch.count_nonzero(gb[:, b:]) == 0
    assert torch.count_nonzero(ga[:b]) > 0 and torch.count_nonzero(gb[:, :b]) > 0


def test_opacus_per_example_gradients_beyond_rank_b_are_exactly_zero():
    # DP-SGD clips per-example gradients: components the step does not train must not add
    # to their norms (a mask on lora_A's output would leave Opacus' A rows non-zero here)
    from opacus import GradSampleModule

    b = 3
    _, model = build("dylora")
    set_rank(model, b)
    model.train()  # Opacus records activations in training mode only
    gsm = GradSampleModule(model)
    batch = batches(1)[0]
    logits = gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    p = dict(model.named_parameters())
    for layer in (LAYER, LAYER.replace("query", "value")):
        ga = p[f"{layer}.lora_A.default.weight"].grad_sample
        gb = p[f"{layer}.lora_B.default.weight"].grad_sample
        assert ga.shape[0] == 4 and gb.shape[0] == 4  # one gradient per example
        assert torch.count_nonzero(ga[:, b:]) == 0 and torch.count_nonzero(gb[:, :, b:]) == 0
        assert torch.count_nonzero(ga[:, :b]) > 0 and torch.count_nonzero(gb[:, :, :b]) > 0
        # per-example gradients of the per-example losses: their mean is the batch-mean gradient
        torch.testing.assert_close(ga.mean(0), p[f"{layer}.lora_A.default.weight"].grad, atol=1e-6, rtol=1e-4)
    gsm._close()


def test_each_step_changes_only_the_first_b_components_even_with_adam_momentum():
    """Ranks 8 then 2, 2, 5: after the rank-8 step Adam has momentum everywhere, yet the
    rank-2 steps must leave components 2..7 untouched."""
    ranks = [R_MAX, 2, 2, 5]
    _, model = build("dylora")
    inner = train_at_ranks(model, lambda k: ranks[k])
    snapshots = [factors(model)]

    def hook(step: int):
        after = inner(step)

        def record() -> None:
            after()
            snapshots.append(factors(model))

        return record

    train_local(model, [batches(len(ranks))], lr=1e-2, before_step=hook)
    for k, b in enumerate(ranks):
        (a0, b0), (a1, b1) = snapshots[k], snapshots[k + 1]
        assert torch.equal(a0[b:], a1[b:]) and torch.equal(b0[:, b:], b1[:, b:]), f"step {k}"
        assert not torch.equal(a0[:b], a1[:b]) and not torch.equal(b0[:, :b], b1[:, :b]), f"step {k}"


def test_dylora_step_hook_samples_ranks_in_range_and_load_state_restores_full_rank():
    adapter, model = build("dylora", min_rank=2)
    start = adapter.trainable_state(model)
    rng = np.random.default_rng(0)
    seen: list[float] = []
    hook = adapter.step_hook(model, rng, None)
    for k in range(40):
        hook(k)()
        seen.append(layer_module(model).scaling["default"])
    ranks = {round(ALPHA / s) for s in seen}
    assert ranks <= set(range(2, R_MAX + 1)) and len(ranks) >= 4
    adapter.load_state(model, start)  # what the next client (or the server's evaluation) does
    module = layer_module(model)
    assert module.scaling["default"] == ALPHA / R_MAX
    A, B = factors(model)
    x = torch.randn(3, HIDDEN)
    expected = x @ module.base_layer.weight.T + module.base_layer.bias + (ALPHA / R_MAX) * x @ A.T @ B.T
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


def test_dp_dylora_round_rank_is_uniform_over_min_to_max():
    adapter = build_adapter("dp-dylora", AdapterSpec(rank=16, min_rank=1))
    draws = [adapter.round_rank(np.random.default_rng([0, 0xD1, r])) for r in range(400)]
    assert set(draws) == set(range(1, 17))
    assert adapter.rank_in_force(5) == 5
    assert build_adapter("dylora", AdapterSpec(rank=16)).round_rank(np.random.default_rng(0)) is None


@pytest.mark.parametrize("b_t", [1, 4, R_MAX])
def test_dp_dylora_trains_downloads_and_uploads_only_the_first_b_t_components(b_t):
    adapter, model = build("dp-dylora")
    global_state = adapter.trainable_state(model)
    head = {k for k in global_state if "lora_" not in k}
    down = adapter.broadcast(global_state, b_t)
    adapter.load_state(model, down)
    train_local(model, [batches(3)], lr=1e-2, before_step=adapter.step_hook(model, np.random.default_rng(0), b_t))
    up = adapter.upload(model, b_t)
    assert up.keys() == global_state.keys()
    for k, v in up.items():
        full = global_state[k]
        if "lora_A" in k:
            assert v.shape == (b_t, full.shape[1])
        elif "lora_B" in k:
            assert v.shape == (full.shape[0], b_t)
        else:
            assert v.shape == full.shape
    for k in down:
        assert down[k].shape == up[k].shape
    # bytes follow b_t: the adapter part is b_t / r_max of the full upload's
    lora_numel = sum(v.numel() for k, v in up.items() if k not in head)
    assert lora_numel == sum(v.numel() for k, v in global_state.items() if k not in head) * b_t // R_MAX
    full_bytes = payload_bytes(to_record(global_state))
    assert (payload_bytes(to_record(up)) < full_bytes) == (b_t < R_MAX)
    # the server writes the prefix back; components beyond b_t keep the global values
    new = adapter.merge(global_state, up, b_t)
    a_key = f"{LAYER}.lora_A.default.weight"
    assert torch.equal(new[a_key][b_t:], global_state[a_key][b_t:])
    assert torch.equal(new[a_key][:b_t], up[a_key])
    # the model itself was trained in the prefix only and is back at r_max afterwards
    A, B = factors(model)
    assert torch.equal(A[b_t:], global_state[a_key][b_t:])
    assert layer_module(model).scaling["default"] == ALPHA / R_MAX


@pytest.mark.parametrize("name", ["dylora", "dp-dylora"])
def test_frozen_base_unchanged_by_training(name):
    adapter, model = build(name)
    before = frozen_fingerprint(model)
    start = adapter.trainable_state(model)
    train_local(model, [batches(3)], lr=1e-2, before_step=adapter.step_hook(model, np.random.default_rng(0), 3))
    after = frozen_fingerprint(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    end = adapter.trainable_state(model)
    assert any(not torch.equal(start[k], end[k]) for k in start)
