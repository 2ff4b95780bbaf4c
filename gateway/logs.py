"""Logging set-up and the structured event lines: one per message, one per connection.

``event(logger, name, **fields)`` logs a line whose fields are rendered as JSON
(``--log-format json``) or as readable ``key=value`` pairs (the default on a terminal).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from gateway import patches

EVENT_ATTR = "mailgate_fields"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, name, extra={EVENT_ATTR: fields})


def _kv_value(v: Any) -> str:
    if isinstance(v, dict):
        v = ",".join(f"{k}:{_kv_value(x)}" for k, x in v.items())
    elif isinstance(v, list | tuple):
        v = ",".join(_kv_value(x) for x in v)
    elif v is None:
        return "-"
    s = str(v)
    if not s or any(c in s for c in ' "=\\') or not s.isprintable():
        return json.dumps(s)
    return s


_last_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _ts(record: logging.LogRecord) -> str:
    global _last_second
    second, text = _last_second  # one read: threads log too
    if second != int(record.created):  # a message's few lines share their second: format once
        second = int(record.created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{int(record.msecs):03d}Z"


# json.dumps with options builds its encoder per call; one line a message and more deserve one
_encode_line = json.JSONEncoder(default=str, ensure_ascii=False).encode


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, EVENT_ATTR, None)
        head = f"{_ts(record)} {record.levelname.lower()} {record.name}"
        if fields is not None:
            body = " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())
            line = f"{head} {record.getMessage()} {body}"
        else:
            line = f"{head} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _ts(record), "level": record.levelname.lower(),
                               "logger": record.name}
        fields = getattr(record, EVENT_ATTR, None)
        if fields is not None:
            out["event"] = record.getMessage()
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode_line(out)


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    """Log to stderr as key=value lines (``kv``, readable on a terminal) or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither format shows where a line was logged from: skip the stack walk (findCaller) that
    # logging makes for every record to fill in file, line and function (the logging HOWTO's
    # "Optimization": set ``logging._srcfile`` to None), once logging is seen to still read it.
    patches.install("logging.srcfile", _check_srcfile, _skip_caller_lookup)
    # aiosmtpd logs every command at INFO; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _check_srcfile() -> str | None:
    if not hasattr(logging, "_srcfile"):
        return "logging._srcfile is missing"
    if not patches.calls(logging.Logger._log, "_srcfile"):
        return "logging.Logger._log no longer reads _srcfile"
    return None


def _skip_caller_lookup() -> None:
    logging._srcfile = None
