"""The policy loader (gateway/policy/loader.py) in-process: defaults, every kind of validation
error (each naming file, key path and reason), several errors at once, TOML/YAML syntax errors,
YAML/TOML equivalence, and filter-settings errors from ``from_config`` via ``build_chain``."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import PolicyError
from gateway.filterapi import Action, Stage
from gateway.policy.loader import load_policy, parse_policy
from gateway.policy.schema import Limits, Listener, RelayConfig, Rule, Thresholds
from gateway.registry import build_chain
from gateway.relay.transport import Transport
from gateway.replies import Reply
from gateway.services import Services

SRC = "policies/test.toml"


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        parse_policy(data, SRC)
    return list(exc.value.problems)


def one_problem(data: dict[str, Any]) -> str:
    found = problems(data)
    assert len(found) == 1, found
    return found[0]


# -- the minimal policy ------------------------------------------------------------------------

def test_empty_policy_loads_with_documented_defaults():
    p = parse_policy({}, SRC)
    assert p.source == SRC
    assert p.hostname == "mailgate.localdomain"
    assert p.listeners == (Listener("127.0.0.1", 2525),)
    assert not p.tls.enabled
    assert p.limits == Limits()
    assert p.limits.max_line_bytes == 1000 and p.limits.bare_lf == "reject"
    assert p.limits.max_message_bytes == 25 * 1024 * 1024
    assert p.relay == RelayConfig()
    assert p.relay.mode == "queue"
    assert p.relay.downstream == Transport("maildir", path=Path("Maildir"))
    # No accepted domains and no trusted networks: nothing can be relayed anywhere.
    assert p.accepted_domains == frozenset()
    assert p.trusted_networks == ()
    assert not p.is_trusted("127.0.0.1")
    assert p.filters == () and p.plugin_dirs == () and p.classes == ()
    assert p.headers.received and p.headers.spam_headers
    assert p.headers.spam_header_prefix == "X-Spam-" and p.headers.subject_tag == "[SPAM]"
    assert p.spool.directory == Path("spool")
    assert p.quarantine.retention_s == 30 * 86400.0 and p.quarantine.expire_interval_s == 600.0
    d = p.default_class
    assert d.name == "default" and d.rules == () and dict(d.scores) == {}
    assert d.thresholds == Thresholds(add_header=5.0, rewrite_subject=None, quarantine=None,
                                      tempfail=None, reject=15.0)


def test_empty_file_loads_like_empty_policy(tmp_path):
    (tmp_path / "empty.toml").write_text("# nothing\n")
    (tmp_path / "empty.yaml").write_text("")
    expected = parse_policy({}, "x", tmp_path)  # relative paths: beside the file
    for name in ("empty.toml", "empty.yaml"):
        p = load_policy(tmp_path / name)
        assert dataclasses.replace(p, source="x") == expected


def test_default_policy_file_loads_and_matches_its_comments():
    p = load_policy(Path(__file__).resolve().parents[2] / "policies" / "default.toml")
    assert p.listeners == (Listener("127.0.0.1", 2525),)
    assert p.accepted_domains == {"example.test"}
    assert [f.name for f in p.filters] == ["rcpt", "headers", "spf", "dkim", "arc", "dmarc",
                                           "authres", "mime", "rules", "bayes", "attachments"]
    assert p.filters[0].settings == {"recipients": ["@example.test"]}
    assert p.filters[1].on_error == "continue"
    by_name = {f.name: f for f in p.filters}
    assert by_name["spf"].timeout_s > by_name["spf"].settings["check_timeout_s"]
    assert by_name["dmarc"].settings == {"trusted_arc_sealers": []}
    assert p.dns.max_queries_per_message == 100 and p.dns.cache_max_entries == 10000
    scores = p.default_class.scores
    assert scores["SPF_FAIL"] == 2.0 and scores["DMARC_FAIL"] == 3.5
    assert p.default_class.thresholds.rewrite_subject is None
    t = p.default_class.thresholds
    assert (t.add_header, t.quarantine, t.reject) == (3.0, 4.0, 12.0)
    assert scores["BAYES_99"] == 5.0 and by_name["rules"].settings == {"shipped": True}
    assert p.default_class.thresholds.tempfail is None  # "false = never"


def test_values_are_read_and_typed():
    p = parse_policy({
        "server": {"hostname": "mx.test", "listen": ["127.0.0.1:0", "[::1]:2526"]},
        "limits": {"idle_timeout_s": 1, "max_recipients": 3, "bare_lf": "normalize"},
        "relay": {"downstream": "lmtp://127.0.0.1:24",
                  "transport": {"Other.Test": "smtp://[::1]:25", ".sub.test": "maildir:md"}},
        "domains": {"accepted": ["Example.TEST."], "trusted_networks": ["10.1.2.3/8"]},
        "filters": [{"name": "rcpt", "timeout_s": 2, "on_error": "reject",
                     "recipients": ["@example.test"]},
                    {"name": "headers", "enabled": False}],
        "scores": {"HEADERS_MISSING_DATE": 1, "X_1": -2.5},
        "actions": {"reject": 10, "add_header": False, "quarantine": 7.5},
        "rules": [{"name": "no-from", "if_any": ["HEADERS_MISSING_FROM"], "action": "reject",
                   "reply": "550 5.7.1 No From header"},
                  {"if_all": ["A", "B"], "unless_any": ["C"], "action": "tempfail",
                   "stage": "rcpt"}],
    }, SRC)
    assert p.listeners == (Listener("127.0.0.1", 0), Listener("::1", 2526))
    assert p.limits.idle_timeout_s == 1.0 and isinstance(p.limits.idle_timeout_s, float)
    assert p.limits.max_recipients == 3 and p.limits.bare_lf == "normalize"
    assert p.relay.downstream == Transport("lmtp", host="127.0.0.1", port=24)
    assert dict(p.relay.transport) == {"other.test": Transport("smtp", host="::1", port=25),
                                       ".sub.test": Transport("maildir", path=Path("md"))}
    assert p.accepted_domains == {"example.test"}
    assert p.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert p.is_trusted("10.200.0.1") and p.is_trusted("::ffff:10.0.0.1")
    assert not p.is_trusted("11.0.0.1")
    rcpt, headers = p.filters
    assert (rcpt.timeout_s, rcpt.on_error, rcpt.enabled) == (2.0, "reject", True)
    assert rcpt.settings == {"recipients": ["@example.test"]}  # chain keys are not settings
    assert headers.enabled is False and headers.timeout_s == 10.0
    assert headers.on_error == "tempfail"  # nothing fails open by default
    assert dict(p.default_class.scores) == {"HEADERS_MISSING_DATE": 1.0, "X_1": -2.5}
    t = p.default_class.thresholds
    assert (t.reject, t.add_header, t.quarantine) == (10.0, None, 7.5)
    r1, r2 = p.default_class.rules
    assert r1 == Rule("no-from", Action.REJECT, Stage.MESSAGE, ("HEADERS_MISSING_FROM",),
                      reply=Reply(550, "5.7.1", "No From header"))
    assert r2 == Rule("rule2", Action.TEMPFAIL, Stage.RCPT, (), ("A", "B"), ("C",))


# -- one error of each kind --------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    # unknown keys, at every level
    ({"colour": "blue"}, "colour: unknown key"),
    ({"server": {"hostnme": "a"}}, "server.hostnme: unknown key (did you mean 'hostname'?)"),
    ({"limits": {"max_recipient": 5}}, "limits.max_recipient: unknown key (did you mean 'max_recipients'?)"),
    ({"relay": {"downstreams": "smtp://h:25"}}, "relay.downstreams: unknown key (did you mean 'downstream'?)"),
    ({"tls": {"cert": "x"}}, "tls.cert: unknown key (did you mean 'cert_file'?)"),
    ({"domains": {"accept": ["a.test"]}}, "domains.accept: unknown key (did you mean 'accepted'?)"),
    ({"headers": {"recieved": False}}, "headers.recieved: unknown key (did you mean 'received'?)"),
    ({"spool": {"dir": "x"}}, "spool.dir: unknown key"),
    ({"plugins": {"dir": ["x"]}}, "plugins.dir: unknown key (did you mean 'dirs'?)"),
    ({"actions": {"nuke": 3}}, "actions.nuke: unknown key"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "reject", "colour": 1}]},
     "rules[0].colour: unknown key"),
    ({"domains": {"accepted": ["a.test"]},
      "classes": {"s": {"domains": ["a.test"], "threshold": {}}}},
     "classes.s.threshold: unknown key"),
    ({"domains": {"accepted": ["a.test"]},
      "classes": {"s": {"domains": ["a.test"], "actions": {"rejct": 1}}}},
     "classes.s.actions.rejct: unknown key (did you mean 'reject'?)"),
    ({"domains": {"accepted": ["a.test"]},
      "classes": {"s": {"domains": ["a.test"],
                        "rules": [{"if_any": ["A"], "action": "reject", "when": 1}]}}},
     "classes.s.rules[0].when: unknown key"),
    # wrong types
    ({"server": "mx.test"}, "server: must be a table"),
    ({"server": {"hostname": 5}}, "server.hostname: must be a non-empty string, got 5"),
    ({"server": {"listen": "127.0.0.1:25"}}, "server.listen: must be a list of strings"),
    ({"limits": {"max_connections": "10"}},
     "limits.max_connections: must be an integer, got '10'"),
    ({"limits": {"max_recipients": 2.5}}, "limits.max_recipients: must be an integer, got 2.5"),
    ({"limits": {"idle_timeout_s": True}}, "limits.idle_timeout_s: must be a number, got True"),
    ({"limits": {"bare_lf": "strip"}},
     "limits.bare_lf: must be one of reject, normalize; got 'strip'"),
    ({"headers": {"received": "yes"}}, "headers.received: must be true or false, got 'yes'"),
    ({"domains": {"accepted": "a.test"}}, "domains.accepted: must be a list of strings"),
    ({"filters": {"name": "rcpt"}}, "filters: must be an array of tables ([[filters]])"),
    ({"filters": ["rcpt"]}, "filters[0]: must be a table"),
    ({"filters": [{"name": "rcpt", "timeout_s": "5"}]},
     "filters.rcpt.timeout_s: must be a number, got '5'"),
    ({"filters": [{"name": "rcpt", "enabled": "no"}]},
     "filters.rcpt.enabled: must be true or false, got 'no'"),
    ({"rules": {"name": "r"}}, "rules: must be an array of tables ([[rules]])"),
    ({"scores": {"A": "high"}}, "scores.A: must be a number, got 'high'"),
    ({"actions": {"reject": "high"}},
     "actions.reject: must be a score, or false to turn it off; got 'high'"),
    ({"relay": {"mode": "fifo"}}, "relay.mode: must be one of proxy, queue; got 'fifo'"),
    # numbers <= 0 for *_s keys (and < 1 for counts)
    ({"limits": {"idle_timeout_s": 0}}, "limits.idle_timeout_s: must be a number > 0"),
    ({"limits": {"data_timeout_s": -1.5}}, "limits.data_timeout_s: must be a number > 0"),
    ({"limits": {"shutdown_grace_s": 0.0}}, "limits.shutdown_grace_s: must be a number > 0"),
    ({"limits": {"check_wait_s": 0}}, "limits.check_wait_s: must be a number > 0"),
    ({"limits": {"max_concurrent_checks": 0}},
     "limits.max_concurrent_checks: must be an integer >= 1"),
    ({"relay": {"connect_timeout_s": 0}}, "relay.connect_timeout_s: must be a number > 0"),
    ({"relay": {"command_timeout_s": -3}}, "relay.command_timeout_s: must be a number > 0"),
    ({"relay": {"data_timeout_s": 0}}, "relay.data_timeout_s: must be a number > 0"),
    ({"relay": {"connection_reuse_s": -1}}, "relay.connection_reuse_s: must be a number >= 0"),
    ({"relay": {"connection_reuse_s": "5s"}},
     "relay.connection_reuse_s: must be a number, got '5s'"),
    ({"filters": [{"name": "rcpt", "timeout_s": 0}]},
     "filters.rcpt.timeout_s: must be a number > 0"),
    ({"limits": {"max_recipients": 0}}, "limits.max_recipients: must be an integer >= 1"),
    ({"limits": {"max_line_bytes": 50}},
     "limits.max_line_bytes: must be an integer >= 80 (RFC 5321 requires 1000)"),
    ({"limits": {"max_command_line_bytes": 100}},
     "limits.max_command_line_bytes: must be an integer >= 512 (RFC 5321 4.5.3.1.4)"),
    # on_error
    ({"filters": [{"name": "rcpt", "on_error": "ignore"}]},
     "filters.rcpt.on_error: must be one of tempfail, continue, reject, quarantine; "
     "got 'ignore'"),
    # relay.downstream / relay.transport
    ({"relay": {"downstream": "ftp://h:21"}},
     "relay.downstream: must start with smtp://, lmtp://, lmtp:unix: or maildir:, or be mx[:PORT]"),
    ({"relay": {"downstream": "smtp://mx.test"}}, "relay.downstream: smtp:// needs host:port"),
    ({"relay": {"downstream": "lmtp://h:0"}}, "relay.downstream: bad port '0'"),
    ({"relay": {"downstream": "maildir:"}}, "relay.downstream: maildir: needs a directory"),
    ({"relay": {"downstream": 25}},
     "relay.downstream: must be a string like smtp://host:port, lmtp://host:port, maildir:DIR "
     "or mx"),
    ({"relay": {"transport": {"a.test": "smtp://h:99999"}}},
     "relay.transport.a.test: bad port '99999'"),
    ({"relay": {"transport": {"not a domain": "smtp://h:25"}}},
     "relay.transport.not a domain: key must be a domain (or .domain for subdomains)"),
    ({"relay": {"transport": "smtp://h:25"}}, "relay.transport: must be a table"),
    # listen addresses
    ({"server": {"listen": ["nonsense"]}},
     "server.listen[0]: must be host:port (port 0 picks a free port), got 'nonsense'"),
    ({"server": {"listen": ["127.0.0.1:70000"]}},
     "server.listen[0]: must be host:port (port 0 picks a free port), got '127.0.0.1:70000'"),
    ({"server": {"listen": ["127.0.0.1:25", "127.0.0.1:smtp"]}},
     "server.listen[1]: must be host:port (port 0 picks a free port), got '127.0.0.1:smtp'"),
    ({"server": {"listen": ["999.1.1.1:25"]}},
     "server.listen[0]: '999.1.1.1' does not appear to be an IPv4 or IPv6 address"),
    ({"server": {"listen": []}}, "server.listen: needs at least one address"),
    # domains and networks
    ({"domains": {"accepted": ["not a domain"]}},
     "domains.accepted[0]: not a domain name: 'not a domain'"),
    ({"domains": {"trusted_networks": ["10.0.0.0/33"]}},
     "domains.trusted_networks[0]: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
    # rules
    ({"rules": [{"name": "r", "action": "reject"}]}, "rules.r: needs if_any or if_all"),
    ({"rules": [{"name": "r", "action": "reject", "unless_any": ["A"]}]},
     "rules.r: needs if_any or if_all"),
    ({"rules": [{"name": "r", "if_any": ["A"]}]}, "rules.r.action: is required"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "nuke"}]},
     "rules.r.action: must be one of accept, add_header, rewrite_subject, quarantine, discard, "
     "tempfail, reject; got 'nuke'"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "reject", "stage": "data"}]},
     "rules.r.stage: must be one of connect, helo, mail, rcpt, message; got 'data'"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "reject", "reply": "451 4.7.1 no"}]},
     "rules.r.reply: a reject rule needs a 5xx reply"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "tempfail",
                 "reply": "550 5.7.1 no"}]},
     "rules.r.reply: a tempfail rule needs a 4xx reply"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "quarantine",
                 "reply": "550 5.7.1 no"}]},
     "rules.r.reply: only reject and tempfail rules carry a reply"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "reject", "reply": "550 4.7.1 no"}]},
     "rules.r.reply: enhanced status 4.7.1 does not match code 550"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "reject", "reply": "go away"}]},
     "rules.r.reply: must look like '550 5.7.1 text', got 'go away'"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "quarantine", "stage": "rcpt"}]},
     "rules.r.stage: quarantine can only happen at the message stage"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "add_header", "stage": "connect"}]},
     "rules.r.stage: add_header can only happen at the message stage"),
    ({"rules": [{"name": "r", "if_any": ["A"], "action": "discard", "stage": "mail"}]},
     "rules.r.stage: discard can only happen at the message stage"),
    ({"rules": [{"name": "r", "if_any": ["spf_fail"], "action": "reject"}]},
     "rules.r.if_any: not a symbol name: 'spf_fail'"),
    ({"rules": [{"if_any": ["A"], "unless_any": ["B-C"], "action": "reject"}]},
     "rules.rule1.unless_any: not a symbol name: 'B-C'"),
    # classes
    ({"domains": {"accepted": ["a.test"]}, "filters": [{"name": "rcpt"}],
      "classes": {"s": {"domains": ["a.test"], "skip_filters": ["spam"]}}},
     "classes.s.skip_filters: no filter named 'spam' in the chain"),
    ({"domains": {"accepted": ["a.test"]}, "classes": {"s": {"domains": ["b.test"]}}},
     "classes.s.domains: b.test is not in domains.accepted"),
    ({"domains": {"accepted": ["a.test", "b.test"]},
      "classes": {"s": {"domains": ["a.test"]}, "t": {"domains": ["b.test", "A.test"]}}},
     "classes.t.domains: a.test is already in class s"),
    ({"classes": {"s": {"domains": []}}}, "classes.s.domains: needs at least one recipient domain"),
    ({"domains": {"accepted": ["a.test"]},
      "classes": {"s": {"domains": ["a.test"], "scores": {"bad-name": 1}}}},
     "classes.s.scores.bad-name: symbol names are UPPER_CASE letters, digits and _"),
    # filters chain
    ({"filters": [{"name": "rcpt"}, {"name": "headers"}, {"name": "rcpt"}]},
     "filters.rcpt: appears twice in the chain"),
    ({"filters": [{"name": "MyFilter"}]},
     "filters[0].name: must be a lowercase identifier like 'rcpt', got 'MyFilter'"),
    ({"filters": [{"timeout_s": 3}]},
     "filters[0].name: missing: every [[filters]] entry needs one"),
    # a misspelt name key is named as such (was: "must be a lowercase identifier")
    ({"filters": [{"nme": "rcpt"}]}, "filters[0].nme: unknown key (did you mean 'name'?)"),
    ({"filters": [{"name": "vip", "module": "vip_filter.VipFilter"}]},
     "filters.vip.module: must be 'package.module:Class', got 'vip_filter.VipFilter'"),
    # tls
    ({"tls": {"cert_file": "/etc/hostname"}}, "tls: cert_file and key_file go together"),
    ({"tls": {"key_file": "/etc/hostname"}}, "tls: cert_file and key_file go together"),
    # symbol names in scores
    ({"scores": {"spf_fail": 1.0}},
     "scores.spf_fail: symbol names are UPPER_CASE letters, digits and _"),
    ({"scores": {"SPF FAIL": 1.0}},
     "scores.SPF FAIL: symbol names are UPPER_CASE letters, digits and _"),
    # plugins
    ({"plugins": {"dirs": ["/nonexistent/plugins"]}},
     "plugins.dirs[0]: no such directory: /nonexistent/plugins"),
    # YAML can produce keys that are not strings; they must not crash the loader
    ({"scores": {1: 2.0}}, "scores.1: keys must be strings, got 1"),
    ({"relay": {"transport": {True: "smtp://h:25"}}},
     "relay.transport.True: keys must be strings, got True"),
])
def test_each_error_names_file_key_path_and_reason(data, expected):
    assert one_problem(data) == f"{SRC}: {expected}"


def test_tls_files_must_exist(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    missing = tmp_path / "key.pem"
    assert problems({"tls": {"cert_file": str(cert), "key_file": str(missing)}}) == [
        f"{SRC}: tls.key_file: no such file: {missing}"]
    # both present: the loader is satisfied (the certificate itself is checked by the app)
    missing.write_text("y")
    p = parse_policy({"tls": {"cert_file": str(cert), "key_file": str(missing)}}, SRC)
    assert p.tls.enabled and p.tls.cert_file == cert and p.tls.key_file == missing


def test_accept_rule_may_name_an_early_stage():
    # accept is not an SMTP answer; it is allowed at any stage (it whitelists at the message
    # stage), unlike the other non-refusing actions.
    p = parse_policy({"rules": [{"name": "vip", "if_any": ["VIP"], "action": "accept",
                                 "stage": "mail"}]}, SRC)
    assert p.default_class.rules[0].stage is Stage.MAIL


def test_several_errors_are_all_reported_at_once():
    found = problems({
        "server": {"listen": ["nowhere"], "hostnme": "x"},
        "limits": {"idle_timeout_s": 0, "max_recipients": "many"},
        "relay": {"downstream": "ftp://h:1"},
        "filters": [{"name": "rcpt", "on_error": "shrug"}, {"name": "rcpt"}],
        "rules": [{"name": "r", "action": "reject"}],
        "scores": {"lower": 1},
        "colour": "red",
    })
    assert sorted(found) == sorted(f"{SRC}: {x}" for x in [
        "colour: unknown key",
        "server.hostnme: unknown key (did you mean 'hostname'?)",
        "server.listen[0]: must be host:port (port 0 picks a free port), got 'nowhere'",
        "limits.idle_timeout_s: must be a number > 0",
        "limits.max_recipients: must be an integer, got 'many'",
        "relay.downstream: must start with smtp://, lmtp://, lmtp:unix: or maildir:, or be mx[:PORT]",
        "filters.rcpt.on_error: must be one of tempfail, continue, reject, quarantine; "
        "got 'shrug'",
        "filters.rcpt: appears twice in the chain",
        "rules.r: needs if_any or if_all",
        "scores.lower: symbol names are UPPER_CASE letters, digits and _",
    ])
    # The exception text lists them all too, one per line (what check-policy prints).
    with pytest.raises(PolicyError) as exc:
        parse_policy({"colour": 1, "limits": {"idle_timeout_s": 0}}, SRC)
    assert str(exc.value).splitlines() == list(exc.value.problems)


# -- files -------------------------------------------------------------------------------------

def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[server]\nhostname = "mx.test\n')
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    [msg] = exc.value.problems
    assert msg.startswith(f"{path}: TOML syntax: ")
    assert "line 2" in msg


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  hostname: [mx.test\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    [msg] = exc.value.problems
    assert msg.startswith(f"{path}: YAML syntax: ")


def test_yaml_top_level_must_be_a_table(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.problems == (f"{path}: the top level must be a table",)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    [msg] = exc.value.problems
    assert msg.startswith(f"{path}: cannot read: ")


def test_errors_in_a_file_carry_its_path(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[limits]\nidle_timeout_s = 0\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.problems == (f"{path}: limits.idle_timeout_s: must be a number > 0",)


TWIN_TOML = """\
[server]
hostname = "mx.twin.test"
listen = ["127.0.0.1:0", "[::1]:2525"]

