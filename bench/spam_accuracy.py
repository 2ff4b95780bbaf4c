"""Spam-filter accuracy and scan cost of a policy on the SpamAssassin training corpus, with
k-fold cross-validation for Bayes, next to spamd's on the same sample (optionally measured in the
same run).

For each fold, Bayes learns the other folds (as ``mailgate learn`` does: same tokenizer, same
store) and the held-out messages are scored by the policy's content filters — the ones that
need no network: ``headers``, ``rules``, ``bayes``, ``attachments`` (SPF/DKIM/DMARC/ARC/DNSBL
need the senders' DNS of 2002, which is gone; clamd/spamd/rspamd are separate services) — run
through the gateway's own pipeline, scorecard and decision with the policy's default class.

Accuracy: ham flagged at or above the quarantine/reject threshold (false positives), spam
caught at that level, both also at the add_header level. spamd's reference figures on this
sample (threshold 5.0, local tests only, no Bayes) are from corpora/spamassassin/SOURCE.md:
3/175 ham flagged, 123/176 spam caught.

Scan cost, as messages per CPU second (= messages/s on one core), median over ``--repeats``
rounds (a few of each fold's training messages go through first, as warm-up, not counted; the
first round gives the verdicts). Bayes training is never timed. mailgate runs in this process,
one message at a time; its CPU is ``time.process_time()`` (every thread of the process: the
filters run in asyncio's thread pool):

* ``mailgate scan`` — ``Pipeline.run_stage`` only: the content filters, MIME parsing included;
* ``mailgate pipeline`` — the whole per-message step as this script runs it: spool file
  written, ``Message.from_spool``, the filters, scorecard, decision, spool file removed.

With ``--spamd``, a private offline spamd (tests/support/spamd.py: ``--local``, shipped rules,
no user config; here also ``use_bayes 0`` and ``bayes_auto_learn 0``: no Bayes, as in
SOURCE.md, and nothing written to the system's Bayes DB) gets the first ``--warmup`` messages
as warm-up, then, in each round right after mailgate's pass, all of them (SPAMC ``SYMBOLS`` over
TCP on 127.0.0.1, as many concurrent clients as it may have children, ``--spamd-children``,
default the number of CPUs). Its CPU is the user+system time of its whole process tree (parent
+ children, children that exited included; bench/run.py's ``tree``/``cpu_s``), its verdicts
those at its threshold 5.0. Without ``--spamd``, spamd's cost is the figure measured earlier
(about 10 msgs/s per core).

Printed: the accuracy table, then per engine: messages, CPU s, msgs/s per core, wall msgs/s,
ham flagged, spam caught; and the ratio mailgate/spamd per core (of the medians, and per round).
One line per round on stderr. See bench/README.md for the figures measured.

The corpus (351 messages) is smaller than Bayes' default minimum training (200 of each): the
script sets ``min_spam``/``min_ham`` to 1 for its folds; every other setting is the policy's.

Usage: .venv/bin/python bench/spam_accuracy.py [--policy policies/default.toml] [--folds 5]
       [--corpus ../shared/corpora/spamassassin/train] [--repeats 3] [--warmup 10]
       [--spamd] [--spamd-children N] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run import cpu_s, tree  # noqa: E402  # bench/run.py: process-tree accounting

from filters._bayesstore import Change, SqliteStore  # noqa: E402
from filters._tokenizer import message_key, token_id, tokenize  # noqa: E402
from filters.bayes import parse_settings  # noqa: E402
from filters.spamd import MAX_REPLY_BYTES, open_stream, parse_reply, read_all  # noqa: E402
from gateway.decide import Scorecard, decide  # noqa: E402
from gateway.filterapi import Action, Client, FilterContext, Stage  # noqa: E402
from gateway.message import Message  # noqa: E402
from gateway.mime import parse_bytes  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.policy.loader import load_policy  # noqa: E402
from gateway.policy.schema import FilterSpec, Policy  # noqa: E402
from gateway.registry import build_chain  # noqa: E402
from gateway.services import Services  # noqa: E402
from tests.support.spamd import HOST, SpamdInstance, spamd_unavailable_reason  # noqa: E402

CONTENT_FILTERS = ("headers", "rules", "bayes", "attachments")
SPAMD = {"ham_flagged": 3, "ham": 175, "spam_caught": 123, "spam": 176}
SPAMD_PER_CORE = 10.0  # msgs/s per core measured earlier (corpora/SERVICES.md: ~0.1 s a message)
FLAGGING = (Action.QUARANTINE, Action.DISCARD, Action.REJECT)  # "caught" = kept from inboxes

Corpus = Sequence[tuple[str, str, bytes]]  # (label, file name, CRLF message bytes)
Scored = tuple[str, str, float, Action, list[str]]  # (label, name, score, action, symbols)


@dataclass
class Cost:
    """One timing pass of one engine: CPU and wall seconds for ``messages``."""

    messages: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def add(self, other: Cost) -> None:
        self.messages += other.messages
        self.cpu_s += other.cpu_s
        self.wall_s += other.wall_s


@dataclass
class Row:
    """An engine's line of the cost table: median over its passes, and its verdicts."""

    engine: str
    passes: list[Cost]
    ham_flagged: int
    ham: int
    spam_caught: int
    spam: int
    note: str = ""

    @property
    def messages(self) -> int:
        return self.passes[0].messages if self.passes else 0

    @property
    def cpu_s(self) -> float:
        return statistics.median(p.cpu_s for p in self.passes)

    @property
    def wall_s(self) -> float:
        return statistics.median(p.wall_s for p in self.passes)

    @property
    def per_core(self) -> float:
        return self.messages / self.cpu_s

    @property
    def wall_rate(self) -> float:
        return self.messages / self.wall_s


