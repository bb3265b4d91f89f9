"""LP-FT (--probe-rounds): head-only rounds, and what user-level DP releases in them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpeft.pipeline import ServerContext
from fedpeft.privacy.accounting import make_accountant
from fedpeft.privacy.randomness import SeededStreams
from fedpeft.settings import resolve
from fedpeft.errors import UsageError
from fedpeft.stages.user_dp import UserLevelDP
from fedpeft.strategy import ClientUpdate
from fedpeft.training.probe import is_head, probing, train_head_only

HEAD = "base_model.model.classifier.modules_to_save.default.weight"  # peft's copy of the head
LORA = "base_model.model.encoder.layer.5.attention.self.query.lora_B.default.weight"


def test_head_names_and_rounds():
    assert is_head(HEAD) and is_head("classifier.bias")
    assert not is_head(LORA) and not is_head("encoder.classifier_like.weight")
    assert [probing(r, 2) for r in (1, 2, 3)] == [True, True, False]
    assert not probing(1, 0)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.classifier = nn.Linear(3, 2)


def test_only_the_head_trains_inside_the_block_and_every_tensor_is_trainable_after():
    m = _Tiny()
    body, head = m.body.weight.detach().clone(), m.classifier.weight.detach().clone()
    with train_head_only(m):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m.classifier(m.body(torch.ones(4, 3))).sum().backward()
        opt.step()
    assert torch.equal(m.body.weight, body) and not torch.equal(m.classifier.weight, head)
    assert all(p.requires_grad for p in m.parameters())
    m.classifier.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable 'classifier' head"):
        with train_head_only(m):
            pass


def _stage(probe_rounds: int, z: float = 2.0) -> UserLevelDP:
    return UserLevelDP(noise_multiplier=z, clip=1.0, expected_cohort=1.0, sample_rate=0.5,
                       accountant=make_accountant("rdp"), delta=1e-5, streams=SeededStreams(0),
                       probe_rounds=probe_rounds)


def _round(stage: UserLevelDP, server_round: int, lora_shift: float) -> dict[str, torch.Tensor]:
    glob = {HEAD: torch.zeros(2, 400), LORA: torch.zeros(384, 4)}
    # a hostile client moves the adapter far although this is a probe round
    upload = {HEAD: torch.full((2, 400), 1e-3), LORA: torch.full((384, 4), lora_shift)}
    ctx = ServerContext(server_round, None, glob, {k: tuple(v.shape) for k, v in glob.items()})
    (pseudo,), metrics = stage.on_server([ClientUpdate(0, 0, 1, upload, 0.0, 0)], ctx)
    return {k: pseudo.state.get(k, glob[k]) for k in glob}, metrics


def test_a_probe_round_releases_only_the_head_and_accounts_like_any_round():
    probe, plain = _stage(1), _stage(0)
    out, _ = _round(probe, 1, lora_shift=100.0)
    # the adapter does not move, whatever the client sent; the head carries the noise N(0, (zS)^2)
    assert torch.equal(out[LORA], torch.zeros(384, 4))
    assert float(out[HEAD].std()) == pytest.approx(2.0, rel=0.05)
    # the adapter's 100-sized values did not enter the clip: the head delta (norm 0.028 < S)
    # arrives whole, where clipping it jointly with them would scale it by 1 / 3,919
    quiet, _ = _round(_stage(1, z=1e-9), 1, lora_shift=100.0)
    torch.testing.assert_close(quiet[HEAD], torch.full((2, 400), 1e-3), rtol=1e-5, atol=1e-8)
    # after the probe rounds everything is released (and clipped together)
    after, _ = _round(probe, 2, lora_shift=100.0)
    assert float(after[LORA].abs().mean()) > 0.5
    # same sampled Gaussian mechanism each round: ε as without probing
    _round(plain, 1, 0.0), _round(plain, 2, 0.0)
    assert probe.epsilon() == plain.epsilon() and math.isfinite(probe.epsilon())


@pytest.mark.parametrize("values, message", [
    ({"rounds": 5, "probe_rounds": 5}, "--probe-rounds 5"),
    ({"adapter": "head", "probe_rounds": 1}, "--adapter head"),
    ({"dp": "sample", "epsilon": 3.0, "probe_rounds": 1}, "not implemented with --dp sample"),
    ({"probe_rounds": 1, "probe_lr": -1.0}, "--probe-lr -1.0"),
])
def test_bad_probe_settings_are_refused_in_one_line(values, message):
    with pytest.raises(UsageError, match=message) as err:
        resolve({"rounds": 10, **values})
    assert "\n" not in str(err.value)
