"""Structured logging: one JSON object per line (or readable text on a terminal)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# The current request's id: every log line written while serving it carries it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


# The factories installed here: installing is idempotent (modules may be reloaded by tests).
_FACTORIES: set[Callable[..., logging.LogRecord]] = set()


def _install_request_id_factory() -> None:
    """Stamp the current request's id on every record at creation, whatever handler (or
    test capture) receives it."""
    previous = logging.getLogRecordFactory()
    if previous in _FACTORIES:
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id = REQUEST_ID.get()
        if request_id is not None:
            record.request_id = request_id
        return record

    _FACTORIES.add(factory)
    logging.setLogRecordFactory(factory)


_install_request_id_factory()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return line + ("  " + " ".join(f"{k}={v}" for k, v in extras.items()) if extras else "")


class ClientProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request (a client's fault, answered 400 by aiohttp itself)
    as an ERROR with a traceback; keep it as a one-line warning without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = f"malformed request refused: {record.exc_info[1]!r}"[:500], ()
            record.exc_info = record.exc_text = None
        return True


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if use_json else TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.server").addFilter(ClientProtocolErrors())
    # aiohttp's access log duplicates what the request metrics and our own lines say.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
