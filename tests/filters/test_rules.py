"""The rules filter: the .cf parser (every rule type, flags, metas, errors with file:line), the
Perl-to-Python regex translation, matching on crafted messages, the scan cap, and the default
rule set (GTUBE)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from filters._rulefile import RuleError, compile_perl, eval_meta, parse_meta, parse_text
from filters.rules import RulesFilter
from gateway.filterapi import Client, ConfigError, FilterContext, Stage, Symbol
from gateway.message import Message
from gateway.services import Services
from tests.support.gateway import REPO

GTUBE_DIR = REPO.parent / "shared" / "corpora" / "gtube"


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def make(tmp_path: Path, rules: str, **cfg: object) -> RulesFilter:
    (tmp_path / "t.cf").write_text(rules)
    return RulesFilter.from_config({"files": ["t.cf"], **cfg}, Services(policy_dir=tmp_path))


def run(f: RulesFilter, tmp_path: Path, data: bytes) -> dict[str, Symbol]:
    path = tmp_path / "msg"
    data = crlf(data)
    path.write_bytes(data)
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 1),
                        message=Message.from_spool(path, len(data)))
    res = asyncio.run(f.on_message(ctx))
    assert "scan_ms" in res.data
    return {s.name: s for s in res.symbols}


def hits(tmp_path: Path, rules: str, data: bytes, **cfg: object) -> set[str]:
    return set(run(make(tmp_path, rules, **cfg), tmp_path, data))


MSG = b"""From: "Alice" <alice@example.test>
To: bob@example.test
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=
Message-ID: <1@example.test>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b"

--b
Content-Type: text/plain; charset=utf-8

Hello Bob,
plain part here.

--b
Content-Type: text/html; charset=utf-8

<html><body><p>Visit <a href="http://198.51.100.7/login">our <b>shop</b></a> now</p>
<p>second paragraph</p></body></html>
--b--
"""


# -- parser ---------------------------------------------------------------------------------------

def test_every_rule_type_and_directive_parses():
    rs = parse_text(r"""
# a comment
header   H1  Subject =~ /hello/i      # trailing comment
header   H2  From:addr !~ /\@example\.test$/ [if-unset: none@x]
header   __H3 exists:X-Mailer
body     B1  /click\s+here/i
rawbody  R1  m{<a\s}i
full     F1  /^Received:/m
uri      U1  m!^https?://[^/]+\.test/!
meta     M1  (B1 + R1 + U1) > 1 && !__H3
score    B1  2.5
score    R1  0 0 0 1.25
describe B1  Click here
tflags   B1  nice unknown_flag
lang de  describe B1  Hier klicken
""")
    r = rs.rules
    assert {n: x.kind for n, x in r.items()} == {
        "H1": "header", "H2": "header", "__H3": "header", "B1": "body", "R1": "rawbody",
        "F1": "full", "U1": "uri", "M1": "meta"}
    assert r["H2"].negate and r["H2"].modifier == "addr" and r["H2"].if_unset == "none@x"
    assert r["__H3"].exists and r["__H3"].is_subrule
    assert r["B1"].score == 2.5 and r["B1"].description == "Click here"
    assert r["B1"].tflags == ("nice", "unknown_flag")
    assert r["R1"].score == 1.25  # of SpamAssassin's four scores: the Bayes+network set
    assert r["H1"].score == 1.0  # SpamAssassin's default
    assert r["H1"].regex is not None and r["H1"].regex.flags & re.I
    assert rs.meta_order == ["M1"]


def test_if_and_ifplugin_blocks_are_skipped_else_taken():
    rs = parse_text("""
ifplugin Mail::SpamAssassin::Plugin::Foo
body A /a/
if (version >= 3.004)
body B /b/
endif
else
body C /c/
endif
if can(Mail::SpamAssassin::Conf::feature_x)
  body D eval:whatever()
