"""A small HTTP endpoint for Prometheus scrapes: `GET /metrics`, one request per connection.

A scrape endpoint needs no more than this, and the gateway lives in a DMZ: no web framework,
no keep-alive, no request body. The request head is capped and must arrive in time; anything
else gets a plain status line (400, 404, 405, 408, 431) and a closed connection, and a log line.
Given networks to allow, it closes a connection from anywhere else at accept, before TLS and
before it takes a scrape slot (said in a log line at most every 10 s); given a certificate, it
speaks HTTPS only (and given a client CA, to scrapers with a certificate from it), and a
failed handshake is a log line and a closed connection.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from edgegw.acceptor import Acceptor
from edgegw.netaddr import HostPort, Network, ip_in_networks, normalize_ip
from edgegw.sockio import listen_socket

log = logging.getLogger("edgegw.metrics")

MAX_HEAD = 8192          # request line and headers
HEAD_TIMEOUT = 5.0       # seconds to send them
MAX_CONNECTIONS = 16     # scrapes at once; more are closed at accept
REFUSED_LOG_EVERY = 10.0  # seconds between log lines about sources off --metrics-allow


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where /metrics is served, and to whom."""
    addr: HostPort
    allow: tuple[Network, ...] = ()      # scrapers answered; empty: any that can connect
    tls: ssl.SSLContext | None = None    # HTTPS with this server context; None: plain HTTP

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def tls_context(cert: Path, key: Path | None, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context for HTTPS scrapes (TLS 1.2 or later) from a PEM certificate chain and
    its key (`key` None: the key is in the certificate file); with `client_ca`, a scraper must
    present a certificate that CA issued. ValueError says what is wrong."""
    for path in (cert, key, client_ca):
        try:
            if path is not None:
                path.open("rb").close()
        except OSError as exc:   # OpenSSL would not say which file
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the certificate {cert} and its key "
                         f"{key or '(in the same file)'}: {exc.strerror or exc}") from None
    if client_ca is not None:
        try:
            ctx.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the client CA {client_ca}: "
                             f"{exc.strerror or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """Serves `registry` at /metrics as `endpoint` says, until close()."""

    def __init__(self, endpoint: MetricsEndpoint, registry: CollectorRegistry,
                 backlog: int = 64) -> None:
        self.endpoint = endpoint
        self.registry = registry
        self.backlog = backlog
        self._lsock: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused = 0                       # refused connections not yet logged
        self._refused_logged = -math.inf        # when the last refusal was logged

    @property
    def address(self) -> tuple[str, int]:
        assert self._lsock is not None
        return self._lsock.getsockname()[:2]

    async def start(self) -> None:
        # Accepted here rather than by asyncio.start_server: with TLS that would handshake out
        # of sight, and a failed handshake would leave no log line.
        self._lsock = listen_socket(self.endpoint.addr, self.backlog)
        self._acceptor = Acceptor("metrics", self._lsock, self._accepted)
        self._acceptor.start()
        log.info("metrics at %s://%s:%d/metrics", self.endpoint.scheme, *self.address)

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        if self._lsock is not None:
            self._lsock.close()
        for task in list(self._tasks):   # scrapes in progress end with the server
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accepted(self, sock: socket.socket, addr: tuple) -> None:
        # Before TLS and before a slot: a source off the list must not hold scrape slots.
        if not self._allowed(addr[0]):
            sock.close()
            self._refused_log(addr[0])
            return
        if len(self._tasks) >= MAX_CONNECTIONS:
            log.warning("metrics: connection from %s dropped: %d scrapes already open",
                        addr[0], len(self._tasks))
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(sock, addr[0]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD)
        tls = self.endpoint.tls
        # our protocol, not the one returned: with TLS, uvloop returns its SSL protocol, which
        # a StreamWriter cannot drain through (every HTTPS scrape ended in a traceback)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=tls,
                ssl_handshake_timeout=HEAD_TIMEOUT if tls is not None else None)
        except (OSError, asyncio.TimeoutError) as exc:   # TLS: plain HTTP, distrust, a reset
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.info("metrics: connection from %s closed: %s (%s)", ip,
                     "TLS handshake failed" if tls is not None else "cannot serve it", why)
            sock.close()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            status, body, head_only = await self._respond(reader, ip)
            ctype = CONTENT_TYPE_LATEST if status == "200 OK" else "text/plain; charset=utf-8"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n")
            if status.startswith("405"):
                head += "Allow: GET, HEAD\r\n"
            writer.write(head.encode("ascii") + b"\r\n" + (b"" if head_only else body))
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass                          # the scraper went away; nothing to tell it
        except asyncio.CancelledError:
            pass                          # the server is closing: so is this connection
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader, ip: str) -> tuple[str, bytes, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.TimeoutError:
            return _bad(ip, "408 Request Timeout", "request head not sent in time")
        except asyncio.LimitOverrunError:
            return _bad(ip, "431 Request Header Fields Too Large", "request head too large")
        except asyncio.IncompleteReadError:
            return _bad(ip, "400 Bad Request", "connection closed inside the request head")
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _bad(ip, "400 Bad Request", f"not an HTTP/1 request line: {parts[:3]!r:.80}")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _bad(ip, "405 Method Not Allowed", f"method {method[:16]!r}")
        if target != b"/metrics":
            return _bad(ip, "404 Not Found", f"path {target[:80]!r}")
        return "200 OK", generate_latest(self.registry), method == b"HEAD"

    def _refused_log(self, ip: str) -> None:
        """One line per REFUSED_LOG_EVERY seconds, with the count since: a flood of
        refused connections must not become a flood of log lines."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged < REFUSED_LOG_EVERY:
            return
        more = f" (and {self._refused - 1} more since the last such line)" \
            if self._refused > 1 else ""
        log.warning("metrics: connection from %s closed: address not in --metrics-allow%s",
                    ip, more)
        self._refused_logged, self._refused = now, 0

    def _allowed(self, ip: str) -> bool:
        if not self.endpoint.allow:
            return True
        try:
            return ip_in_networks(normalize_ip(ip), self.endpoint.allow)
        except ValueError:   # no peer address (the socket is already gone)
            return False


def _bad(ip: str, status: str, why: str, level: int = logging.INFO) -> tuple[str, bytes, bool]:
    log.log(level, "metrics: request from %s refused (%s): %s", ip, status, why)
    return status, (status + "\n").encode("ascii"), False


def registry_of(*collectors: Collector) -> CollectorRegistry:
    """A registry holding only the given collectors (no process or platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry
