"""What a new admin sees when a policy or a command line is wrong (review of issue 25): every
problem of the file in one run of `check-policy` and of `run`, the same problems in both, each
one line naming file, key and reason, and never a traceback: YAML syntax errors, a TOML file
saved with a byte-order mark, several unknown settings in one filter, a Bayes store that is
not one, environment problems beside filter problems, bad `health` options, and a reader of
the output that goes away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.gateway import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "MAILGATE_SYSTEM_POLICY": "/nonexistent",
       "MAILGATE_LISTEN": "127.0.0.1:0"}
ENV.pop("MAILGATE_POLICY", None)
ENV.pop("MAILGATE_STATE_DIR", None)


def mailgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=60)


def run_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """`run`'s error lines (kv log format) without their timestamp."""
    out = []
    for line in r.stderr.splitlines():
        assert " error mailgate " in line or " warning mailgate " in line, r.stderr
        out.append(line.split(" error mailgate ", 1)[-1])
    return out


POLICY = """\
[server]
workers = 1
[domains]
accepted = ["acme.org"]
[[filters]]
name = "rcpt"
recipients = ["@acme.org"]
"""



def refused(path: Path) -> tuple[int, list[str]]:
    """check-policy on ``path``: its exit code and stderr lines."""
    r = mailgate("check-policy", str(path), cwd=path.parent)
    return r.returncode, r.stderr.splitlines()

def test_yaml_syntax_error_is_one_line_in_check_policy_and_run(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text('server:\n  hostname: "x\n  listen: [\n')
    want = (f'{path}: YAML syntax: found unexpected end of stream (at line 4, column 1) '
            f'while scanning a quoted scalar (at line 2, column 13)')
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [want, f"{path}: 1 problem(s)"])
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    assert (r.returncode, run_lines(r)) == (1, [want])


def test_toml_with_a_byte_order_mark_loads_as_yaml_does(tmp_path):
    # Windows editors save UTF-8 with a BOM; PyYAML skips it, tomllib calls it an "Invalid
    # statement (at line 1, column 1)"
    path = tmp_path / "p.toml"
    path.write_bytes(b"\xef\xbb\xbf" + POLICY.encode())
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith(f"{path}: ok\n")


def test_every_unknown_setting_of_a_filter_is_reported(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[[filters]]\nname = "rules"\nshipped = true\nscroe = 3\n'
                    'timeout = 5\n')
    known = "(known: files, max_scan_bytes, prefix, rule_timeout_s, scan_budget_s, shipped)"
    want = [f"{path}: filters.rules.scroe: unknown setting {known}",
            f"{path}: filters.rules.timeout: unknown setting (did you mean 'timeout_s'?) {known}"]
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [*want, f"{path}: 2 problem(s)"])
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    assert (r.returncode, run_lines(r)) == (1, want)


def test_a_bayes_store_that_is_not_sqlite_is_refused_at_check_and_start(tmp_path):
    # before: check-policy said ok and run started, every message's bayes step then failing
    # with "DatabaseError: file is not a database" (451 under the default on_error)
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[[filters]]\nname = "bayes"\ndb_path = "bayes.db"\n')
    (tmp_path / "bayes.db").write_text("this is not an SQLite database at all\n")
    want = (f"{path}: filters.bayes.db_path: {tmp_path / 'bayes.db'}: not a Bayes store "
            f"(not an SQLite database)")
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [want, f"{path}: 1 problem(s)"])
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    assert (r.returncode, run_lines(r)) == (1, [want])
    (tmp_path / "bayes.db").unlink()
    (tmp_path / "bayes.db").mkdir()
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (f"{path}: filters.bayes.db_path: "
                                        f"{tmp_path / 'bayes.db'}: a directory, not a Bayes store")


def test_environment_and_filter_problems_are_reported_together_by_both_commands(tmp_path):
    # before: check-policy named the missing map file only, run the spool only; and an
    # unloadable key was only named once the map file was there
    (tmp_path / "afile").write_text("")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace('recipients = ["@acme.org"]', 'recipient_map_file = "users"')
                    + '[spool]\ndirectory = "afile/spool"\n'
                    + '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n')
    spool = (f"spool directory {tmp_path / 'afile' / 'spool'}: cannot create: "
             f"{tmp_path / 'afile'} is not a directory")
    users = (f"{path}: filters.rcpt.recipient_map_file: cannot read {tmp_path / 'users'}: "
             f"No such file or directory")
    tls = [f"{path}: tls.cert_file: {tmp_path / 'cert.pem'} holds no PEM certificate",
           f"{path}: tls.key_file: {tmp_path / 'key.pem'} holds no PEM private key"]
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        users, *tls, f"{path}: spool.directory: {spool}", f"{path}: 4 problem(s)"])
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    assert (r.returncode, run_lines(r)) == (1, [spool, users, *tls])


