"""The ClientApp's per-message timing line: two train messages in one process build the
workspace once (the line says so, with the build's phases), and the line parses back."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.engine import workspace
from fedpeft.federation.client_app import app
from fedpeft.federation.message_timing import ENV_VAR, PhaseClock, parse_line, process_age_s
from fedpeft.records import to_record
from fedpeft.settings import resolve


def test_phase_line_round_trips_and_process_age_is_sane() -> None:
    clock = PhaseClock()
    clock.lap("imports")
    clock.lap("training")
    line = clock.line("train", "client 3 round 2 [workspace built #1 (data 1.50 s, tokenise 0.25 s)]")
    parsed = parse_line("INFO :      " + line)
    assert parsed is not None and parsed["kind"] == "train"
    assert parsed["build_data"] == 1.5 and parsed["build_tokenise"] == 0.25
    assert set(parsed) >= {"process_age", "imports", "training"}
    assert parse_line("INFO : Received successfully") is None
    age = process_age_s()
    assert age is not None and 0.0 < age < 24 * 3600


def test_two_messages_in_one_process_build_the_workspace_once(small_csv, tmp_path, monkeypatch,
                                                              flower_task_identity) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path / "cache"))
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Grab(level=logging.INFO)
    logging.getLogger("flwr").addHandler(handler)
    try:
        cfg = resolve({"dataset": str(small_csv), "max_test_examples": 24, "clients": 2, "cohort": 2,
                       "batch_size": 8, "max_client_examples": 8, "output": str(tmp_path / "run")})
        workspace._cache.clear()
        arrays = to_record(workspace.get_workspace(cfg).initial_state)
        workspace._cache.clear()  # the messages find an empty process cache, as a fresh worker does
        builds = workspace.builds_in_process()
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                          state=RecordDict(), run_config={})
        for rnd in (1, 2):
            config = ConfigRecord({**cfg.to_client_flat(), "server-round": rnd, "round-rank": 0, "client-id": 0})
            msg = Message(RecordDict({"arrays": arrays, "config": config}), 1, "train")
            msg.metadata.__dict__["_message_id"] = f"m{rnd}"
            assert not app(msg, context).has_error()
    finally:
        logging.getLogger("flwr").removeHandler(handler)
        workspace._cache.clear()
    assert workspace.builds_in_process() == builds + 1
    parsed = [p for p in map(parse_line, lines) if p and p["kind"] == "train"]
    assert len(parsed) == 2
    assert "build_data" in parsed[0] and "build_tokenise" in parsed[0] and "build_model" in parsed[0]
    assert "build_data" not in parsed[1]
    assert parsed[1]["workspace"] < parsed[0]["workspace"]
    assert sum("workspace built #" in line for line in lines) == 1


@pytest.mark.parametrize("value,level", [("1", logging.INFO), ("", logging.DEBUG), ("0", logging.DEBUG)])
def test_line_is_info_only_when_asked_for(monkeypatch, value, level) -> None:
    from fedpeft.federation.message_timing import log_level

    monkeypatch.setenv(ENV_VAR, value)
    assert log_level() == level