def load_corpus(root: Path) -> list[tuple[str, str, bytes]]:
    """(label, name, CRLF message bytes without the mbox From line), in name order."""
    out = []
    for label in ("ham", "spam"):
        for f in sorted((root / label).glob("*.eml")):
            raw = f.read_bytes()
            if raw.startswith(b"From "):
                raw = raw.partition(b"\n")[2]
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out.append((label, f.name, raw))
    return out


def content_policy(policy: Policy, db: Path) -> Policy:
    """The policy with only its network-free content filters (bayes added when absent),
    Bayes pointed at this fold's store."""
    specs = [s for s in policy.filters if s.name in CONTENT_FILTERS and s.enabled]
    if not any(s.name == "bayes" for s in specs):
        specs.append(FilterSpec(name="bayes", module=None, timeout_s=10.0, on_error="continue",
                                settings={}))
    out = []
    for s in specs:
        if s.name == "bayes":
            settings = {**s.settings, "db_path": str(db), "min_spam": 1, "min_ham": 1}
            settings.pop("autolearn_spam_at", None)
            settings.pop("autolearn_ham_below", None)
            s = dataclasses.replace(s, settings=settings)
        out.append(s)
    return dataclasses.replace(policy, filters=tuple(out))


def learn(db: Path, policy: Policy, train: Corpus) -> None:
    spec = next(s for s in policy.filters if s.name == "bayes")
    tok_cfg = parse_settings(spec.settings, policy.hostname).tokenizer
    store = SqliteStore(db)
    try:
        store.apply([Change(message_key(raw), "spam" if label == "spam" else "ham",
                            [token_id(t) for t in tokenize(parse_bytes(raw), tok_cfg)])
                     for label, _, raw in train])
    finally:
        store.close()


def split(corpus: Corpus, folds: int, k: int) -> tuple[Corpus, Corpus]:
    """(test, train) of fold ``k``: every ``folds``-th message of each label, from the ``k``-th."""
    per_label: dict[str, list[tuple[str, str, bytes]]] = {"ham": [], "spam": []}
    for c in corpus:
        per_label[c[0]].append(c)
    test = [c for lst in per_label.values() for i, c in enumerate(lst) if i % folds == k]
    train = [c for lst in per_label.values() for i, c in enumerate(lst) if i % folds != k]
    return test, train


async def score_all(pipeline: Pipeline, policy: Policy, msgs: Corpus, spool: Path
                    ) -> tuple[list[Scored], Cost, Cost]:
    """Score ``msgs`` one at a time; returns the results, the cost of the scan
    (``run_stage`` only) and of the whole per-message step."""
    cls = policy.default_class
    out = []
    scan, whole = Cost(len(msgs)), Cost(len(msgs))
    for i, (label, name, raw) in enumerate(msgs):
        c0, w0 = time.process_time(), time.perf_counter()
        path = spool / f"m{i}"
        path.write_bytes(raw)
        msg = Message.from_spool(path, len(raw))
        ctx = FilterContext(stage=Stage.MESSAGE, qid=f"Q{i}", client=Client("192.0.2.1", 25),
                            message=msg)
        c1, w1 = time.process_time(), time.perf_counter()
        outcomes = await pipeline.run_stage(Stage.MESSAGE, ctx)
        scan.cpu_s += time.process_time() - c1
        scan.wall_s += time.perf_counter() - w1
        card = Scorecard(list(outcomes.values()))
        score = card.score(cls)
        d = decide(card.symbols(cls), list(outcomes.values()), cls, Stage.MESSAGE, score)
        assert d is not None
        path.unlink()
        whole.cpu_s += time.process_time() - c0
        whole.wall_s += time.perf_counter() - w0
        syms = [f"{s.name}({s.score:g})" for s in card.symbols(cls) if s.score]
        out.append((label, name, score, d.action, syms))
    return out, scan, whole


