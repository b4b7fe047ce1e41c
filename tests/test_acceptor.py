"""The listeners' accept callback, over real sockets: every queued connection taken, a failing
handler closing only its connection, and a pause (not a spin) after an accept error."""
from __future__ import annotations

import asyncio
import errno
import socket

from edgegw import acceptor
from edgegw.acceptor import Acceptor
from edgegw.netaddr import HostPort
from edgegw.sockio import listen_socket


def _listener() -> tuple[socket.socket, int]:
    lsock = listen_socket(HostPort("127.0.0.1", 0))
    return lsock, lsock.getsockname()[1]


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.01)


async def test_takes_every_queued_connection_non_blocking() -> None:
    lsock, port = _listener()
    got: list[socket.socket] = []
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    acc = Acceptor("test", lsock, lambda sock, addr: got.append(sock))
    acc.start()
    try:
        await _until(lambda: len(got) == 5)
        assert all(not s.getblocking() for s in got)
        assert sorted(s.getpeername()[1] for s in got) == \
            sorted(c.getsockname()[1] for c in clients)
    finally:
        acc.close()
        for s in got + clients:
            s.close()
        lsock.close()


async def test_a_failing_handler_closes_its_connection_only(caplog) -> None:  # type: ignore[no-untyped-def]
    lsock, port = _listener()
    kept: list[socket.socket] = []
    calls = 0

    def on_accept(sock: socket.socket, addr: tuple) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        kept.append(sock)

    acc = Acceptor("test", lsock, on_accept)
    acc.start()
    first = socket.create_connection(("127.0.0.1", port))
    try:
        first.settimeout(5)
        assert await asyncio.to_thread(first.recv, 1) == b""   # closed, not leaked
        second = socket.create_connection(("127.0.0.1", port))
        await _until(lambda: len(kept) == 1)                   # the listener goes on
        second.close()
        assert "internal error; closed it" in caplog.text
    finally:
        acc.close()
        first.close()
        for s in kept:
            s.close()
        lsock.close()


class _FailingOnce:
    """A listening socket whose first accept() fails with EMFILE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.attempts = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, tuple]:
        self.attempts += 1
        if self.attempts == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


async def test_accept_error_pauses_the_listener_then_resumes(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(acceptor, "BACKOFF", 0.3)
    lsock, port = _listener()
    failing = _FailingOnce(lsock)
    got: list[socket.socket] = []
    acc = Acceptor("test", failing, lambda sock, addr: got.append(sock))  # type: ignore[arg-type]
    acc.start()
    client = socket.create_connection(("127.0.0.1", port))
    try:
        await asyncio.sleep(0.15)
        assert failing.attempts == 1 and not got      # resting, not spinning on the error
        await _until(lambda: len(got) == 1)
        assert "accept failed" in caplog.text
    finally:
        acc.close()
        client.close()
        for s in got:
            s.close()
        lsock.close()
