"""Bayes: the probability that a message is spam, learned from the site's own mail, reported as
one of SpamAssassin's ``BAYES_00`` … ``BAYES_99`` band symbols (plus ``BAYES_999``).

The message is tokenized (``filters/_tokenizer.py``), each token's counts are looked up in the
token store (``filters/_bayesstore.py``: SQLite, written by ``mailgate learn``), and the
probabilities are combined the way SpamBayes and SpamAssassin do:

* per token, Robinson's f(w) = (s·x + n·p(w)) / (s + n), where p(w) is the token's spam ratio
  over the sum of its spam and ham ratios, n the number of messages it was seen in, s the
  strength of the prior (``unknown_strength``, 0.45) and x the prior (``unknown_prob``, 0.5);
* the up to ``max_discriminators`` (150) tokens with |f(w) − 0.5| ≥ ``min_strength`` (0.1)
  are combined with Fisher's chi-square method: H = C⁻¹(−2 Σ ln f, 2n), S = C⁻¹(−2 Σ ln(1−f),
  2n), probability = (1 + H − S) / 2 (in 0…1; 0.5 when there is no evidence either way).

Symbols (each with a default score, SpamAssassin's, used when ``[scores]`` has no entry; the
probability as option): ``BAYES_00`` (< 0.01, −1.9), ``BAYES_05`` (< 0.05, −0.5),
``BAYES_20`` (< 0.20, −0.001), ``BAYES_40`` (< 0.40, −0.001), ``BAYES_50`` (< 0.60, 0.8),
``BAYES_60`` (< 0.80, 1.5), ``BAYES_80`` (< 0.95, 2.0), ``BAYES_95`` (< 0.99, 3.0),
``BAYES_99`` (≥ 0.99, 3.5) and, with it, ``BAYES_999`` (≥ 0.999, +0.2). Until ``min_spam``
spam and ``min_ham`` ham messages have been learned: ``BAYES_UNTRAINED`` (score 0; option
``spam=N ham=M``) instead; ``mailgate learn`` says so after learning, and the gateway logs
a ``filter-inactive`` warning at start (``inactive_reason``), with the counts.

Settings: ``db_path`` ("bayes.db", relative to the gateway's working directory), ``min_spam``
and ``min_ham`` (200 each), ``max_discriminators`` (150), ``min_strength`` (0.1),
``unknown_strength`` (0.45), ``unknown_prob`` (0.5), ``max_text_chars`` (100000),
``max_tokens`` (5000), ``skip_headers`` (header fields never tokenized; ``"x-foo-*"`` for a
prefix; the default list covers the headers we and the delivering server add).

Auto-learn (off by default): ``autolearn_spam_at`` / ``autolearn_ham_below`` (scores). After
the decision (``on_decided``, in the background), a message whose score *without* the BAYES_
symbols (so Bayes does not reinforce its own opinion) is at or above ``autolearn_spam_at`` is
learned as spam, one below ``autolearn_ham_below`` as ham if it was delivered (accept,
add_header, rewrite_subject: a virus or a DMARC reject is never ham) — never a message that was
tempfailed, never one already learned (a manual ``mailgate learn`` is not overridden); one
write at a time, skipped (logged) when the store is busy.
Logged as ``bayes_autolearn``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filters._bayesstore import (
    BayesStore,
    Change,
    Klass,
    SqliteReader,
    SqliteStore,
    json_each_missing,
)
from filters._tokenizer import (
    DEFAULT_SKIP_HEADERS,
    TokenizerConfig,
    message_key,
    token_ids,
    tokenize,
)
from gateway import mime
from gateway.filterapi import (
    Action,
    ConfigError,
    Decided,
    Filter,
    FilterContext,
    Result,
    Symbol,
    offload,
)
from gateway.logs import event
from gateway.mime import MimeView
from gateway.services import Services
from gateway.settings import check_keys, integer, opt_str, str_list

log = logging.getLogger("mailgate.filter.bayes")

# (upper bound, symbol, SpamAssassin's score with Bayes and network tests)
BANDS: tuple[tuple[float, str, float], ...] = (
    (0.01, "BAYES_00", -1.9), (0.05, "BAYES_05", -0.5), (0.20, "BAYES_20", -0.001),
    (0.40, "BAYES_40", -0.001), (0.60, "BAYES_50", 0.8), (0.80, "BAYES_60", 1.5),
    (0.95, "BAYES_80", 2.0), (0.99, "BAYES_95", 3.0), (math.inf, "BAYES_99", 3.5),
)
BAYES_999 = (0.999, "BAYES_999", 0.2)


@dataclass(frozen=True, slots=True)
class Classifier:
    unknown_strength: float = 0.45  # s
    unknown_prob: float = 0.5  # x
    min_strength: float = 0.1
    max_discriminators: int = 150

    def token_prob(self, spam: int, ham: int, nspam: int, nham: int) -> float:
        """Robinson's f(w)."""
        spamratio = spam / nspam if nspam else 0.0
        hamratio = ham / nham if nham else 0.0
        if spamratio + hamratio == 0:
            return self.unknown_prob
        p = spamratio / (spamratio + hamratio)
        n = spam + ham
        s, x = self.unknown_strength, self.unknown_prob
        return (s * x + n * p) / (s + n)

    def clues(self, counts: Iterable[tuple[int, int]], nspam: int, nham: int) -> list[float]:
        """The most significant token probabilities."""
        probs = [self.token_prob(s, h, nspam, nham) for s, h in counts]
        strong = [p for p in probs if abs(p - 0.5) >= self.min_strength]
        strong.sort(key=lambda p: abs(p - 0.5), reverse=True)
        return strong[:self.max_discriminators]

    def probability(self, counts: Iterable[tuple[int, int]], nspam: int, nham: int) -> float:
        return chi2_combine(self.clues(counts, nspam, nham))


