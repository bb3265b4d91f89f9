"""What a run may publish (SPEC §3.4).

A DP guarantee covers the mechanism's release — the noised global model — and whatever is
computed from it and from public settings alone. Everything else a round knows is a statistic
of the clients' raw data or of the secret cohort: the clients' train loss, who was sampled
and how many, who failed or was refused and why, the (data-dependent) size of a compressed
upload, personalised accuracies, per-round wall time. Under DP (``--dp user|sample``) none of
that goes into results.json, rounds.csv, the terminal or the logs:

====================  =====================================================================
published under DP    why it is covered
====================  =====================================================================
eval_loss/accuracy    the released model evaluated on server-held test data (perplexity:
                      exp of that loss)
validation_loss/acc.  the same model on the validation rows (--validation-fraction): held
                      out of the training data before partitioning, so no client holds them
epsilon, rank         the accountant's output; DP-DyLoRA's rank is drawn independently of data
bytes_up/down         planned figures: expected cohort q·N × the dense payload of one client
plan                  ε target, δ, z, q, T, clip, accountant, planned cohort, dimensions
====================  =====================================================================

The rest is kept only for the user who asks for it (``--diagnostics``), in a separate file
whose name and header say that it is not covered. Without DP every record is published as is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write_text
from fedpeft.results import ResultsWriter, RoundRecord

DIAGNOSTICS_FILE = "diagnostics_NOT_COVERED_BY_DP.json"
DIAGNOSTICS_WARNING = ("NOT covered by the run's differential-privacy guarantee: client-reported "
                       "statistics (train loss, per-client rejections and ids, personalised "
                       "accuracy), the realised cohort, data-dependent upload sizes and timings. "
                       "Do not publish or share this file as part of a DP result.")

#: RoundRecord fields a DP run publishes as they are (bytes are replaced by planned figures).
COVERED_ROUND_FIELDS = frozenset({"round", "eval_loss", "eval_accuracy", "eval_perplexity", "epsilon", "rank",
                                  "validation_loss", "validation_accuracy"})
#: Plan keys that describe the data rather than the settings (kept out of a DP run's plan;
#: the validation count is a fraction of the training pool, so it would give that away).
UNCOVERED_PLAN_KEYS = frozenset({"train_examples", "validation_examples"})
#: Planner keys computed from the data's size (the time estimate scales with the examples).
UNCOVERED_UTILITY_KEYS = frozenset({"examples_per_round", "data_warnings", "predicted_seconds"})


class Publication:
    """Splits every record into what is published and what stays in the diagnostics."""

    def __init__(self, private: bool, expected_cohort: float) -> None:
        self.private = private
        self.expected_cohort = float(expected_cohort)

    @property
    def names_clients(self) -> bool:
        """May logs name clients, the realised cohort, failures and rejections?"""
        return not self.private

    def plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        if not self.private:
            return plan
        out = {k: v for k, v in plan.items() if k not in UNCOVERED_PLAN_KEYS}
        if isinstance(out.get("utility"), dict):  # the planner's view, minus the data's size
            out["utility"] = {k: v for k, v in out["utility"].items() if k not in UNCOVERED_UTILITY_KEYS}
        return out

    def round(self, record: RoundRecord, dense_up: int, dense_down: int) -> RoundRecord:
        """The published form of ``record``. ``dense_up``/``dense_down``: bytes of one
        client's uncompressed upload / broadcast this round (functions of public settings)."""
        if not self.private:
            return record
        blank = {f.name: None for f in dataclasses.fields(RoundRecord)
                 if f.name not in COVERED_ROUND_FIELDS | {"bytes_up", "bytes_down"}}
        return dataclasses.replace(
            record, **blank,
            bytes_up=round(self.expected_cohort * dense_up),
            bytes_down=round(self.expected_cohort * dense_down))


class DiagnosticsWriter(ResultsWriter):
    """The full per-round records of a run (``--diagnostics``), in one file whose name and
    header say that it is not covered by DP (no results.json/rounds.csv of its own)."""

    def __init__(self, output: str | Path, private: bool) -> None:
        super().__init__(output)
        self.path = Path(output) / DIAGNOSTICS_FILE
        self.private = private

    def as_dict(self) -> dict[str, Any]:
        return {"warning": DIAGNOSTICS_WARNING if self.private else "run without DP: nothing to protect",
                "covered_by_dp": False, **super().as_dict()}

    def _flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.as_dict(), indent=2) + "\n", fsync=False)


__all__ = ["COVERED_ROUND_FIELDS", "DIAGNOSTICS_FILE", "DIAGNOSTICS_WARNING", "DiagnosticsWriter",
           "Publication"]
