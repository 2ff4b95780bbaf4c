"""Custom filters, loaded the three ways an admin can: ``module = "pkg.mod:Class"`` (a module on
PYTHONPATH), a file in ``plugins.dirs``, and the ``mailgate.filters`` entry-point group of an
installed distribution. Their symbols reach the message log line and the rules; their edits
reach the relayed message; broken ones are named by check-policy; ``requires`` orders filters
within a stage."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy
from tests.support.sink import Sink

QID_RE = re.compile(r"\(([0-9A-Z]{16})\)$")

# A filter an admin might write: tags senders it is told about. ``{cls}`` and ``{name}`` are
# filled in so that each loading method gets its own class.
TAGGER_SOURCE = '''
"""A test filter: VIP_SENDER / BLOCKED_SENDER symbols for listed senders, plus an edit."""
from gateway.filterapi import AddHeader, ConfigError, Filter, Result, Symbol


class {cls}(Filter):
    name = "{name}"

    def __init__(self, vip, blocked):
        self.vip, self.blocked = vip, blocked

    @classmethod
    def from_config(cls, cfg, services):
        for key in cfg:
            if key not in ("vip", "blocked"):
                raise ConfigError(key, "unknown setting")
        lists = {{}}
        for key in ("vip", "blocked"):
            value = cfg.get(key, [])
            if not isinstance(value, list):
                raise ConfigError(key, "must be a list of addresses")
            lists[key] = frozenset(a.lower() for a in value)
        return cls(lists["vip"], lists["blocked"])

    async def on_mail(self, ctx):
        sender = ctx.sender.addr.lower() if ctx.sender else ""
        if sender in self.blocked:
            return Result(symbols=(Symbol("BLOCKED_SENDER", (sender,)),))
        if sender in self.vip:
            return Result(symbols=(Symbol("VIP_SENDER", (sender,)),),
                          edits=(AddHeader("X-Tagged-By", "{name}"),))
        return Result()
'''

ORDER_SOURCE = '''
"""Filters for the requires test: ``first`` is slow; ``second`` requires it, ``blind`` does
not, and both report whether they saw first's result in ctx.results."""
import asyncio

from gateway.filterapi import Filter, Result, Symbol


class First(Filter):
    name = "first"

    async def on_mail(self, ctx):
        await asyncio.sleep(0.2)
        return Result(symbols=(Symbol("FIRST_DONE"),), data={{"answer": 42}})


class _Looker(Filter):
    prefix = ""

    async def on_mail(self, ctx):
        first = ctx.results.get("first")
        if first is None:
            return Result(symbols=(Symbol(self.prefix + "_MISSED_FIRST"),))
        seen = ",".join(s.name for s in first.symbols)
        return Result(symbols=(Symbol(self.prefix + "_SAW_FIRST",
                                      (seen, str(first.data["answer"]))),))


class Second(_Looker):
    name = "second"
    requires = ("first",)
    prefix = "SECOND"


class Blind(_Looker):
    name = "blind"
    prefix = "BLIND"


class CycA(Second):
    name = "cyca"
    requires = ("cycb",)


class CycB(Second):
    name = "cycb"
    requires = ("cyca",)