def chi2q(x2: float, v: int) -> float:
    """P(chi² with v degrees of freedom ≥ x2), v even."""
    m = x2 / 2.0
    total = term = math.exp(-m)
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def chi2_combine(probs: Iterable[float]) -> float:
    """Fisher's chi-square combination of token probabilities: near 1 for spam evidence, near
    0 for ham evidence, 0.5 for none or for strong evidence both ways."""
    ps = [min(max(p, 1e-12), 1 - 1e-12) for p in probs]
    if not ps:
        return 0.5
    n = len(ps)
    s_ln = sum(math.log(1.0 - p) for p in ps)
    h_ln = sum(math.log(p) for p in ps)
    s = 1.0 - chi2q(-2.0 * s_ln, 2 * n)  # spamminess
    h = 1.0 - chi2q(-2.0 * h_ln, 2 * n)  # hamminess
    return (s - h + 1.0) / 2.0


def band_symbols(prob: float) -> tuple[Symbol, ...]:
    option = (f"{prob:.4f}",)
    for upper, name, score in BANDS:
        if prob < upper:
            syms = [Symbol(name, option, score)]
            if prob >= BAYES_999[0]:
                syms.append(Symbol(BAYES_999[1], option, BAYES_999[2]))
            return tuple(syms)
    raise AssertionError("unreachable")


