"""The printed run summary shows what results.json holds, incl. FedSA's personalized accuracy."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console

from fedpeft.cli import summary_table
from fedpeft.results import RoundRecord


def _render(rounds) -> str:
    console = Console(record=True, width=250)
    console.print(summary_table(SimpleNamespace(rounds=rounds)))
    return console.export_text()


def _round(t: int, personal: float | None) -> RoundRecord:
    return RoundRecord(round=t, clients_sampled=3, train_loss=0.5, eval_loss=0.6, eval_accuracy=0.7,
                       bytes_up=1234, bytes_down=5678, aggregation_error=None, epsilon=None, rank=8,
                       wall_s=1.0, personalized_accuracy=personal)


def test_personalized_column_only_when_reported():
    text = _render([_round(1, 0.8125), _round(2, None)])
    assert "personal acc." in text and "0.8125" in text and "1,234" in text
    assert "personal acc." not in _render([_round(1, None)])
