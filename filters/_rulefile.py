"""Parse rule files for the ``rules`` filter: a subset of SpamAssassin's ``.cf`` syntax,
compiled once (regexes translated from Perl to Python, meta expressions to a small AST).

Supported directives::

    header NAME Header =~ /re/flags [if-unset: TEXT]    (also !~, Header:raw, Header:addr,
    header NAME exists:Header                             Header:name, ALL, ALL:raw, ToCc)
    body NAME /re/flags        rawbody NAME /re/flags      full NAME /re/flags
    uri NAME /re/flags         meta NAME expression        score NAME n [n n n]
    describe NAME text         tflags NAME ...             # comments
    if ... / ifplugin ... / else / endif                   (conditions count as false)

Regexes may be written ``/.../`` or ``m{...}``/``m!...!``; flags ``i m s x`` (``g`` and ``o``
ignored). Perl constructs are translated where Python has an exact equivalent (``\\z``,
``\\Z``, ``\\Q..\\E``, ``\\x{..}``, ``\\e``, ``(?<name>``, ``\\k<name>``, POSIX classes) and
refused with an error otherwise (``\\h``, ``\\v``, ``\\R``, ``\\K``, ``\\G``, ``\\p{..}``,
``(?{..})``, ``(?|..)``…), never silently mis-translated. A repeated group whose body can match
the same text in several ways (``(a+)+``, ``(\\w+\\s?)*``) is refused too: Python's ``re`` has
no timeout, and such patterns backtrack exponentially.

Every error is a :class:`RuleError` naming ``file:line`` and the reason.

The backtracking check walks CPython's private ``re._parser`` parse; known patterns are checked
first (patch ``re._parser.backtracking``, gateway/patches.py). When that fails, no pattern is
refused for it (one warning line): ``regex``'s per-search timeout still bounds each match.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from filters._literals import Needle
from gateway import patches

try:
    _sre: Any = importlib.import_module("re._parser")  # sre_parse, for the backtracking check
    _MAXREPEAT = _sre.MAXREPEAT
except (ImportError, AttributeError):  # checked below
    _sre = _MAXREPEAT = None

KINDS = ("header", "body", "rawbody", "full", "uri", "meta")
_IGNORED = {"lang", "priority", "require_version", "reuse", "test"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLAGS = {"i": re.I, "m": re.M, "s": re.S, "x": re.X, "g": 0, "o": 0}
_QUANTIFIER = re.compile(r"\{(?:\d+(?:,\d*)?|,\d+)\}")
_PAIRS = {"{": "}", "(": ")", "[": "]", "<": ">"}
_HEADER_MODS = {"raw", "addr", "name"}
DEFAULT_SCORE = 1.0  # SpamAssassin's score for a rule without a score line


class RuleError(Exception):
    """A problem in a rule file, already prefixed with ``file:line: ``; ``problems``: every
    line's (the first of them is the message), so one check reports them all."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


MAX_REPORTED = 20  # line problems reported per load (a binary file would give thousands)


@dataclass
class Rule:
    name: str
    kind: str  # one of KINDS
    where: str  # "file:line", for errors found later (metas)
    regex: Any = None  # a compiled ``regex`` pattern (matching with a timeout)
    negate: bool = False  # header !~
    header: str = ""  # header rules: the field name, "ALL" or "ToCc"
    modifier: str = ""  # "", "raw", "addr", "name"
    exists: bool = False  # header NAME exists:Field
    if_unset: str = ""
    meta: Node | None = None
    score: float = DEFAULT_SCORE
    description: str = ""
    tflags: tuple[str, ...] = ()
    needle: Needle | None = None  # body-like rules: literals one of which a match must hold
    # body-like rules of the form \b(?:A|B|…)\b: each alternative's own regex and needle,
    # searched one by one (filters._literals.alternatives); () when not split
    alternatives: tuple[tuple[Any, Needle | None], ...] = ()

    @property
    def is_subrule(self) -> bool:
        return self.name.startswith("__")


@dataclass
class RuleSet:
    rules: dict[str, Rule] = field(default_factory=dict)
    meta_order: list[str] = field(default_factory=list)  # metas, dependencies first


# -- meta expressions --------------------------------------------------------------------------

Node = tuple[Any, ...]  # ("name", N) | ("num", x) | ("not", a) | (op, a, b)
_META_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||[<>=!]=|"
                         r"[-+*/()!<>]))")
