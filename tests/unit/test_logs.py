"""The log line formatters (gateway.logs): the timestamp of every line, whatever the order of
the seconds its records come from, and the JSON line's fields."""

from __future__ import annotations

import json
import logging
import time

from gateway.logs import EVENT_ATTR, JsonFormatter, KeyValueFormatter, setup_logging


def _record(created: float, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("mailgate.test", logging.INFO, __file__, 1, "message", None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    setattr(record, EVENT_ATTR, fields)
    return record


def _expected(created: float) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            + f".{int((created - int(created)) * 1000):03d}Z")


def test_each_line_carries_its_own_second_and_milliseconds() -> None:
    """The formatted second is reused while records share it: records from another second,
    later or earlier (threads), still get theirs."""
    fmt = JsonFormatter()
    for created in (1764410000.001, 1764410000.999, 1764410001.5, 1764409999.25, 1764410001.0,
                    0.0, 1764410001.042):
        line = json.loads(fmt.format(_record(created, qid="Q1")))
        assert line["ts"] == _expected(created), created
    kv = KeyValueFormatter().format(_record(1764412345.678, qid="Q2"))
    assert kv.startswith(_expected(1764412345.678) + " info mailgate.test message qid=Q2")


def test_json_lines_keep_non_ascii_and_render_other_values_as_text() -> None:
    line = JsonFormatter().format(_record(1764410000.5, helo="héllo", size=3, when=object))
    parsed = json.loads(line)
    assert "héllo" in line and parsed["helo"] == "héllo" and parsed["size"] == 3
    assert parsed["when"] == str(object) and parsed["event"] == "message"


def test_setup_logging_skips_the_callers_stack_walk() -> None:
    """Neither format shows where a line came from, so records are made without the stack walk
    (file, line and function stay unknown)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    try:
        setup_logging("json", "info")
        root.addHandler(Keep())
        logging.getLogger("mailgate.test").info("hello")
    finally:
        root.handlers[:], level, logging._srcfile = saved
        root.setLevel(level)
    [record] = seen
    assert (record.lineno, record.funcName) == (0, "(unknown function)")
