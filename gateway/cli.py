"""The ``mailgate`` command: ``run`` the gateway, ``check-policy`` a file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway import __version__

DEFAULT_POLICY = Path("policies/default.toml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailgate", description="Inbound SMTP "
                                     "content-filtering gateway")
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the gateway")
    run.add_argument("--policy", type=Path, default=DEFAULT_POLICY,
                     help=f"policy file (default: {DEFAULT_POLICY})")
    run.add_argument("--log-format", choices=("kv", "json"), default="kv",
                     help="key=value lines (default) or JSON lines")
    run.add_argument("--log-level", default="info",
                     choices=("debug", "info", "warning", "error"))
    check = sub.add_parser("check-policy", help="validate a policy file and exit")
    check.add_argument("policy", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "check-policy":
        return check_policy(args.policy)
    from gateway.app import run as run_gateway
    from gateway.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    return run_gateway(args.policy)


def check_policy(path: Path) -> int:
    from gateway.app import load_engine, make_tls_context
    from gateway.errors import PolicyError

    try:
        engine = load_engine(path)
        make_tls_context(engine.policy)
    except PolicyError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        print(f"{path}: {len(e.problems)} problem(s)", file=sys.stderr)
        return 1
    pol = engine.policy
    print(f"{path}: ok")
    print(f"  listen: {', '.join(f'{x.host}:{x.port}' for x in pol.listeners)}")
    print(f"  relay: {pol.relay.mode} -> {pol.relay.downstream}")
    print(f"  accepted domains: {', '.join(sorted(pol.accepted_domains)) or '(none)'}")
    for f in engine.pipeline.chain:
        print(f"  filter {f.name}: {', '.join(s.value for s in f.stages)} "
              f"(timeout {f.timeout_s:g}s, on_error {f.on_error}; {f.origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