[tls]

[limits]
max_recipients = 50
idle_timeout_s = 1.5
bare_lf = "normalize"

[relay]
mode = "proxy"
downstream = "smtp://127.0.0.1:10025"
connect_timeout_s = 5
helo_name = "relay.twin.test"

[relay.transport]
"lmtp.test" = "lmtp:unix:/run/dovecot/lmtp"
".sub.test" = "maildir:Maildir-sub"

[domains]
accepted = ["example.test", "strict.test", "lmtp.test"]
trusted_networks = ["192.0.2.0/24", "2001:db8::/32"]

[headers]
spam_header_prefix = "X-Twin-"

[spool]
directory = "spool-twin"

[[filters]]
name = "rcpt"
timeout_s = 5
recipients = ["@example.test", "alice@strict.test"]

[[filters]]
name = "headers"
on_error = "continue"
enabled = false

[scores]
HEADERS_MISSING_DATE = 1
HEADERS_MISSING_MESSAGE_ID = 0.5
NEGATIVE = -3.0

[actions]
add_header = 4
rewrite_subject = false
reject = 12.5

[[rules]]
name = "no-from"
if_any = ["HEADERS_MISSING_FROM"]
action = "reject"
reply = "550 5.7.1 A From header is required"

[[rules]]
if_all = ["A", "B"]
unless_any = ["C"]
stage = "rcpt"
action = "tempfail"

