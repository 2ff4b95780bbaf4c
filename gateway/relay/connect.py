"""Open a downstream connection for a transport: each of its hosts in order (failover on a
refused, unreachable, silent or 4xx/5xx-greeting host), with the relay's timeouts, and STARTTLS
by the relay's TLS level for that host (``none``, ``may``: opportunistic, falling back to
plaintext if the handshake fails; ``encrypt``: required, unverified; ``verify``: required, with
the certificate checked against the host name and ``relay.tls_ca_file`` or the system CAs)."""

from __future__ import annotations

import logging
import ssl

from gateway.errors import RelayError, RelayTempError
from gateway.policy.schema import RelayConfig
from gateway.relay.client import DownstreamClient
from gateway.relay.transport import Transport

log = logging.getLogger("mailgate.relay")


def tls_context(relay: RelayConfig, level: str) -> ssl.SSLContext:
    if level == "verify":
        ca = str(relay.tls_ca_file) if relay.tls_ca_file else None
        return ssl.create_default_context(cafile=ca)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _one(host: str, port: int, lmtp: bool, relay: RelayConfig, helo: str,
               use_tls: bool = True) -> DownstreamClient:
    client = await DownstreamClient.connect(
        host, port, lmtp=lmtp, helo_name=helo, connect_timeout_s=relay.connect_timeout_s,
        command_timeout_s=relay.command_timeout_s, data_timeout_s=relay.data_timeout_s)
    level = relay.tls_level(host) if use_tls else "none"
    if level == "none":
        return client
    if "STARTTLS" not in client.extensions:
        if level == "may":
            return client
        await client.quit()
        msg = f"downstream {host}:{port}: STARTTLS required (tls level {level}) but not offered"
        raise RelayTempError(msg, code=451, status="4.7.10", text=msg)
    try:
        await client.starttls(tls_context(relay, level),
                              host if level == "verify" else None)
    except RelayError as e:
        if level != "may":
            raise
        log.warning("downstream %s:%s: STARTTLS failed (%s); retrying without TLS", host, port, e)
        return await _one(host, port, lmtp, relay, helo, use_tls=False)
    return client


async def connect_transport(t: Transport, relay: RelayConfig, helo_name: str
                            ) -> DownstreamClient:
    lmtp = t.kind == "lmtp"
    if t.path is not None:
        return await DownstreamClient.connect_unix(
            str(t.path), lmtp=lmtp, helo_name=helo_name,
            connect_timeout_s=relay.connect_timeout_s,
            command_timeout_s=relay.command_timeout_s, data_timeout_s=relay.data_timeout_s)
    last: RelayError | None = None
    for host, port in t.endpoints:
        try:
            return await _one(host, port, lmtp, relay, helo_name)
        except RelayError as e:
            last = e
            if len(t.endpoints) > 1:
                log.warning("downstream %s:%s failed (%s); trying the next host", host, port, e)
    assert last is not None
    raise last
