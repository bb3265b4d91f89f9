"""The update pipeline (fedpeft.pipeline): stage order, the client/server halves as inverses,
and DP + compression composing with a strategy that fedpeft has never seen."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.adapters.base import Adapter, AdapterSpec, State
from fedpeft.compression import build_codec
from fedpeft.config import RunConfig
from fedpeft.errors import UsageError
from fedpeft.records import from_record, to_record
from fedpeft.federation.round import RoundStrategy
from fedpeft.pipeline import STAGES, BuildEnv, ClientContext, Pipeline, ServerContext, Stage, refusals
from fedpeft.privacy.accounting import make_accountant
from fedpeft.privacy.randomness import SeededStreams
from fedpeft.settings import resolve
from fedpeft.stages.compression import ErrorFeedbackCompression
from fedpeft.stages.user_dp import UserLevelDP
from fedpeft.strategy import STRATEGIES, FedPeftStrategy
from fedpeft.updates import client_delta

#: Message() outside a Flower runtime needs a task identity (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("flower_task_identity")

A, B, HEAD = "l.lora_A.default.weight", "l.lora_B.default.weight", "classifier.weight"


class _NoInject(Adapter):
    name = "test"

    def inject(self, model):  # pragma: no cover - never called
        raise NotImplementedError


class CoordinateMedian(FedPeftStrategy):
    """A third-party strategy, unknown to fedpeft: coordinate-wise median of the uploads."""

    name: ClassVar[str] = "median"

    def __init__(self, adapter: Adapter) -> None:
        super().__init__(adapter)
        self.seen: list[int] = []

    def aggregate(self, global_state: State, updates, round_rank=None) -> State:
        self.seen.append(len(updates))
        return {k: torch.stack([u.state[k] for u in updates]).median(dim=0).values for k in updates[0].state}


class _Nodes:
    def __init__(self, n: int) -> None:
        self.n = n

    def sample(self, server_round: int) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.n)]


def _state(seed: int, scale: float = 1.0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {A: scale * torch.randn(2, 6, generator=g), B: scale * torch.randn(5, 2, generator=g),
            HEAD: scale * torch.randn(3, 5, generator=g)}


def _run_round(rs: RoundStrategy, client_pipeline: Pipeline, glob: State, uploads: list[State],
               state_dir: Path, server_round: int = 1) -> tuple[State | None, dict]:
    """Configure, run each client's pipeline half on its upload, reply, aggregate."""
    messages = list(rs.configure_train(server_round, to_record(glob), ConfigRecord({"round-rank": 0}), grid=None))
    replies = []
    for i, (msg, up) in enumerate(zip(messages, uploads)):
        ctx = ClientContext(i, str(i), server_round, None, from_record(msg.content["arrays"]), state_dir)
        sent, _ = client_pipeline.on_client(up, ctx)
        replies.append(Message(RecordDict({"arrays": to_record(sent), "metrics": MetricRecord(
            {"client-id": i, "num-examples": 10, "train-loss": 1.0})}), reply_to=msg))
    arrays, metrics = rs.aggregate_train(server_round, replies)
    return (from_record(arrays) if arrays is not None else None), dict(metrics)


def test_stages_run_in_their_declared_order_and_only_on_their_side():
    cfg = RunConfig(strategy="fedsa-lora", compression="compeft", dp="user", epsilon=2.0, clients=100)
    fedsa = STRATEGIES.get("fedsa-lora")
    client = Pipeline.build(BuildEnv(cfg, fedsa, "client"))
    assert [s.name for s in client.stages] == ["client-local", "compression"]   # user-dp is server-only
    sample = Pipeline.build(BuildEnv(RunConfig(dp="sample", epsilon=2.0, client_ranks="2,4", strategy="flora"),
                                     STRATEGIES.get("flora"), "client"))
    assert [s.name for s in sample.stages] == ["dp-sgd", "rank-cap"] and sample.training == "sample"
    assert sample.describe("flora").startswith("client: train with DP-SGD")
    assert Pipeline.build(BuildEnv(RunConfig(), STRATEGIES.get("fedavg"), "client")).stages == []


def test_printed_order_decodes_before_the_check_and_privatizes_before_aggregation():
    stage = UserLevelDP(1.0, 0.5, 4.0, 0.1, make_accountant("rdp"), 1e-5, streams=SeededStreams(0))
    pipeline = Pipeline(sorted([ErrorFeedbackCompression(build_codec("compeft", density=0.5), "compeft"), stage],
                               key=lambda s: s.order))
    text = pipeline.describe("fedavg", "fedadam")
    client, server = text.split(" | ")
    assert client == "client: train → compeft"
    order = [server.index(x) for x in ("decode compeft", "check", "clip to S=0.5", "aggregate (fedavg)",
                                       "server optimiser (fedadam)", "broadcast")]
    assert order == sorted(order)


