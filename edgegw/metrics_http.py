"""A small HTTP endpoint for Prometheus scrapes: `GET /metrics`, one request per connection.

A scrape endpoint needs no more than this, and the gateway lives in a DMZ: no web framework,
no keep-alive, no request body. The request head is capped and must arrive in time; anything
else gets a plain status line (400, 404, 405, 408, 431) and a closed connection, and a log line.
Given networks to allow, it answers a request from anywhere else 403.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from edgegw.netaddr import HostPort, Network, ip_in_networks, normalize_ip
from edgegw.sockio import listen_socket

log = logging.getLogger("edgegw.metrics")

MAX_HEAD = 8192          # request line and headers
HEAD_TIMEOUT = 5.0       # seconds to send them
MAX_CONNECTIONS = 16     # scrapes at once; more are closed at accept


class MetricsServer:
    """Serves `registry` at /metrics on `addr` until close(); to scrapers in `allow` only,
    if that is not empty."""

    def __init__(self, addr: HostPort, registry: CollectorRegistry, backlog: int = 64,
                 allow: tuple[Network, ...] = ()) -> None:
        self.addr = addr
        self.registry = registry
        self.backlog = backlog
        self.allow = allow
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        sock = listen_socket(self.addr, self.backlog)
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=MAX_HEAD)
        log.info("metrics at http://%s:%d/metrics", *self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._open):   # scrapes in progress end with the server
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        if len(self._open) >= MAX_CONNECTIONS:
            log.warning("metrics: connection from %s dropped: %d scrapes already open",
                        peer[0], len(self._open))
            writer.close()
            return
        self._open.add(writer)
        try:
            status, body, head_only = await self._respond(reader, peer[0])
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
            self._open.discard(writer)
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
        if not self._allowed(ip):   # read first: closing on unread bytes would reset the reply
            return _bad(ip, "403 Forbidden", "address not in --metrics-allow", logging.WARNING)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _bad(ip, "400 Bad Request", f"not an HTTP/1 request line: {parts[:3]!r:.80}")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _bad(ip, "405 Method Not Allowed", f"method {method[:16]!r}")
        if target != b"/metrics":
            return _bad(ip, "404 Not Found", f"path {target[:80]!r}")
        return "200 OK", generate_latest(self.registry), method == b"HEAD"

    def _allowed(self, ip: str) -> bool:
        if not self.allow:
            return True
        try:
            return ip_in_networks(normalize_ip(ip), self.allow)
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
