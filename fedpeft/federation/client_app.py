"""The fedpeft ClientApp (Flower Message API), identical in simulation and deployment.

Run settings arrive in every message's ConfigRecord, so a SuperNode needs no local config
beyond its identity: ``partition-id`` / ``num-partitions`` in its node config. A message carries
only the settings the run's client-side components declare, read back as a
:class:`fedpeft.config.ClientConfig` (reading any other raises; :mod:`fedpeft.engine.client_settings`). What protects
its examples is its own, though: its DP policy (level, ε budget / z floor, δ, secret noise,
where its accountant lives) comes from its node config, and a train message asking for less is
refused (:mod:`fedpeft.federation.node_policy`; in simulation the run's config is the policy). Every train
message also names the logical client it is for (``client-id``): in simulation a pool of
workers serves any number of clients and the grid binds each message to its client's
identity (:mod:`fedpeft.federation.virtual_grid`); a SuperNode refuses a message meant for
another client. A node with
its own data adds ``dataset-path`` (a csv/json/jsonl/parquet file or a ``save_to_disk``
directory with the run's text and label columns): it then trains on that dataset — all of
it — instead of partition ``partition-id`` of the run's dataset; ``partition-id`` stays its
client identity (discovery, sampling).

In deployment every message runs in a fresh ``flwr-clientapp`` process, so the heavy
imports (torch, transformers, peft) happen inside the handlers that need them: discovery
(``query``) stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedpeft.config import ClientConfig, RunConfig
from fedpeft.federation.message_timing import PhaseClock, log_level, logs_message_lines
from fedpeft.federation.messages import CLIENT_ID_KEY
from fedpeft.logs import install as install_logging
from fedpeft.threads import client_threads

app = ClientApp()


def _identity(context: Context, config: Mapping[str, Any] | None = None) -> tuple[int, int]:
    client_id = int(context.node_config["partition-id"])
    named = None if config is None else config.get(CLIENT_ID_KEY)
    if named is not None and int(named) != client_id:
        raise ValueError(f"message for client {int(named)} reached the node of client {client_id}")
    return client_id, int(context.node_config["num-partitions"])


def node_data(cfg: RunConfig, node_config: Mapping[str, Any], client_id: int,
              num_partitions: int) -> tuple[RunConfig, int, int]:
    """(config, partition index, number of partitions) this node trains on.

    Without ``dataset-path``: partition ``client_id`` of ``num_partitions`` of the run's
    dataset. With it: the node's local dataset as one partition (index 0, count 1).
    """
    path = str(node_config.get("dataset-path", "") or "")
    if not path:
        return cfg, client_id, num_partitions
    return cfg.with_changes(dataset=path, partition="iid"), 0, 1


def _worker_node() -> int:
    """Which Ray node ran this client (CRC-32 of its node id; 0 outside Ray): shows the work
    spreading over a cluster. Never imports Ray itself."""
    import sys
    import zlib

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0
    return zlib.crc32(ray.get_runtime_context().get_node_id().encode())


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Central evaluation offloaded to a simulation worker: this worker's share of the test (or
    validation) batches under the broadcast global state (see ``federation/central_eval.py``)."""
    install_logging()  # a Ray actor or deployed ClientApp: fedpeft decides what prints (fedpeft/logs.py)
    import torch

    from fedpeft.federation.central_eval import SHARD_KEY, SHARDS_KEY, SPLIT_KEY, TEST, evaluate_shard
    from fedpeft.records import from_record
    from fedpeft.engine.workspace import get_workspace

    config = msg.content["config"]
    cfg = ClientConfig.from_flat(dict(config))
    torch.set_num_threads(client_threads(cfg, context.node_config))
    ev = evaluate_shard(get_workspace(cfg), from_record(msg.content["arrays"]),
                        (int(config[SHARD_KEY]), int(config[SHARDS_KEY])), str(config.get(SPLIT_KEY, TEST)))
    metrics = MetricRecord({"loss": ev.loss, "accuracy": ev.accuracy, "examples": ev.examples, "tokens": ev.tokens})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery: tell the server which logical client this node is."""
    clock = PhaseClock()
    install_logging()
    client_id, num_partitions = _identity(context)
    metrics = MetricRecord({"client-id": client_id, "num-partitions": num_partitions})
    reply = Message(RecordDict({"metrics": metrics}), reply_to=msg)
    clock.lap("reply")
    log(log_level(), clock.line("query", f"client {client_id}"))
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    clock = PhaseClock()  # one log line per message: where its time went (message_timing.py)
    install_logging()  # before anything imports Opacus (its basicConfig): fedpeft/logs.py
    import torch

    from fedpeft.engine.client import ClientRound, client_pipeline, train_client
    from fedpeft.federation.node_policy import NodePolicy
    from fedpeft.engine.faults import check_dropout, simulated_latency
    from fedpeft.engine.client_state import client_state_dir
    from fedpeft.records import from_record, to_record
    from fedpeft.engine.workspace import builds_in_process, get_workspace

    clock.lap("imports")
    config = msg.content["config"]
    cfg: RunConfig = ClientConfig.from_flat(dict(config))
    torch.set_num_threads(client_threads(cfg, context.node_config))
    client_id, num_partitions = _identity(context, config)
    cfg, part_index, part_count = node_data(cfg, context.node_config, client_id, num_partitions)
    # the node's DP policy, not the message, decides (None: simulation, the run's config is it)
    policy = NodePolicy.of(context.node_config)
    dp_delta = config.get("dp-delta")
    if policy is not None:  # refuses (and logs) a message asking for less
        cfg, dp_delta = policy.admit(cfg, dp_delta, client_pipeline(cfg).training, client_id)
    check_dropout(cfg, int(config["server-round"]), client_id)
    rank = int(config.get("round-rank", 0)) or None
    rnd = ClientRound(client_id=part_index, num_partitions=part_count,
                      server_round=int(config["server-round"]), round_rank=rank,
                      state_key=str(client_id),
                      dp_delta=float(dp_delta) if dp_delta is not None else None, dp_policy=policy)
    builds = builds_in_process()
    ws = get_workspace(cfg)
    built = builds_in_process() > builds
    broadcast = from_record(msg.content["arrays"])
    state_dir = client_state_dir(cfg, context.node_config) if policy is None else policy.run_dir(cfg)
    clock.lap("workspace")
    started = time.perf_counter()
    out = train_client(ws, cfg, rnd, broadcast, state_dir)
    latency = simulated_latency(cfg, rnd.server_round, client_id, time.perf_counter() - started)
    clock.lap("training")
    upload, result = out.upload, out.result
    # sample-level DP adds "epsilon" (this client's ε so far at the run's δ),
    # "noise-multiplier", "dp-steps", "dp-delta" and "dp-sample-rate" (its DP-SGD q); the
    # server reports the max ε over clients; strategies with client-local tensors (FedSA-LoRA)
    # add "personalized-accuracy" and "personalized-examples" (its own model, local test set)
    metrics = MetricRecord({"client-id": client_id, "num-examples": result.examples,
                            "train-loss": result.mean_loss if result.examples else 0.0,
                            "steps": result.steps, "simulated-latency": latency,
                            "worker-node": _worker_node(), **out.metrics})
    arrays = to_record(upload) if upload else ArrayRecord()  # already through the pipeline
    reply = Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    clock.lap("reply")
    how = (f"workspace built #{ws.build_number} ("
           + ", ".join(f"{k} {v:.2f} s" for k, v in ws.build_timings.items()) + ")"
           if built else "workspace cached")
    if logs_message_lines(cfg):  # under DP the line would name who was sampled
        log(log_level(), clock.line("train", f"client {client_id} round {rnd.server_round} [{how}]"))
    return reply