def test_tls_files_swapped_or_not_matching_say_so(tmp_path):
    # before: "tls: cannot load certificate/key: [SSL] PEM lib (_ssl.c:3905) (...)" for
    # both files given the wrong way round
    from tests.integration.test_startup import make_cert

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = make_cert(tmp_path / "a")
    _, other_key = make_cert(tmp_path / "b")
    path = tmp_path / "p.toml"
    path.write_text(POLICY + f'[tls]\ncert_file = "{key}"\nkey_file = "{cert}"\n')
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        f"{path}: tls.cert_file: {key} holds no PEM certificate (cert_file and key_file "
        f"swapped?)",
        f"{path}: tls.key_file: {cert} holds no PEM private key (cert_file and key_file "
        f"swapped?)",
        f"{path}: 2 problem(s)"])
    path.write_text(POLICY + f'[tls]\ncert_file = "{cert}"\nkey_file = "{other_key}"\n')
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0].startswith(
        f"{path}: tls: cannot load certificate/key: [X509: KEY_VALUES_MISMATCH] key values "
        f"mismatch"), r.stderr


def test_health_timeout_must_be_a_positive_number(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    for value in ("0", "-1", "nan", "inf"):
        r = mailgate("health", "--policy", str(path), "--timeout-s", value, cwd=tmp_path)
        assert r.returncode == 2, (value, r.stderr)
        assert r.stderr.splitlines()[-1] == (
            f"mailgate health: error: argument --timeout-s: must be a number of seconds > 0, "
            f"got {value!r}"), r.stderr


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    # `mailgate check-policy | head -1`: the rest of the output has nowhere to go
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    (tmp_path / "spool").mkdir()
    for args in (("check-policy", str(path)), ("queue", "list", "--policy", str(path)),
                 ("quarantine", "list", "--policy", str(path))):
        rd, wr = os.pipe()
        os.close(rd)
        try:
            r = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=tmp_path, env=ENV,
                               stdout=wr, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(wr)
        assert r.stderr == "", (args, r.stderr)
        assert r.returncode == 0, args  # as `mailgate queue list | head` always did


def test_a_bad_listen_option_is_bad_usage_naming_the_option(tmp_path):
    # before: exit 1 (a bad environment) and the error blamed $MAILGATE_LISTEN, which the
    # admin never set; '[::1' was "':' does not appear to be an IPv4 or IPv6 address"
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    for value, why in (("foo", "must be host:port (port 0 picks a free port), got 'foo'"),
                       ("[::1", "must be [IPv6 address]:port, got '[::1'"),
                       ("", "must be host:port (port 0 picks a free port), got ''")):
        r = mailgate("run", "--policy", str(path), "--listen", value, cwd=tmp_path)
        assert r.returncode == 2, (value, r.stderr)
        assert r.stderr.splitlines()[-1] == f"mailgate run: error: argument --listen: {why}"
    path.write_text(POLICY.replace("workers = 1", 'workers = 1\nlisten = ["[::1"]'))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.stderr.splitlines()[0] == (f"{path}: server.listen[0]: must be [IPv6 address]:port, "
                                        f"got '[::1'")


def test_a_maildir_that_cannot_be_written_is_refused_at_check_and_start(tmp_path):
    # before: check-policy said ok and run started; every message was then deferred with
    # the maildir's error, retried for days and bounced
    (tmp_path / "afile").write_text("")
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace('["acme.org"]', '["acme.org", "acme.net"]')
                    .replace('["@acme.org"]', '["@acme.org", "@acme.net"]')
                    + '[relay]\ndownstream = "maildir:afile/md"\n'
                    + '[relay.transport]\n"acme.net" = "maildir:afile/net"\n')
    want = [f"{path}: relay.downstream: maildir {tmp_path / 'afile' / 'md'}: cannot create: "
            f"{tmp_path / 'afile'} is not a directory",
            f"{path}: relay.transport.acme.net: maildir {tmp_path / 'afile' / 'net'}: cannot "
            f"create: {tmp_path / 'afile'} is not a directory"]
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (1, [*want, f"{path}: 2 problem(s)"])
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    assert (r.returncode, run_lines(r)) == (1, want)
    assert not (tmp_path / "spool").exists()  # nothing touched