_BINARY = [("||",), ("&&",), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"), ("*", "/")]


def parse_meta(expr: str) -> Node:
    tokens: list[tuple[str, str]] = []
    pos = 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _META_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad meta expression at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1):
            tokens.append(("num", m.group(1)))
        elif m.group(2):
            tokens.append(("name", m.group(2)))
        else:
            tokens.append(("op", m.group(3)))
    if not tokens:
        raise ValueError("empty meta expression")
    i = 0

    def peek() -> tuple[str, str] | None:
        return tokens[i] if i < len(tokens) else None

    def level(n: int) -> Node:
        nonlocal i
        if n == len(_BINARY):
            return unary()
        left = level(n + 1)
        while (t := peek()) is not None and t[0] == "op" and t[1] in _BINARY[n]:
            i += 1
            left = (t[1], left, level(n + 1))
        return left

    def unary() -> Node:
        nonlocal i
        t = peek()
        if t is None:
            raise ValueError("meta expression ends too early")
        i += 1
        if t == ("op", "!"):
            return ("not", unary())
        if t == ("op", "-"):
            return ("-", ("num", 0.0), unary())
        if t == ("op", "("):
            node = level(0)
            if peek() != ("op", ")"):
                raise ValueError("missing ')' in meta expression")
            i += 1
            return node
        if t[0] == "num":
            return ("num", float(t[1]))
        if t[0] == "name":
            return ("name", t[1])
        raise ValueError(f"unexpected {t[1]!r} in meta expression")

    node = level(0)
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i][1]!r} in meta expression")
    return node


def meta_names(node: Node) -> set[str]:
    if node[0] == "name":
        return {node[1]}
    if node[0] == "num":
        return set()
    return set().union(*(meta_names(n) for n in node[1:]))


_OPS: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else 0.0,
    "<": lambda a, b: float(a < b), ">": lambda a, b: float(a > b),
    "<=": lambda a, b: float(a <= b), ">=": lambda a, b: float(a >= b),
    "==": lambda a, b: float(a == b), "!=": lambda a, b: float(a != b),
}


def eval_meta(node: Node, hits: Mapping[str, float]) -> float:
    op = node[0]
    if op == "name":
        return hits.get(node[1], 0.0)
    if op == "num":
        return float(node[1])
    if op == "not":
        return float(not eval_meta(node[1], hits))
    if op == "&&":
        return float(bool(eval_meta(node[1], hits)) and bool(eval_meta(node[2], hits)))
    if op == "||":
        return float(bool(eval_meta(node[1], hits)) or bool(eval_meta(node[2], hits)))
    return _OPS[op](eval_meta(node[1], hits), eval_meta(node[2], hits))


# -- Perl regex -> Python ----------------------------------------------------------------------

_POSIX = {"alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z",
          "lower": "a-z", "space": r"\s", "xdigit": "0-9A-Fa-f", "word": r"\w",
          "punct": r"!-/:-@\[-`{-~", "blank": r" \t", "cntrl": r"\x00-\x1f\x7f",
          "print": r"\x20-\x7e", "graph": r"\x21-\x7e"}
_REFUSED_ESCAPES = {"h": "\\h (horizontal space)", "H": "\\H", "v": "\\v (vertical space)",
                    "V": "\\V", "R": "\\R", "K": "\\K", "G": "\\G", "X": "\\X",
                    "p": "\\p{...} (Unicode properties)", "P": "\\P{...}", "N": "\\N",
                    "c": "\\c (control characters)", "g": "\\g (backreferences)",
                    "C": "\\C", "l": "\\l", "u": "\\u", "L": "\\L", "U": "\\U", "E": "\\E",
                    "o": "\\o{...}"}