endif
""")
    assert set(rs.rules) == {"C"}


@pytest.mark.parametrize("expr,values,expected", [
    ("A && B", {"A": 1, "B": 1}, True),
    ("A && B", {"A": 1}, False),
    ("A || B", {"B": 1}, True),
    ("!A", {}, True),
    ("!(A || B) && C", {"C": 1}, True),
    ("(A + B + C) > 1", {"A": 1, "C": 1}, True),
    ("(A + B + C) > 1", {"A": 1}, False),
    ("A + B >= 2 || C", {"C": 1}, True),
    ("A * 2 == 2 && B - 1 < 0", {"A": 1}, True),
    ("(A + B) / 2 >= 1", {"A": 1, "B": 1}, True),
])
def test_meta_expressions(expr, values, expected):
    assert bool(eval_meta(parse_meta(expr), {k: float(v) for k, v in values.items()})) \
        is expected


@pytest.mark.parametrize("perl,text,matches", [
    (r"/abc/i", "xABCx", True),
    (r"/^b/", "a\nb", False),
    (r"/^b/m", "a\nb", True),
    (r"/a.b/", "a\nb", False),
    (r"/a.b/s", "a\nb", True),
    (r"/a b # comment\n c/x", "abc", True),
    (r"/end\z/", "the end\n", False),
    (r"/end\Z/", "the end\n", True),
    (r"/end$/", "the end\n", True),
    (r"/\Qa.b*c\E/", "xa.b*cx", True),
    (r"/\Qa.b*c\E/", "xaXbbcx", False),
    (r"/[[:upper:]][[:digit:]]+/", "x A12", True),
    (r"/(?<w>ab)\k<w>/", "abab", True),
    (r"/\x{e9}t\x{e9}/", "été", True),
    (r"m{a/b}", "a/b", True),
    (r"m!a\!b!", "a!b", True),
    (r"/[]x]/", "]", True),
    (r"/a++b/", "aab", True),  # possessive and atomic: Python 3.11 has them
    (r"/(?>a+)b/", "aab", True),
    (r"/\@foo/", "x@foo", True),
])
def test_perl_regex_translation(perl, text, matches):
    regex, rest = compile_perl(perl)
    assert rest == ""
    assert (regex.search(text) is not None) is matches


@pytest.mark.parametrize("perl,reason", [
    (r"/a\hb/", r"\h (horizontal space) is not supported"),
    (r"/a\Kb/", r"\K is not supported"),
    (r"/\p{L}/", r"\p{...} (Unicode properties) is not supported"),
    (r"/a(?{ code })/", "is not supported"),
    (r"/(?|a|b)/", "is not supported"),
    (r"/$var/", "variable interpolation"),
    (r"/a@list/", "array interpolation"),
    (r"/(a+)+b/", "can backtrack catastrophically"),
    (r"/(\w+\s?)*!/", "can backtrack catastrophically"),
    (r"/(?:\s*\S+){0,40}$/", "can backtrack catastrophically"),
    (r"/abc/q", "unsupported regex flag 'q'"),
    (r"/abc", "unterminated regex"),
    (r"/a(b/", "bad regex /a(b/: missing ), unterminated subpattern"),
    (r"/[[:foo:]]/", "POSIX class '[:foo:]' is not supported"),
])
def test_untranslatable_regexes_are_refused(perl, reason):
    with pytest.raises(ValueError) as e:
        compile_perl(perl)
    assert reason in str(e.value)


@pytest.mark.parametrize("perl,matches,misses", [
    (r"/(?:\w+\.)+com/", "see www.example.com now", "example com"),
    (r"/\A\s*\S+(?:\s+\S+){0,39}\s*\z/", "  three short words ", ""),
    (r"/(a|b)+c/", "xxabbac", "xxabba"),
    (r"/(?:[a-z]+-)*[a-z]+/", "well-known", "1234"),
])
def test_safe_repetitions_are_accepted(perl, matches, misses):
    regex, rest = compile_perl(perl)  # accepted, and it matches what Perl's would
    assert rest == ""
    assert regex.search(matches)
    assert not regex.search(misses)


@pytest.mark.parametrize("text,error", [
    ("\n\nbody X /a(/\n", "t.cf:3: bad regex /a(/"),
    ("blah X /a/\n", "t.cf:1: unknown rule type or directive 'blah'"),
    ("body X eval:check_foo()\n", "t.cf:1: body X: eval: tests are not supported"),
    ("body 9X /a/\n", "t.cf:1: bad rule name '9X'"),
    ("body A /a/\nmeta M A && NOPE\n", "t.cf:2: meta M uses unknown rule NOPE"),
    ("meta M1 M2\nmeta M2 M3 || A\nmeta M3 M1\nbody A /a/\n",
     "t.cf:1: meta cycle M1 -> M2 -> M3 -> M1"),
    ("meta M (A && \nbody A /a/\n", "t.cf:1: meta expression ends too early"),
    ("meta M A B\nbody A /a/\nbody B /b/\n", "t.cf:1: unexpected 'B' in meta expression"),
    ("score NOPE 1\n", "t.cf:1: score for unknown rule NOPE"),
    ("body A /a/\nscore A lots\n", "t.cf:2: bad score 'lots'"),
    ("header H Subject ~ /a/\n", "t.cf:1: header H: expected 'Header =~ /re/'"),
    ("header H Subject:foo =~ /a/\n", "t.cf:1: header H: unsupported modifier :foo"),
    ("body A /a/ trailing\n", "t.cf:1: unexpected text after the regex: 'trailing'"),
    ("ifplugin X\nbody A /a/\n", "t.cf: 1 if/ifplugin block(s) without endif"),
    ("endif\n", "t.cf:1: endif without if"),
])
def test_errors_name_file_and_line(text, error):
    with pytest.raises(RuleError) as e:
        parse_text(text, "t.cf")
    assert str(e.value).startswith(error)


def test_config_errors(tmp_path):
    (tmp_path / "bad.cf").write_text("body OK /ok/\n\nbody BAD /(/\n")
    svc = Services(policy_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        RulesFilter.from_config({"files": ["bad.cf"]}, svc)
    assert e.value.key == "files"
    assert e.value.reason.startswith("bad.cf:3: bad regex /(/: missing ),")
    with pytest.raises(ConfigError) as e:
        RulesFilter.from_config({"files": ["missing.cf"]}, svc)
    assert e.value.reason == (f"missing.cf: cannot read {tmp_path / 'missing.cf'}: "
                              "No such file or directory")
    for cfg, key in (({}, "files"), ({"files": "x.cf"}, "files"),
                     ({"files": ["bad.cf"], "max_scan_bytes": 10}, "max_scan_bytes"),
                     ({"files": ["bad.cf"], "prefix": "a b"}, "prefix"),
                     ({"files": ["bad.cf"], "typo": 1}, "typo")):
        with pytest.raises(ConfigError) as e:
            RulesFilter.from_config(cfg, svc)
        assert e.value.key == key


def test_relative_files_resolve_against_the_policy_dir_later_files_override(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.cf").write_text("body A /plain part/\nscore A 3\n")
    (tmp_path / "b.cf").write_text("score A 0.5\nbody C /nothing-like-this/\n")
    f = RulesFilter.from_config({"files": ["sub/a.cf", str(tmp_path / "b.cf")]},
                                Services(policy_dir=tmp_path))
    assert run(f, tmp_path, MSG) == {"A": Symbol("A", (), 0.5)}


# -- matching -------------------------------------------------------------------------------------

def test_header_rules_see_decoded_values_raw_addr_name_all_exists(tmp_path):
    rules = r"""
