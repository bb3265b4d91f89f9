"""One federated round through Flower's Strategy API: sample, broadcast, check, run the
update pipeline, aggregate, step the server optimiser.

:class:`RoundStrategy` is the only Flower :class:`Strategy` fedpeft hands to a grid. It
composes the parts that each know one thing: the sampler (who trains), the update pipeline
(:mod:`fedpeft.pipeline`: how updates are encoded, filtered and privatized), the strategy
(:mod:`fedpeft.strategy`: how updates are combined) and the server optimiser
(:mod:`fedpeft.server_optim`). Everything it needs is given at construction; nothing reaches
into a component after it was built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.base import State
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.records import from_record, payload_bytes, to_record
from fedpeft.layout import check_update
from fedpeft.pipeline import Layout, Pipeline, ServerContext
from fedpeft.server_optim import NoServerOptimizer, ServerOptimizer
from fedpeft.strategy import ClientSampler, ClientUpdate, FedPeftStrategy

#: ``round_rank -> {key: shape}`` of what the adapter uploads before any stage
UploadLayout = Callable[[int | None], Layout]


class RoundStrategy(Strategy):
    """Flower strategy running ``strategy`` behind ``pipeline``.

    Args:
        strategy: the aggregation.
        pipeline: the update stages (the same ones every client builds from the run config).
        sampler: the round's cohort as ``(client id, node id)`` pairs.
        upload_layout: shapes of what the adapter uploads per round rank, before the stages
            (every reply is checked against it; user-level DP noises exactly these coordinates).
        server_opt: applied to every aggregate (SPEC §3.6).
        max_upload_bytes: larger replies are refused (0: no limit).
        deadline_s: replies with a larger simulated latency count as late (0: no deadline).
    """

    def __init__(self, strategy: FedPeftStrategy, pipeline: Pipeline, sampler: ClientSampler,
                 upload_layout: UploadLayout,
                 server_opt: ServerOptimizer | None = None,
                 max_upload_bytes: int = 0, deadline_s: float = 0.0) -> None:
        self.strategy = strategy
        self.pipeline = pipeline
        self.sampler = sampler
        self.upload_layout = upload_layout
        self.server_opt = server_opt if server_opt is not None else NoServerOptimizer()
        self.max_upload_bytes = int(max_upload_bytes)
        self.deadline_s = float(deadline_s)
        self._global: State = {}
        self._round_rank: int | None = None
        self._broadcast_bytes = 0
        #: ``(client id, reason)`` of the replies refused in the last round
        self.rejections: list[tuple[int, str]] = []
        self.late = 0

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def broadcast_bytes(self) -> int:
        """Serialized size of this round's (dense) broadcast to one client."""
        return self._broadcast_bytes

    def shared_layout(self, round_rank: int | None) -> Layout:
        """What an honest client uploads this round, after every client stage."""
        return self.pipeline.client_layout(self.upload_layout(round_rank), None)

    # -- Flower Strategy API ----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = from_record(arrays)
        rank = config.get("round-rank", 0)
        self._round_rank = int(rank) if rank else None
        broadcast = to_record(self.strategy.broadcast_state(self._global, self._round_rank))
        self._broadcast_bytes = payload_bytes(broadcast)
        # one shared broadcast record; each message names its logical client, so a node can
        # serve any number of clients (simulation) or check that it is the one (deployment)
        return [Message(content=RecordDict({"arrays": broadcast,
                                            "config": ConfigRecord({**config, CLIENT_ID_KEY: client})}),
                        message_type=MessageType.TRAIN, dst_node_id=node)
                for client, node in self.sampler.sample(server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ctx = ServerContext(server_round, self._round_rank, self._global,
                            self.shared_layout(self._round_rank))
        updates = self.accept(replies, ctx)
        # diagnostics from the raw replies (under DP not covered by the guarantee: the
        # publication policy keeps them out of published results)
        metrics = {**self.round_metrics(replies, updates), **self.strategy.round_metrics(updates)}
        released, stage_metrics = self.pipeline.on_server(updates, ctx)
        metrics.update(stage_metrics)
        usable = [u for u in released if u.num_examples > 0]
        if not usable:
            return None, MetricRecord(metrics)
        new_global = self.strategy.aggregate(self._global, usable, self._round_rank)
        if not self.pipeline.combines_updates:
            err = self.strategy.aggregation_error(self._global, usable, new_global)
            if err is not None:  # of the aggregate itself, before the server optimiser moves it
                metrics["aggregation-error"] = err
            metrics.update(self.strategy.aggregation_metrics())
        return to_record(self.server_opt.step(self._global, new_global)), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # fedpeft evaluates the global model centrally on the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── strategy: %s (adapter %s)", self.strategy.name, self.strategy.adapter.name)
        log(INFO, "\t├── pipeline: %s", self.pipeline.describe(self.strategy.name))

    # -- reply checks ------------------------------------------------------------------
    def accept(self, replies: Sequence[Message], ctx: ServerContext) -> list[ClientUpdate]:
        """Decode the replies that arrived; refuse malformed or late ones (with reasons)."""
        self.rejections, self.late = [], 0
        accepted = []
        for reply in replies:
            if reply.has_error():
                continue  # a failed client (dropout, crash): counted in clients-failed
            client = _client_id(reply)
            size = payload_bytes(reply.content["arrays"]) if "arrays" in reply.content else 0
            if self.max_upload_bytes and size > self.max_upload_bytes:
                self.rejections.append((client, f"payload of {size} bytes over the limit {self.max_upload_bytes}"))
                continue
            try:
                update = self.decode(reply, ctx)
            except Exception as exc:  # noqa: BLE001 - any malformed reply is refused, never fatal
                self.rejections.append((client, f"undecodable reply ({type(exc).__name__}: {exc})"))
                continue
            if self.deadline_s and update.metrics.get("simulated-latency", 0.0) > self.deadline_s:
                self.late += 1
                continue
            if update.num_examples < 0:
                self.rejections.append((client, f"negative example count {update.num_examples}"))
                continue
            # every reply is checked the same way whatever its example count: a client with
            # no data sends a zero update of the honest layout, never an empty or free-form one
            reason = check_update(update.state, self.expected_layout(update.client_id))
            if reason is not None:
                self.rejections.append((client, reason))
                continue
            accepted.append(update)
        # no log here: whether clients may be named depends on the run's privacy level
        # (fedpeft.privacy.publication); the round loop logs the rejections when allowed
        return accepted

    def expected_layout(self, client_id: int) -> Layout:
        """Key -> shape of an honest upload of ``client_id`` this round."""
        return self.pipeline.client_layout(self.upload_layout(self._round_rank), client_id)

    def decode(self, reply: Message, ctx: ServerContext) -> ClientUpdate:
        """A reply as a :class:`ClientUpdate`, its encoding undone by the pipeline. The
        stages decode against this client's honest layout (a codec checks the sizes its
        payload declares against it before allocating, issue 24 finding 5)."""
        record = reply.content["arrays"]
        m = reply.content["metrics"]
        client_id = int(m.get("client-id", -1))
        own = dataclasses.replace(ctx, upload_layout=self.expected_layout(client_id))
        return ClientUpdate(
            node_id=reply.metadata.src_node_id,
            client_id=client_id,
            num_examples=int(m["num-examples"]),
            state=self.pipeline.decode(from_record(record), own),
            train_loss=float(m.get("train-loss", float("nan"))),
            bytes_up=payload_bytes(record),
            metrics={k: float(v) for k, v in m.items()},
        )

    def round_metrics(self, replies: Sequence[Message], updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """The per-round keys of the results schema, whatever the strategy."""
        metrics: dict[str, float] = {
            "clients-replied": float(len(updates)),
            "clients-failed": float(sum(1 for r in replies if r.has_error())),
            "rejected": float(len(self.rejections)),
            "late": float(self.late),
            "bytes-up": float(sum(u.bytes_up for u in updates)),
            "bytes-down": float(self._broadcast_bytes * len(replies)),
        }
        nodes = {u.metrics["worker-node"] for u in updates if u.metrics.get("worker-node")}
        if nodes:  # a systems figure: how many Ray nodes the cohort ran on
            metrics["worker-nodes"] = float(len(nodes))
        # sample-level DP: each client reports its own ε — a statistic of the cohort, kept for
        # the diagnostics; the published guarantee is the planned bound (privacy_plan.SampleLevel)
        eps = [u.metrics["epsilon"] for u in updates if "epsilon" in u.metrics]
        if eps:
            metrics["epsilon-max"] = max(eps)
        zs = [u.metrics["noise-multiplier"] for u in updates if "noise-multiplier" in u.metrics]
        if zs:
            metrics["noise-multiplier-min"] = min(zs)
        usable = [u for u in updates if u.num_examples > 0]
        if usable:
            total = float(sum(u.num_examples for u in usable))
            metrics["train-loss"] = sum(u.train_loss * u.num_examples for u in usable) / total
            metrics["num-examples"] = total
        return metrics


def _client_id(reply: Message) -> int:
    try:
        return int(reply.content["metrics"]["client-id"])
    except Exception:  # noqa: BLE001
        return -1


__all__ = ["RoundStrategy", "UploadLayout"]
