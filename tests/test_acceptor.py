"""The listeners' accept callback, over real sockets: every queued connection taken, a failing
handler closing only its connection, and a pause (not a spin) after an accept error."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Iterator, Protocol

import pytest

from edgegw import acceptor
from edgegw.acceptor import Acceptor
from edgegw.netaddr import HostPort
from edgegw.sockio import listen_socket


class _Closable(Protocol):
    def close(self) -> None: ...


@pytest.fixture
def closing() -> Iterator[list[_Closable]]:
    """Acceptors and sockets a test opened, closed after it in reverse order."""
    opened: list[_Closable] = []
    yield opened
    for thing in reversed(opened):
        thing.close()


def _listener(closing: list[_Closable]) -> tuple[socket.socket, int]:
    lsock = listen_socket(HostPort("127.0.0.1", 0))
    closing.append(lsock)
    return lsock, lsock.getsockname()[1]


def _connect(closing: list[_Closable], port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    closing.append(sock)
    return sock


def _start(closing: list[_Closable], acc: Acceptor) -> Acceptor:
    acc.start()
    closing.append(acc)
    return acc


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.01)


async def test_takes_every_queued_connection_non_blocking(closing) -> None:  # type: ignore[no-untyped-def]
    lsock, port = _listener(closing)
    got: list[socket.socket] = []
    clients = [_connect(closing, port) for _ in range(5)]
    _start(closing, Acceptor("test", lsock, lambda sock, addr: (got.append(sock),
                                                                closing.append(sock))))
    await _until(lambda: len(got) == 5)
    assert all(not s.getblocking() for s in got)
    assert sorted(s.getpeername()[1] for s in got) == sorted(c.getsockname()[1] for c in clients)


async def test_a_failing_handler_closes_its_connection_only(closing, caplog,  # type: ignore[no-untyped-def]
                                                            unhandled_errors) -> None:
    lsock, port = _listener(closing)
    kept: list[socket.socket] = []
    calls = 0

    def on_accept(sock: socket.socket, addr: tuple) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        kept.append(sock)
        closing.append(sock)

    _start(closing, Acceptor("test", lsock, on_accept))
    first = _connect(closing, port)
    first.settimeout(5)
    assert await asyncio.to_thread(first.recv, 1) == b""   # closed, not leaked
    _connect(closing, port)
    await _until(lambda: len(kept) == 1)                   # the listener goes on
    assert "internal error; closed it" in caplog.text
    assert [str(r.exc_info[1]) for r in unhandled_errors if r.exc_info] == ["handler bug"]
    unhandled_errors.clear()


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


async def test_accept_error_pauses_the_listener_then_resumes(closing, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(acceptor, "BACKOFF", 0.3)
    lsock, port = _listener(closing)
    failing = _FailingOnce(lsock)
    got: list[socket.socket] = []
    _start(closing, Acceptor("test", failing,  # type: ignore[arg-type]
                             lambda sock, addr: (got.append(sock), closing.append(sock))))
    _connect(closing, port)
    await asyncio.sleep(0.15)
    assert failing.attempts == 1 and not got      # resting, not spinning on the error
    await _until(lambda: len(got) == 1)
    assert "accept failed" in caplog.text


async def test_paused_listener_leaves_connections_in_the_backlog(closing) -> None:  # type: ignore[no-untyped-def]
    lsock, port = _listener(closing)
    got: list[socket.socket] = []
    acc = _start(closing, Acceptor("test", lsock, lambda sock, addr: (got.append(sock),
                                                                      closing.append(sock))))
    acc.pause()
    acc.pause()                                   # idempotent
    _connect(closing, port)
    await asyncio.sleep(0.2)
    assert acc.paused and not got
    acc.resume()
    await _until(lambda: len(got) == 1)


async def test_a_handler_that_pauses_stops_the_batch(closing) -> None:  # type: ignore[no-untyped-def]
    """The owner pauses from on_accept at its capacity: the rest of the queue stays queued."""
    lsock, port = _listener(closing)
    for _ in range(5):
        _connect(closing, port)
    got: list[socket.socket] = []

    def on_accept(sock: socket.socket, addr: tuple) -> None:
        got.append(sock)
        closing.append(sock)
        if len(got) == 2:
            acc.pause()

    acc = _start(closing, Acceptor("test", lsock, on_accept))
    await asyncio.sleep(0.2)
    assert len(got) == 2
    acc.resume()
    await _until(lambda: len(got) == 5)


class _FailingFor(_FailingOnce):
    """A listening socket whose first `n` accept() calls fail with EMFILE."""

    def __init__(self, sock: socket.socket, n: int) -> None:
        super().__init__(sock)
        self.n = n

    def accept(self) -> tuple[socket.socket, tuple]:
        self.attempts += 1
        if self.attempts <= self.n:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


async def test_a_run_of_accept_errors_is_one_line_then_one_at_recovery(closing, monkeypatch,  # type: ignore[no-untyped-def]
                                                                       caplog) -> None:
    monkeypatch.setattr(acceptor, "BACKOFF", 0.005)
    caplog.set_level(logging.INFO, logger="edgegw.accept")
    lsock, port = _listener(closing)
    failing = _FailingFor(lsock, 40)
    got: list[socket.socket] = []
    _start(closing, Acceptor("test", failing,  # type: ignore[arg-type]
                             lambda sock, addr: (got.append(sock), closing.append(sock))))
    _connect(closing, port)
    await _until(lambda: len(got) == 1)
    assert failing.attempts >= 41                 # then EAGAIN: the queue is empty
    failed = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(failed) == 1 and "(1 in a row)" in failed[0].getMessage()
    assert "accepting again after 40 failed accepts" in caplog.text