def test_an_empty_policy_warns_that_no_domain_is_accepted(tmp_path):
    # before: "p.toml: ok" and nothing else, for a gateway that refuses every recipient
    path = tmp_path / "p.toml"
    path.write_text("")
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (0, [
        f"{path}: domains.accepted: warning: no domain is accepted and domains.trusted_networks "
        f"is empty, so every recipient but <postmaster> is refused as relay (550 5.7.1); list "
        f"your domains in domains.accepted"])
    assert r.stdout.startswith(f"{path}: ok (1 warning(s))\n")


def test_learn_names_what_it_cannot_read_from(tmp_path):
    # before: "/dev/null: no such file or directory", for a file that is there
    r = mailgate("learn", "--spam", "/dev/null", "--db", str(tmp_path / "b.db"), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (
        1, "mailgate learn: /dev/null: not a message file, mbox or directory\n")
    r = mailgate("learn", "--spam", "absent", "--db", str(tmp_path / "b.db"), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "mailgate learn: absent: no such file or directory\n")


def test_queue_on_a_spool_that_is_a_file_and_health_on_port_0(tmp_path):
    # before: "spool directory X does not exist" for a file that exists, and health's
    # "127.0.0.1:0: Connection refused"
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[spool]\ndirectory = "sfile"\n')
    (tmp_path / "sfile").write_text("")
    for cmd in ("queue", "quarantine"):
        r = mailgate(cmd, "list", "--policy", str(path), cwd=tmp_path)
        assert (r.returncode, r.stderr) == (1, f"mailgate {cmd}: spool directory "
                                               f"{tmp_path / 'sfile'}: not a directory "
                                               f"(spool.directory of {path})\n")
    path.write_text(POLICY.replace("workers = 1", 'workers = 1\nlisten = ["127.0.0.1:0"]'))
    env = {k: v for k, v in ENV.items() if k != "MAILGATE_LISTEN"}
    r = subprocess.run([sys.executable, "-m", "gateway", "health", "--policy", str(path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, "mailgate health: 127.0.0.1:0: port 0 is a free port "
                                           "picked at start, which cannot be probed: give "
                                           "server.listen (or --listen) a fixed port\n")


def test_queue_without_a_spool_names_the_state_directory_it_looked_in(tmp_path):
    # before: "(a relative spool.directory is relative to the policy file's directory)" for a
    # policy that sets no spool.directory at all
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    state = tmp_path / "state"
    r = subprocess.run([sys.executable, "-m", "gateway", "queue", "list", "--policy", str(path)],
                       cwd=tmp_path, env={**ENV, "MAILGATE_STATE_DIR": str(state)},
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (1, (
        f"mailgate queue: spool directory {state / 'spool'} does not exist: has the gateway run "
        f"with this policy ({path})? (spool.directory is not set: its default is spool in the "
        f"state directory, {state})\n"))


def test_quarantine_list_limit_must_not_be_negative(tmp_path):
    # before: --limit -1 listed everything (SQLite's LIMIT -1), exit 0
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    (tmp_path / "spool").mkdir()
    r = mailgate("quarantine", "list", "--limit", "-1", "--policy", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("mailgate quarantine list: error: argument --limit: "
                                         "must be an integer >= 0, got '-1'")


def test_reload_refuses_a_maildir_it_cannot_write_as_start_does(gateway_factory):
    # before: the reload was taken, and every message then deferred with the maildir's error
    from tests.integration.test_policy_cli import policy_with, reload, send

    gw = gateway_factory(policy_with("example.test"))
    (gw.workdir / "afile").write_text("")
    bad = policy_with("example.test")
    bad["relay"] = {**bad["relay"], "downstream": f"maildir:{gw.workdir / 'afile' / 'md'}"}
    ev = reload(gw, bad, "reload-failed")
    assert ev["kept"] == "previous policy"
    assert ev["errors"] == [f"{gw.policy_path}: relay.downstream: maildir "
                            f"{gw.workdir / 'afile' / 'md'}: cannot create: "
                            f"{gw.workdir / 'afile'} is not a directory"]
    code, text = send(gw, "alice@example.test")
    assert code == 250, text
    assert len(gw.maildir_messages()) == 1  # delivered by the policy kept


def test_a_failed_reload_is_one_line_whatever_the_number_of_workers(gateway_factory):
    # before: each of the N workers validated the file and logged the same reload-failed
    from tests.integration.test_policy_cli import policy_with, reload, send

    good = policy_with("example.test")
    good["server"] = {**good["server"], "workers": 3}
    gw = gateway_factory(good)
    gw.wait_for(lambda e: len(gw.events("listening")) == 3, timeout_s=30)  # all 3 started
    bad = policy_with("example.test")
    bad["server"] = {**bad["server"], "workers": 3, "colour": "red"}
    ev = reload(gw, bad, "reload-failed")
    assert ev["errors"] == [f"{gw.policy_path}: server.colour: unknown key"]
    time.sleep(2)  # the workers, had they been told, would have logged theirs by now
    assert len(gw.events("reload-failed")) == 1
    code, text = send(gw, "alice@example.test")
    assert code == 250, text
    reload(gw, good, "reloaded")  # a valid file still reaches every worker
    gw.wait_for(lambda e: len(gw.events("reloaded")) == 3, timeout_s=20)


def test_a_spool_whose_areas_are_not_writable_is_refused_at_check_and_start(public_dir):
    # `chown mailgate /var/lib/mailgate/spool` without -R after a first run as root: the
    # spool directory is writable, its areas are not. Before: check-policy said ok, run
    # started, and every message got "451 4.3.0 Internal error" with a PermissionError
    # traceback in the log.
    from tests.integration.test_startup import _nobody, _uid, run_fails
    from tests.integration.test_startup import mailgate as mailgate_as

    spool = public_dir / "spool"
    for sub in ("", "active", "deferred", "hold", "corrupt", "data", "spare"):
        (spool / sub).mkdir(exist_ok=True)
        (spool / sub).chmod(0o777)
    (spool / "incoming").mkdir(mode=0o700)  # root's alone
    policy = {"domains": {"accepted": ["example.test"]}, "server": {"workers": 1},
              "spool": {"directory": str(spool)},
              "filters": [{"name": "rcpt", "recipients": ["@example.test"]}]}
    want = (f"spool directory {spool / 'incoming'}: not writable: permission denied "
            f"(uid {_uid('nobody')})")
    line = run_fails(policy, public_dir / "p", prefix=_nobody())
    assert line.endswith(f" error mailgate {want}"), line
    path = public_dir / "p" / "policy.toml"
    r = mailgate_as("check-policy", str(path), cwd=public_dir, prefix=_nobody())
    assert (r.returncode, r.stderr.splitlines()) == (
        1, [f"{path}: spool.directory: {want}", f"{path}: 1 problem(s)"])
    # the areas fixed, the quarantine's index still root's: every quarantined message would
    # get 451 (the lock file alike: run said so, check-policy did not)
    (spool / "incoming").chmod(0o777)
    (spool / "quarantine.db").write_bytes(b"")
    (spool / "quarantine.db").chmod(0o600)
    want = (f"spool file {spool / 'quarantine.db'}: not writable: permission denied "
            f"(uid {_uid('nobody')})")
    line = run_fails(policy, public_dir / "p", prefix=_nobody())
    assert line.endswith(f" error mailgate {want}"), line
    r = mailgate_as("check-policy", str(path), cwd=public_dir, prefix=_nobody())
    assert (r.returncode, r.stderr.splitlines()) == (
        1, [f"{path}: spool.directory: {want}", f"{path}: 1 problem(s)"])


def test_an_encrypted_tls_key_is_one_line_not_a_passphrase_prompt(tmp_path):
    # before: OpenSSL asked "Enter PEM pass phrase:" on the terminal and check-policy (and
    # run, and a reload in a foreground run) waited for it
    from tests.integration.test_startup import make_cert

    if shutil.which("script") is None:
        pytest.skip("needs script(1) (util-linux) for a terminal")
    crt, key = make_cert(tmp_path)
    enc = tmp_path / "enc.pem"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
                    "-out", str(enc)], check=True, capture_output=True, timeout=60)
    path = tmp_path / "p.toml"
    path.write_text(POLICY + f'[tls]\ncert_file = "{crt}"\nkey_file = "{enc}"\n')
    cmd = f"{sys.executable} -m gateway check-policy {path}"
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=tmp_path, env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout
    assert r.stdout.replace("\r\n", "\n").splitlines() == [
        f"{path}: tls.key_file: {enc} is encrypted (it needs a passphrase): give an "
        f"unencrypted key (openssl pkey -in {enc} -out KEY)", f"{path}: 1 problem(s)"]


def test_a_worker_that_cannot_start_backs_off_until_the_file_is_fixed(gateway_factory):
    # A worker dies while the policy file is being edited (invalid for now): its replacement
    # cannot load it. Before: restarted every second, forever, each time rebuilding the engine
    # and logging the same errors; now 1, 2, 4... s (up to 60), and back once the file is fixed.
    from tests.integration.test_policy_cli import policy_with

    good = policy_with("example.test")
    good["server"] = {**good["server"], "workers": 2}
    gw = gateway_factory(good)
    gw.wait_for(lambda e: len(gw.events("listening")) == 2, timeout_s=30)
    [workers] = gw.events("workers")
    bad = policy_with("example.test")
    bad["server"] = {**bad["server"], "workers": 2, "colour": "red"}
    gw.write_policy(bad)
    os.kill(workers["pids"][0], signal.SIGKILL)
    gw.wait_for(lambda e: len(gw.events("worker-died")) >= 3, timeout_s=30)
    died = gw.events("worker-died")[:3]
    assert [(d["worker"], d["code"], d.get("restart_in_s")) for d in died] == [
        (0, -9, 1.0), (0, 1, 2.0), (0, 1, 4.0)]
    ts = [datetime.fromisoformat(d["ts"].replace("Z", "+00:00")).timestamp() for d in died]
    assert ts[2] - ts[1] >= 2.0, ts  # the second failed start came 2 s after the first
    gw.write_policy(good)
    gw.wait_for(lambda e: e.get("event") == "listening" and e.get("worker") == 0
                and len(gw.events("listening")) == 3, timeout_s=30)
    assert len(gw.events("worker-died")) == 3


def test_each_broken_plugin_file_is_named_for_its_own_filter_on_one_line(tmp_path):
    # before: every plugin filter was blamed on the first file that failed to import
    # (imp.py), vip.py's syntax error and rt.py's error were never shown, a good plugin in
    # the same directory could not load, and an exception text with a newline made two lines
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "imp.py").write_text("import nonexistent_module_xyz\n")
    (plugins / "rt.py").write_text('raise RuntimeError("boom\\nsecond line")\n')
    (plugins / "vip.py").write_text("def broken(:\n")
    (plugins / "zgood.py").write_text(
        "from gateway.filterapi import Filter, Result\n\n\n"
        "class Good(Filter):\n    name = 'good'\n\n"
        "    async def on_message(self, ctx):\n        return Result()\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[plugins]\ndirs = ["plugins"]\n'
                    + "".join(f'[[filters]]\nname = "{n}"\n' for n in ("vip", "imp", "rt", "good")))
    assert refused(path) == (1, [
        f"{path}: filters.vip: plugin file {plugins / 'vip.py'}: SyntaxError: invalid syntax "
        f"(vip.py, line 1)",
        f"{path}: filters.imp: plugin file {plugins / 'imp.py'}: ModuleNotFoundError: No module "
        f"named 'nonexistent_module_xyz'",
        f"{path}: filters.rt: plugin file {plugins / 'rt.py'}: RuntimeError: boom second line",
        f"{path}: 3 problem(s)"])


def test_every_bad_line_of_a_rule_file_in_one_run(tmp_path):
    # before: only the first bad line; the next after it was fixed, and so on
    (tmp_path / "local.cf").write_text(
        "body BAD_RE /(unclosed/\nscore BAD_RE 1\nfrobnicate X\nbody OK /fine/\n"
        "score OK notanumber\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[[filters]]\nname = "rules"\nfiles = ["local.cf", "absent.cf"]\n')
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    key = f"{path}: filters.rules.files:"
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        f"{key} local.cf:1: bad regex /(unclosed/: missing ), unterminated subpattern at "
        f"position 0",
        f"{key} local.cf:3: unknown rule type or directive 'frobnicate'",
        f"{key} local.cf:5: bad score 'notanumber'",
        f"{key} absent.cf: cannot read {tmp_path / 'absent.cf'}: No such file or directory",
        f"{path}: 4 problem(s)"])


def test_every_bad_recipient_entry_is_named_with_its_map_line(tmp_path):
    # before: only the first, and a bad map line was blamed on filters.rcpt.recipients
    (tmp_path / "users").write_text("alice@acme.org\nnot an address\nbob@acme.org\nx y\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace('recipients = ["@acme.org"]',
                                   'recipients = ["nobody", "@acme.org"]\n'
                                   'recipient_map_file = "users"'))
    assert refused(path) == (1, [
        f"{path}: filters.rcpt.recipients: 'nobody' is not an address or @domain",
        f"{path}: filters.rcpt.recipient_map_file: users:2: 'not' is not an address or @domain",
        f"{path}: filters.rcpt.recipient_map_file: users:4: 'x' is not an address or @domain",
        f"{path}: 3 problem(s)"])


