"""A tiny authoritative DNS server on loopback: "the internet's DNS" for tests.

``FakeDNS`` answers UDP and TCP queries on 127.0.0.1:<free port> from
records the test sets (at any time, from any thread), built with dnspython's
message API. Unknown names get NXDOMAIN; a name that exists (or has names
below it) but lacks the type asked gets NOERROR with no answer (NODATA).
Negative answers carry a root SOA, like a real authoritative server's.
Answers too big for the client's UDP size come back truncated (TC), and the
resolver retries over TCP. CNAMEs are followed within the fake's data.

Point dnspython at it::

    resolver = dns.asyncresolver.Resolver(configure=False)  # or dns.resolver
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = fake.port
    # or: resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", fake.port)]
    # or simply: fake.resolver() / fake.async_resolver()

Addresses in A/AAAA records must be loopback (127.0.0.0/8, ::1) unless
``external_ok=True``: whatever the code under test connects to stays on this
machine.
"""

from __future__ import annotations

import errno
import ipaddress
import selectors
import socket
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Self

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.rrset

__all__ = ["FakeDNS"]

_IN = dns.rdataclass.IN
_SOA_TEXT = "ns.fake-dns.test. hostmaster.fake-dns.test. 1 3600 600 86400 60"
_TCP_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0
_MAX_CNAME_CHAIN = 8


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def _text(name: dns.name.Name) -> str:
    """``example.test`` (no final dot, lower case; the root is ``.``)."""
    return name.to_text(omit_final_dot=True).lower() or "."


def _rdtype(value: str | dns.rdatatype.RdataType | None) -> dns.rdatatype.RdataType | None:
    if value is None or isinstance(value, dns.rdatatype.RdataType):
        return value
    return dns.rdatatype.from_text(value)


