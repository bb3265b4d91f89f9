"""The fedpeft ClientApp (Flower Message API), identical in simulation and deployment.

Run settings arrive in every message's ConfigRecord, so a SuperNode needs no local config
beyond its identity: ``partition-id`` / ``num-partitions`` in its node config.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import RunConfig
from fedpeft.federation.client import ClientRound, run_client_round
from fedpeft.federation.records import from_record, to_record
from fedpeft.federation.workspace import get_workspace

app = ClientApp()


def _identity(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery: tell the server which logical client this node is."""
    client_id, num_partitions = _identity(context)
    metrics = MetricRecord({"client-id": client_id, "num-partitions": num_partitions})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = RunConfig.from_flat(dict(config))
    torch.set_num_threads(max(1, int(cfg.cpus_per_client)))
    client_id, num_partitions = _identity(context)
    rank = int(config.get("round-rank", 0)) or None
    rnd = ClientRound(client_id=client_id, num_partitions=num_partitions,
                      server_round=int(config["server-round"]), round_rank=rank)
    ws = get_workspace(cfg)
    upload, result = run_client_round(ws, cfg, rnd, from_record(msg.content["arrays"]))
    metrics = MetricRecord({"client-id": client_id, "num-examples": result.examples,
                            "train-loss": result.mean_loss if result.examples else 0.0,
                            "steps": result.steps})
    arrays = to_record(upload) if upload else ArrayRecord()
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
