"""``fedsa-lora`` server side (SPEC §2.4): A and head are averaged, global B is untouched;
``flora`` is deliberately not registered."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters.base import Adapter, AdapterSpec
from fedpeft.errors import UsageError
from strategies import STRATEGIES
from strategies.base import ClientUpdate
from strategies.fedsa_lora import FedSaLora, is_lora_b


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        return model


A, B = "m.query.lora_A.default.weight", "m.query.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.weight"


def _client(seed: int, n: int) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    state = {A: torch.randn(2, 6, generator=g), B: torch.randn(5, 2, generator=g), HEAD: torch.randn(3, 6, generator=g)}
    return ClientUpdate(node_id=seed, client_id=seed, num_examples=n, state=state, train_loss=0.0, bytes_up=0)


def test_fedsa_is_registered():
    assert STRATEGIES.get("fedsa-lora") is FedSaLora


def test_fedsa_averages_a_and_head_and_leaves_global_b_untouched():
    glob = {A: torch.zeros(2, 6), B: torch.full((5, 2), 7.0), HEAD: torch.zeros(3, 6)}
    c1, c2 = _client(1, 1), _client(2, 3)
    out = STRATEGIES.get("fedsa-lora")(_NoInject(AdapterSpec()), sampler=None).aggregate(glob, [c1, c2])
    assert set(out) == set(glob)
    assert torch.equal(out[B], glob[B])  # bit-identical: B never leaves the clients' control
    for key in (A, HEAD):
        torch.testing.assert_close(out[key], 0.25 * c1.state[key] + 0.75 * c2.state[key])


def test_fedsa_differs_from_fedavg_only_in_b():
    glob = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), HEAD: torch.zeros(3, 6)}
    ups = [_client(3, 2), _client(4, 5)]
    adapter = _NoInject(AdapterSpec())
    fedsa = STRATEGIES.get("fedsa-lora")(adapter, sampler=None).aggregate(glob, ups)
    fedavg = STRATEGIES.get("fedavg")(adapter, sampler=None).aggregate(glob, ups)
    changed = {k for k in glob if not torch.equal(fedsa[k], fedavg[k])}
    assert changed == {B}


def test_lora_b_key_recognition():
    assert is_lora_b(B) and not is_lora_b(A) and not is_lora_b(HEAD)
    assert not is_lora_b("m.lora_B_extra.weight")


def test_flora_is_not_a_selectable_strategy():
    # only the exact stacking math exists (strategies/flora.py); no dishonest strategy
    assert "flora" not in STRATEGIES
    with pytest.raises(UsageError):
        STRATEGIES.get("flora")
