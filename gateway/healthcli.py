"""``mailgate health``: is the gateway answering SMTP? Connects to each listening address of
the policy (``0.0.0.0`` and ``::`` probed on loopback), expects the ``220`` greeting, says
``QUIT``. Exit 0 when every listener greets, 1 otherwise (one line per address on stderr):
the container image's ``HEALTHCHECK`` and a systemd ``ExecStartPost`` use it."""

from __future__ import annotations

import argparse
import math
import smtplib
import sys
from pathlib import Path

from gateway.errors import PolicyError


def add_arguments(p: argparse.ArgumentParser, policy_help: str) -> None:
    p.add_argument("--policy", type=Path, default=None, help=f"policy file ({policy_help})")
    p.add_argument("--timeout-s", type=_seconds, default=5.0,
                   help="seconds to wait for each greeting (default: 5)")


def _seconds(text: str) -> float:
    """A finite number > 0 (argparse: anything else is bad usage, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def probe_address(host: str) -> str:
    """Where to connect for a listener bound to ``host`` (a wildcard means this machine)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def probe(host: str, port: int, timeout_s: float) -> str:
    """The greeting's text; raises OSError or smtplib.SMTPException when there is none."""
    with smtplib.SMTP(timeout=timeout_s) as s:
        code, msg = s.connect(probe_address(host), port)
        if code != 220:
            raise smtplib.SMTPResponseException(code, msg)
        s.quit()
    return msg.decode("utf-8", "replace")


def _reason(e: Exception) -> str:
    if isinstance(e, TimeoutError):
        return "no greeting (timed out)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def run(args: argparse.Namespace) -> int:
    from gateway.policy.loader import load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    bad = 0
    for lst in policy.listeners:
        where = f"[{lst.host}]:{lst.port}" if ":" in lst.host else f"{lst.host}:{lst.port}"
        if lst.port == 0:  # the gateway binds whatever free port it gets: not known here
            print(f"mailgate health: {where}: port 0 is a free port picked at start, which "
                  f"cannot be probed: give server.listen (or --listen) a fixed port",
                  file=sys.stderr)
            bad += 1
            continue
        try:
            greeting = probe(lst.host, lst.port, args.timeout_s)
        except smtplib.SMTPResponseException as e:
            print(f"mailgate health: {where}: greeted with {e.smtp_code} instead of 220",
                  file=sys.stderr)
            bad += 1
        except (OSError, smtplib.SMTPException) as e:
            print(f"mailgate health: {where}: {_reason(e)}", file=sys.stderr)
            bad += 1
        else:
            print(f"{where}: 220 {greeting.splitlines()[0] if greeting else ''}".rstrip())
    return 1 if bad else 0