def test_every_signing_domain_problem_in_one_run(tmp_path):
    # before: only the first domain's problem; the next one after it was fixed
    (tmp_path / "garbage.pem").write_text("not a key\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[[filters]]\nname = "dkim_sign"\n'
                    '[filters.domains."acme.org"]\nselector = "s1"\nkey_file = "garbage.pem"\n'
                    '[filters.domains."acme.net"]\nselector = "s1"\nkey_file = "absent.pem"\n'
                    '[filters.domains."acme.com"]\nselectr = "s1"\nkey_file = "absent.pem"\n')
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    key = f"{path}: filters.dkim_sign.domains"
    assert (r.returncode, r.stderr.splitlines()) == (1, [
        f"{key}.acme.org.key_file: {tmp_path / 'garbage.pem'}: neither a PEM RSA key nor a "
        f"base64 Ed25519 seed",
        f"{key}.acme.net.key_file: cannot read {tmp_path / 'absent.pem'}: No such file or "
        f"directory",
        f"{key}.acme.com.selectr: unknown setting (did you mean 'selector'?) (known: algorithm, "
        f"headers, key_file, oversign, selector)",
        f"{path}: 3 problem(s)"])


def test_a_downstream_ca_file_that_does_not_load_is_refused_at_check_and_start(tmp_path):
    # before: check-policy said ok and run started; every delivery with starttls = "verify"
    # then failed on it
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[relay]\ndownstream = "smtp://127.0.0.1:9"\nstarttls = "verify"\n'
                    'tls_ca_file = "ca.pem"\n')
    want = (f"{path}: relay.tls_ca_file: {tmp_path / 'ca.pem'} holds no PEM CA certificate "
            f"that loads ([X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found ")
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 2 and lines[0].startswith(want), r.stderr
    r = mailgate("run", "--policy", str(path), cwd=tmp_path)
    lines = run_lines(r)
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(want), r.stderr