'''

ENTRY_POINT_DIST = "myplugin-0.1.dist-info"


def write_module(directory: Path, module: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_distribution(site: Path, entry_points: dict[str, str]) -> None:
    """A real (if minimal) installed distribution: importlib.metadata finds the dist-info
    directory in any sys.path entry."""
    info = site / ENTRY_POINT_DIST
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mailgate.filters]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


def pythonpath(*dirs: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([*map(str, dirs), str(REPO)])}


def check_policy(policy: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    path = workdir / "check.toml"
    path.write_text(toml.dumps(policy))
    return subprocess.run([sys.executable, "-m", "gateway", "check-policy", str(path)],
                          cwd=workdir, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **pythonpath(), **(env or {})})


def tagger_policy(entry: dict[str, Any], **sections: Any) -> dict[str, Any]:
    filt = {**entry, "vip": ["vip@sender.test"], "blocked": ["spammer@sender.test"]}
    return base_policy(
        filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                 {"name": "headers", "on_error": "continue"}, filt],
        scores={"HEADERS_MISSING_FROM": 20.0},
        rules=[{"name": "block", "if_any": ["BLOCKED_SENDER"], "stage": "mail",
                "action": "reject"},
               {"name": "vip", "if_any": ["VIP_SENDER"], "stage": "mail", "action": "accept"}],
        **sections)


def setup_module_way(tmp: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    lib = tmp / "lib"
    write_module(lib / "acme", "__init__", "")
    write_module(lib / "acme", "tagging", TAGGER_SOURCE.format(cls="TagFilter", name="tagger"))
    return ({"name": "tagger", "module": "acme.tagging:TagFilter"}, {"env": pythonpath(lib)},
            "module acme.tagging:TagFilter")


def setup_plugin_dir_way(tmp: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    plugins = tmp / "plugins"
    write_module(plugins, "unrelated", "X = 1\n")  # other files in the directory are harmless
    path = write_module(plugins, "ptag", TAGGER_SOURCE.format(cls="PluginTag", name="ptag"))
    return {"name": "ptag"}, {"plugins": {"dirs": [str(plugins)]}}, f"plugin {path}"


def setup_entry_point_way(tmp: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    site = tmp / "site"
    write_module(site, "myplugin_filters", TAGGER_SOURCE.format(cls="EpTag", name="eptag"))
    write_distribution(site, {"eptag": "myplugin_filters:EpTag"})
    return {"name": "eptag"}, {"env": pythonpath(site)}, "entry point myplugin_filters:EpTag"


WAYS = {"module": setup_module_way, "plugin-dir": setup_plugin_dir_way,
        "entry-point": setup_entry_point_way}


def start(gateway_factory, tmp_path: Path, way: str):
    entry, extra, origin = WAYS[way](tmp_path)
    env = extra.pop("env", None)
    policy = tagger_policy(entry, **extra)
    return gateway_factory(policy, env=env), entry["name"], origin, policy, env


@pytest.mark.parametrize("way", list(WAYS))
def test_custom_filter_symbols_reach_log_rules_and_message(gateway_factory, tmp_path, way):
    gw, name, origin, policy, env = start(gateway_factory, tmp_path, way)
    listening = gw.events("listening")[0]
    assert listening["filters"] == ["rcpt", "headers", name]

    # check-policy finds it the same way and says where it came from.
    r = check_policy(policy, tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert f"  filter {name}: mail (timeout 10s, on_error tempfail; {origin})" in r.stdout

    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        # A blocked sender: the custom symbol fires the mail-stage rule -> 550 at MAIL.
        code, text = s.mail("spammer@sender.test")
        text = text.decode()
        assert code == 550 and text.startswith("5.7.1 Message rejected by policy (")
        blocked_qid = QID_RE.search(text).group(1)

        # A VIP sender: symbol + edit; the accept rule overrides the score (no From = 20).
        assert s.mail("vip@sender.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(b"Subject: no from header\r\n\r\nvip body\r\n")
        assert code == 250, text
        vip_qid = text.decode().rsplit(" ", 1)[1]

        # Anybody else with the same message: the score rejects it.
        assert s.mail("someone@sender.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(b"Subject: no from header\r\n\r\nother body\r\n")
        assert code == 550 and text.decode().startswith("5.7.1 Message rejected by policy (")
        other_qid = QID_RE.search(text.decode()).group(1)

    ev = gw.message_event(blocked_qid)
    assert ev["action"] == "reject" and ev["by"] == "rule:block"
    assert ev["symbols"] == ["BLOCKED_SENDER(0)[spammer@sender.test]"]
    assert ev["reply"] == f"550 5.7.1 Message rejected by policy ({blocked_qid})"
    assert ev["rcpts"] == [] and ev["relay"] == "not relayed"

    ev = gw.message_event(vip_qid)
    assert ev["action"] == "accept" and ev["by"] == "rule:vip"
    assert "VIP_SENDER(0)[vip@sender.test]" in ev["symbols"]
    assert "HEADERS_MISSING_FROM(20)" in ev["symbols"] and ev["score"] == 20

    ev = gw.message_event(other_qid)
    assert ev["action"] == "reject" and ev["by"] == "threshold:reject>=15"
    assert not any(s.startswith(("VIP_SENDER", "BLOCKED_SENDER")) for s in ev["symbols"])

    [msg] = gw.maildir_messages()
    assert f"X-Tagged-By: {name}\r\n".encode() in msg and msg.endswith(b"vip body\r\n")
    assert b"Return-Path: <vip@sender.test>" in msg


def test_module_filter_settings_error_is_named_by_check_policy(tmp_path):
    entry, extra, _ = setup_module_way(tmp_path)
    policy = tagger_policy(entry)
    policy["filters"][2]["vip"] = "vip@sender.test"
    policy["filters"][2]["colour"] = "red"  # only the first problem a from_config raises
    r = check_policy(policy, tmp_path, extra["env"])
    assert r.returncode == 1
    path = tmp_path / "check.toml"
    assert r.stderr.splitlines() == [f"{path}: filters.tagger.colour: unknown setting",
                                     f"{path}: 1 problem(s)"]
    del policy["filters"][2]["colour"]
    r = check_policy(policy, tmp_path, extra["env"])
    assert r.stderr.splitlines()[0] == \
        f"{path}: filters.tagger.vip: must be a list of addresses"


BROKEN = {
    "nohook.py": '''
        from gateway.filterapi import Filter
        class NoHook(Filter):
            name = "nohook"
            async def on_data(self, ctx):  # not a stage
                pass
    ''',
    "raising.py": '''
        from gateway.filterapi import Filter
        class Raising(Filter):
            name = "raising"
            @classmethod
            def from_config(cls, cfg, services):
                raise RuntimeError("database not reachable")
            async def on_mail(self, ctx):
                pass
    ''',
}


def test_broken_custom_filters_are_named_by_check_policy(tmp_path):
    lib = tmp_path / "lib"
    for fname, source in BROKEN.items():
        write_module(lib, fname[:-3], source)
    write_module(lib, "tagmod", TAGGER_SOURCE.format(cls="TagFilter", name="tagger"))
    plugins = tmp_path / "plugins"
    write_module(plugins, "syntax_error", "def broken(:\n")
    policy = base_policy(filters=[
        {"name": "rcpt", "recipients": ["@example.test"]},
        {"name": "nohook", "module": "nohook:NoHook"},
        {"name": "missing", "module": "no_such_module_xyz:Filter"},
        {"name": "noattr", "module": "tagmod:NoSuchClass"},
        {"name": "badcfg", "module": "tagmod:TagFilter", "vip": "not-a-list"},
        {"name": "raising", "module": "raising:Raising"},
        {"name": "needy", "module": "tagmod:TagFilter"},
    ])
    r = check_policy(policy, tmp_path, pythonpath(lib))
    path = tmp_path / "check.toml"
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{path}: filters.nohook: module nohook:NoHook implements no hook (on_connect, on_helo, "
        f"on_mail, on_rcpt, on_message, on_sign, on_decided)",
        f"{path}: filters.missing: cannot import no_such_module_xyz: No module named "
        f"'no_such_module_xyz'",
        f"{path}: filters.noattr: tagmod has no attribute NoSuchClass",
        f"{path}: filters.badcfg.vip: must be a list of addresses",
        f"{path}: filters.raising: RuntimeError: database not reachable",
        f"{path}: 5 problem(s)",
    ]
    assert "Traceback" not in r.stderr

    # By name only: not built in, in no plugin dir, no entry point.
    policy = base_policy(plugins={"dirs": [str(plugins)]},
                         filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                  {"name": "ghost"}])
    r = check_policy(policy, tmp_path)
    assert r.returncode == 1
    [err, _] = r.stderr.splitlines()
    # The plugin directory is scanned, so its broken file is what gets reported.
    assert err.startswith(f"{path}: filters.ghost: plugin file {plugins / 'syntax_error.py'}: "
                          f"SyntaxError")
    (plugins / "syntax_error.py").unlink()
    r = check_policy(policy, tmp_path)
    assert r.stderr.splitlines()[0] == (
        f"{path}: filters.ghost: no such filter: not built in, not in plugins.dirs, no "
        f"'mailgate.filters' entry point (set module = \"pkg.mod:Class\" for your own)")


def test_entry_point_that_fails_to_load_is_named(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, {"epbroken": "myplugin_missing_module:Filter"})
    policy = base_policy(filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                  {"name": "epbroken"}])
    r = check_policy(policy, tmp_path, pythonpath(site))
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        f"{tmp_path / 'check.toml'}: filters.epbroken: entry point "
        f"myplugin_missing_module:Filter: ModuleNotFoundError: No module named "
        f"'myplugin_missing_module'")


def test_requires_orders_filters_within_a_stage(gateway_factory, tmp_path):
    lib = tmp_path / "lib"
    write_module(lib, "ordering", ORDER_SOURCE.format())
    policy = base_policy(filters=[
        {"name": "rcpt", "recipients": ["@example.test"]},
        # declared before what it requires: the pipeline must still run "first" first
        {"name": "second", "module": "ordering:Second"},
        {"name": "blind", "module": "ordering:Blind"},
        {"name": "first", "module": "ordering:First"},
    ])
    gw = gateway_factory(policy, env=pythonpath(lib))
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("bob@sender.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(b"From: bob@sender.test\r\nSubject: x\r\n\r\nbody\r\n")
    assert code == 250
    ev = gw.message_event(text.decode().rsplit(" ", 1)[1])
    # second waited for first and saw its symbols and data; blind (no requires) ran alongside
    # first and did not see it -- the control that shows requires is what made the difference.
    assert "SECOND_SAW_FIRST(0)[FIRST_DONE|42]" in ev["symbols"]
    assert "BLIND_MISSED_FIRST(0)" in ev["symbols"]
    assert "FIRST_DONE(0)" in ev["symbols"]
    assert 200 <= ev["stage_ms"]["mail"] < 1000  # concurrent: about one sleep, not two

    # A requirement missing from the chain, or a cycle, is a policy error.
    policy["filters"] = [{"name": "second", "module": "ordering:Second"}]
    r = check_policy(policy, tmp_path, pythonpath(lib))
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        f"{tmp_path / 'check.toml'}: filters.second: requires filter 'first', not in the "
        f"chain: add it, or remove 'second'")
    policy["filters"] = [{"name": "cyca", "module": "ordering:CycA"},
                         {"name": "cycb", "module": "ordering:CycB"}]
    r = check_policy(policy, tmp_path, pythonpath(lib))
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        f"{tmp_path / 'check.toml'}: filters: requires cycle: cyca -> cycb -> cyca")


STAGE_SOURCE = '''
"""Filters that refuse at the connect and helo stages, by verdict or by symbol."""
from gateway.filterapi import Action, Filter, Result, Symbol, Verdict