[classes.strict]
domains = ["strict.test"]
skip_filters = ["headers"]
scores = { HEADERS_MISSING_DATE = 5 }
actions = { reject = 1.0 }

[[classes.strict.rules]]
name = "strict-no-date"
if_any = ["HEADERS_MISSING_DATE"]
action = "quarantine"
"""

TWIN_YAML = """\
server:
  hostname: mx.twin.test
  listen: ["127.0.0.1:0", "[::1]:2525"]
tls: {}
limits:
  max_recipients: 50
  idle_timeout_s: 1.5
  bare_lf: normalize
relay:
  mode: proxy
  downstream: "smtp://127.0.0.1:10025"
  connect_timeout_s: 5
  helo_name: relay.twin.test
  transport:
    lmtp.test: "lmtp:unix:/run/dovecot/lmtp"
    .sub.test: "maildir:Maildir-sub"
domains:
  accepted: [example.test, strict.test, lmtp.test]
  trusted_networks: [192.0.2.0/24, "2001:db8::/32"]
headers:
  spam_header_prefix: X-Twin-
spool:
  directory: spool-twin
filters:
  - name: rcpt
    timeout_s: 5
    recipients: ["@example.test", alice@strict.test]
  - name: headers
    on_error: continue
    enabled: false
scores:
  HEADERS_MISSING_DATE: 1
  HEADERS_MISSING_MESSAGE_ID: 0.5
  NEGATIVE: -3.0
