"""The one exception tree of mailgate.

Every error the gateway raises on purpose derives from :class:`MailgateError`. Exception text is
for logs only: it never reaches an SMTP peer (the front end answers ``451 4.3.0 ... (qid)``).
"""

from __future__ import annotations


class MailgateError(Exception):
    """Base of every mailgate error."""


class PolicyError(MailgateError):
    """A policy file is invalid. Carries every problem found, each naming file and key path,
    and the warnings found beside them (gateway/policy/lint.py), for the same report."""

    def __init__(self, problems: list[str] | tuple[str, ...],
                 warnings: list[str] | tuple[str, ...] = ()) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        super().__init__("\n".join(self.problems))


class FilterError(MailgateError):
    """A filter failed; the pipeline applies that filter's ``on_error``."""


class FilterLoadError(MailgateError):
    """A filter (built-in, module path, plugin directory or entry point) could not be loaded."""


class RelayError(MailgateError):
    """Talking to the downstream failed. ``permanent`` distinguishes 5xx from 4xx/transport."""

    permanent = False

    def __init__(self, message: str, *, code: int = 451, status: str = "4.4.0",
                 text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.text = text


class RelayTempError(RelayError):
    """Downstream answered 4xx, was unreachable, timed out or dropped the connection."""


class RelayPermError(RelayError):
    """Downstream answered 5xx."""

    permanent = True


class SpoolError(MailgateError):
    """The spool could not store, find, lock or move a message (the SMTP side answers 451)."""


class StartupError(MailgateError):
    """The gateway cannot start in this environment: the spool is not writable or is in use by
    another instance, a listen address is taken or needs privilege, a TLS file cannot be read.
    The text is one line naming the file or address and the reason (exit 1)."""