def test_names_and_texts_that_go_into_the_dialogue_or_headers_are_checked(tmp_path):
    # before: all four accepted; the CR LF went into the greeting, the EHLO to the downstream,
    # the X-Spam-* field names and the Subject of relayed mail
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace("workers = 1", 'workers = 1\nhostname = "mx 1\\r\\nX-Evil: 1"')
                    + '[relay]\nhelo_name = "bad name"\n'
                    + '[headers]\nspam_header_prefix = "X-Spam:\\r\\nBcc: a@b"\n'
                    + 'subject_tag = "[SPAM]\\r\\nBcc: x@y"\n')
    host = "a host name (letters, digits, '-', '.') or an address literal like [192.0.2.1]"
    assert refused(path) == (1, [
        f"{path}: server.hostname: must be {host}, got 'mx 1\\r\\nX-Evil: 1'",
        f"{path}: relay.helo_name: must be {host}, got 'bad name'",
        f"{path}: headers.spam_header_prefix: must be the start of a header field name: "
        f"printable ASCII without ':' or spaces, got 'X-Spam:\\r\\nBcc: a@b'",
        f"{path}: headers.subject_tag: must be one line of text (no control characters), "
        f"got '[SPAM]\\r\\nBcc: x@y'",
        f"{path}: 4 problem(s)"])