@dataclass
class Fold:
    """One fold: its held-out messages, a few training messages for the warm-up, and the
    policy's content filters with Bayes trained on the other folds."""

    test: Corpus
    warmup: Corpus
    policy: Policy
    pipeline: Pipeline


def prepare_folds(policy: Policy, policy_dir: Path, corpus: Corpus, folds: int, warmup: int,
                  tmp: Path) -> list[Fold]:
    """Bayes learns each fold's training messages (not timed); a pipeline per fold."""
    out = []
    for k in range(folds):
        db = tmp / f"bayes{k}.db"
        fold_policy = content_policy(policy, db)
        test, train = split(corpus, folds, k)
        learn(db, fold_policy, train)
        services = Services(hostname=policy.hostname, policy_dir=policy_dir)
        warm = list(train[::max(1, len(train) // warmup)][:warmup]) if warmup > 0 else []
        out.append(Fold(test, warm, fold_policy, Pipeline(build_chain(fold_policy, services))))
    return out


async def mailgate_pass(folds: Sequence[Fold], spool: Path, warmup: bool = False
                        ) -> tuple[list[Scored], Cost, Cost]:
    """Every fold's held-out messages (or its warm-up ones): results, the scan's and the whole
    step's cost summed over the folds."""
    results: list[Scored] = []
    scan, whole = Cost(), Cost()
    for f in folds:
        res, s, w = await score_all(f.pipeline, f.policy, f.warmup if warmup else f.test, spool)
        results += res
        scan.add(s)
        whole.add(w)
    return results, scan, whole


# -- spamd --------------------------------------------------------------------------------------
class BenchSpamd(SpamdInstance):
    """tests/support/spamd.py's spamd, plus ``use_bayes 0`` and ``bayes_auto_learn 0``: Bayes
    off, as SOURCE.md's reference, and no autolearning into the Bayes DB of the system's
    ``debian-spamd`` user (/var/lib/spamassassin/.spamassassin), which spamd would otherwise
    write — the same work on every pass, and no state left behind."""

    def _launch(self, argv: list[str], ready: Callable[[], bool], timeout_s: float,
                interval_s: float, env: Mapping[str, str] | None = None) -> None:
        super()._launch([*argv, "--cf=use_bayes 0", "--cf=bayes_auto_learn 0"], ready,
                        timeout_s, interval_s, env)

    @property
    def root(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid


@dataclass
class ChildCounter:
    """Samples how many processes spamd's tree has (parent excluded) every 0.1 s."""

    root: int
    counts: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            self.counts.add(len(tree(self.root)) - 1)
            self._stop.wait(0.1)

    def __enter__(self) -> ChildCounter:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


SpamdVerdict = tuple[bool, float, str]  # (spam at spamd's threshold, score, rules that hit)


async def spamd_symbols(port: int, raw: bytes) -> SpamdVerdict:
    """One SPAMC ``SYMBOLS`` request (filters/spamd.py's stream and reply helpers)."""
    reader, writer = await open_stream((HOST, port))
    try:
        writer.write(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(raw) + raw)
        await writer.drain()
        reply = await read_all(reader, MAX_REPLY_BYTES)
    finally:
        writer.close()
    spam, score, _, _ = parse_reply(reply)
    return spam, score, reply.partition(b"\r\n\r\n")[2].decode("utf-8", "replace").strip()


async def spamd_pass(sa: BenchSpamd, msgs: Corpus, clients: int
                     ) -> tuple[list[SpamdVerdict], Cost]:
    """Every message of ``msgs`` to spamd, ``clients`` requests at a time: the replies in
    order, and the CPU seconds of spamd's process tree and the wall time it took."""
    out: list[SpamdVerdict | None] = [None] * len(msgs)
    todo = iter(range(len(msgs)))

    async def client() -> None:
        for i in todo:
            out[i] = await spamd_symbols(sa.port, msgs[i][2])

    c0, w0 = cpu_s(sa.root), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    cost = Cost(len(msgs), cpu_s(sa.root) - c0, time.perf_counter() - w0)
    return [r for r in out if r is not None], cost


@dataclass
class Measured:
    results: list[Scored] = field(default_factory=list)  # mailgate's, first pass
    scans: list[Cost] = field(default_factory=list)
    wholes: list[Cost] = field(default_factory=list)
    spamd: list[SpamdVerdict] = field(default_factory=list)  # corpus order, first pass
    spamd_passes: list[Cost] = field(default_factory=list)
    spamd_children: set[int] = field(default_factory=set)


async def measure(folds: Sequence[Fold], corpus: Corpus, spool: Path, repeats: int,
                  warmup: int, sa: BenchSpamd | None, clients: int) -> Measured:
    """Warm-up, then ``repeats`` rounds: a mailgate pass, then (with ``sa``) a spamd pass —
    interleaved, so both see the same machine load round by round."""
    m = Measured()
    await mailgate_pass(folds, spool, warmup=True)
    if sa is not None:
        await spamd_pass(sa, corpus[:warmup], clients)
    with ChildCounter(sa.root) if sa is not None else contextlib.nullcontext() as counter:
        for r in range(repeats):
            results, scan, whole = await mailgate_pass(folds, spool)
            m.scans.append(scan)
            m.wholes.append(whole)
            line = (f"  pass {r + 1}/{repeats}: mailgate scan {scan.cpu_s:.2f} CPU s, "
                    f"pipeline {whole.cpu_s:.2f} CPU s ({whole.wall_s:.2f} s wall)")
            if sa is not None:
                verdicts, cost = await spamd_pass(sa, corpus, clients)
                m.spamd_passes.append(cost)
                line += f"; spamd {cost.cpu_s:.2f} CPU s ({cost.wall_s:.2f} s wall)"
                m.spamd = m.spamd or verdicts
            print(line, file=sys.stderr, flush=True)
            m.results = m.results or results
    if isinstance(counter, ChildCounter):
        m.spamd_children = counter.counts
    return m


# -- report -------------------------------------------------------------------------------------
def print_accuracy(results: list[Scored], add_at: float) -> None:
    ham = [r for r in results if r[0] == "ham"]
    spam = [r for r in results if r[0] == "spam"]
    fp = [r for r in ham if r[3] in FLAGGING]
    caught = [r for r in spam if r[3] in FLAGGING]
    print()
    print(f"{'':34} {'mailgate':>14} {'spamd (SOURCE.md)':>20}")
    print(f"{'ham quarantined/rejected (FP)':34} {len(fp):>5}/{len(ham):<8} "
          f"{SPAMD['ham_flagged']:>9}/{SPAMD['ham']:<10}")
    print(f"{'spam quarantined/rejected':34} {len(caught):>5}/{len(spam):<8} "
          f"{SPAMD['spam_caught']:>9}/{SPAMD['spam']:<10}")
    print(f"{'spam caught %':34} {100 * len(caught) / len(spam):>13.1f}% "
          f"{100 * SPAMD['spam_caught'] / SPAMD['spam']:>19.1f}%")
    print(f"{'ham marked (>= add_header)':34} {sum(r[2] >= add_at for r in ham):>5}/"
          f"{len(ham):<8}")
    print(f"{'spam marked (>= add_header)':34} {sum(r[2] >= add_at for r in spam):>5}/"
          f"{len(spam):<8}")
    print(f"{'median score ham / spam':34} {statistics.median(r[2] for r in ham):>6.2f} / "
          f"{statistics.median(r[2] for r in spam):.2f}")


def print_costs(rows: list[Row], spamd: Row | None) -> None:
    print()
    print(f"{'engine':28} {'messages':>8} {'CPU s':>8} {'msgs/s/core':>12} {'wall msgs/s':>12} "
          f"{'ham flagged':>12} {'spam caught':>12}")
    for r in rows:
        cpu = f"{r.cpu_s:8.2f}" if r.passes else f"{'-':>8}"
        wall = f"{r.wall_rate:12.1f}" if r.passes else f"{'-':>12}"
        rate = f"{r.per_core:12.1f}" if r.passes else f"{'~' + format(SPAMD_PER_CORE, 'g'):>12}"
        msgs = f"{r.messages:8}" if r.passes else f"{'-':>8}"
        print(f"{r.engine:28} {msgs} {cpu} {rate} {wall} "
              f"{f'{r.ham_flagged}/{r.ham}':>12} {f'{r.spam_caught}/{r.spam}':>12}{r.note}")
    ref = spamd.per_core if spamd is not None else SPAMD_PER_CORE
    what = "measured above" if spamd is not None else f"~{SPAMD_PER_CORE:g}, SOURCE.md"
    ratios = ", ".join(f"{r.engine.removeprefix('mailgate ')} {r.per_core / ref:.1f}x"
                       for r in rows if r.engine.startswith("mailgate"))
    print(f"mailgate/spamd per core ({what}): {ratios}")
    if spamd is not None:
        scan = next(r for r in rows if r.engine == "mailgate scan")
        per_round = [(a.messages / a.cpu_s) / (b.messages / b.cpu_s)
                     for a, b in zip(scan.passes, spamd.passes, strict=True)]
        print(f"  scan ratio per round: {', '.join(f'{x:.1f}x' for x in per_round)} "
              f"(median {statistics.median(per_round):.1f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", type=Path, default=REPO / "policies" / "default.toml")
    ap.add_argument("--corpus", type=Path,
                    default=REPO.parent / "shared" / "corpora" / "spamassassin" / "train")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timing passes (median)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="messages scanned before timing (per fold for mailgate)")
    ap.add_argument("--spamd", action="store_true",
                    help="measure a private offline spamd on the same messages")
    ap.add_argument("--spamd-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--verbose", action="store_true", help="list every misclassified message")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    corpus = load_corpus(args.corpus)
    if not corpus:
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    if args.spamd and (reason := spamd_unavailable_reason()):
        print(f"--spamd: {reason}", file=sys.stderr)
        return 2
    policy = load_policy(args.policy)
    t = policy.default_class.thresholds
    print(f"policy {args.policy} (class {policy.default_class.name}): add_header >= "
          f"{t.add_header}, quarantine >= {t.quarantine}, reject >= {t.reject}")
    print(f"corpus {args.corpus}: {sum(1 for c in corpus if c[0] == 'ham')} ham, "
          f"{sum(1 for c in corpus if c[0] == 'spam')} spam; {args.folds}-fold, "
          f"filters: {', '.join(CONTENT_FILTERS)}; {args.repeats} timing pass(es)")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailgate-acc-")))
        folds = prepare_folds(policy, args.policy.parent, corpus, args.folds, args.warmup, tmp)
        sa = stack.enter_context(BenchSpamd(args.spamd_children)) if args.spamd else None
        m = asyncio.run(measure(folds, corpus, tmp, args.repeats, args.warmup, sa,
                                args.spamd_children))
    results = m.results
    add_at = t.add_header if t.add_header is not None else float("inf")
    print_accuracy(results, add_at)

    ham = sum(r[0] == "ham" for r in results)
    spam = len(results) - ham
    fp = sum(r[0] == "ham" and r[3] in FLAGGING for r in results)
    caught = sum(r[0] == "spam" and r[3] in FLAGGING for r in results)
    rows = [Row("mailgate scan", m.scans, fp, ham, caught, spam),
            Row("mailgate pipeline", m.wholes, fp, ham, caught, spam)]
    measured: Row | None = None
    spamd_misses: list[tuple[str, str, float, str]] = []
    if args.spamd:
        lab = [(c[0], c[1], v) for c, v in zip(corpus, m.spamd, strict=True)]
        children = "/".join(map(str, sorted(m.spamd_children)))
        measured = Row(f"spamd ({args.spamd_children} clients)", m.spamd_passes,
                       sum(lb == "ham" and v[0] for lb, _, v in lab), ham,
                       sum(lb == "spam" and v[0] for lb, _, v in lab), spam,
                       f"  children: {children}")
        rows.append(measured)
        spamd_misses = [(lb, n, v[1], v[2]) for lb, n, v in lab if v[0] != (lb == "spam")]
    rows.append(Row("spamd (SOURCE.md)", [], SPAMD["ham_flagged"], SPAMD["ham"],
                    SPAMD["spam_caught"], SPAMD["spam"]))
    print_costs(rows, measured)
    print("ham flagged / spam caught: mailgate = quarantined/discarded/rejected by the "
          f"decision (quarantine >= {t.quarantine}); spamd = Spam: True at its threshold 5.0")

    if args.verbose:
        misses = [r for r in results if (r[0] == "ham") == (r[3] in FLAGGING)]
        for r in sorted(misses, key=lambda r: r[2]):
            print(f"  {r[0]:4} {r[2]:7.2f} {r[3].value:11} {r[1]}  {' '.join(r[4])}")
        for lb, n, score, syms in sorted(spamd_misses, key=lambda m: m[2]):
            print(f"  spamd {lb:4} {score:7.2f} {n}  {syms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
