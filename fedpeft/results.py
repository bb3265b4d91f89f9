"""The machine-readable record of a run: ``results.json`` and ``rounds.csv``.

Every number the CLI prints is in here. Keys that do not apply are ``null``, never absent.
Files are replaced atomically after every round, so an interrupted run leaves a consistent
(partial) record and never a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write_text


@dataclass
class RoundRecord:
    """One round. Under DP only the covered fields are published; the others are null
    (see :mod:`fedpeft.privacy.publication`)."""

    round: int
    clients_sampled: int | None
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    bytes_up: int
    bytes_down: int
    aggregation_error: float | None
    epsilon: float | None
    rank: int | None
    wall_s: float | None
    clients_failed: int | None = 0  # sampled but no reply (dropout, crash, timeout)
    stragglers: int | None = 0  # replied after the round deadline, not aggregated
    rejected: int | None = 0  # malformed updates refused by the server (see rejections)
    rejections: list[str] | None = field(default_factory=list)
    #: example-weighted mean accuracy of the sampled clients' personalized models on their
    #: local test sets (strategies with client-local parameters, e.g. FedSA-LoRA), else null
    personalized_accuracy: float | None = None
    #: the same clients' local-majority-label rate on those local test sets (the baseline)
    personalized_majority: float | None = None
    #: distinct Ray nodes that ran this round's clients (null outside Ray)
    worker_nodes: int | None = None
    #: sample-level DP: the largest ε the clients that returned reported (a statistic of the
    #: cohort, so diagnostics only; the published ε is the planned bound)
    reported_epsilon_max: float | None = None
    #: exp(eval_loss) when the loss is a mean over tokens (``--task causal-lm``), else null
    eval_perplexity: float | None = None
    #: LoRA-FAIR: share of FedAvg's squared aggregation error outside Ā's row space, which its
    #: correction ΔB cannot reach (mean over adapted layers); null for other strategies
    aggregation_error_outside_span: float | None = None
    #: the evaluated model on the validation rows held out of the training data
    #: (``--validation-fraction``; no client holds them), at the rounds the test set is scored
    validation_loss: float | None = None
    validation_accuracy: float | None = None


@dataclass
class FinalRecord:
    accuracy: float | None
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    accountant: str | None
    dp_level: str | None
    bytes_up_total: int
    bytes_down_total: int
    wall_s: float
    #: under DP, where the noise came from: "secret" (OS CSPRNG key) or "seeded-insecure"
    #: (--insecure-reproducible-noise); null without DP
    randomness: str | None = None
    #: set when the run's privacy guarantee is weaker than its ε says (seeded noise)
    privacy_warning: str | None = None
    #: the last evaluated round's held-out loss, and its perplexity where the task has one
    eval_loss: float | None = None
    perplexity: float | None = None
    #: the last evaluated round's validation accuracy (``--validation-fraction``), else null
    validation_accuracy: float | None = None


ROUND_KEYS = [f.name for f in fields(RoundRecord)]
FINAL_KEYS = [f.name for f in fields(FinalRecord)]


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class ResultsWriter:
    """Reporter that keeps ``results.json`` and ``rounds.csv`` of one run up to date."""

    def __init__(self, output: str | Path) -> None:
        self.dir = Path(output)
        self.config: dict[str, Any] = {}
        self.plan: dict[str, Any] = {}
        self.rounds: list[RoundRecord] = []
        self.final: FinalRecord | None = None

    def on_start(self, config: dict[str, Any], plan: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config, self.plan = config, plan
        self._flush()

    def on_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self._flush()

    def on_finish(self, final: FinalRecord) -> None:
        self.final = final
        self._flush()

    def as_dict(self) -> dict[str, Any]:
        return _clean({
            "config": self.config,
            "plan": self.plan,
            "rounds": [asdict(r) for r in self.rounds],
            "final": asdict(self.final) if self.final else None,
        })

    def _flush(self) -> None:
        atomic_write_text(self.dir / "results.json", json.dumps(self.as_dict(), indent=2) + "\n", fsync=False)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=ROUND_KEYS, lineterminator="\n")
        writer.writeheader()
        for r in self.as_dict()["rounds"]:
            writer.writerow({k: "" if r[k] is None else ("; ".join(r[k]) if isinstance(r[k], list) else r[k])
                             for k in ROUND_KEYS})
        atomic_write_text(self.dir / "rounds.csv", buf.getvalue(), fsync=False)