class FakeDNS:
    """An authoritative server for everything, from an in-memory table."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, ttl: int = 300) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"host must be on loopback, not {host}")
        self._host = host
        self._requested_port = port
        self._port = 0
        self.ttl = ttl
        self._lock = threading.Lock()
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rrset.RRset]] = {}
        self._servfail: set[tuple[dns.name.Name, dns.rdatatype.RdataType | None]] = set()
        self._drop: set[tuple[dns.name.Name, dns.rdatatype.RdataType | None]] = set()
        self._queries: list[tuple[str, str]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._tcp_workers: dict[threading.Thread, socket.socket] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeDNS already started")
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="fake-dns", daemon=True)
        self._thread.start()
        return self

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP on one port (a free one when ``port`` was 0)."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((self._host, self._requested_port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self._host, udp.getsockname()[1]))
                tcp.listen(16)
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno == errno.EADDRINUSE and self._requested_port == 0:
                    continue
                raise
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        thread.join(_STOP_TIMEOUT)
        with self._lock:
            workers = dict(self._tcp_workers)
        for worker, conn in workers.items():
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the worker's recv
            except OSError:
                pass
            worker.join(_TCP_TIMEOUT)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("FakeDNS not started: no port yet")
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{self._host}:{self.port}"

    def resolver(self, *, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A synchronous resolver that asks only this server (no cache)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self._host]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = lifetime
        return resolver

    def async_resolver(self, *, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """An asyncio resolver that asks only this server (no cache)."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self._host]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = lifetime
        return resolver

    # -- records -----------------------------------------------------------

    def _add(self, name: str, rdata: dns.rdata.Rdata, ttl: int | None, replace: bool) -> None:
        owner = _name(name)
        with self._lock:
            node = self._records.setdefault(owner, {})
            rrset = node.get(rdata.rdtype)
            if rrset is None or replace:
                rrset = node[rdata.rdtype] = dns.rrset.RRset(owner, _IN, rdata.rdtype)
            rrset.add(rdata, self.ttl if ttl is None else ttl)

    def add_mx(
        self, domain: str, records: Iterable[tuple[int, str]], *, ttl: int | None = None
    ) -> None:
        """Add MX records: ``[(10, "mx1.example.test"), (20, "mx2.example.test")]``."""
        for preference, host in records:
            exchange = _name(host).to_text()
            rdata = dns.rdata.from_text(_IN, dns.rdatatype.MX, f"{preference} {exchange}")
            self._add(domain, rdata, ttl, replace=False)

    def null_mx(self, domain: str, *, ttl: int | None = None) -> None:
        """Replace ``domain``'s MX records by the null MX ``0 .`` (RFC 7505)."""
        self._add(domain, dns.rdata.from_text(_IN, dns.rdatatype.MX, "0 ."), ttl, replace=True)

    def _check_address(self, ip: str, external_ok: bool) -> None:
        if not external_ok and not ipaddress.ip_address(ip).is_loopback:
            raise ValueError(f"{ip} is not loopback (pass external_ok=True if meant)")

    def add_a(
        self, host: str, ip: str, *, ttl: int | None = None, external_ok: bool = False
    ) -> None:
        ipaddress.IPv4Address(ip)
        self._check_address(ip, external_ok)
        self._add(host, dns.rdata.from_text(_IN, dns.rdatatype.A, ip), ttl, replace=False)

    def add_aaaa(
        self, host: str, ip: str, *, ttl: int | None = None, external_ok: bool = False
    ) -> None:
        ipaddress.IPv6Address(ip)
        self._check_address(ip, external_ok)
        self._add(host, dns.rdata.from_text(_IN, dns.rdatatype.AAAA, ip), ttl, replace=False)

    def add_txt(self, name: str, text: str | bytes, *, ttl: int | None = None) -> None:
        """Add one TXT record; text over 255 bytes becomes several strings
        (255 bytes each) of that one record, as DKIM keys are published."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        rdata = dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, chunks)
        self._add(name, rdata, ttl, replace=False)

    def add_cname(self, name: str, target: str, *, ttl: int | None = None) -> None:
        """``name`` is an alias of ``target`` (replacing any earlier CNAME)."""
        rdata = dns.rdata.from_text(_IN, dns.rdatatype.CNAME, _name(target).to_text())
        self._add(name, rdata, ttl, replace=True)

    def servfail(self, name: str, rdtype: str | None = None) -> None:
        """Answer SERVFAIL for ``name`` (all types, or just ``rdtype``)."""
        with self._lock:
            self._servfail.add((_name(name), _rdtype(rdtype)))

    def drop_queries(self, name: str, rdtype: str | None = None) -> None:
        """Never answer queries for ``name``: the resolver times out."""
        with self._lock:
            self._drop.add((_name(name), _rdtype(rdtype)))

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Delete ``name``'s records (of one type, or all) and failure rules."""
        owner, kind = _name(name), _rdtype(rdtype)
        with self._lock:
            if kind is None:
                self._records.pop(owner, None)
            else:
                node = self._records.get(owner, {})
                node.pop(kind, None)
                if not node:
                    self._records.pop(owner, None)
            for rules in (self._servfail, self._drop):
                rules -= {rule for rule in rules if rule[0] == owner and kind in (None, rule[1])}

    def reset(self) -> None:
        """No records, no failure rules, empty query log."""
        with self._lock:
            self._records.clear()
            self._servfail.clear()
            self._drop.clear()
            self._queries.clear()

    @property
    def queries(self) -> list[tuple[str, str]]:
        """``[("example.test", "MX"), ("mx1.example.test", "AAAA"), ...]`` (a copy)."""
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # -- answering ---------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        return any(owner.is_subdomain(name) for owner in self._records)

    @staticmethod
    def _matches(
        rules: set[tuple[dns.name.Name, dns.rdatatype.RdataType | None]],
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
    ) -> bool:
        return (name, None) in rules or (name, rdtype) in rules

    def _respond(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response (None: stay silent). Called with the lock held."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        self._queries.append((_text(qname), dns.rdatatype.to_text(qtype)))
        if self._matches(self._drop, qname, qtype):
            return None
        if self._matches(self._servfail, qname, qtype):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if question.rdclass != _IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        current = qname
        for _ in range(_MAX_CNAME_CHAIN):
            node = self._records.get(current, {})
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None or qtype in (dns.rdatatype.CNAME, dns.rdatatype.ANY):
                break
            response.answer.append(cname)
            current = _name(cname[0].to_text())
        node = self._records.get(current, {})
        if qtype == dns.rdatatype.ANY and node:
            response.answer.extend(node.values())
        elif qtype in node:
            response.answer.append(node[qtype])
        else:
            if not self._exists(current):
                response.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.RRset(dns.name.root, _IN, dns.rdatatype.SOA)
            soa.add(dns.rdata.from_text(_IN, dns.rdatatype.SOA, _SOA_TEXT), 60)
            response.authority.append(soa)
        return response

    def _answer(self, wire: bytes, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        with self._lock:
            response = self._respond(query)
            if response is None:
                return None
            limit = 65535
            if udp:
                limit = max(512, query.payload) if query.edns >= 0 else 512
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                truncated = dns.message.make_response(query)
                truncated.flags |= dns.flags.AA | dns.flags.TC
                return truncated.to_wire()

    def _serve(self) -> None:
        udp, tcp, wake = self._udp, self._tcp, self._wake_r
        assert udp is not None and tcp is not None and wake is not None
        with selectors.DefaultSelector() as selector:
            selector.register(udp, selectors.EVENT_READ, "udp")
            selector.register(tcp, selectors.EVENT_READ, "tcp")
            selector.register(wake, selectors.EVENT_READ, "wake")
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "udp":
                        self._serve_udp(udp)
                    elif key.data == "tcp":
                        self._accept_tcp(tcp)

    def _serve_udp(self, udp: socket.socket) -> None:
        try:
            wire, peer = udp.recvfrom(65535)
        except OSError:  # nothing there after all (BlockingIOError), or closing
            return
        answer = self._answer(wire, udp=True)
        if answer is not None:
            try:
                udp.sendto(answer, peer)
            except OSError:
                pass

    def _accept_tcp(self, tcp: socket.socket) -> None:
        try:
            conn, _ = tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        worker = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        with self._lock:
            self._tcp_workers[worker] = conn
        worker.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(_TCP_TIMEOUT)
            while not self._stopping.is_set():
                header = _recv_exactly(conn, 2)
                if header is None:
                    return
                wire = _recv_exactly(conn, int.from_bytes(header, "big"))
                if wire is None:
                    return
                answer = self._answer(wire, udp=False)
                if answer is not None:
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self._tcp_workers.pop(threading.current_thread(), None)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
