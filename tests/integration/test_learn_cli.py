"""``mailgate learn`` as a subprocess (Maildir, mbox, .eml files and directories; progress bar
on a terminal, progress lines without; the summary; forget; usage errors), then the real
gateway with the ``bayes`` filter and the store it trained: a held-out spam gets ``BAYES_99``
in the message log line, a held-out ham ``BAYES_00``."""

from __future__ import annotations

import mailbox
import os
import pty
import re
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "spamassassin" / "train"
pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")

SUMMARY = re.compile(r"learned (\d+) as (spam|ham), already known (\d+) \(skipped\), relearned "
                     r"(\d+) \((?:ham|spam) -> (?:spam|ham)\), errors (\d+); (\d+) messages in "
                     r"[\d.]+ s \(\d+ msg/s\); store (.+)")


def corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*.eml"))


def learn(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "learn", *map(str, args)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=60)


def summary(out: str) -> tuple[int, str, int, int, int, int]:
    m = SUMMARY.fullmatch(out.splitlines()[0])  # (a second line: Bayes still inactive)
    assert m, out
    return (int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5]), int(m[6]))


def maildir_of(root: Path, files: list[Path]) -> Path:
    md = root / "Maildir"
    for sub in ("cur", "new", "tmp", "records"):
        (md / sub).mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, md / ("new" if i % 2 else "cur") / f"{i}.host:2,")
    (md / "tmp" / "partial").write_bytes(files[0].read_bytes()[:100])  # never read
    (md / "records" / "x.json").write_text("{}")  # not a message (the quarantine's records)
    return md


def test_maildir_then_again_then_relearn_then_forget(tmp_path):
    spam = corpus("spam")[:12]
    md = maildir_of(tmp_path, spam)
    r = learn(tmp_path, "--spam", "--db", "b.db", md)
    assert r.returncode == 0, r.stderr
    assert summary(r.stdout) == (12, "spam", 0, 0, 0, 12)
    assert r.stdout.splitlines()[0].endswith("store b.db") and (tmp_path / "b.db").is_file()
    r = learn(tmp_path, "--spam", "--db", "b.db", md)
    assert summary(r.stdout) == (0, "spam", 12, 0, 0, 12)  # not counted twice
    r = learn(tmp_path, "--ham", "--db", "b.db", *spam[:5])  # the same messages as .eml files
    assert summary(r.stdout) == (0, "ham", 0, 5, 0, 5)
    assert "relearned 5 (spam -> ham)" in r.stdout
    r = learn(tmp_path, "--forget", "--db", "b.db", md)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("forgot 12, not known 0, errors 0; 12 messages in ")
    r = learn(tmp_path, "--forget", "--db", "b.db", spam[0])
    assert r.stdout.startswith("forgot 0, not known 1, errors 0; 1 messages in ")


def test_mbox_and_directories(tmp_path):
    ham = corpus("ham")[:7]
    box = mailbox.mbox(tmp_path / "ham.mbox")
    for f in ham[:4]:
        box.add(mailbox.mboxMessage(f.read_bytes()))
    box.close()
    d = tmp_path / "dir" / "sub"
    d.mkdir(parents=True)
    for f in ham[3:]:  # ham[3] is in both: learned once
        shutil.copy(f, d / f.name)
    (d / ".hidden").write_text("not mail")
    r = learn(tmp_path, "--ham", "--db", "b.db", "--progress-interval", "0",
              tmp_path / "ham.mbox", tmp_path / "dir")
    assert r.returncode == 0, r.stderr
    assert summary(r.stdout) == (7, "ham", 1, 0, 0, 8)
    lines = r.stderr.splitlines()  # no terminal: plain progress lines
    assert lines and all(re.fullmatch(r"learn: \d+/8 messages \(\d+%\), \d+ msg/s", x)
                         for x in lines), r.stderr
    assert lines[-1].startswith("learn: 8/8 messages (100%)")


def test_progress_bar_on_a_terminal(tmp_path):
    files = corpus("spam")[:20]
    main, sub = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "gateway", "learn", "--spam", "--db", "b.db",
                            *map(str, files)], cwd=tmp_path, stderr=sub, stdout=subprocess.PIPE,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, timeout=60)
        os.close(sub)
        chunks = []
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main)
    err = b"".join(chunks).decode()
    assert p.returncode == 0
    assert summary(p.stdout)[0] == 20
    assert re.search(r"\r\[#{30}\] 20/20 100% \d+ msg/s\r?\n$", err), repr(err)


INACTIVE = ("Bayes stays inactive until {} spam and {} ham: now {} spam, {} ham (until then "
            "every message scores BAYES_UNTRAINED)")


def test_learn_says_while_bayes_stays_inactive(tmp_path):
    """A typical first batch (the whole sample: 176 spam, 175 ham) is below the default
    minimum of 200 each: learn says so, with the counts; once a policy's minimum is reached
    (here lowered to 150) it says nothing more."""
    r = learn(tmp_path, "--spam", "--db", "b.db", CORPUS / "spam")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [INACTIVE.format(200, 200, 176, 0)], r.stdout
    r = learn(tmp_path, "--ham", "--db", "b.db", CORPUS / "ham")
    assert summary(r.stdout)[:2] == (175, "ham")
    assert r.stdout.splitlines()[1:] == [INACTIVE.format(200, 200, 176, 175)], r.stdout
    (tmp_path / "p.toml").write_text(toml.dumps(base_policy(filters=[
        {"name": "bayes", "db_path": "b.db", "min_spam": 150, "min_ham": 150}])))
    r = learn(tmp_path, "--forget", "--policy", "p.toml", corpus("ham")[0])
    assert r.stdout.startswith("forgot 1,")
    assert r.stdout.splitlines()[1:] == [], r.stdout  # 176 and 174: past the policy's 150
    (tmp_path / "p.toml").write_text(toml.dumps(base_policy(filters=[
        {"name": "bayes", "db_path": "b.db", "min_spam": 150, "min_ham": 180}])))
    r = learn(tmp_path, "--ham", "--policy", "p.toml", corpus("ham")[0])
    assert r.stdout.splitlines()[1:] == [INACTIVE.format(150, 180, 176, 175)], r.stdout