ACTIONS = {"reject": Action.REJECT, "tempfail": Action.TEMPFAIL, "none": None}


class _Gate(Filter):
    def __init__(self, action):
        self.action = action

    @classmethod
    def from_config(cls, cfg, services):
        return cls(ACTIONS[cfg.get("verdict", "none")])

    def result(self, symbol):
        verdict = Verdict(self.action) if self.action else None
        return Result(symbols=(Symbol(symbol),), verdict=verdict)


class ConnectGate(_Gate):
    name = "connectgate"

    async def on_connect(self, ctx):
        assert ctx.qid.startswith("S") and ctx.sender is None
        return self.result("CLIENT_FLAGGED")


class HeloGate(_Gate):
    name = "helogate"

    async def on_helo(self, ctx):
        return self.result("HELO_FLAGGED")
'''


def lines_until_close(sock) -> list[bytes]:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.splitlines()


@pytest.mark.parametrize(("verdict", "rule", "greeting"), [
    ("reject", None, "554 5.7.1 Message rejected by policy"),
    ("none", {"action": "reject", "reply": "550 5.7.1 Your network is not welcome here"},
     "554 5.7.1 Your network is not welcome here"),
    ("tempfail", None, "421 4.7.1 Message deferred by policy, try again later"),
    ("none", {"action": "tempfail"}, "421 4.7.1 Message deferred by policy, try again later"),
])
def test_connect_stage_refusal_replaces_the_greeting(gateway_factory, tmp_path, verdict, rule,
                                                     greeting):
    import socket

    lib = tmp_path / "lib"
    write_module(lib, "stagehooks", STAGE_SOURCE)
    rules = [{"name": "flagged", "if_any": ["CLIENT_FLAGGED"], "stage": "connect", **rule}] \
        if rule else []
    gw = gateway_factory(base_policy(
        filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                 {"name": "connectgate", "module": "stagehooks:ConnectGate", "verdict": verdict}],
        rules=rules), env=pythonpath(lib))
    with socket.create_connection(gw.address, timeout=10) as s:
        f = s.makefile("rb")
        first = f.readline().decode().rstrip("\r\n")
        # RFC 5321 4.3.2: instead of 220, only 554 (then wait for QUIT) or 421 (then close).
        assert re.fullmatch(re.escape(greeting) + r" \(S[0-9A-Z]{15}\)", first), first
        if first.startswith("554"):
            s.sendall(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
            assert [f.readline() for _ in range(3)] == [
                b"503 5.5.1 Service refused, only QUIT is accepted\r\n",
                b"503 5.5.1 Service refused, only QUIT is accepted\r\n",
                b"221 2.0.0 Bye\r\n"]
        assert f.read() == b""  # closed (at once for 421, after QUIT for 554)
    ev = gw.wait_for(lambda e: e.get("event") == "refused")
    assert ev["stage"] == "connect" and ev["reply"].startswith(greeting[:3])
    assert ev["by"] == ("rule:flagged" if rule else "filter:connectgate")
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["transactions"] == 0


def test_helo_stage_refusal_is_given_at_mail(gateway_factory, tmp_path):
    lib = tmp_path / "lib"
    write_module(lib, "stagehooks", STAGE_SOURCE)
    gw = gateway_factory(base_policy(
        filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                 {"name": "helogate", "module": "stagehooks:HeloGate"}],
        rules=[{"name": "bad-helo", "if_any": ["HELO_FLAGGED"], "stage": "helo",
                "action": "reject", "reply": "550 5.7.1 Fix your HELO"}]),
        env=pythonpath(lib))
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        assert s.ehlo("client.test")[0] == 250  # the answer waits for MAIL (like Postfix)
        code, text = s.mail("bob@sender.test")
        assert code == 550
        assert re.fullmatch(r"5\.7\.1 Fix your HELO \(([0-9A-Z]{16})\)", text.decode())
        qid = QID_RE.search(text.decode()).group(1)
    ev = gw.message_event(qid)
    assert ev["action"] == "reject" and ev["by"] == "rule:bad-helo"
    assert ev["symbols"] == ["HELO_FLAGGED(0)"]


SIGNER_SOURCE = '''
"""Signers (on_sign) for the signing-step tests, and an ``after`` ordering pair."""
import asyncio