def store_problem(path: Path) -> str | None:
    """Why the file at ``path`` cannot be the store the filter reads (None if it can: an SQLite
    database, an empty file, or none yet). Read from its first 16 bytes, never waiting on a
    lock, so a check at start or reload fails at once rather than on every message."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return f"{path}: a directory, not a Bayes store"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if head and head != b"SQLite format 3\x00":
        return f"{path}: not a Bayes store (not an SQLite database)"
    return None


class BayesFilter(Filter):
    name = "bayes"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    def __init__(self, store: BayesStore, db_path: Path, classifier: Classifier,
                 tokenizer: TokenizerConfig, min_spam: int, min_ham: int,
                 autolearn_spam_at: float | None = None,
                 autolearn_ham_below: float | None = None) -> None:
        self.store = store
        self.db_path = db_path
        self.classifier = classifier
        self.tokenizer = tokenizer
        self.min_spam = min_spam
        self.min_ham = min_ham
        self.autolearn_spam_at = autolearn_spam_at
        self.autolearn_ham_below = autolearn_ham_below
        self._writing = asyncio.Lock()
        if autolearn_spam_at is None and autolearn_ham_below is None:
            self.on_decided = None  # type: ignore[assignment]  # no hook: nothing to learn

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> BayesFilter:
        settings = parse_settings(cfg, services.hostname, services.path, services.state_dir)
        if (why := json_each_missing()) is not None:
            raise ConfigError("db_path", why)
        if (why := store_problem(settings.db_path)) is not None:
            raise ConfigError("db_path", why)
        return cls(SqliteReader(settings.db_path), settings.db_path, settings.classifier,
                   settings.tokenizer, settings.min_spam, settings.min_ham,
                   settings.autolearn_spam_at, settings.autolearn_ham_below)

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        view = await mime.view(msg)
        if self.on_decided is None:
            return await offload(msg.size, self.classify, view)
        # auto-learn needs the key and tokens later, when the spool file may be gone
        return await offload(msg.size, self._classify_for_learning, view, msg.path)

    def _classify_for_learning(self, view: MimeView, path: Path) -> Result:
        ids = self.token_ids(view)
        result = self.classify_ids(ids)
        key = _key_of(path)
        return Result(symbols=result.symbols, data={**result.data, "learn": (key, ids)})

    async def on_decided(self, ctx: FilterContext, decided: Decided) -> None:
        own = ctx.results.get(self.name)
        learn = own.data.get("learn") if own is not None else None
        if learn is None or decided.action is Action.TEMPFAIL:
            return
        score = decided.score - sum(v for k, v in decided.scores.items()
                                    if k.startswith("BAYES_"))
        klass: Klass | None = None
        if self.autolearn_spam_at is not None and score >= self.autolearn_spam_at:
            klass = "spam"
        elif self.autolearn_ham_below is not None and score < self.autolearn_ham_below \
                and decided.action in _DELIVERED:  # a virus or DMARC reject is never ham
            klass = "ham"
        if klass is None:
            return
        if self._writing.locked():  # one write at a time; under load, skip rather than queue
            event(log, "bayes_autolearn", qid=ctx.qid, klass=klass, outcome="skipped: busy")
            return
        key, ids = learn
        async with self._writing:
            outcome = await asyncio.to_thread(_learn_one, self.db_path,
                                              Change(key, klass, ids, only_new=True))
        event(log, "bayes_autolearn", qid=ctx.qid, klass=klass, score=round(score, 3),
              outcome=outcome)

    def inactive_reason(self) -> str | None:
        """Asked at start and on reload (blocking, one small read): while the store is below
        ``min_spam`` / ``min_ham``, why every message scores ``BAYES_UNTRAINED``."""
        snap = self.store.snapshot(())
        note = inactive_note(snap.nspam, snap.nham, self.min_spam, self.min_ham)
        if note is None:
            return None
        return f"{note} in {self.db_path}; every message scores BAYES_UNTRAINED meanwhile"

    def classify(self, view: MimeView) -> Result:
        """Blocking: tokenize, look up, combine."""
        return self.classify_ids(self.token_ids(view))

    def token_ids(self, view: MimeView) -> tuple[int, ...]:
        return token_ids(tokenize(view, self.tokenizer))

    def classify_ids(self, ids: tuple[int, ...]) -> Result:
        """Blocking: look up, combine."""
        snap = self.store.snapshot(ids)
        if snap.nspam < self.min_spam or snap.nham < self.min_ham:
            return Result(symbols=(Symbol("BAYES_UNTRAINED",
                                          (f"spam={snap.nspam} ham={snap.nham}",), 0.0),),
                          data={"nspam": snap.nspam, "nham": snap.nham})
        clues = self.classifier.clues(snap.counts.values(), snap.nspam, snap.nham)
        prob = chi2_combine(clues)
        return Result(symbols=band_symbols(prob),
                      data={"prob": prob, "tokens": len(ids), "known": len(snap.counts),
                            "clues": len(clues), "nspam": snap.nspam, "nham": snap.nham})


def inactive_note(nspam: int, nham: int, min_spam: int, min_ham: int) -> str | None:
    """Why the filter reports only ``BAYES_UNTRAINED`` (the store holds fewer messages than
    ``min_spam``/``min_ham``), or None once it classifies. Said by ``mailgate learn`` and logged
    when the gateway starts, so an admin does not find out from the scores."""
    if nspam >= min_spam and nham >= min_ham:
        return None
    return (f"Bayes stays inactive until {min_spam} spam and {min_ham} ham: now {nspam} spam, "
            f"{nham} ham")


def _key_of(path: Path) -> str:
    with path.open("rb") as f:
        return message_key(f.read(mime.MAX_PARSE_BYTES))


_DELIVERED = (Action.ACCEPT, Action.ADD_HEADER, Action.REWRITE_SUBJECT)


def _learn_one(db_path: Path, change: Change) -> str:
    # a connection of this thread's own, closed at once; a short busy wait: while `mailgate
    # learn` holds the write lock this message is simply not learned (it never blocks a thread)
    store = SqliteStore(db_path, busy_timeout_s=1.0)
    try:
        return store.apply([change])[0]
    finally:
        store.close()


@dataclass(frozen=True, slots=True)
class Settings:
    db_path: Path
    classifier: Classifier
    tokenizer: TokenizerConfig
    min_spam: int
    min_ham: int
    autolearn_spam_at: float | None = None
    autolearn_ham_below: float | None = None


_KEYS = {"db_path", "min_spam", "min_ham", "max_discriminators", "min_strength",
         "unknown_strength", "unknown_prob", "max_text_chars", "max_tokens", "skip_headers",
         "autolearn_spam_at", "autolearn_ham_below"}


def parse_settings(cfg: Mapping[str, Any], hostname: str | None = None,
                   locate: Callable[[str], Path] = Path,
                   state_dir: Path | None = None) -> Settings:
    """The filter's settings (shared with ``mailgate learn``, which must tokenize alike);
    ``locate`` resolves a relative ``db_path`` given (``Services.path``: the policy's
    directory); the default, ``bayes.db``, is in ``state_dir`` (None: the working
    directory)."""
    check_keys(cfg, _KEYS)
    given = opt_str(cfg, "db_path")
    db_path = locate(given) if given else (state_dir or Path()) / "bayes.db"
    skip: tuple[str, ...] = DEFAULT_SKIP_HEADERS
    if "skip_headers" in cfg:
        skip = tuple(s.lower() for s in str_list(cfg, "skip_headers"))
    classifier = Classifier(
        unknown_strength=_number(cfg, "unknown_strength", 0.45, 0.0, math.inf),
        unknown_prob=_number(cfg, "unknown_prob", 0.5, 0.0, 1.0),
        min_strength=_number(cfg, "min_strength", 0.1, 0.0, 0.5, low_ok=True),
        max_discriminators=integer(cfg, "max_discriminators", 150, 1))
    tokenizer = TokenizerConfig(max_text_chars=integer(cfg, "max_text_chars", 100_000, 0),
                                max_tokens=integer(cfg, "max_tokens", 5_000, 1),
                                skip_headers=skip,
                                own_hosts=(hostname.lower(),) if hostname else ())
    spam_at, ham_below = _opt_score(cfg, "autolearn_spam_at"), _opt_score(cfg,
                                                                          "autolearn_ham_below")
    if spam_at is not None and ham_below is not None and not ham_below < spam_at:
        raise ConfigError("autolearn_ham_below", "must be below autolearn_spam_at")
    return Settings(db_path, classifier, tokenizer, integer(cfg, "min_spam", 200, 0),
                    integer(cfg, "min_ham", 200, 0), spam_at, ham_below)


def _opt_score(cfg: Mapping[str, Any], key: str) -> float | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(key, "must be a number (a score)")
    return float(v)


def _number(cfg: Mapping[str, Any], key: str, default: float, low: float, high: float,
            low_ok: bool = False) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) \
            or not (low <= v if low_ok else low < v) or not v < high:
        bound = "" if high == math.inf else f" and < {high:g}"
        raise ConfigError(key, f"must be a number {'>=' if low_ok else '>'} {low:g}{bound}")
    return float(v)
