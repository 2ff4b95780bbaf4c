"""Open a downstream connection for a transport: each of its hosts in order (failover on a
refused, unreachable, silent or 4xx/5xx-greeting host), with the relay's timeouts, and STARTTLS
by the relay's TLS level for that host (``none``, ``may``: opportunistic, falling back to
plaintext if the handshake fails; ``encrypt``: required, unverified; ``verify``: required, with
the certificate checked against the host name and ``relay.tls_ca_file`` or the system CAs).

An ``mx`` transport is first routed through DNS (:func:`gateway.relay.mx.mx_route`): a permanent
DNS answer (null MX, NXDOMAIN...) raises :class:`RelayPermError`, a temporary one
:class:`RelayTempError` (4.4.3); then each MX host's addresses are tried in order, the TLS level
and certificate name being the MX host name's. As with Postfix's ``smtp_skip_5xx_greeting``, a
5xx greeting only moves on to the next MX host: when all fail, the error is temporary."""

from __future__ import annotations

import logging
import ssl

from gateway.dnsresolver import DnsResolver
from gateway.errors import RelayError, RelayPermError, RelayTempError
from gateway.policy.schema import RelayConfig
from gateway.relay.client import DownstreamClient
from gateway.relay.mx import MxResult, mx_route
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
               use_tls: bool = True, name: str | None = None) -> DownstreamClient:
    """Connect to ``host`` (a name or an address); ``name``: the host name for the TLS level
    and certificate check when ``host`` is an MX host's address."""
    client = await DownstreamClient.connect(
        host, port, lmtp=lmtp, helo_name=helo, connect_timeout_s=relay.connect_timeout_s,
        command_timeout_s=relay.command_timeout_s, data_timeout_s=relay.data_timeout_s)
    tls_name = name or host
    client.remote_name = tls_name  # an MX host's name rather than its address (DSN Remote-MTA)
    level = relay.tls_level(tls_name) if use_tls else "none"
    if level == "none":
        return client
    if "STARTTLS" not in client.extensions:
        if level == "may":
            return client
        await client.quit()
        msg = f"downstream {tls_name}:{port}: STARTTLS required (tls level {level}) but not offered"
        raise RelayTempError(msg, code=451, status="4.7.10", text=msg)
    try:
        await client.starttls(tls_context(relay, level),
                              tls_name if level == "verify" else None)
    except RelayError as e:
        if level != "may":
            raise
        log.warning("downstream %s:%s: STARTTLS failed (%s); retrying without TLS",
                    tls_name, port, e)
        return await _one(host, port, lmtp, relay, helo, use_tls=False, name=name)
    return client


async def connect_transport(t: Transport, relay: RelayConfig, helo_name: str,
                            resolver: DnsResolver | None = None) -> DownstreamClient:
    if t.kind == "mx":
        return await _connect_mx(t, relay, helo_name, resolver)
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
    if last.permanent:  # a 5xx greeting/EHLO says nothing about the recipients: retry later
        raise RelayTempError(str(last), code=451, status="4.4.0", text=str(last))
    raise last


async def _connect_mx(t: Transport, relay: RelayConfig, helo_name: str,
                      resolver: DnsResolver | None) -> DownstreamClient:
    if resolver is None:  # the loader allows mx only in queue mode, whose pool has one
        msg = f"{t}: no DNS resolver for MX routing"
        raise RelayTempError(msg, code=451, status="4.4.3", text=msg)
    route = await mx_route(t.domain, resolver, local_names=(helo_name,))
    if not route.ok:
        kind = RelayPermError if route.permanent else RelayTempError
        raise kind(f"{t}: {route.text}", code=route.code, status=route.status, text=route.text)
    return await connect_mx(route, t.port, relay, helo_name)


async def connect_mx(route: MxResult, port: int, relay: RelayConfig, helo_name: str
                     ) -> DownstreamClient:
    """Each address of each MX host in order, until one greets and answers EHLO."""
    errors: list[str] = []
    for host in route.hosts:
        for addr in host.addresses:
            try:
                return await _one(addr, port, False, relay, helo_name, name=host.name)
            except RelayError as e:
                errors.append(f"{host.name}[{addr}]:{port}: {e}")
                log.warning("MX %s[%s]:%s for %s failed (%s); trying the next", host.name, addr,
                            port, route.domain, e)
    msg = f"no MX host of {route.domain} accepted a connection: " + "; ".join(errors)
    raise RelayTempError(msg[:500], code=451, status="4.4.1", text=msg[:300])
