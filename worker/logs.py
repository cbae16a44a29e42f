"""Logging set-up: a text format for people and one JSON object per line for
journald and log shippers. The JSON formatter takes `job`, `attempt` and
`attempts` from the structured fields a log call passes with `extra=`, never from
the message text. Whatever is printed passes through the secret masking."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import TextIO

from .config import mask_secrets

STRUCTURED_FIELDS = ("job", "attempt", "attempts")
TEXT_FORMAT = "%(asctime)s %(levelname)s pid=%(process)d [%(threadName)s] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; time with its UTC offset."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created).astimezone()
                 .isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "pid": record.process, "thread": record.threadName,
                 "message": mask_secrets(record.getMessage())}
        for name in STRUCTURED_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if fmt == "json":
        # Every line on stderr is JSON: Python's warnings and an uncaught exception's
        # traceback too, not only our own log calls.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught


def _log_uncaught(kind, value, traceback) -> None:
    logging.getLogger("worker").critical("uncaught exception: %s", kind.__name__,
                                         exc_info=(kind, value, traceback))


def json_chosen() -> bool:
    return any(isinstance(handler.formatter, JsonFormatter)
               for handler in logging.getLogger().handlers)


def command_error(message: str) -> None:
    """An error of the command itself (bad config, unknown job...), one line: as
    "run-worker: MESSAGE" for people, or a JSON entry with --log-format json, so
    that a log shipper never gets a line that is not JSON."""
    if json_chosen():
        logging.getLogger("worker").error(message)
    else:
        print(f"run-worker: {mask_secrets(message)}", file=sys.stderr)


def job_fields(job: str, attempt: int | None = None, attempts: int | None = None) -> dict:
    """The `extra=` of a log line about a job (and one of its attempts)."""
    fields: dict = {"job": job}
    if attempt is not None:
        fields["attempt"], fields["attempts"] = attempt, attempts
    return fields