def test_compression_client_half_and_server_decode_are_inverse_up_to_the_codec(tmp_path):
    """decode(on_client(x)) = broadcast + C(x − broadcast): the codec's own dense compression,
    computed independently of the wire format."""
    codec = build_codec("compeft", density=0.3)
    stage = ErrorFeedbackCompression(codec, "compeft")
    glob, up = _state(0), _state(1)
    ctx = ClientContext(3, "3", 1, None, glob, tmp_path)
    sent, _ = stage.on_client(up, ctx)
    assert set(sent) == {"compressed-update"} and sent["compressed-update"].dtype == torch.uint8
    decoded = stage.decode(sent, ServerContext(1, None, glob, {k: tuple(v.shape) for k, v in glob.items()}))
    expected = codec.compress(client_delta(glob, up))
    for k in glob:
        torch.testing.assert_close(decoded[k].double() - glob[k].double(), expected[k].double(),
                                   rtol=0, atol=1e-6)
    assert (tmp_path / "residuals" / "3.safetensors").exists()   # error feedback kept e_3


def test_a_third_party_strategy_composes_with_compression_without_dp(tmp_path):
    cfg = RunConfig(compression="compeft", density=1.0, gamma=1.0)
    server = Pipeline.build(BuildEnv(cfg, CoordinateMedian, "server"))
    client = Pipeline.build(BuildEnv(cfg, CoordinateMedian, "client"))
    median = CoordinateMedian(_NoInject(AdapterSpec()))
    glob = _state(0)
    layout = {k: tuple(v.shape) for k, v in glob.items()}
    rs = RoundStrategy(median, server, _Nodes(3), upload_layout=lambda rank: layout)
    uploads = [_state(s) for s in (1, 2, 3)]
    new, metrics = _run_round(rs, client, glob, uploads, tmp_path)
    assert median.seen == [3] and metrics["rejected"] == 0
    # at density 1 ComPEFT keeps every sign at magnitude γσ; the median of the decoded uploads
    codec = build_codec("compeft", density=1.0, gamma=1.0)
    decoded = [{k: glob[k] + codec.compress(client_delta(glob, u))[k].float() for k in glob} for u in uploads]
    for k in glob:
        torch.testing.assert_close(new[k], torch.stack([d[k] for d in decoded]).median(dim=0).values,
                                   rtol=0, atol=1e-5)


def test_a_third_party_strategy_sees_only_the_noised_release_under_user_dp(tmp_path):
    glob = _state(0)
    layout = {k: tuple(v.shape) for k, v in glob.items()}
    stage = UserLevelDP(1.0, 0.5, 3.0, 0.5, make_accountant("rdp"), 1e-5, streams=SeededStreams(7))
    median = CoordinateMedian(_NoInject(AdapterSpec()))
    rs = RoundStrategy(median, Pipeline([stage]), _Nodes(3), upload_layout=lambda rank: layout)
    new, metrics = _run_round(rs, Pipeline([]), glob, [_state(s, 0.01) for s in (1, 2, 3)], tmp_path)
    assert median.seen == [1]                  # one pseudo-update: the DP release, nothing else
    assert metrics["epsilon"] > 0 and "aggregation-error" not in metrics
    assert stage.accountant.steps == 1
    assert all(not torch.equal(new[k], glob[k]) for k in glob)


def test_refusals_are_declared_by_the_stage_and_checked_once_by_validation():
    assert refusals(RunConfig(client_ranks="2,4"), STRATEGIES.get("fedavg")) is not None
    with pytest.raises(UsageError, match="--client-ranks needs a strategy .* allowed: flora"):
        resolve({"client_ranks": "2,4"})
    with pytest.raises(UsageError, match="flora needs every client's individual update.*user-dp"):
        resolve({"strategy": "flora", "epsilon": 2.0})


def test_an_unknown_extra_stage_is_a_one_line_error():
    with pytest.raises(UsageError, match=r"--stages 'no-such' is invalid; allowed: comma-separated names of "
                                         r"plug-in stages \(none registered\); the built-in stages switch on"):
        resolve({"stages": "no-such"})
    with pytest.raises(UsageError, match="--stages 'user-dp' is invalid"):   # switched on by --dp user
        resolve({"stages": "user-dp"})


