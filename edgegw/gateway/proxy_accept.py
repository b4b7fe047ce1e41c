"""Read a PROXY protocol header from a trusted load balancer, byte-exactly, with a deadline."""
from __future__ import annotations

import asyncio
import logging
import socket

from edgegw import proxyproto
from edgegw.logthrottle import LogThrottle
from edgegw.netaddr import normalize_ip
from edgegw.sockio import recv_exact

HEADER_TIMEOUT = 5.0


async def read_proxy_header(sock: socket.socket, ip: str, port: int,
                            say: LogThrottle) -> tuple[str, int] | None:
    """The client address the header carries (the balancer's own when it has none), or None
    when the header is missing or malformed (the caller closes the connection). Failures
    are logged through `say`: a balancer's health checks often come without a header, every
    few seconds, for ever (edgegw_gateway_clients_refused{reason="proxy_header"} counts
    every one)."""
    try:
        info = await asyncio.wait_for(_read(sock), HEADER_TIMEOUT)
    except proxyproto.ProxyProtocolError as exc:
        say.log("proxy_malformed", logging.WARNING,
                "connection from %s:%d (trusted balancer): %s; closed", ip, port, exc)
        return None
    except asyncio.TimeoutError:
        say.log("proxy_timeout", logging.WARNING,
                "connection from %s:%d: no PROXY header within %.0fs; closed", ip, port,
                HEADER_TIMEOUT)
        return None
    except (ConnectionError, OSError) as exc:
        say.log("proxy_closed", logging.INFO,
                "connection from %s:%d closed during PROXY header: %s", ip, port, exc)
        return None
    if info.src is None:
        return ip, port
    return normalize_ip(info.src[0]), info.src[1]


async def _read(sock: socket.socket) -> proxyproto.ProxyInfo:
    prefix = await recv_exact(sock, proxyproto.PREFIX_LEN)
    if proxyproto.version_of(prefix) == 1:
        line = bytearray(prefix)
        while not line.endswith(b"\r\n"):
            if len(line) >= proxyproto.V1_MAX:
                raise proxyproto.ProxyProtocolError("PROXY v1 line too long")
            line += await recv_exact(sock, 1)  # byte by byte: never read past the header
        return proxyproto.parse_v1(bytes(line))
    header = prefix + await recv_exact(sock, 16 - proxyproto.PREFIX_LEN)
    body = await recv_exact(sock, proxyproto.v2_body_length(header))
    return proxyproto.parse_v2(header, body)
