"""The ``rules`` filter: SpamAssassin-style content rules from ``.cf`` files.

Rule types: ``header`` (decoded header values; ``:raw``, ``:addr``, ``:name``, ``ALL``,
``exists:``), ``body`` (the Subject and the visible text of every text part, HTML reduced to
text, one paragraph per line with its white space collapsed), ``rawbody`` (the decoded text
parts, HTML tags kept), ``uri`` (every URL found in text and HTML, one per line), ``full``
(the raw message, headers and body, CRLF as LF) and ``meta`` (boolean and arithmetic
expressions over other rules). Each rule that hits is reported as a symbol named after it
(``prefix`` + name), carrying the file's ``score`` as its suggested score (the policy's
``[scores]`` wins). Rules named ``__*`` are sub-rules for metas and never reported; a rule
scored 0 in its file is disabled (reported never, still usable by metas). The file syntax is
parsed by :mod:`filters._rulefile`.

Regexes are compiled once, when the policy is loaded. Matching runs through ``offload`` (on
the event loop for a message up to 64 KiB, in the worker's CPU thread above) and scans at most
``max_scan_bytes`` of each text part, each header, the URL list and the raw message, so a huge
message costs no more than a small one. ``body``, ``rawbody`` and ``uri``
patterns are matched once over their text with ``re.M`` added, so ``^``/``$`` anchor at each
paragraph/line/URL as SpamAssassin's per-line matching does. Those and ``full`` patterns get a
needle when loaded (:mod:`filters._literals`): the literals every match must contain (an OR
of ANDs); a text that lacks them skips the regex. A pattern that is one alternation
(``\b(?:A|B|…)\b``, as most phrase rules are) is also split into one regex per alternative,
each behind its own needle, searched in turn until one matches: the same hits, but each search
can start from its alternative's leading literal instead of trying every alternative at every
position of the text.

Settings: ``shipped`` (false: true reads the rule set shipped with mailgate,
``filters/rulesets/default.cf`` in the package, before ``files``), ``files`` (rule files,
relative paths resolved against the policy file's directory, later definitions override earlier
ones; required unless ``shipped``), ``max_scan_bytes`` (262144), ``prefix`` (``""``: prepended
to every reported symbol name).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import regex

import gateway.mime
from filters._literals import Needle, alternatives, containments, fold, needle
from filters._rulefile import Rule, RuleError, RuleSet, eval_meta, load_rules
from gateway.filterapi import ConfigError, Filter, FilterContext, Result, Symbol, offload
from gateway.headeraddr import addresses
from gateway.mime import MimeView
from gateway.services import Services
from gateway.settings import boolean, check_keys, integer, positive, str_list

DEFAULT_MAX_SCAN_BYTES = 256 * 1024
_LINE_KINDS = ("body", "rawbody", "uri")  # matched with re.M added
_TEXT_KINDS = (*_LINE_KINDS, "full")  # matched over one text per message: a needle first
_WS_ODD = "\t\r\f\v\xa0"  # white space (beside the space) that _squeeze makes a space
_PARA = re.compile(r"\n\s*\n")


def _paragraphs(text: str) -> str:
    """SpamAssassin-style body text: one paragraph per line, white space collapsed."""
    return "\n".join(p for p in map(_collapse, _PARA.split(text)) if p)


def _collapse(par: str) -> str:
    # one line per paragraph (decoded text keeps the CRLFs)
    return _squeeze(par.replace("\r\n", " ").replace("\n", " ")).strip()


def _squeeze(text: str) -> str:
    r"""Each run of spaces, tabs, CRs, FFs, VTs and no-break spaces as one space: what
    ``re.sub(r"[ \t\r\f\v\xa0]+", " ", text)`` gives, by substring replacements, which
    skip through the text at memchr speed where the regex tried every position and made a
    piece of every single space (2 ms at 64 KiB; a lone CR, as a text cut after one has,
    was enough to start it)."""
    for c in _WS_ODD:
        if c in text:
            text = text.replace(c, " ")
    while "  " in text:  # each pass halves the runs
        text = text.replace("  ", " ")
    return text


# From this length of text on, a needle string contained in another that is known absent is
# not searched for (``Needle.in_text``'s ``within``): below it, a search costs about what the
# lookup does (at 4 KiB the lookups made the rules 15% slower; at 64 KiB they save 8%).
_IMPLY_MIN_CHARS = 16 * 1024


class _Scan:
    """The texts of one message, built lazily and capped; the rules are matched here."""

    def __init__(self, view: MimeView, raw: bytes, cap: int,
                 within: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.view, self.raw, self.cap = view, raw, cap
        self.within = within  # needle strings contained in others (_literals.containments)
        self._cache: dict[str, str] = {}
        self._folded: dict[str, str] = {}
        self._memo: dict[tuple[str, bool], dict[str, bool]] = {}  # needle strings seen

    def text(self, kind: str) -> str:
        t = self._cache.get(kind)
        if t is None:
            t = self._build(kind)
            self._cache[kind] = t
        return t

    def _build(self, kind: str) -> str:
        v, cap = self.view, self.cap
        if kind == "body":
            return "\n".join([_squeeze(v.subject[:cap]).strip(),
                              *(_paragraphs(t.text[:cap]) for t in v.texts)])
        if kind == "rawbody":
            return "\n".join(t.raw[:cap] for t in v.texts)
        if kind == "uri":
            urls = ("http://" + u if u[:4].lower() == "www." else u for u in v.urls)
            return "\n".join(urls)[:cap]
        if kind == "full":
            return self.raw[:cap].replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
        raise AssertionError(kind)

    def header(self, rule: Rule) -> str | None:
        """The value a header rule matches (None: the header is absent)."""
        key = f"h:{rule.header.lower()}:{rule.modifier}"
        if key in self._cache:
            return self._cache[key] or None
        headers = self.view.raw_headers if rule.modifier == "raw" else self.view.headers
        name = rule.header.lower()
        if name == "all":
            values = [f"{k}: {v}" for k, v in headers]
        else:
            wanted = ("to", "cc") if name == "tocc" else (name,)
            values = [v[:self.cap] for k, v in headers if k.lower() in wanted]
        if values and rule.modifier in ("addr", "name"):
            pairs = addresses(", ".join(values))  # as getaddresses(values) joins them
            first = pairs[0] if pairs else ("", "")
            values = [first[1] if rule.modifier == "addr" else first[0]]
        value = "\n".join(values)[:self.cap] if values else ""
        self._cache[key] = value
        return value if values else None

    def hits(self, rules: RuleSet, rule_timeout_s: float = 0.1, budget_s: float = 2.0
             ) -> dict[str, float]:
        """The rules that hit. Each regex search may take ``rule_timeout_s`` and all of them
        ``budget_s`` together (``regex``'s timeout, the GIL released while matching): a rule
        that runs out counts as no hit and is listed in ``self.timed_out``."""
        out: dict[str, float] = {}
        self.timed_out: list[str] = []
        deadline = time.perf_counter() + budget_s
        for name, rule in rules.rules.items():
            if rule.kind == "meta":
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                self.timed_out.append("(scan budget)")
                break
            try:
                hit = self._hit(rule, min(rule_timeout_s, left))
            except TimeoutError:
                self.timed_out.append(name)
                continue
            if hit:
                out[name] = 1.0
        for name in rules.meta_order:
            meta = rules.rules[name].meta
            assert meta is not None
            if eval_meta(meta, out):
                out[name] = 1.0
        return out

    def _lacks(self, kind: str, needle: Needle) -> bool:
        """True when the text of ``kind`` satisfies none of the needle's terms: the rule's
        regex cannot match it."""
        text = self.text(kind)
        if needle.folded:
            f = self._folded.get(kind)
            if f is None:
                f = self._folded[kind] = fold(text)
            text = f
        return not needle.in_text(text, self._memo.setdefault((kind, needle.folded), {}),
                                  self.within if len(text) >= _IMPLY_MIN_CHARS else None)

    def _hit(self, rule: Rule, timeout_s: float) -> bool:
        if rule.kind == "header":
            value = self.header(rule)
            if rule.exists:
                return value is not None
            found = rule.regex.search(rule.if_unset if value is None else value,
                                      timeout=timeout_s, concurrent=True)
            return (found is None) if rule.negate else (found is not None)
        if rule.needle is not None and self._lacks(rule.kind, rule.needle):
            return False
        if rule.alternatives:  # one by one, each behind its own needle, within timeout_s
            end = time.perf_counter() + timeout_s
            for alt, alt_needle in rule.alternatives:
                if alt_needle is not None and self._lacks(rule.kind, alt_needle):
                    continue
                left = end - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(rule.name)
                if alt.search(self.text(rule.kind), timeout=left, concurrent=True) is not None:
                    return True
            return False
        return rule.regex.search(self.text(rule.kind), timeout=timeout_s,
                                 concurrent=True) is not None


# the rule set shipped with mailgate (package data), read first with ``shipped = true``
SHIPPED_RULES = Path(__file__).resolve().parent / "rulesets" / "default.cf"


class RulesFilter(Filter):
    name = "rules"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    def __init__(self, rules: RuleSet, max_scan_bytes: int, prefix: str,
                 rule_timeout_s: float = 0.1, scan_budget_s: float = 2.0) -> None:
        self.rules = rules
        self.max_scan_bytes = max_scan_bytes
        self.prefix = prefix
        self.rule_timeout_s = rule_timeout_s
        self.scan_budget_s = scan_budget_s
        self.needs_full = any(r.kind == "full" for r in rules.rules.values())
        self.within = containments(n for r in rules.rules.values()
                                   for n in (r.needle, *(n for _, n in r.alternatives)))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> RulesFilter:
        check_keys(cfg, {"shipped", "files", "max_scan_bytes", "prefix", "rule_timeout_s",
                         "scan_budget_s"})
        files = str_list(cfg, "files")
        shipped = boolean(cfg, "shipped", False)
        if not files and not shipped:
            raise ConfigError("files", "is required (a list of rule files, .cf) unless "
                                       "shipped = true")
        max_scan = integer(cfg, "max_scan_bytes", DEFAULT_MAX_SCAN_BYTES, 1024)
        prefix = cfg.get("prefix", "")
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_]*", prefix):
            raise ConfigError("prefix", "must be a string of letters, digits and _")
        try:
            rules = load_rules([*([(SHIPPED_RULES, "shipped:default.cf")] if shipped else []),
                                *((services.path(f), f) for f in files)])
        except RuleError as e:  # every bad line, each its own problem
            raise ConfigError("files", e.problems[0],
                              tuple(("files", p) for p in e.problems[1:])) from None
        for rule in rules.rules.values():
            if rule.kind in _LINE_KINDS and rule.regex is not None:  # ^ and $ at each line
                rule.regex = regex.compile(rule.regex.pattern, rule.regex.flags | regex.M)
            if rule.kind in _TEXT_KINDS and rule.regex is not None:
                rule.needle = needle(rule.regex.pattern, rule.regex.flags)
                rule.alternatives = tuple(
                    (alt, needle(alt.pattern, alt.flags)) for alt in (
                        regex.compile(p, rule.regex.flags)
                        for p in alternatives(rule.regex.pattern, rule.regex.flags) or ()))
        return cls(rules, max_scan, prefix, positive(cfg, "rule_timeout_s", 0.1),
                   positive(cfg, "scan_budget_s", 2.0))

    def scan(self, view: MimeView, raw: bytes) -> dict[str, float]:
        """The rules that hit (sub-rules and metas included) for a parsed message."""
        return self.scan_all(view, raw)[0]

    def scan_all(self, view: MimeView, raw: bytes) -> tuple[dict[str, float], list[str]]:
        """(the rules that hit, the rules cut by their timeout or the scan budget)."""
        scan = _Scan(view, raw, self.max_scan_bytes, self.within)
        hits = scan.hits(self.rules, self.rule_timeout_s, self.scan_budget_s)
        return hits, scan.timed_out

    def symbols(self, hits: Mapping[str, float]) -> tuple[Symbol, ...]:
        out = []
        for name in hits:
            rule = self.rules.rules[name]
            if rule.is_subrule or rule.score == 0:
                continue
            out.append(Symbol(self.prefix + name, (), rule.score))
        return tuple(out)

    def _run(self, view: MimeView, path: Path) -> tuple[dict[str, float], list[str], float]:
        t0 = time.perf_counter()
        raw = b""
        if self.needs_full:
            with path.open("rb") as f:
                raw = f.read(self.max_scan_bytes)
        hits, timed_out = self.scan_all(view, raw)
        return hits, timed_out, (time.perf_counter() - t0) * 1000

    async def on_message(self, ctx: FilterContext) -> Result:
        assert ctx.message is not None
        view = await gateway.mime.view(ctx.message)
        hits, timed_out, ms = await offload(ctx.message.size, self._run, view,
                                            ctx.message.path)
        symbols = self.symbols(hits)
        if timed_out:  # a slow rule on this message: visible, never a hit
            symbols += (Symbol("RULES_TIMEOUT", tuple(timed_out[:10]), 0.0),)
        return Result(symbols=symbols, data={"scan_ms": round(ms, 2),
                                             "timed_out": timed_out})