actions:
  add_header: 4
  rewrite_subject: false
  reject: 12.5
rules:
  - name: no-from
    if_any: [HEADERS_MISSING_FROM]
    action: reject
    reply: "550 5.7.1 A From header is required"
  - if_all: [A, B]
    unless_any: [C]
    stage: rcpt
    action: tempfail
classes:
  strict:
    domains: [strict.test]
    skip_filters: [headers]
    scores: {HEADERS_MISSING_DATE: 5}
    actions: {reject: 1.0}
    rules:
      - name: strict-no-date
        if_any: [HEADERS_MISSING_DATE]
        action: quarantine
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_twin_loads_identically_to_toml(tmp_path, suffix):
    toml_path = tmp_path / "twin.toml"
    yaml_path = tmp_path / f"twin{suffix}"
    toml_path.write_text(TWIN_TOML)
    yaml_path.write_text(TWIN_YAML)
    from_toml = load_policy(toml_path)
    from_yaml = load_policy(yaml_path)
    assert from_toml.source == str(toml_path) and from_yaml.source == str(yaml_path)
    assert dataclasses.replace(from_yaml, source="-") == dataclasses.replace(from_toml,
                                                                             source="-")
    # ...and the comparison is not vacuous: the twin exercises every section.
    strict = from_yaml.class_for_domain("STRICT.test")
    assert strict.name == "strict" and strict.skip_filters == {"headers"}
    assert strict.scores["HEADERS_MISSING_DATE"] == 5.0
    assert strict.scores["NEGATIVE"] == -3.0  # inherited from the default class
    assert strict.thresholds.reject == 1.0 and strict.thresholds.add_header == 4.0
    assert [r.name for r in strict.rules] == ["strict-no-date", "no-from", "rule2"]
    assert from_yaml.class_for_domain("example.test").name == "default"
    assert from_yaml.relay.transport[".sub.test"] == Transport(
        "maildir", path=tmp_path / "Maildir-sub")  # relative to the policy file
    assert from_yaml.filters[1].enabled is False


