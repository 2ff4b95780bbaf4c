"""Tests for the example filter of docs/writing-filters.md: the hook called directly with a
FilterContext (no sockets), its settings errors, and the whole gateway with the filter loaded
by ``module = "vip_filter:VipFilter"`` from this directory.

Run from the repository root: ``pytest docs/examples`` (pytest puts this directory on
sys.path, so ``import vip_filter`` finds the example next to this file).
"""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
import vip_filter

from gateway.errors import PolicyError
from gateway.filterapi import AddHeader, Client, ConfigError, FilterContext, Stage, Symbol
from gateway.policy.loader import parse_policy
from gateway.registry import build_chain
from gateway.services import Services
from gateway.smtp.address import NULL, Address
from tests.support.gateway import REPO, GatewayProcess, base_policy

HERE = Path(__file__).resolve().parent
SETTINGS = {"senders": ["CEO@partner.test", "@board.partner.test"]}


def make_filter(**settings: object) -> vip_filter.VipFilter:
    return vip_filter.VipFilter.from_config({**SETTINGS, **settings}, Services())


def mail_ctx(sender: Address) -> FilterContext:
    return FilterContext(stage=Stage.MAIL, qid="0000000000000QID",
                         client=Client("192.0.2.1", 40000, helo="mx.partner.test"),
                         sender=sender)


# -- unit: call the hook directly -------------------------------------------------------------

def test_listed_sender_gets_symbol_and_header():
    result = asyncio.run(make_filter().on_mail(mail_ctx(Address("ceo", "Partner.TEST"))))
    assert result.symbols == (Symbol("VIP_SENDER", ("ceo@Partner.TEST",)),)
    assert result.edits == (AddHeader("X-VIP", "yes"),)
    assert result.verdict is None  # the filter reports; the policy decides
    assert result.data["matched"] == "ceo@partner.test"


def test_whole_domain_and_custom_header():
    f = make_filter(header="X-Board")
    result = asyncio.run(f.on_mail(mail_ctx(Address("chair", "board.partner.test"))))
    assert [s.name for s in result.symbols] == ["VIP_SENDER"]
    assert result.edits == (AddHeader("X-Board", "yes"),)
    assert result.data["matched"] == "@board.partner.test"


@pytest.mark.parametrize("sender", [Address("intern", "partner.test"),
                                    Address("ceo", "partner.test.evil"),
                                    Address("chair", "sub.board.partner.test"),
                                    NULL])
def test_other_senders_get_nothing(sender):
    result = asyncio.run(make_filter().on_mail(mail_ctx(sender)))
    assert result.symbols == () and result.edits == ()


@pytest.mark.parametrize(("settings", "key", "reason"), [
    ({"senders": "ceo@partner.test"}, "senders", "must be a list of strings"),
    ({"senders": ["partner.test"]}, "senders", "'partner.test' is not an address or @domain"),
    ({"senders": ["x@y.test"], "header": "X VIP:"}, "header",
     "'X VIP:' is not a header field name"),
    ({"senders": ["x@y.test"], "sender": []}, "sender", "unknown setting (did you mean 'senders'?) (known: header, senders)"),
    ({}, "senders", "is required (addresses or @domain)"),
])
def test_settings_errors(settings, key, reason):
    with pytest.raises(ConfigError) as exc:
        vip_filter.VipFilter.from_config(settings, Services())
    assert (exc.value.key, exc.value.reason) == (key, reason)


def test_settings_errors_as_the_policy_loader_reports_them(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    policy = parse_policy({"filters": [{"name": "vip", "module": "vip_filter:VipFilter",
                                        "senders": ["nobody"]}]}, "my.toml")
    with pytest.raises(PolicyError) as exc:
        build_chain(policy, Services())
    assert exc.value.problems == (
        "my.toml: filters.vip.senders: 'nobody' is not an address or @domain",)


# -- end to end: the real gateway loads the example from this directory -----------------------

POLICY = base_policy(
    filters=[{"name": "rcpt", "recipients": ["@example.test"]},
             {"name": "headers", "on_error": "continue"},
             {"name": "vip", "module": "vip_filter:VipFilter", "timeout_s": 2,
              "on_error": "continue", "senders": ["ceo@partner.test"]}],
    scores={"HEADERS_MISSING_FROM": 20.0},  # above the reject threshold (15)
    rules=[{"name": "vip-accept", "if_any": ["VIP_SENDER"], "action": "accept"}],
)
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
NO_FROM = b"To: alice@example.test\r\nSubject: quarterly numbers\r\n\r\nsee attached\r\n"


@pytest.fixture
def gateway(tmp_path):
    gw = GatewayProcess(tmp_path / "gw", POLICY, env=ENV).start()
    yield gw
    gw.stop()


def test_end_to_end_vip_sender_is_tagged_and_whitelisted(gateway):
    with smtplib.SMTP(*gateway.address, timeout=10) as s:
        s.ehlo("mx.partner.test")
        assert s.mail("ceo@partner.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(NO_FROM)
        assert code == 250, text
        vip_qid = text.decode().rsplit(" ", 1)[1]
        # The same message from anybody else is rejected on its score.
        assert s.mail("intern@partner.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(NO_FROM)
        assert code == 550
        assert re.fullmatch(rb"5\.7\.1 Message rejected by policy \([0-9A-Z]{16}\)", text)

    ev = gateway.message_event(vip_qid)
    assert ev["action"] == "accept" and ev["by"] == "rule:vip-accept"
    assert "VIP_SENDER(0)[ceo@partner.test]" in ev["symbols"]
    [msg] = gateway.maildir_messages()
    assert b"\r\nX-VIP: yes\r\n" in msg and msg.endswith(b"see attached\r\n")


def test_check_policy_names_the_filter_and_where_it_came_from(tmp_path):
    from tests.support import toml

    path = tmp_path / "policy.toml"
    path.write_text(toml.dumps(POLICY))
    r = subprocess.run([sys.executable, "-m", "gateway", "check-policy", str(path)],
                       env={**os.environ, **ENV}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert ("  filter vip: mail (timeout 2s, on_error continue; module vip_filter:VipFilter)"
            in r.stdout.splitlines())


# -- the guide shows this very code, and its policy snippets load ------------------------------

GUIDE = HERE.parent / "writing-filters.md"


def test_guide_shows_the_example_verbatim():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert (HERE / "vip_filter.py").read_text() in blocks


def test_guide_policy_snippets_load(monkeypatch):
    import tomllib

    monkeypatch.syspath_prepend(str(HERE))
    snippets = [b for b in re.findall(r"```toml\n(.*?)```", GUIDE.read_text(), re.S)
                if 'module = "vip_filter:VipFilter"' in b]
    assert len(snippets) == 2
    for text in snippets:
        data = tomllib.loads(text)
        policy = parse_policy({"domains": {"accepted": ["example.test"]}, **data}, "guide")
        [loaded] = build_chain(policy, Services())
        assert loaded.name == "vip" and loaded.stages == (Stage.MAIL,)
        assert loaded.origin == "module vip_filter:VipFilter"