def test_quarantine_expiry_goes_past_an_unreadable_entry(tmp_path):
    # before: `mailgate quarantine expire` ended in a SpoolCorrupt traceback, and the
    # gateway's expiry pass failed the same way every time: nothing after it ever expired
    from gateway.quarantine import Quarantine
    from gateway.spool import Spool

    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    q = Quarantine(Spool(tmp_path / "spool"))
    qid = "06H56MHD9SHF71F2"
    (tmp_path / "spool" / "hold" / f"{qid}.json").write_text('{"bad": 1}\n')
    (tmp_path / "spool" / "data" / qid).write_bytes(b"Subject: x\r\n\r\nx\r\n")
    with q._db() as db:
        db.execute("INSERT INTO messages VALUES (?, 0, 'a@b.test', 16, 1.0, 'r', 'default', "
                    "'[]', '127.0.0.1', 'h', 's', 'm')", (qid,))
    r = mailgate("quarantine", "expire", "--policy", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [line] = r.stderr.splitlines()
    assert " warning mailgate.quarantine quarantine-unreadable qid=06H56MHD9SHF71F2 " in line
    assert "Traceback" not in r.stderr
    assert (tmp_path / "spool" / "hold" / f"{qid}.json").exists()  # kept for a look


def test_an_unreadable_entry_can_be_deleted_it_is_set_aside(tmp_path):
    # before: `mailgate queue delete QID` / `mailgate quarantine delete QID` answered
    # "QID: KeyError: 'format'", exit 1: only a restart of the gateway or a hand-made rm
    # could drop it
    from gateway.spool import Spool

    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    Spool(tmp_path / "spool")
    for area, qid, cmd in (("deferred", "06H56DHQMC2XFMHS", "queue"),
                           ("hold", "06H56MHD9SHF71F2", "quarantine")):
        (tmp_path / "spool" / area / f"{qid}.json").write_text('{"bad": 1}\n')
        (tmp_path / "spool" / "data" / qid).write_bytes(b"Subject: x\r\n\r\nx\r\n")
        r = mailgate(cmd, "delete", qid, "--policy", str(path), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"{qid}: unreadable (KeyError: 'format'): moved to "
                            f"corrupt/{qid}.json\n")
        assert not (tmp_path / "spool" / area / f"{qid}.json").exists()
        assert (tmp_path / "spool" / "corrupt" / f"{qid}.data").exists()
        assert not (tmp_path / "spool" / "data" / qid).exists()


def test_nan_inf_and_absurd_worker_counts_are_refused(tmp_path):
    # before: all accepted. TOML has nan and inf: a nan score makes a message's total nan,
    # so no threshold ever fires; 100000 workers forks 100000 processes
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace("workers = 1", "workers = 100000").replace(
        'recipients = ["@acme.org"]', 'recipients = ["@acme.org"]\ntimeout_s = nan')
        + "[limits]\nidle_timeout_s = nan\ncommand_timeout_s = inf\n"
        + "[scores]\nRCPT_KNOWN = nan\n[actions]\nreject = inf\n")
    assert refused(path) == (1, [
        f"{path}: server.workers: must be an integer <= 1024, got 100000",
        f"{path}: limits.idle_timeout_s: must be a finite number, got nan",
        f"{path}: limits.command_timeout_s: must be a finite number, got inf",
        f"{path}: filters.rcpt.timeout_s: must be a finite number, got nan",
        f"{path}: scores.RCPT_KNOWN: must be a finite number, got nan",
        f"{path}: actions.reject: must be a score, or false to turn it off; got inf",
        f"{path}: 6 problem(s)"])


def test_a_misspelt_skip_filters_name_gets_a_suggestion(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY.replace('["acme.org"]', '["acme.org", "b.org"]').replace(
        '["@acme.org"]', '["@acme.org", "@b.org"]')
        + '[[filters]]\nname = "headers"\n[classes.vip]\ndomains = ["b.org"]\n'
        + 'skip_filters = ["hedaers"]\n')
    assert refused(path) == (1, [
        f"{path}: classes.vip.skip_filters: no filter named 'hedaers' in the chain (did you "
        f"mean 'headers'?)", f"{path}: 1 problem(s)"])


def test_two_rules_with_one_name_are_refused(tmp_path):
    # before: accepted; the log's by=rule:x could not tell which of them decided
    path = tmp_path / "p.toml"
    path.write_text(POLICY + '[[rules]]\nname = "x"\nif_any = ["A"]\naction = "reject"\n'
                    '[[rules]]\nname = "x"\nif_any = ["B"]\naction = "quarantine"\n')
    assert refused(path) == (1, [
        f"{path}: rules.x: appears twice: rule names must be unique (the log's by=rule:NAME "
        f"names the rule that decided)", f"{path}: 1 problem(s)"])
