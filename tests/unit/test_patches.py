"""gateway/patches.py, and the patches of logging's and dnspython's internals: a check that fails
(or raises) leaves the library's own path in place, with exactly one warning line naming the
patch and the reason; a passing one applies the patch; each runs once per process."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import dnsextras, patches
from gateway.logs import setup_logging
from tests.support.patches import kept_patch_status, patch_warnings


@pytest.fixture
def restored() -> Iterator[None]:
    with kept_patch_status():
        yield


def test_a_failing_check_applies_nothing_and_warns_once(restored, caplog):
    applied: list[str] = []
    for _ in range(3):
        assert not patches.install("lib.thing", lambda: "lib.x is gone",
                                   lambda: applied.append("x"))
    assert applied == []
    assert patch_warnings(caplog) == ["patch lib.thing disabled, the library's own path is used: "
                                      "lib.x is gone"]
    assert patches.statuses()[-1] == patches.PatchStatus("lib.thing", False, "lib.x is gone")


def test_a_check_that_raises_counts_as_failed(restored, caplog):
    def check() -> str | None:
        raise KeyError("opcode")

    assert not patches.install("lib.raises", check, lambda: None)
    assert patch_warnings(caplog) == ["patch lib.raises disabled, the library's own path is used: "
                                      "check raised KeyError: 'opcode'"]


def test_a_passing_check_applies_once_silently(restored, caplog):
    applied: list[str] = []
    for _ in range(2):
        assert patches.install("lib.ok", lambda: None, lambda: applied.append("x"))
    assert applied == ["x"] and patches.active("lib.ok") and patch_warnings(caplog) == []


def test_calls_sees_the_names_a_function_uses():
    def f() -> Any:
        return logging.getLogger

    assert patches.calls(f, "getLogger") and not patches.calls(f, "basicConfig")
    assert not patches.calls(None, "x")


# -- logging._srcfile ------------------------------------------------------------------------
def _log_one_line() -> logging.LogRecord:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Keep())
    logging.getLogger("mailgate.test").warning("hello")
    [record] = seen
    return record


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile)
    yield
    root.handlers[:], level, logging._srcfile = saved
    root.setLevel(level)


def test_logging_without_srcfile_keeps_its_own_caller_lookup(restored, root_logging,
                                                             monkeypatch, capsys):
    monkeypatch.setattr(logging.Logger, "_log", _log_without_srcfile)
    patches.forget("logging.srcfile")
    setup_logging("json", "info")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["level"], x["logger"], x["msg"]) for x in lines] == [
        ("warning", "mailgate.patches", "patch logging.srcfile disabled, the library's own "
                                        "path is used: logging.Logger._log no longer reads "
                                        "_srcfile")]
    assert logging._srcfile is not None  # not touched
    record = _log_one_line()
    assert record.getMessage() == "hello" and record.lineno > 0  # the caller was looked up


def _log_without_srcfile(self: logging.Logger, level: int, msg: object, args: Any,
                         **kw: Any) -> None:
    """Logger._log of a later Python that finds its caller some other way."""
    fn, lno, func, _ = self.findCaller(False, 1)
    self.handle(self.makeRecord(self.name, level, fn, lno, msg, args, None, func))


def test_logging_with_srcfile_skips_the_caller_lookup(restored, root_logging):
    patches.forget("logging.srcfile")
    setup_logging("json", "info")
    assert patches.active("logging.srcfile") and logging._srcfile is None
    assert _log_one_line().funcName == "(unknown function)"


# -- dnspython's dns._features ------------------------------------------------------------------
def test_a_changed_dns_features_table_is_left_to_dnspython(restored, caplog):
    forced: list[tuple[str, bool]] = []

    def force(feature: str, enabled: bool, permanent: bool) -> None:
        forced.append((feature, enabled))

    def have(feature: str) -> bool:
        return False

    requirements = {"dnssec": ["cryptography>=43"], "doh": ["httpcore>=1.0.0"]}
    for table, why in (({"dnssec": "cryptography>=43"}, "dns._features._requirements is not "
                                                         "a dict of package lists"),
                       (requirements, "dns._features.force is not force(feature, enabled)")):
        patches.forget("dnspython.features")
        caplog.clear()
        dnsextras._force_absent(SimpleNamespace(_requirements=table, force=force, have=have))
        assert patch_warnings(caplog) == [f"patch dnspython.features disabled, the library's own path "
                                          f"is used: {why}"]
    assert forced == []  # nothing forced: dnspython's own version checks answer

    def force2(feature: str, enabled: bool) -> None:
        forced.append((feature, enabled))

    patches.forget("dnspython.features")
    dnsextras._force_absent(SimpleNamespace(_requirements=requirements, force=force2, have=have))
    assert ("doh", False) in forced and patches.active("dnspython.features")


# -- the version bounds that go with the patches --------------------------------------------------
@pytest.mark.parametrize("dist,bound", [("dkimpy", "<1.2"), ("aiosmtpd", "<1.5"),
                                        ("dnspython", "<2.10"), ("pyspf", "<2.1"),
                                        ("publicsuffixlist", "<1.2"), ("tnefparse", "<1.5"),
                                        ("authres", "<1.3")])
def test_each_patched_library_is_bounded_above_the_installed_minor(dist, bound):
    import re
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    [spec] = [d for d in deps["project"]["dependencies"]
              if re.match(rf"{dist}\b", d, re.I)]
    assert spec.endswith("," + bound), spec
    major, minor = (int(x) for x in bound[1:].split("."))
    installed = tuple(int(x) for x in version(dist).split(".")[:2])
    assert installed < (major, minor), f"{dist} {version(dist)} is past {bound}: re-test"
