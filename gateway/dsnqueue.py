"""Sending a DSN: build it (:mod:`gateway.dsn`) for a message and some of its recipients, and
commit it to the spool as a message of its own, from the null sender to the original sender,
for the queue manager to deliver like any other. Used by the queue manager (failure, delay and
success reports) and by proxy mode (success reports).

Which success report a delivery owes: ``dsn.success_action``. Never to the null sender
(``dsn.wants_dsn``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import BinaryIO

from gateway import dsn
from gateway.logs import event
from gateway.qid import new_qid
from gateway.queue_entry import QueueEntry, Recipient
from gateway.spool import Spool

log = logging.getLogger("mailgate.qmgr")
OpenOriginal = Callable[[], AbstractContextManager[BinaryIO]]
# one recipient's delivery: (recipient, action, downstream reply, remote MTA host or None)
Delivered = tuple[Recipient, dsn.Action, str | None, str | None]


def success_status(reply: str | None) -> str:
    """The 2.x.x status in the downstream's reply ("250 2.0.0 Ok"), else 2.0.0."""
    m = re.search(r"\b(2\.\d{1,3}\.\d{1,3})\b", reply or "")
    return m.group(1) if m else "2.0.0"


async def report_success(spool: Spool, entry: QueueEntry, reporting_mta: str,
                         delivered: Sequence[Delivered], open_original: OpenOriginal,
                         now: float | None = None) -> str | None:
    """Queue one success DSN for the ``(recipient, action, downstream reply, remote MTA)``
    that asked for it (NOTIFY=SUCCESS, a sender that is not null); returns its qid, None when
    none asked, or "not sent: why" when it cannot be built. The remote MTA (the SMTP/LMTP
    server's name as we reached it; None for a Maildir) is the report's Remote-MTA, which RFC
    3461 6.3 e requires beside the Diagnostic-Code for a relay via SMTP.
    OSError/SpoolError: not queued (the caller logs it; the deliveries stand)."""
    now = time.time() if now is None else now
    wanted = [d for d in delivered if dsn.wants_dsn(entry.sender, d[0].notify, d[1])]
    if not wanted:
        return None
    try:
        statuses = [dsn.RecipientStatus(
            recipient=r.addr, action=action, status=success_status(reply),
            original_recipient=r.orcpt, last_attempt=now,
            remote_mta=mta_name(remote) if remote and reply and reply[:1] == "2" else None,
            diagnostic=f"smtp; {reply}" if reply and reply[:1] == "2" else None)
            for r, action, reply, remote in wanted]
    except dsn.DsnError as e:
        log.error("DSN for %s cannot be built: %s", entry.qid, e)
        return f"not sent: {e}"
    return await queue_dsn(spool, entry, reporting_mta, statuses, open_original, now)


def mta_name(host: str) -> str:
    """``dns; host`` for a DSN's Remote-MTA; an address as an RFC 5321 address literal."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"dns; {host}"
    return f"dns; [{'IPv6:' if ip.version == 6 else ''}{ip.compressed}]"


async def queue_dsn(spool: Spool, entry: QueueEntry, reporting_mta: str,
                    statuses: Sequence[dsn.RecipientStatus], open_original: OpenOriginal,
                    now: float) -> str:
    """Build the DSN and commit it to the spool; returns its qid, or "not sent: why" when it
    cannot be built (now or ever: not retried). OSError/SpoolError: try again later."""
    try:
        req = dsn.DsnRequest(qid=entry.qid, sender=entry.sender, arrival=entry.arrival,
                             envid=entry.envid, ret=entry.ret,  # type: ignore[arg-type]
                             reporting_mta=reporting_mta, received_from_mta=entry.helo or None)
        with await asyncio.to_thread(open_original) as f:
            data = await asyncio.to_thread(dsn.build_dsn, req, statuses, f, now=now)
    except dsn.DsnError as e:
        log.error("DSN for %s cannot be built: %s", entry.qid, e)
        return f"not sent: {e}"
    qid = new_qid()
    path = spool.incoming_path(qid)
    params = tuple(p for p, need in (("BODY=8BITMIME", not data.isascii()),
                                     ("SMTPUTF8", not entry.sender.isascii())) if need)
    bounce = QueueEntry(qid=qid, sender="", recipients=(Recipient(addr=entry.sender),),
                        mail_params=params, arrival=now, size=len(data), next_attempt=now,
                        decision={"action": "dsn", "for": entry.qid})
    try:
        await asyncio.to_thread(path.write_bytes, data)
        await asyncio.to_thread(spool.commit, bounce, path)
    finally:
        path.unlink(missing_ok=True)  # renamed away by a successful commit
    actions = sorted({s.action for s in statuses})
    event(log, "dsn", qid=qid, original=entry.qid, to=entry.sender, action=",".join(actions),
          rcpts=[s.recipient for s in statuses])
    return qid
