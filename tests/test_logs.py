"""Structured logs: one call style (``log.<level>(..., extra={"event": ...})``) and one event-name style
(snake_case), checked over the source with ``ast``; and the JSON line such a call makes."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_agent", "training", "calibration")
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
LOGGER_NAMES = ("log", "logger")  # log = logging.getLogger(__name__), trt_log, ...
EVENT_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def sources(*folders: str) -> Iterator[tuple[Path, ast.AST]]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def logging_calls(tree: ast.AST) -> Iterator[ast.Call]:
    """``<...log>.<level>(...)`` and ``<...logger>.<level>(...)`` calls."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LEVELS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id.endswith(LOGGER_NAMES)
        ):
            yield node


def event_names(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Every literal ``"event": "<name>"`` of a dict (the ``extra`` of a call or a dict built for one)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "event"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    yield value.value, node.lineno


def call_style_problems(path: Path, tree: ast.AST) -> Iterator[str]:
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "log_event":
            yield f"{where}:{node.lineno} defines a second logging style (log_event)"
    for call in logging_calls(tree):
        extra = next((k.value for k in call.keywords if k.arg == "extra"), None)
        if extra is None:
            yield f"{where}:{call.lineno} logs without extra={{'event': ...}}"
        elif isinstance(extra, ast.Dict) and not any(
            isinstance(k, ast.Constant) and k.value == "event" for k in extra.keys
        ):
            yield f"{where}:{call.lineno} logs an extra without an event"


def test_the_checks_see_both_styles(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def log_event(*a): ...\n"
        "log.info('a')\n"
        "log.warning('b', extra={'uri': 1})\n"
        "log.error('c', extra={'event': 'source.opened'})\n"
        "log.log(20, 'd', extra={'event': 'source_opened'})\n"
    )
    tree = ast.parse(probe.read_text())
    problems = list(call_style_problems(probe, tree))
    assert [p.split(" ", 1)[0] for p in problems] == ["probe.py:1", "probe.py:2", "probe.py:3"]
    assert [n for n, _ in event_names(tree) if not EVENT_NAME.fullmatch(n)] == ["source.opened"]


def test_every_log_call_names_its_event_in_extra() -> None:
    problems = [p for path, tree in sources(*PACKAGES) for p in call_style_problems(path, tree)]
    assert not problems, "log with log.<level>(msg, extra={'event': ...}):\n" + "\n".join(problems)


def test_every_event_name_is_snake_case() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} {name!r}"
        for path, tree in sources(*PACKAGES, "bench")
        for name, line in event_names(tree)
        if not EVENT_NAME.fullmatch(name)
    ]
    assert not bad, "event names are snake_case (source_opened, train_epoch):\n" + "\n".join(bad)


def test_a_structured_call_is_one_json_line_with_its_event_context_and_exception() -> None:
    from edge_agent.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("edge_agent.test_logs.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("handler failed on %s", "t", exc_info=True, extra={"event": "mqtt_handler_failed", "topic": "t"})
    finally:
        log.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "mqtt_handler_failed" and line["topic"] == "t" and line["msg"] == "handler failed on t"
    assert line["level"] == "ERROR" and "ValueError: boom" in line["exc"]