def perl_to_python(pat: str) -> str:
    """Translate a Perl regex body to Python ``re`` syntax; ValueError for what has no exact
    equivalent."""
    out: list[str] = []
    i, n = 0, len(pat)
    in_class = False
    while i < n:
        c = pat[i]
        if c == "\\":
            if i + 1 >= n:
                raise ValueError("trailing backslash")
            d = pat[i + 1]
            if d == "Q":  # \Q...\E: literal text
                end = pat.find("\\E", i + 2)
                lit = pat[i + 2:] if end < 0 else pat[i + 2:end]
                out.append(re.escape(lit))
                i = n if end < 0 else end + 2
                continue
            if d == "x" and i + 2 < n and pat[i + 2] == "{":
                end = pat.find("}", i + 3)
                if end < 0:
                    raise ValueError("unterminated \\x{...}")
                out.append(f"\\U{int(pat[i + 3:end] or '0', 16):08x}")
                i = end + 1
                continue
            if d == "k" and i + 2 < n and pat[i + 2] in "<{'":
                close = {"<": ">", "{": "}", "'": "'"}[pat[i + 2]]
                end = pat.find(close, i + 3)
                if end < 0:
                    raise ValueError("unterminated \\k<name>")
                out.append(f"(?P={pat[i + 3:end]})")
                i = end + 1
                continue
            if d in _REFUSED_ESCAPES:
                raise ValueError(f"{_REFUSED_ESCAPES[d]} is not supported")
            if not in_class and d == "z":
                out.append(r"\Z")
            elif not in_class and d == "Z":
                out.append(r"(?=\n?\Z)")
            elif d == "e":
                out.append(r"\x1b")
            else:
                out.append(c + d)
            i += 2
            continue
        if in_class:
            if c == "[" and pat.startswith("[:", i):
                end = pat.find(":]", i + 2)
                cls = pat[i + 2:end] if end > 0 else ""
                neg = cls.startswith("^")
                if end < 0 or cls.lstrip("^") not in _POSIX or neg:
                    raise ValueError(f"POSIX class {pat[i:end + 2]!r} is not supported")
                out.append(_POSIX[cls])
                i = end + 2
                continue
            if c == "[":
                out.append("\\[")  # Perl: a literal; Python may read it as a nested set
                i += 1
                continue
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pat[i] == "^":
                out.append("^")
                i += 1
            if i < n and pat[i] == "]":  # a leading ] is a literal
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pat.startswith("(?", i):
            rest = pat[i + 2:]
            if rest[:1] in ("{", "?") or rest.startswith("|") or rest.startswith("&") \
                    or rest[:1] in "R0123456789+" or rest.startswith("(?{"):
                raise ValueError(f"Perl construct {pat[i:i + 4]!r}... is not supported")
            if rest.startswith("<") and rest[1:2] not in ("=", "!"):
                out.append("(?P<")
                i += 3
                continue
            if rest.startswith("'"):
                end = pat.find("'", i + 3)
                out.append(f"(?P<{pat[i + 3:end]}>")
                i = end + 1
                continue
        if c == "{" and not _QUANTIFIER.match(pat, i):  # Perl and re: a literal; regex
            out.append("\\{")  # reads some ({e<=1}) as fuzzy matching
            i += 1
            continue
        if c == "$" and i + 1 < n and (pat[i + 1].isalpha() or pat[i + 1] in "{_"):
            raise ValueError("variable interpolation ($name) is not supported")
        if c == "@" and i + 1 < n and (pat[i + 1].isalpha() or pat[i + 1] == "{"):
            raise ValueError("array interpolation (@name) is not supported; escape it as \\@")
        out.append(c)
        i += 1
    return "".join(out)


def _nullable(items: Iterable[tuple[Any, Any]]) -> bool:
    """True when a parsed sequence can match the empty string."""
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            if av[0] > 0 and not _nullable(av[2]):
                return False
        elif op is _sre.SUBPATTERN:
            if not _nullable(av[3]):
                return False
        elif op is _sre.ATOMIC_GROUP:
            if not _nullable(av):
                return False
        elif op is _sre.BRANCH:
            if not any(_nullable(b) for b in av[1]):
                return False
        elif op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            continue
        else:
            return False
    return True


def _unbounded_inside(items: Iterable[tuple[Any, Any]]) -> bool:
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and av[1] is _MAXREPEAT \
                or op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) and _unbounded_inside(av[2]):
            return True
        if op is _sre.SUBPATTERN and _unbounded_inside(av[3]):
            return True
        if op is _sre.BRANCH and any(_unbounded_inside(b) for b in av[1]):
            return True
    return False


def _ambiguous_repeat(items: Iterable[tuple[Any, Any]]) -> bool:
    """A repeat (max > 1) of a body that holds an unbounded repeat while everything else in
    it is optional: ``(a+)+``, ``(\\w+\\s?)*`` — the same text splits in exponentially many
    ways, so a failing match backtracks for ever."""
    for op, av in items:
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            body = list(av[2])
            if av[1] is _MAXREPEAT or av[1] > 1:
                flat = list(body[0][1][3]) if len(body) == 1 and body[0][0] is _sre.SUBPATTERN \
                    else body
                for k, (iop, iav) in enumerate(flat):
                    unbounded = (iop in (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
                                 and iav[1] is _MAXREPEAT) or \
                        (iop is _sre.SUBPATTERN and _unbounded_inside(iav[3]))
                    if unbounded and _nullable(flat[:k] + flat[k + 1:]):
                        return True
            if _ambiguous_repeat(body):
                return True
        elif op is _sre.SUBPATTERN and _ambiguous_repeat(av[3]):
            return True
        elif op is _sre.BRANCH and any(_ambiguous_repeat(b) for b in av[1]):
            return True
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT) and _ambiguous_repeat(av[1]):
            return True
    return False


