"""Logs: one line per record, tied to the workflow and trace of the step that wrote it.

JSON when stderr is not a terminal (a container's log collector reads it), text when it
is; ``KAPELLMEISTER_LOG_FORMAT=json|text`` decides otherwise. A line written during a
step (a task run, a result applied, a request) carries that step's ``workflow_id``,
``task_ref`` and ``trace_id``, so a log search and a trace find each other.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import msgspec

from kapellmeister import tracing

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_encode = msgspec.json.Encoder().encode

# Step attributes (`tracing.current`) and the log field each becomes.
_FIELDS = (("workflow.id", "workflow_id"), ("task.ref", "task_ref"), ("trace_id", "trace_id"))


def _step_fields() -> dict[str, str | int]:
    step = tracing.current.get()
    return {field: step[key] for key, field in _FIELDS if step.get(key)}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "service", "logger", "message", workflow_id, task_ref,
    trace_id, "exception"}``, one object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            **_step_fields(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


class TextFormatter(logging.Formatter):
    """``<time> <service> <LEVEL> <message> [workflow_id=… task_ref=… trace_id=…]``."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _step_fields()
        if not fields:
            return line
        first, newline, rest = line.partition("\n")
        about = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{first} [{about}]{newline}{rest}"


def setup_logging(service: str, level: str = "INFO", log_format: str = "auto") -> None:
    """Log to stderr at ``level`` in ``log_format`` (``auto``: JSON unless a terminal)."""
    json_lines = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if json_lines else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
