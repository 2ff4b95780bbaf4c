"""The rules filter end to end: the real gateway (proxy relay to the sink) loading the default
rule set (filters/rulesets/default.cf, by absolute path) and a local rule file next to the policy
(relative path, resolved against the policy's directory). GTUBE is refused at end of data by
score and never relayed; ordinary mail goes through with the rules' symbols in the log; big
messages sent at once (their scans in the worker's CPU thread) each get their own verdict; a
broken rule file makes ``mailgate check-policy`` fail naming file and line."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy
from tests.support.sink import Sink

GTUBE = REPO.parent / "shared" / "corpora" / "gtube" / "gtube.eml"
DEFAULT_RULES = REPO / "filters" / "rulesets" / "default.cf"
QID_RE = re.compile(r"\(([0-9A-Z]{16})\)$")
LOCAL_RULES = r"""
# local additions, next to the policy file
header __FROM_PARTNER  From:addr =~ /\@partner\.test$/
body   __INVOICE       /\binvoice\b/i
meta   LOCAL_PARTNER_INVOICE  __FROM_PARTNER && __INVOICE
score  LOCAL_PARTNER_INVOICE  -1.5
"""


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def rules_policy(sink_port: int) -> dict[str, object]:
    return base_policy(
        downstream=f"smtp://127.0.0.1:{sink_port}",
        filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                 {"name": "rules", "files": [str(DEFAULT_RULES), "rules/local.cf"],
                  "max_scan_bytes": 65536}],
        scores={"URI_IP_HOST": 3.0})


class World:
    def __init__(self, sink: Sink, gw: GatewayProcess) -> None:
        self.sink, self.gw = sink, gw

    def send(self, data: bytes, sender: str = "someone@sender.test") -> tuple[int, str]:
        with smtplib.SMTP(*self.gw.address, timeout=20) as s:
            s.ehlo("client.sender.test")
            assert s.mail(sender)[0] == 250
            assert s.rcpt("alice@example.test")[0] == 250
            code, text = s.data(crlf(data))
            return code, text.decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("gw")
    (workdir / "rules").mkdir()
    (workdir / "rules" / "local.cf").write_text(LOCAL_RULES)
    with Sink() as sink, GatewayProcess(workdir, rules_policy(sink.port)) as gw:
        yield World(sink, gw)


@pytest.mark.skipif(not GTUBE.is_file(), reason=f"GTUBE message not found at {GTUBE}")
def test_gtube_is_rejected_by_score_and_not_relayed(world):
    relayed_before = len(world.sink.messages)
    code, text = world.send(GTUBE.read_bytes())
    assert code == 550 and text.startswith("5.7.1 Message rejected by policy ("), text
    qid = QID_RE.search(text).group(1)
    ev = world.gw.message_event(qid)
    assert ev["action"] == "reject" and ev["by"] == "threshold:reject>=15"
    assert "GTUBE(1000)" in ev["symbols"] and ev["score"] >= 1000
    assert ev["relay"] == "not relayed"
    assert len(world.sink.messages) == relayed_before  # proxy mode: nothing was sent on


def test_ordinary_mail_relayed_with_rule_symbols_policy_score_wins(world):
    msg = b"""From: Bob <bob@partner.test>
To: alice@example.test
Subject: your invoice
Message-ID: <inv-1@partner.test>
Content-Type: text/html; charset=utf-8

<p>Please find your invoice at <a href="http://192.0.2.55/inv/1">the portal</a>.</p>
<p>It covers the consulting work of last month as agreed in our contract, the travel
expenses of the two site visits and the licence renewal for the coming year. Payment is due
within thirty days; tell us if anything looks wrong and we will send a corrected copy.</p>
"""
    relayed_before = len(world.sink.messages)
    code, text = world.send(msg)
    assert code == 250, text
    qid = text.rsplit(" ", 1)[1]
    ev = world.gw.message_event(qid)
    assert ev["action"] == "accept"
    # the file's score (1.5) is overridden by the policy's [scores] (3); sub-rules stay hidden
    assert sorted(ev["symbols"]) == ["HTML_ONLY(0.5)", "LOCAL_PARTNER_INVOICE(-1.5)",
                                     "RCPT_KNOWN(0)", "URI_IP_HOST(3)"]
    assert ev["score"] == 2.0
    relayed = world.sink.wait_for(relayed_before + 1)[-1]
    assert b"invoice at" in relayed.data and b"Message-ID: <inv-1@partner.test>" in relayed.data


@pytest.mark.skipif(not GTUBE.is_file(), reason=f"GTUBE message not found at {GTUBE}")
def test_big_messages_at_once_each_get_their_own_verdict(world):
    """Messages over filterapi.INLINE_MAX_BYTES have their parse and scan run in the worker's
    one CPU thread, queued one after another: sent at the same time, each still gets its own
    verdict (GTUBE refused, the others relayed with their own symbols)."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.filterapi import INLINE_MAX_BYTES

    lines = 2 * INLINE_MAX_BYTES // 60
    filler = b"".join(b"Line %d of the quarterly report, nothing to see here at all.\n" % i
                      for i in range(lines))
    gtube = GTUBE.read_bytes() + b"\n" + filler
    invoice = (b"From: Bob <bob@partner.test>\nTo: alice@example.test\nSubject: invoice %d\n"
               b"Message-ID: <big-%d@partner.test>\n\nYour invoice is attached below.\n\n")
    plain = [invoice % (i, i) + filler for i in range(3)]
    assert all(len(crlf(m)) > 2 * INLINE_MAX_BYTES for m in [gtube, *plain])
    relayed_before = len(world.sink.messages)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(world.send, [plain[0], gtube, plain[1], plain[2]]))
    codes = [code for code, _ in replies]
    assert codes == [250, 550, 250, 250], replies
    ev = world.gw.message_event(QID_RE.search(replies[1][1]).group(1))
    assert ev["action"] == "reject" and "GTUBE(1000)" in ev["symbols"]
    for _, text in (replies[0], replies[2], replies[3]):
        ev = world.gw.message_event(text.rsplit(" ", 1)[1])
        assert ev["action"] == "accept" and "LOCAL_PARTNER_INVOICE(-1.5)" in ev["symbols"], ev
    relayed = world.sink.wait_for(relayed_before + 3)[relayed_before:]
    assert sorted(m.data.count(b"quarterly report") for m in relayed) == [lines] * 3
    assert b"GTUBE" not in b"".join(m.data for m in relayed)


def test_rule_file_error_fails_check_policy_naming_file_and_line(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "x.cf").write_text("body OK /fine/\n# comment\n\nbody BAD /(unclosed/\n")
    policy = base_policy(filters=[{"name": "rules", "files": ["rules/x.cf"]}])
    (tmp_path / "policy.toml").write_text(toml.dumps(policy))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "gateway", "check-policy",
                        str(tmp_path / "policy.toml")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert (f"{tmp_path / 'policy.toml'}: filters.rules.files: rules/x.cf:4: bad regex "
            f"/(unclosed/: missing ), unterminated subpattern at position 0") in r.stderr