def test_usage_errors(tmp_path):
    r = learn(tmp_path, "--spam", "--db", "b.db", tmp_path / "nope")
    assert r.returncode == 1 and "nope: no such file or directory" in r.stderr
    r = learn(tmp_path, "--db", "b.db", tmp_path)  # no --spam/--ham/--forget
    assert r.returncode == 2
    (tmp_path / "p.toml").write_text(toml.dumps(base_policy()))
    r = learn(tmp_path, "--spam", "--policy", "p.toml", tmp_path)
    assert r.returncode == 1 and "no bayes filter in the chain" in r.stderr
    (tmp_path / "p.toml").write_text(toml.dumps(base_policy(
        filters=[{"name": "bayes", "min_spam": "many"}])))
    r = learn(tmp_path, "--spam", "--policy", "p.toml", tmp_path)
    assert r.returncode == 1 and "filters.bayes.min_spam: must be an integer >= 0" in r.stderr
    assert not (tmp_path / "bayes.db").exists()


# -- end to end -----------------------------------------------------------------------------

def held_out(kind: str) -> tuple[list[Path], list[Path]]:
    files = corpus(kind)
    return ([f for i, f in enumerate(files) if i % 3 != 2],
            [f for i, f in enumerate(files) if i % 3 == 2])


def wire(f: Path) -> bytes:
    """A corpus file as DATA: without its mbox "From " line, CRLF line ends."""
    data = f.read_bytes().partition(b"\n")[2]
    return re.sub(rb"\r?\n", b"\r\n", data)


def test_gateway_classifies_with_the_trained_store(tmp_path):
    policy = base_policy(filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                  {"name": "bayes", "db_path": "data/bayes.db", "min_spam": 50,
                                   "min_ham": 50, "timeout_s": 5}])
    gwdir = tmp_path / "gw"
    gwdir.mkdir()
    (gwdir / "data").mkdir()
    (gwdir / "policy.toml").write_text(toml.dumps(policy))
    spam_train, spam_test = held_out("spam")
    ham_train, ham_test = held_out("ham")
    # the learn command finds the store through the policy, relative to where it runs
    assert learn(gwdir, "--spam", "--policy", "policy.toml", *spam_train).returncode == 0
    r = learn(gwdir, "--ham", "--policy", "policy.toml", *ham_train)
    assert summary(r.stdout)[:2] == (117, "ham")
    assert (gwdir / "data" / "bayes.db").is_file()
    spam = next(f for f in spam_test if b"viagra" in f.read_bytes().lower()
                or b"money" in f.read_bytes().lower())
    ham = ham_test[0]
    events = []
    with GatewayProcess(gwdir, policy) as gw, smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("client.sender.test")
        for n, f in enumerate((spam, ham), start=1):
            assert s.mail("someone@sender.test")[0] == 250
            assert s.rcpt("alice@example.test")[0] == 250
            code, text = s.data(wire(f))
            assert code == 250, text
            gw.wait_for(lambda e, n=n: len(gw.events("message")) >= n)
            events.append(gw.events("message")[n - 1])
    spam_ev, ham_ev = events
    assert [x for x in spam_ev["symbols"] if x.startswith("BAYES")][0].startswith("BAYES_99(3.5)[")
    assert [x for x in ham_ev["symbols"] if x.startswith("BAYES")] == [
        x for x in ham_ev["symbols"] if x.startswith("BAYES_00(-1.9)[")]
    assert any(x.startswith("BAYES_00(-1.9)[0.0") for x in ham_ev["symbols"])


def test_gateway_start_line_says_bayes_is_inactive_until_trained(tmp_path):
    """The start: a store below the policy's minimum gives a ``filter-inactive`` warning with
    the counts and ``inactive=bayes`` on the ``listening`` line; past the minimum, neither."""
    db = tmp_path / "bayes.db"
    assert learn(tmp_path, "--spam", "--db", db, *corpus("spam")[:12]).returncode == 0
    assert learn(tmp_path, "--ham", "--db", db, *corpus("ham")[:10]).returncode == 0

    def start(name: str, minimum: int) -> tuple[dict, list[dict]]:
        policy = base_policy(filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                      {"name": "bayes", "db_path": str(db),
                                       "min_spam": minimum, "min_ham": minimum}])
        with GatewayProcess(tmp_path / name, policy) as gw:
            return gw.events("listening")[0], gw.events("filter-inactive")

    listening, inactive = start("below", 11)
    assert listening["inactive"] == ["bayes"]
    assert [(e["level"], e["filter"]) for e in inactive] == [("warning", "bayes")]
    assert inactive[0]["reason"].startswith(
        "Bayes stays inactive until 11 spam and 11 ham: now 12 spam, 10 ham in ")
    assert "BAYES_UNTRAINED" in inactive[0]["reason"]
    listening, inactive = start("trained", 10)
    assert "inactive" not in listening or listening["inactive"] is None, listening
    assert inactive == []