def test_a_stage_registered_elsewhere_is_switched_on_by_name(monkeypatch, tmp_path):
    """A plug-in stage in one place: register it, name it in --stages, and both sides build it."""

    class HalveUpdates(Stage):
        name = "halve"
        order = 30

        def on_client(self, update, ctx):
            return {k: ctx.broadcast[k] + (v - ctx.broadcast[k]) / 2 for k, v in update.items()}, {"halved": 1.0}

    monkeypatch.setitem(STAGES._items, "halve", HalveUpdates)
    assert HalveUpdates.switched_by_name() and not UserLevelDP.switched_by_name()
    cfg = resolve({"stages": "halve", "compression": "compeft"})
    client = Pipeline.build(BuildEnv(cfg, STRATEGIES.get("fedavg"), "client"))
    assert [s.name for s in client.stages] == ["halve", "compression"]
    glob, up = _state(0), _state(1)
    halved, metrics = client.stages[0].on_client(up, ClientContext(0, "0", 1, None, glob, tmp_path))
    assert metrics == {"halved": 1.0}
    torch.testing.assert_close(halved[A], (glob[A] + up[A]) / 2)


# -- a stage's client half: hooks the pipeline composes, found without a name ----------------
class _Recorder(Stage):
    """A stage that logs every client hook it gets (a plug-in fedpeft has never seen)."""

    order = 30
    sides = ("client",)

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_training(self, task, ctx):
        self.log.append(f"{self.name} before {ctx.server_round}")

    def after_step(self, task, ctx):
        return lambda: self.log.append(f"{self.name} after step")

    def after_training(self, task, ctx):
        self.log.append(f"{self.name} after training")
        return {f"{self.name}-metric": 1.0}


def test_stage_hooks_run_around_training_after_the_adapters_own_step_hook():
    log: list[str] = []
    pipeline = Pipeline([_Recorder("a", log), _Recorder("b", log)])
    ctx = ClientContext(1, "1", 4, None, {}, Path("."))
    pipeline.before_training(None, ctx)
    adapter_hook = lambda step: (lambda: log.append(f"adapter after step {step}"))  # noqa: E731
    hook = pipeline.step_hook(adapter_hook, None, ctx)
    for step in range(2):
        hook(step)()
    metrics = pipeline.after_training(None, ctx)
    assert log == ["a before 4", "b before 4",
                   "adapter after step 0", "a after step", "b after step",
                   "adapter after step 1", "a after step", "b after step",
                   "a after training", "b after training"]
    assert metrics == {"a-metric": 1.0, "b-metric": 1.0}
    assert Pipeline([]).step_hook(adapter_hook, None, ctx) is adapter_hook  # nothing composed
    assert Pipeline([]).step_hook(None, None, ctx) is None


def test_a_client_builds_the_stages_the_server_named_not_those_its_settings_switch_on():
    cfg = RunConfig(compression="compeft", client_ranks="2,4", strategy="flora")
    named = Pipeline.build(BuildEnv(cfg, STRATEGIES.get("flora"), "client", stages=("rank-cap",)))
    assert [s.name for s in named.stages] == ["rank-cap"]
    with pytest.raises(ValueError, match="do not run on the client"):
        Pipeline.build(BuildEnv(cfg, STRATEGIES.get("flora"), "client", stages=("user-dp",)))


def test_the_privacy_plan_finds_the_accounting_stage_by_what_it_does():
    stage = UserLevelDP(1.0, 0.5, 4.0, 0.1, make_accountant("rdp"), 1e-5, streams=SeededStreams(0))
    compression = ErrorFeedbackCompression(build_codec("compeft", density=0.5), "compeft")
    assert Pipeline([compression, stage]).privacy_account is stage
    assert Pipeline([compression]).privacy_account is None
    stage.account_attempts(3)
    assert stage.accountant.history == [(1.0, 0.1, 3)] and stage.epsilon() > 0


def test_the_local_round_names_no_stage_and_holds_no_stage_mechanism():
    """engine/client.py runs stages through the pipeline only: no stage name, no DP-SGD, no
    rank cap, no client-local tensors (each lives in its stage's module)."""
    source = (Path(__file__).resolve().parents[1] / "fedpeft" / "engine" / "client.py").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("#", ":", "`")))
    for name in STAGES.names():
        assert f'"{name}"' not in code and f"'{name}'" not in code, name
    for mechanism in ("limit_rank", "client_rank", "opacus", "train_local_dp", "Accountant", "LocalParamStore",
                      "is_local", "personal_eval"):
        assert mechanism not in source, mechanism