header SUBJ_DECODED  Subject =~ /Grüße aus Köln/
header SUBJ_RAW      Subject:raw =~ /=\?utf-8\?q\?Gr=C3=BC/
header SUBJ_RAW_NO   Subject:raw =~ /Grüße/
header FROM_ADDR     From:addr =~ /^alice\@example\.test$/
header FROM_NAME     From:name =~ /^Alice$/
header ALL_HDRS      ALL =~ /^To: bob\@example\.test$/m
header HAS_MID       exists:Message-Id
header HAS_XM        exists:X-Mailer
header NOT_SPAMMER   From !~ /spammer/
header UNSET_EMPTY   X-Missing =~ /^$/
header UNSET_VALUE   X-Missing =~ /^dflt$/ [if-unset: dflt]
header TOCC          ToCc =~ /bob/
"""
    assert hits(tmp_path, rules, MSG) == {
        "SUBJ_DECODED", "SUBJ_RAW", "FROM_ADDR", "FROM_NAME", "ALL_HDRS", "HAS_MID",
        "NOT_SPAMMER", "UNSET_EMPTY", "UNSET_VALUE", "TOCC"}


def test_body_rawbody_uri_full(tmp_path):
    rules = r"""
body    BODY_SUBJECT   /^Grüße aus Köln$/
body    BODY_PLAIN     /^Hello Bob, plain part here\.$/
body    BODY_HTML_TEXT /Visit our shop now/
body    BODY_NO_TAGS   /<b>/
rawbody RAW_TAGS       /our <b>shop<\/b>/
rawbody RAW_NO_DECODE  /Gr=C3=BC/
uri     URI_IP         /^http:\/\/\d+\.\d+\.\d+\.\d+\/login$/
uri     URI_FROM_TEXT  /^http:\/\/www\.example\.test\//
full    FULL_HEADERS   /^Content-Type: multipart\/alternative;.*\n\n--b\nContent-Type: text\/plain/m
full    FULL_QP        /=\?utf-8\?q\?Gr=C3=BC/
"""
    assert hits(tmp_path, rules, MSG) == {
        "BODY_SUBJECT", "BODY_PLAIN", "BODY_HTML_TEXT", "RAW_TAGS", "URI_IP",
        "FULL_HEADERS", "FULL_QP"}
    with_www = MSG.replace(b"plain part here.", b"plain part here. See www.example.test/x.")
    assert "URI_FROM_TEXT" in hits(tmp_path, rules, with_www)


def test_metas_subrules_scores_prefix(tmp_path):
    rules = r"""
