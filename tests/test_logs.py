"""log_event: the same structured record as ``log.<level>(..., extra={"event": ...})``, attributed to its caller."""

from __future__ import annotations

import io
import json
import logging

import pytest

from edge_agent.logs import JsonFormatter, log_event


def test_log_event_is_a_structured_record_from_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("edge_agent.test_logs")
    with caplog.at_level(logging.INFO, logger=log.name):
        log_event(log, logging.WARNING, "broker %s unreachable", "mqtt_unreachable", "b1", port=1883, pending=2)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == "broker b1 unreachable"
    assert (record.event, record.port, record.pending) == ("mqtt_unreachable", 1883, 2)  # type: ignore[attr-defined]
    assert record.pathname == __file__ and record.funcName == "test_log_event_is_a_structured_record_from_the_caller"


def test_log_event_with_exc_info_in_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("edge_agent.test_logs.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        log_event(log, logging.ERROR, "handler failed", "mqtt_handler_failed", exc_info=True, topic="t")
    finally:
        log.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["event"] == "mqtt_handler_failed" and line["topic"] == "t" and "ValueError: boom" in line["exc"]
