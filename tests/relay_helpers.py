"""Real-socket plumbing for the relay tests: TCP pairs on 127.0.0.1 and report collection."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

from edgegw.relay import RelayReport


class Listener:
    """One listening socket; pair() returns (our end, relay's end) of a fresh connection."""

    def __init__(self, rcvbuf: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:   # before listen(), so that accepted sockets advertise a window this large
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.addr = self.sock.getsockname()

    def pair(self) -> tuple[socket.socket, socket.socket]:
        ours = socket.create_connection(self.addr)
        theirs, _ = self.sock.accept()
        ours.setblocking(False)
        return ours, theirs

    def close(self) -> None:
        self.sock.close()


class Reports:
    """Collects on_finished calls, checks they arrive in the loop thread, lets tests await."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.by_id: dict[int, RelayReport] = {}
        self.duplicates: list[RelayReport] = []
        self.wrong_thread = 0
        self._waiters: dict[int, asyncio.Future[RelayReport]] = {}

    def __call__(self, report: RelayReport) -> None:
        if threading.get_ident() != self.thread:
            self.wrong_thread += 1
        if report.session_id in self.by_id:
            self.duplicates.append(report)
        self.by_id[report.session_id] = report
        fut = self._waiters.pop(report.session_id, None)
        if fut is not None and not fut.done():
            fut.set_result(report)

    async def wait(self, session_id: int, timeout: float = 30.0) -> RelayReport:
        if session_id in self.by_id:
            return self.by_id[session_id]
        fut = self._waiters.setdefault(session_id, self.loop.create_future())
        return await asyncio.wait_for(asyncio.shield(fut), timeout)


async def send_all(sock: socket.socket, data: bytes, chunk: int = 1 << 20) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for i in range(0, len(view), chunk):
        await loop.sock_sendall(sock, view[i:i + chunk])


async def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> tuple[int, str]:
    """Read to end of stream; returns (byte count, sha256 hex). A reset counts as the end."""
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    while n <= limit:
        try:
            got = await loop.sock_recv_into(sock, buf)
        except ConnectionResetError:
            break
        if not got:
            break
        h.update(memoryview(buf)[:got])
        n += got
    return n, h.hexdigest()


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        got = await loop.sock_recv(sock, size - len(out))
        if not got:
            raise EOFError(f"stream ended after {len(out)} of {size} bytes")
        out += got
    return bytes(out)


async def sees_end(sock: socket.socket, timeout: float = 30.0) -> bool:
    """True once the peer closed (EOF or reset), discarding any bytes still in flight."""
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        while True:
            try:
                if not await loop.sock_recv(sock, 65536):
                    return
            except (ConnectionResetError, BrokenPipeError):
                return

    await asyncio.wait_for(drain(), timeout)
    return True


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