def test_yaml_errors_read_like_toml_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("limits:\n  idle_timeout_s: 0\nfilters:\n  - name: rcpt\n    on_error: "
                    "maybe\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert sorted(exc.value.problems) == sorted([
        f"{path}: limits.idle_timeout_s: must be a number > 0",
        f"{path}: filters.rcpt.on_error: must be one of tempfail, continue, reject, "
        f"quarantine; got 'maybe'",
    ])


# -- filter settings: from_config errors via build_chain ---------------------------------------

def chain_problems(filters: list[dict[str, Any]]) -> list[str]:
    policy = parse_policy({"domains": {"accepted": ["example.test"]}, "filters": filters}, SRC)
    with pytest.raises(PolicyError) as exc:
        build_chain(policy, Services())
    return list(exc.value.problems)


def test_filter_setting_errors_name_file_filter_and_setting():
    assert chain_problems([{"name": "rcpt", "recipients": ["nobody"]}]) == [
        f"{SRC}: filters.rcpt.recipients: 'nobody' is not an address or @domain"]
    assert chain_problems([{"name": "rcpt", "recipients": "@example.test"}]) == [
        f"{SRC}: filters.rcpt.recipients: must be a list of strings"]
    assert chain_problems([{"name": "rcpt", "recipient": ["@example.test"]}]) == [
        f"{SRC}: filters.rcpt.recipient: unknown setting (did you mean 'recipients'?) "
        f"(known: domains, "
        f"recipient_map_file, recipients)"]
    assert chain_problems([{"name": "headers", "strict": True}]) == [
        f"{SRC}: filters.headers.strict: unknown setting (known: )"]


