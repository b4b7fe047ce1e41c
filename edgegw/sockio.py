"""Small socket helpers for code that keeps raw sockets (to hand their fds to the relay)."""
from __future__ import annotations

import asyncio
import socket

from edgegw.netaddr import HostPort


def listen_socket(addr: HostPort, backlog: int = 1024, *,
                  reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket; OSError names the address that could not be bound.
    `reuse_port` lets several worker processes share the port (the kernel spreads clients)."""
    infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family = infos[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(infos[0][4])
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


async def connect_tcp(addr: HostPort, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket with Nagle off (both sides exchange small
    messages and wait for answers); closed again if the connect fails or is cancelled."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
    except BaseException:
        sock.close()
        raise
    set_nodelay(sock)
    return sock


async def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes, never more (bytes after them belong to whoever gets the socket)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
