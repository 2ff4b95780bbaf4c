"""A small authoritative DNS server on loopback for tests (UDP and TCP on one free port), built
with dnslib: ``with DnsServer(ZONE) as ns:`` then point a resolver at ``127.0.0.1:ns.port``.

``ZONE`` is zone-file text (absolute names, e.g. ``other.test. 60 IN MX 10 mx1.other.test.``).
Answers: the records of the asked name and type; a CNAME (followed within the zone, the chain
in the answer); NODATA (NOERROR, empty answer, the SOA in authority) for a name that has other
records; NXDOMAIN for any other name. A UDP answer over 512 bytes is sent truncated (TC, no
records), so the client asks again over TCP. ``servfail`` names get SERVFAIL; ``drop`` names are never
answered; ``delay={name: seconds}`` names are answered that much later (the server keeps
answering others meanwhile). ``port`` binds that port (default: a free one); ``tcp=False`` serves UDP only (TCP refused). ``soa`` is the SOA record (zone-file text) of negative answers,
default ``SOA`` (TTL and MINIMUM 60); ``soa=None`` sends them without one. Every query is recorded in ``queries`` as (name, type, "udp"|"tcp"), name without the
final dot, lowercase.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

from dnslib import QTYPE, RCODE, RR, DNSRecord

SOA = "test. 60 IN SOA ns.test. hostmaster.test. 1 60 60 60 60"


class DnsServer:
    def __init__(self, zone: str, *, servfail: Iterable[str] = (), drop: Iterable[str] = (),
                 host: str = "127.0.0.1", soa: str | None = SOA,
                 delay: Mapping[str, float] | None = None, port: int = 0,
                 tcp: bool = True) -> None:
        self.host = host
        self.records: dict[str, list[RR]] = {}
        for rr in RR.fromZone(zone):
            self.records.setdefault(_key(str(rr.rname)), []).append(rr)
        self.soa = RR.fromZone(soa)[0] if soa is not None else None
        self.servfail = {_key(n) for n in servfail}
        self.drop = {_key(n) for n in drop}
        self.delay = {_key(n): s for n, s in (delay or {}).items()}
        self.queries: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.udp, self.tcp = _bind_pair(host, port)
        self.port: int = self.udp.getsockname()[1]
        self.serves_tcp = tcp
        if not tcp:  # UDP only: a TCP connection to the port is refused (reset)
            self.tcp.close()

    # -- answers ------------------------------------------------------------------------------
    def answer(self, data: bytes, proto: str) -> bytes | None:
        request = DNSRecord.parse(data)
        q = request.q
        name, qtype = _key(str(q.qname)), QTYPE[q.qtype]
        self.queries.append((name, qtype, proto))
        if name in self.drop:
            return None
        reply = request.reply()
        if name in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        for _ in range(8):  # follow CNAMEs inside the zone
            rrs = self.records.get(name)
            if rrs is None:
                if not reply.rr:
                    reply.header.rcode = RCODE.NXDOMAIN
                    if self.soa is not None:
                        reply.add_auth(self.soa)
                return reply.pack()
            wanted = [rr for rr in rrs if QTYPE[rr.rtype] == qtype]
            cname = [rr for rr in rrs if QTYPE[rr.rtype] == "CNAME"]
            if wanted or not cname or qtype == "CNAME":
                for rr in wanted:
                    reply.add_answer(rr)
                if not wanted and self.soa is not None:
                    reply.add_auth(self.soa)
                return reply.pack()
            reply.add_answer(cname[0])
            name = _key(str(cname[0].rdata.label))
        return reply.pack()

    # -- serving ------------------------------------------------------------------------------
    def start(self) -> DnsServer:
        for target in (self._serve_udp, self._serve_tcp) if self.serves_tcp else (
                self._serve_udp,):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(Exception):
                out = self.answer(data, "udp")
                if out is not None and len(out) > 512:
                    out = _truncated(out)
                if out is not None:
                    wait = self._delay_of(data)
                    if wait:
                        threading.Timer(wait, self._send_udp, (out, peer)).start()
                    else:
                        self.udp.sendto(out, peer)

    def _send_udp(self, out: bytes, peer: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.udp.sendto(out, peer)

    def _delay_of(self, data: bytes) -> float:
        return self.delay.get(_key(str(DNSRecord.parse(data).q.qname)), 0.0) if self.delay else 0.0

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn, contextlib.suppress(Exception):
            while not self._stop.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                data = _recv_exact(conn, struct.unpack("!H", head)[0])
                if data is None:
                    return
                out = self.answer(data, "tcp")
                if out is not None:
                    wait = self._delay_of(data)
                    if wait:
                        self._stop.wait(wait)
                    conn.sendall(struct.pack("!H", len(out)) + out)


def silent_udp_port(host: str = "127.0.0.1") -> socket.socket:
    """A bound UDP socket that never reads: a nameserver that never answers (close it after)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def _truncated(packed: bytes) -> bytes:
    """The answer without its records and with TC set (the question kept)."""
    full = DNSRecord.parse(packed)
    short = DNSRecord(full.header, q=full.q)
    short.header.tc = 1
    return short.pack()


def _key(name: str) -> str:
    return name.lower().rstrip(".")


def closed_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port where nothing listens (bound, then closed): a nameserver that refuses, the
    kernel answering each query with ICMP port unreachable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


def _bind_pair(host: str, port: int = 0) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same port (``port``, or a free one)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no free port for both UDP and TCP")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
