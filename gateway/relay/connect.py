"""Open a downstream connection for a transport: each of its hosts in order (failover on a
refused, unreachable, silent or 421-greeting host), with the relay's timeouts."""

from __future__ import annotations

import logging

from gateway.errors import RelayError
from gateway.policy.schema import RelayConfig
from gateway.relay.client import DownstreamClient
from gateway.relay.transport import Transport

log = logging.getLogger("mailgate.relay")


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
            return await DownstreamClient.connect(
                host, port, lmtp=lmtp, helo_name=helo_name,
                connect_timeout_s=relay.connect_timeout_s,
                command_timeout_s=relay.command_timeout_s, data_timeout_s=relay.data_timeout_s)
        except RelayError as e:
            last = e
            if len(t.endpoints) > 1:
                log.warning("downstream %s:%s failed (%s); trying the next host", host, port, e)
    assert last is not None
    raise last
