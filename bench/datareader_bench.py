"""Micro-benchmark: DATA-phase throughput of gateway.smtp.datareader.read_data against an
aiosmtpd-1.4.6-style ``readuntil(b"\\r\\n")`` line loop, on 64 KiB messages.

Both readers drain the same wire bytes from an in-memory ``asyncio.StreamReader`` built like
aiosmtpd's (limit=1001); each message is followed by a pipelined command that is read back, so
the pushback path is exercised too. Prints MB/s (content bytes) side by side, medians over runs.

Usage: .venv/bin/python bench/datareader_bench.py [--runs 7] [--messages 300] [--size 65536]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable

from gateway.smtp.datareader import read_data

NEXT = b"MAIL FROM:<next@example.org>\r\n"
Reader = Callable[[asyncio.StreamReader], Awaitable[int]]


def make_message(size: int, seed: int = 1) -> bytes:
    """About ``size`` bytes of dot-stuffed wire DATA with mail-like lines, terminator included."""
    rng = random.Random(seed)
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"x" * 12, b"mail", b"gate", b"on"]
    lines = [b"From: a@example.org", b"To: b@example.org", b"Subject: benchmark", b""]
    total = sum(len(x) + 2 for x in lines)
    while total < size - 5:
        line = b" ".join(rng.choice(words) for _ in range(rng.randrange(4, 14)))[:76]
        if rng.random() < 0.02:
            line = b".." + line  # a line starting with a dot, stuffed as a client does
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n.\r\n"


async def aiosmtpd_style(reader: asyncio.StreamReader) -> int:
    """The aiosmtpd 1.4.6 smtp_DATA loop, minus the SMTP session around it (one deadline for the
    whole loop rather than one per line, which would only make it slower)."""
    data: list[bytearray] = []
    fragments: list[bytes] = []
    async with asyncio.timeout(60):
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as e:
                line = await reader.read(e.consumed)
            if not fragments and line == b".\r\n":
                break
            fragments.append(line)
            if line.endswith(b"\r\n"):
                data.append(bytearray(b"".join(fragments)))
                fragments.clear()
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return len(b"".join(data))


async def datareader(reader: asyncio.StreamReader) -> int:
    sink: list[bytes] = []
    loop = asyncio.get_running_loop()
    outcome = await read_data(reader, sink.append, max_message_bytes=10**8,
                              idle_timeout_s=5, deadline=loop.time() + 60)
    return outcome.size


async def one_run(read: Reader, message: bytes, count: int) -> tuple[float, int]:
    reader = asyncio.StreamReader(limit=1001)
    content = 0
    start = time.perf_counter()
    for _ in range(count):
        reader.feed_data(message + NEXT)
        content += await read(reader)
        if await asyncio.wait_for(reader.readuntil(b"\n"), 5) != NEXT:
            raise RuntimeError("pipelined command lost")
    return time.perf_counter() - start, content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=65536)
    args = parser.parse_args()
    message = make_message(args.size)
    results: dict[str, list[float]] = {"aiosmtpd-style": [], "read_data": []}
    readers: dict[str, Reader] = {"aiosmtpd-style": aiosmtpd_style, "read_data": datareader}
    sizes: dict[str, int] = {}
    for _ in range(args.runs):
        for name, read in readers.items():
            seconds, content = asyncio.run(one_run(read, message, args.messages))
            results[name].append(content / seconds / 1e6)
            sizes[name] = content
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"readers disagree on content size: {sizes}")
    print(f"{args.messages} messages x {len(message)} wire bytes, median of {args.runs} runs")
    for name, rates in results.items():
        print(f"  {name:15s} {statistics.median(rates):9.1f} MB/s"
              f"   (min {min(rates):.1f}, max {max(rates):.1f})")
    ratio = statistics.median(results["read_data"]) / statistics.median(results["aiosmtpd-style"])
    print(f"  speed-up        {ratio:9.1f}x")


if __name__ == "__main__":
    main()
