"""Structured logging: one line per event, JSON for journald or plain text for a terminal.

Every log call names its event and context in ``extra``, one style everywhere::

    log.info("source opened", extra={"event": "source_opened", "uri": uri, "fps": 30.0})

Event names are snake_case (``source_opened``, ``train_epoch``): a grep or a log query matches one
spelling. tests/test_logs.py holds every package to both rules.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else came from ``extra`` and is context worth printing.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def record_context(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields attached to a record."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """{"ts":..., "level":..., "logger":..., "msg":..., "event":..., <context>} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(record_context(record))
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS level logger: msg key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        context = " ".join(f"{k}={v}" for k, v in record_context(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if context:
            line += f"  {context}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


def setup_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Configure the root logger once per process (idempotent: replaces our previous handler)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.set_name("edge_agent")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "edge_agent":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