def compile_perl(spec: str) -> tuple[Any, str]:
    """``/re/flags`` or ``m{re}flags`` → (compiled pattern, the rest of the line)."""
    spec = spec.lstrip()
    if spec.startswith("/"):
        open_, close, start = "/", "/", 1
    elif spec.startswith("m") and len(spec) > 1 and not spec[1].isalnum() \
            and not spec[1].isspace():
        open_ = spec[1]
        close = _PAIRS.get(open_, open_)
        start = 2
    else:
        raise ValueError("expected a regex /.../flags")
    i, depth = start, 0
    while i < len(spec):
        c = spec[i]
        if c == "\\":
            i += 2
            continue
        if c == open_ and open_ != close:
            depth += 1
        elif c == close:
            if depth == 0:
                break
            depth -= 1
        i += 1
    else:
        raise ValueError("unterminated regex")
    body = spec[start:i]
    m = re.match(r"[a-z]*", spec[i + 1:])
    flagstr = m.group(0) if m else ""
    rest = spec[i + 1 + len(flagstr):]
    flags = 0
    for f in flagstr:
        if f not in _FLAGS:
            raise ValueError(f"unsupported regex flag {f!r}")
        flags |= _FLAGS[f]
    if open_ != "/":  # an escaped delimiter is a literal (``m!a\!b!``)
        body = body.replace("\\" + close, close) if not close.isalnum() else body
    try:
        pyre = perl_to_python(body)
        re.compile(pyre, flags)  # Python's syntax is the contract: its errors are the clear ones
        compiled = regex.compile(pyre, flags)  # matched with ``regex``: it has a timeout
    except (re.error, regex.error) as e:
        raise ValueError(f"bad regex /{body}/: {e}") from None
    if _BACKTRACKING_CHECK and _ambiguous_repeat(_sre.parse(pyre, flags)):
        raise ValueError(f"regex /{body}/ has a nested repetition that can backtrack "
                         f"catastrophically (like (a+)+); rewrite it")
    return compiled, rest


def check_backtracking() -> str | None:
    """None when the backtracking check reads known patterns as known; else why not."""
    if _sre is None:
        return "re._parser or its MAXREPEAT is missing"
    for pattern, ambiguous in (("(a+)+", True), (r"(\w+\s?)*", True), (r"x(?:a|ab)*y", False),
                               ("foo(bar)+", False), (r"\d+-\d+", False)):
        if _ambiguous_repeat(_sre.parse(pattern, 0)) is not ambiguous:
            return f"/{pattern}/ was {'not ' if ambiguous else ''}found to backtrack"
    return None


_BACKTRACKING_CHECK = patches.install("re._parser.backtracking", check_backtracking)


# -- files ---------------------------------------------------------------------------------------

def _strip_comment(line: str) -> str:
    m = re.search(r"(?<!\\)#", line)
    return line[:m.start()] if m else line