from gateway.filterapi import AddHeader, Filter, Result, Symbol


class Stamp(Filter):
    name = "stamp"

    async def on_sign(self, ctx, header_block):
        # sees the final block: our Received: on top, the edits applied
        assert header_block.startswith(b"Received: from ")
        return (AddHeader("X-Stamp", "one\\r\\n\\tfolded line"),)


class Second(Filter):
    name = "second"

    async def on_sign(self, ctx, header_block):
        assert header_block.startswith(b"X-Stamp:")  # earlier signers' headers are on top
        return (AddHeader("X-Second", "yes"),)


class Broken(Filter):
    name = "broken"

    async def on_sign(self, ctx, header_block):
        raise RuntimeError("signing key unavailable")


class Slow(Filter):
    name = "slow"

    async def on_mail(self, ctx):
        await asyncio.sleep(0.3)
        return Result(symbols=(Symbol("SLOW_DONE"),))


class Late(Filter):
    name = "late"
    after = ("slow", "absent")  # absent: not in the chain, and that is fine

    async def on_mail(self, ctx):
        seen = "slow" in ctx.results
        return Result(symbols=(Symbol("LATE_SAW_SLOW" if seen else "LATE_MISSED_SLOW"),))
'''


def _send_one(gw: GatewayProcess) -> tuple[int, str]:
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("bob@sender.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(b"From: bob@sender.test\r\nSubject: x\r\n\r\nbody\r\n")
    return code, text.decode()


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_signers_run_in_order_on_the_final_headers(gateway_factory, tmp_path, mode):
    lib = tmp_path / "lib"
    write_module(lib, "signers", SIGNER_SOURCE)
    with Sink() as sink:
        policy = base_policy(downstream=f"smtp://127.0.0.1:{sink.port}",
                             relay={"mode": mode},
                             filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                      {"name": "stamp", "module": "signers:Stamp"},
                                      {"name": "second", "module": "signers:Second"}])
        gw = gateway_factory(policy, env=pythonpath(lib))
        code, _ = _send_one(gw)
        assert code == 250
        data = sink.wait_for(1, timeout_s=10)[0].data
    assert data.startswith(b"X-Second: yes\r\nX-Stamp: one\r\n\tfolded line\r\nReceived: ")


@pytest.mark.parametrize("on_error,code", [("tempfail", 451), ("continue", 250)])
def test_a_failing_signer_tempfails_or_is_skipped(gateway_factory, tmp_path, on_error, code):
    lib = tmp_path / "lib"
    write_module(lib, "signers", SIGNER_SOURCE)
    with Sink() as sink:
        policy = base_policy(downstream=f"smtp://127.0.0.1:{sink.port}",
                             filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                      {"name": "broken", "module": "signers:Broken",
                                       "on_error": on_error}])
        gw = gateway_factory(policy, env=pythonpath(lib))
        got, text = _send_one(gw)
        assert got == code, text
        qid = re.search(r"[0-9A-Z]{16}", text).group(0)  # type: ignore[union-attr]
        ev = gw.message_event(qid)
        if code == 451:
            assert text.startswith("4.3.0 ") and qid in text
            assert ev["sign_error"] == "broken: RuntimeError: signing key unavailable"
            assert ev["relay"] == "not relayed"
            time.sleep(0.3)
            assert sink.messages == []
        else:
            assert ev.get("sign_error") is None
            assert sink.wait_for(1, timeout_s=10)[0].data.startswith(b"Received: ")


def test_after_orders_only_when_present(gateway_factory, tmp_path):
    lib = tmp_path / "lib"
    write_module(lib, "signers", SIGNER_SOURCE)
    policy = base_policy(filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                  {"name": "late", "module": "signers:Late"},
                                  {"name": "slow", "module": "signers:Slow"}])
    gw = gateway_factory(policy, env=pythonpath(lib))
    _, text = _send_one(gw)
    ev = gw.message_event(text.rsplit(" ", 1)[1])
    assert "LATE_SAW_SLOW(0)" in ev["symbols"] and "SLOW_DONE(0)" in ev["symbols"]