body   __A  /Hello Bob/
body   __B  /second paragraph/
body   __C  /not there/
meta   TWO_OF_THREE  (__A + __B + __C) > 1
meta   ALL_THREE     __A && __B && __C
meta   NESTED        TWO_OF_THREE && !ALL_THREE
score  TWO_OF_THREE  2.5
body   DISABLED      /Hello/
score  DISABLED      0
meta   USES_DISABLED DISABLED
"""
    syms = run(make(tmp_path, rules, prefix="RULE_"), tmp_path, MSG)
    assert syms == {"RULE_TWO_OF_THREE": Symbol("RULE_TWO_OF_THREE", (), 2.5),
                    "RULE_NESTED": Symbol("RULE_NESTED", (), 1.0),
                    "RULE_USES_DISABLED": Symbol("RULE_USES_DISABLED", (), 1.0)}


def test_scan_cap_per_part_and_full(tmp_path):
    rules = "body FAR /NEEDLE/\nfull FULLFAR /NEEDLE/\nrawbody RAWFAR /NEEDLE/\n"
    far = (b"From: a@example.test\nSubject: s\n\n" + b"filler words here\n" * 4000
           + b"NEEDLE\n")  # ~72 KB in
    assert hits(tmp_path, rules, far) == {"FAR", "FULLFAR", "RAWFAR"}
    assert hits(tmp_path, rules, far, max_scan_bytes=64 * 1024) == set()
    near = far.replace(b"NEEDLE\n", b"").replace(b"\n\n", b"\n\nNEEDLE\n", 1)
    assert hits(tmp_path, rules, near, max_scan_bytes=64 * 1024) == {"FAR", "FULLFAR",
                                                                     "RAWFAR"}


def test_huge_message_scans_quickly(tmp_path):
    # QUAD is quadratic in its input (each "a" starts a scan to the end): over the 1 MiB that
    # gateway.mime keeps of a text part it would run for minutes; capped at 8 KiB, for ~20 ms
    rules = r"""
body    B     /(?:\w+\s+){3}NEEDLE/
body    QUAD  /a.*NEEDLE/s
rawbody R     /x*y/
full    F     /^Subject:.*z$/m
uri     U     /a+b/
header  H     ALL =~ /q+r/
"""
    f = make(tmp_path, rules, max_scan_bytes=8192)
    line = b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa http://aaaaaaaaaaaaaaaaaaa.test/\n"
    # the literals the rules need come first (NEEDLE, z, a URL with a b), so their needles let
    # them run over the whole capped text, and fail only at its end
    data = (b"From: a@example.test\nSubject: " + b"q" * 900 + b"\n\n"
            + b"NEEDLE z http://b.test/\n" + line * (20_000_000 // len(line)))
    path = tmp_path / "big"
    path.write_bytes(crlf(data))
    msg = Message.from_spool(path, path.stat().st_size)
    assert msg.size > 20_000_000
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 1),
                        message=msg)
    t0 = time.monotonic()
    res = asyncio.run(f.on_message(ctx))
    assert res.symbols == ()
    assert res.data["scan_ms"] < 2000
    assert time.monotonic() - t0 < 15  # most of it is the MIME parse (10 MiB, mime's cap)


def test_default_rule_set_detects_gtube(tmp_path):
    f = RulesFilter.from_config({"shipped": True},
                                Services(policy_dir=REPO / "policies"))
    gtube = (GTUBE_DIR / "gtube.eml").read_bytes()
    syms = run(f, tmp_path, gtube)
    assert syms["GTUBE"] == Symbol("GTUBE", (), 1000.0)
    assert "GTUBE" in run(f, tmp_path, (GTUBE_DIR / "sa-sample-spam.eml").read_bytes())
    clean = run(f, tmp_path, (GTUBE_DIR / "sa-sample-nonspam.eml").read_bytes())
    assert "GTUBE" not in clean and sum(s.score or 0 for s in clean.values()) < 2


def test_default_rule_set_flags_typical_spam(tmp_path):
    f = RulesFilter.from_config({"shipped": True},
                                Services(policy_dir=REPO / "policies"))
    spam = b"""From: "service@paypal.test" <x@cheap-deals.test>