class _Parser:
    def __init__(self) -> None:
        self.rs = RuleSet()
        self.errors: list[str] = []  # every bad line, reported together by check_errors
        self.pending_scores: dict[str, tuple[float, str]] = {}
        self.pending_describe: dict[str, str] = {}
        self.pending_tflags: dict[str, tuple[str, ...]] = {}

    def file(self, path: Path, label: str) -> None:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            where = "" if str(path) == label else f" {path}"
            self.errors.append(f"{label}: cannot read{where}: {e.strerror}")
            return
        self.text(text, label)

    def text(self, text: str, label: str) -> None:
        cond: list[bool] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            where = f"{label}:{lineno}"
            line = _strip_comment(raw).strip()
            if not line:
                continue
            word, _, rest = line.partition(" ")
            word = word.lower()
            rest = rest.strip()
            try:
                if word in ("if", "ifplugin"):
                    cond.append(False)  # no plugins, no Perl conditions: their blocks are off
                    continue
                if word == "else":
                    if not cond:
                        raise ValueError("else without if")
                    cond[-1] = not cond[-1]
                    continue
                if word == "endif":
                    if not cond:
                        raise ValueError("endif without if")
                    cond.pop()
                    continue
                if not all(cond):
                    continue
                self.directive(word, rest, where)
            except ValueError as e:
                self.errors.append(f"{where}: {e}")
        if cond:
            self.errors.append(f"{label}: {len(cond)} if/ifplugin block(s) without endif")

    def check_errors(self) -> None:
        """RuleError carrying every bad line found so far (at most MAX_REPORTED of them)."""
        if self.errors:
            shown = self.errors[:MAX_REPORTED]
            if len(self.errors) > MAX_REPORTED:
                shown.append(f"... and {len(self.errors) - MAX_REPORTED} more bad lines")
            raise RuleError(shown[0], tuple(shown))

    def directive(self, word: str, rest: str, where: str) -> None:
        if word in _IGNORED:
            return
        name, _, arg = rest.partition(" ")
        arg = arg.strip()
        if word in KINDS or word in ("score", "describe", "tflags"):
            if not _NAME.match(name):
                raise ValueError(f"bad rule name {name!r}")
        if word == "score":
            vals = arg.split()
            if len(vals) not in (1, 4):
                raise ValueError("score takes one number (or SpamAssassin's four)")
            try:
                score = float(vals[-1])  # of four: the set with Bayes and network tests
            except ValueError:
                raise ValueError(f"bad score {vals[-1]!r}") from None
            self.pending_scores[name] = (score, where)
            return
        if word == "describe":
            self.pending_describe[name] = arg
            return
        if word == "tflags":
            self.pending_tflags[name] = tuple(arg.split())
            return
        if word not in KINDS:
            raise ValueError(f"unknown rule type or directive {word!r}")
        if not arg:
            raise ValueError(f"{word} {name}: missing definition")
        if arg.startswith("eval:"):
            raise ValueError(f"{word} {name}: eval: tests are not supported")
        rule = Rule(name, word, where)
        if word == "meta":
            rule.meta = parse_meta(arg)
        elif word == "header":
            self.header(rule, arg)
        else:
            rule.regex, tail = compile_perl(arg)
            if tail.strip():
                raise ValueError(f"unexpected text after the regex: {tail.strip()!r}")
        self.rs.rules[name] = rule

    def header(self, rule: Rule, arg: str) -> None:
        if arg.startswith("exists:"):
            field_ = arg[len("exists:"):].strip()
            if not field_ or " " in field_:
                raise ValueError(f"header {rule.name}: bad exists:Header")
            rule.exists, rule.header = True, field_
            return
        m = re.match(r"(\S+?)\s*(=~|!~)\s*(.*)\Z", arg)
        if not m:
            raise ValueError(f"header {rule.name}: expected 'Header =~ /re/'")
        field_, op, spec = m.groups()
        fname, _, mod = field_.partition(":")
        if mod and mod not in _HEADER_MODS:
            raise ValueError(f"header {rule.name}: unsupported modifier :{mod}")
        rule.header, rule.modifier, rule.negate = fname, mod, op == "!~"
        rule.regex, tail = compile_perl(spec)
        tail = tail.strip()
        if tail:
            um = re.fullmatch(r"\[if-unset:\s*(.*)\]", tail)
            if not um:
                raise ValueError(f"unexpected text after the regex: {tail!r}")
            rule.if_unset = um.group(1)

    def finish(self) -> RuleSet:
        rules = self.rs.rules
        for name, (score, where) in self.pending_scores.items():
            if name not in rules:
                raise RuleError(f"{where}: score for unknown rule {name}")
            rules[name].score = score
        for name, text in self.pending_describe.items():
            if name in rules:
                rules[name].description = text
        for name, flags in self.pending_tflags.items():
            if name in rules:
                rules[name].tflags = flags
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, stack: list[str]) -> None:
            rule = rules[name]
            state[name] = 1
            assert rule.meta is not None
            for dep in sorted(meta_names(rule.meta)):
                if dep not in rules:
                    raise RuleError(f"{rule.where}: meta {name} uses unknown rule {dep}")
                if rules[dep].kind != "meta":
                    continue
                if state.get(dep) == 1:
                    cycle = " -> ".join([*stack[stack.index(dep):], dep])
                    raise RuleError(f"{rules[dep].where}: meta cycle {cycle}")
                if dep not in state:
                    visit(dep, [*stack, dep])
            state[name] = 2
            order.append(name)

        for name, rule in rules.items():
            if rule.kind == "meta" and name not in state:
                visit(name, [name])
        self.rs.meta_order = order
        return self.rs


def load_rules(files: Iterable[tuple[Path, str]]) -> RuleSet:
    """Parse and compile rule files, each given as (path, the name to show in errors)."""
    p = _Parser()
    for path, label in files:
        p.file(path, label)
    p.check_errors()
    return p.finish()


def parse_text(text: str, label: str = "rules.cf") -> RuleSet:
    """Rules from a string (tests, tools)."""
    p = _Parser()
    p.text(text, label)
    p.check_errors()
    return p.finish()