def test_filter_errors_from_several_filters_are_reported_together(tmp_path):
    missing = tmp_path / "no-such-map"
    found = chain_problems([
        {"name": "rcpt", "recipient_map_file": str(missing)},
        {"name": "nosuchfilter"},
        {"name": "headers", "x": 1},
    ])
    assert found[0].startswith(f"{SRC}: filters.rcpt.recipient_map_file: cannot read {missing}")
    assert found[1].startswith(f"{SRC}: filters.nosuchfilter: no such filter: not built in")
    assert found[2].startswith(f"{SRC}: filters.headers.x: unknown setting")
    assert len(found) == 3


def test_disabled_filters_are_not_built():
    policy = parse_policy({"filters": [{"name": "nosuchfilter", "enabled": False},
                                       {"name": "headers"}]}, SRC)
    chain = build_chain(policy, Services())
    assert [f.name for f in chain] == ["headers"]
    assert chain[0].stages == (Stage.MESSAGE,) and chain[0].origin == "built-in filters.headers"


def test_builtin_filters_without_network_io_are_local():
    policy = parse_policy({"domains": {"accepted": ["example.test"]}, "filters": [
        {"name": "rcpt", "recipients": ["@example.test"]}, {"name": "headers"},
        {"name": "spf"}, {"name": "dkim"}, {"name": "dmarc"}, {"name": "authres"},
        {"name": "rules", "shipped": True}, {"name": "attachments"}]},
        SRC)
    chain = build_chain(policy, Services())
    assert {f.name for f in chain if f.local} == {"rcpt", "headers", "authres", "rules",
                                                  "attachments"}


