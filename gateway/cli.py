"""The ``mailgate`` command: ``run`` the gateway, ``check-policy`` a file, manage the ``queue``
(``gateway/queuecli.py``), the ``quarantine`` and Bayes (``learn``).

Every subcommand finds its policy the same way (``gateway/policy/locate.py``: ``--policy``,
``$MAILGATE_POLICY``, ``/etc/mailgate/mailgate.toml``, ``./policies/default.toml``) and exits
alike: 0 ok, 1 a bad policy or environment (or what the command reports as failed), 2 bad usage
(the command line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway import __version__

POLICY_HELP = ("default: the first of $MAILGATE_POLICY, /etc/mailgate/mailgate.toml, "
               "./policies/default.toml")
EXIT_CODES = "Exit codes: 0 ok, 1 bad policy or environment, 2 bad usage."


def _listen_address(text: str) -> str:
    """``--listen``'s value, checked as ``server.listen``'s: a bad one is bad usage (exit 2)."""
    from gateway.policy.loader import _listener

    try:
        _listener(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def build_parser(*, only_run: bool = False) -> argparse.ArgumentParser:
    """The whole command line; ``only_run``: just ``run``, without importing the other
    commands' modules (they load the spool, the quarantine and Bayes: memory the gateway's
    supervisor process would otherwise carry for as long as it runs)."""
    parser = argparse.ArgumentParser(prog="mailgate", description="Inbound SMTP "
                                     f"content-filtering gateway. {EXIT_CODES}")
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the gateway",
                         description=f"Start the gateway. {EXIT_CODES}")
    run.add_argument("--policy", type=Path, default=None, help=f"policy file ({POLICY_HELP})")
    run.add_argument("--log-format", choices=("kv", "json"), default="kv",
                     help="key=value lines (default) or JSON lines")
    run.add_argument("--log-level", default="info",
                     choices=("debug", "info", "warning", "error"))
    run.add_argument("--listen", action="append", metavar="HOST:PORT", type=_listen_address,
                     help="listen here instead of the policy's server.listen (repeatable; "
                     "the same as $MAILGATE_LISTEN, comma-separated)")
    if only_run:
        return parser
    check = sub.add_parser("check-policy", help="validate a policy file and what running it "
                           "needs, and exit",
                           description="Validate a policy file, its filters' files and what "
                           "`run` needs (spool directory writable, TLS files loadable). "
                           "Exit codes: 0 ok, 1 problems (each printed), 2 bad usage.")
    check.add_argument("policy", type=Path, nargs="?", help=f"policy file ({POLICY_HELP})")
    check.add_argument("--policy", type=Path, dest="policy_option", metavar="POLICY",
                       help="the same, as an option")
    import importlib

    for name, help_, description in _ADMIN_COMMANDS:
        module = importlib.import_module(f"gateway.{name}cli")
        module.add_arguments(sub.add_parser(name, help=help_, description=description),
                             POLICY_HELP)
    return parser


_ADMIN_COMMANDS: tuple[tuple[str, str, str], ...] = (
    # (command, help, description): each is gateway/<command>cli.py's add_arguments
    ("queue", "list and manage the queue (works whether the gateway runs or not)",
     "List and manage queued messages. Exit codes: 0 ok, 1 not found / busy / wrong state, "
     "or a bad policy or spool, 2 bad usage."),
    ("quarantine", "list, show, release, delete and expire quarantined mail (works whether "
     "the gateway runs or not)",
     "Quarantined messages. Exit codes: 0 ok, 1 not found / busy, or a bad policy or spool, "
     "2 bad usage."),
    ("learn", "train the bayes filter from message files, Maildir folders and mbox files",
     "Learn messages as spam or ham, or forget them. Exit codes: 0 ok, 1 some messages "
     "unreadable, or a bad policy, store or PATH, 2 bad usage."),
    ("health", "check that every listener answers with a 220 greeting (for container and "
     "service health checks)",
     "Connect to each listening address of the policy and expect the 220 greeting. Exit "
     "codes: 0 all answer, 1 one does not (or the policy does not load), 2 usage."),
)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except BrokenPipeError:
        # the reader went away (`mailgate check-policy | head -1`): not an error, as in
        # `mailgate queue list | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only_run=argv[:1] == ["run"]).parse_args(argv)
    if args.cmd == "check-policy" and args.policy_option is not None:
        if args.policy is not None:
            print("mailgate check-policy: give the policy file once (FILE or --policy FILE)",
                  file=sys.stderr)
            return 2
        args.policy = args.policy_option
    if args.cmd == "run":
        from gateway.logs import setup_logging

        setup_logging(args.log_format, args.log_level)
    if not (args.cmd == "learn" and args.db is not None):
        from gateway.errors import PolicyError
        from gateway.policy.locate import find_policy

        try:
            args.policy = find_policy(args.policy)
        except PolicyError as e:
            if args.cmd == "run":
                import logging

                logging.getLogger("mailgate").error("%s", e)
            else:
                print(f"mailgate {args.cmd}: {e}", file=sys.stderr)
            return 1

    if args.cmd == "check-policy":
        return check_policy(args.policy)
    if args.cmd == "queue":
        from gateway import queuecli
        from gateway.logs import setup_logging

        setup_logging(args.log_format, "info")
        return queuecli.run(args)
    if args.cmd == "health":
        from gateway import healthcli

        return healthcli.run(args)
    if args.cmd == "learn":
        from gateway import learncli

        return learncli.run(args)
    if args.cmd == "quarantine":
        from gateway import quarantinecli
        from gateway.logs import setup_logging

        setup_logging(args.log_format, "info")
        return quarantinecli.run(args)
    from gateway.launch import run as run_gateway

    if args.listen:
        import os

        from gateway.policy.loader import LISTEN_ENV

        os.environ[LISTEN_ENV] = ",".join(args.listen)

    return run_gateway(args.policy)


def check_policy(path: Path) -> int:
    from gateway.app import load_checked
    from gateway.errors import PolicyError
    from gateway.policy.loader import load_policy
    from gateway.policy.schema import Policy
    from gateway.preflight import maildir_problems, spool_problem

    problems: list[str] = []
    warnings: tuple[str, ...] = ()
    policy: Policy | None
    try:
        engine, _ = load_checked(path)
        policy = engine.policy
    except PolicyError as e:
        problems, warnings = list(e.problems), e.warnings
        try:  # the spool too, as `run` does, when the policy's own keys are valid
            policy = load_policy(path)
        except PolicyError:
            policy = None
    if policy is not None:  # what `run` needs
        spool = spool_problem(policy.spool.directory)
        if spool:
            problems.append(f"{path}: spool.directory: {spool}")
        problems += maildir_problems(policy)
    if problems:
        for p in (*problems, *warnings):
            print(p, file=sys.stderr)
        print(f"{path}: {len(problems)} problem(s)"
              + (f", {len(warnings)} warning(s)" if warnings else ""), file=sys.stderr)
        return 1
    for w in engine.warnings:  # mis-deployments that work but are unsafe (policy/lint.py)
        print(w, file=sys.stderr)
    pol = engine.policy
    print(f"{path}: ok" + (f" ({len(engine.warnings)} warning(s))" if engine.warnings else ""))
    print(f"  listen: {', '.join(f'{x.host}:{x.port}' for x in pol.listeners)}")
    print(f"  relay: {pol.relay.mode} -> {pol.relay.downstream}")
    print(f"  accepted domains: {', '.join(sorted(pol.accepted_domains)) or '(none)'}")
    for f in engine.pipeline.chain:
        hooks = [s.value for s in f.stages] + (["sign"] if f.signs else []) \
            + (["decided"] if f.decides else [])
        print(f"  filter {f.name}: {', '.join(hooks)} "
              f"(timeout {f.timeout_s:g}s, on_error {f.on_error}; {f.origin})")
    _print_patches()
    return 0


def _print_patches() -> None:
    """The library patches ``run`` would use (gateway/patches.py): those of the policy's
    filters (checked as they loaded) and the SMTP front end's (checked here, as at start)."""
    import gateway.smtp.server  # noqa: F401 - runs the front end's checks
    from gateway import patches

    every = patches.statuses()
    off = [st for st in every if not st.active]
    print(f"  library patches: {len(every) - len(off)} of {len(every)} in use")
    for st in off:
        print(f"  library patch {st.name}: off, the library's own path is used ({st.reason})")


if __name__ == "__main__":
    sys.exit(main())
