"""Central evaluation of the global model on the held-out test split (or the validation rows,
``--validation-fraction``), locally or on workers.

In simulation the Ray actors are idle while the server evaluates; evaluating there instead
(each worker a strided share of the length-sorted batches, single-threaded, the server
summing the results) uses every core without the driver's threads competing with the
actors' — the measured lead of issue #15 (the driver's 2-thread evaluation took 31.7 s
under load where 1 thread took 8.9 s), and what pfl-research does. The shards together are
exactly the local batches (the task's, e.g. :func:`fedpeft.data.tokenized.eval_batches`), so
the result is the local one up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft.adapters import State
from fedpeft.config import RunConfig
from fedpeft.records import to_record
from fedpeft.engine.workspace import Workspace
from fedpeft.training.evaluate import EvalResult

EVAL_BATCH = 64
#: eval message config keys: this worker's share of the batches, and of which split
SHARD_KEY, SHARDS_KEY, SPLIT_KEY = "eval-shard", "eval-shards", "eval-split"
TEST, VALIDATION = "test", "validation"

Evaluator = Callable[[State], EvalResult]


def evaluate_shard(ws: Workspace, state: State, shard: tuple[int, int] = (0, 1), split: str = TEST) -> EvalResult:
    """``state`` loaded into this process' model, evaluated on shard ``shard`` of ``split``
    (:data:`TEST` or :data:`VALIDATION`)."""
    ws.adapter.load_state(ws.model, state)
    return ws.task.evaluate(ws.model, ws.eval_split(split), ws.pad_id, shard)


def local_evaluator(ws: Workspace, split: str = TEST) -> Evaluator:
    return lambda state: evaluate_shard(ws, state, split=split)


def sharded_evaluator(grid: Grid, cfg: RunConfig, ws: Workspace, timeout: float, split: str = TEST) -> Evaluator:
    """Evaluate on the grid's workers, one shard each; falls back to local evaluation for a
    state that does not set every trainable tensor (a worker's model would keep the last
    client's values there) or when a worker fails."""
    workers = list(grid.get_node_ids())
    trainable = set(ws.adapter.trainable_state(ws.model))
    flat = cfg.to_client_flat()
    local = local_evaluator(ws, split)

    def run(state: State) -> EvalResult:
        if not trainable <= set(state):
            return local(state)
        arrays = to_record(state)
        messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                        {**flat, SHARD_KEY: i, SHARDS_KEY: len(workers), SPLIT_KEY: split})}),
                            message_type=MessageType.EVALUATE, dst_node_id=node)
                    for i, node in enumerate(workers)]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if len(replies) != len(messages) or any(r.has_error() for r in replies):
            return local(state)
        return EvalResult.combine(
            EvalResult(loss=float(m["loss"]), accuracy=float(m["accuracy"]), examples=int(m["examples"]),
                       tokens=int(m.get("tokens", 0)))
            for m in (r.content["metrics"] for r in replies))

    return run