def test_minimum_data_rate_keys_zero_turns_the_rate_off_and_the_grace_must_be_positive():
    assert (Limits().min_data_rate_bytes_per_s, Limits().data_rate_grace_s) == (500, 30.0)
    off = parse_policy({"limits": {"min_data_rate_bytes_per_s": 0}}, SRC).limits
    assert off.min_data_rate_bytes_per_s == 0
    assert one_problem({"limits": {"min_data_rate_bytes_per_s": -1}}) == \
        f"{SRC}: limits.min_data_rate_bytes_per_s: must be an integer >= 0"
    assert one_problem({"limits": {"data_rate_grace_s": 0}}) == \
        f"{SRC}: limits.data_rate_grace_s: must be a number > 0"
    assert one_problem({"limits": {"max_recipients": 0}}) == \
        f"{SRC}: limits.max_recipients: must be an integer >= 1"  # the others stay >= 1


def test_paths_written_are_relative_to_the_policy_defaults_to_the_working_directory(tmp_path):
    base = tmp_path / "conf"
    p = parse_policy({"spool": {"directory": "q"}, "relay": {"downstream": "maildir:M",
                                                               "transport": {"b.test": "lmtp:unix:l.sock"}},
                      "plugins": {"dirs": ["."]}}, "x", base.parent)
    assert p.spool.directory == tmp_path / "q" and p.relay.downstream.path == tmp_path / "M"
    assert p.relay.transport["b.test"].path == tmp_path / "l.sock"
    assert p.plugin_dirs == (tmp_path / ".",) and p.base_dir == tmp_path
    d = parse_policy({}, "x", base)  # keys left out: state in the working directory
    assert d.spool.directory == Path("spool") and d.relay.downstream.path == Path("Maildir")
    assert parse_policy({"spool": {"directory": "/abs/q"}}, "x", base).spool.directory == \
        Path("/abs/q")