To: undisclosed-recipients:;
Subject: MAKE MONEY FAST FROM HOME!!!
Message-ID: <2@cheap-deals.test>
Content-Type: text/html

<html><body><p>Dear Friend,</p><p>Earn $5000 a week, work from home! Act now!!!
<a href="http://203.0.113.9/offer">Click here</a>. To be removed from our list reply.</p>
</body></html>
"""
    assert set(run(f, tmp_path, spam)) >= {
        "FROM_NAME_DOMAIN_MISMATCH", "TO_UNDISCLOSED", "SUBJ_ALL_CAPS", "SUBJ_EXCLAIM",
        "DEAR_FRIEND", "MONEY_PHRASES", "URGENT_ACTION", "BODY_EXCLAIM", "CLICK_HERE_REMOVE",
        "URI_IP_HOST", "HTML_ONLY"}
    assert set(run(f, tmp_path, MSG)) == {"URI_IP_HOST"}


@pytest.mark.parametrize("phrase, rule", [
    ("Act now, while supplies last!", "URGENT_ACTION"),
    ("This limited time offer ends soon, order today.", "URGENT_ACTION"),
    ("A limited time deal, don't miss out.", "LIMITED_TIME"),
    ("It is completely risk-free.", "NO_OBLIGATION"),
    ("Membership is 100% free.", "FREE_OFFER"),
    ("Lower your monthly payments today.", "MORTGAGE_DEBT"),
    ("You can earn $500 per week.", "EARN_MONEY"),
    ("Results 100% guaranteed!", "MONEY_PHRASES"),  # was also GUARANTEED
    ("Satisfaction guaranteed.", "GUARANTEED"),
])
def test_default_rule_set_scores_a_phrase_once(tmp_path, phrase, rule):
    """Each sales phrase is one finding: exactly one rule of default.cf scores it (before, an
    "act now" scored URGENT_ACTION and LIMITED_TIME, "risk-free" MONEY_PHRASES and
    NO_OBLIGATION, "100% free" MONEY_PHRASES and FREE_OFFER, ...)."""
    f = RulesFilter.from_config({"shipped": True}, Services(policy_dir=REPO / "policies"))
    msg = (b"From: a@example.test\nTo: b@example.test\nSubject: hello\n"
           b"Message-ID: <3@example.test>\n\n" + phrase.encode() + b"\n")
    assert {n for n, s in run(f, tmp_path, msg).items() if s.score} == {rule}


def test_the_docs_example_parses():
    doc = (REPO / "docs" / "policy.md").read_text()
    block = doc[doc.index("### Rule files"):].split("```")[1]
    rs = parse_text(block, "policy.md")
    assert rs.rules["SPAMMY"].score == 2.5 and rs.rules["FONT_HUGE"].kind == "rawbody"
    assert len(rs.rules) == 10


def test_a_slow_rule_is_cut_by_its_timeout_and_the_others_still_run(tmp_path):
    """Catastrophic-but-accepted patterns (several .* scans) on hostile input: each search
    stops at rule_timeout_s (regex's timeout), the rule counts as no hit and is named in
    RULES_TIMEOUT; the other rules still match; the whole scan is bounded by scan_budget_s."""
    rules = r"""
body SLOW  /a.*b.*c.*d.*e/
body SLOW2 /a.*a.*a.*a.*z/
body FAST  /NEEDLE/
"""
    f = make(tmp_path, rules, max_scan_bytes=256 * 1024, rule_timeout_s=0.2,
             scan_budget_s=5.0)
    # every literal the slow rules need is there (b c d e z: their needles let them run),
    # before the a's, so both still scan quadratically
    data = b"From: a@example.test\nSubject: hostile\n\nNEEDLE bcdz " + b"a" * 200_000 + b"\n"
    t0 = time.monotonic()
    syms = run(f, tmp_path, data)
    elapsed = time.monotonic() - t0
    assert set(syms) == {"FAST", "RULES_TIMEOUT"}, syms
    assert set(syms["RULES_TIMEOUT"].options) == {"SLOW", "SLOW2"}
    assert elapsed < 2.0, elapsed  # two timeouts of 0.2 s, not minutes
    # the budget for all rules together
    f = make(tmp_path, rules, max_scan_bytes=256 * 1024, rule_timeout_s=5, scan_budget_s=0.3)
    t0 = time.monotonic()
    syms = run(f, tmp_path, data)
    assert time.monotonic() - t0 < 2.0
    assert "RULES_TIMEOUT" in syms
