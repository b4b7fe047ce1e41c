"""The relay contract, run against every backend: C splice, C select/poll, pure Python.

Real TCP sockets on 127.0.0.1; our test peers stand for the SFTP client (side a) and the
internal node's Data connection (side b). No assertion depends on speed.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable

import pytest

from edgegw.relay import (FinishReason, Relay, RelayStats, available_backends, create_relay,
                          default_backend)
from tests.relay_helpers import (Listener, Reports, open_fds, recv_exactly, recv_until_eof, send_all,
                           sees_end, sha)

BIG = 64 << 20

# 200 sessions use ~800 sockets plus pipes; make room for them.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and _soft < 8192:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, _hard), _hard))


@pytest.fixture(scope="module")
def big_payloads() -> tuple[bytes, bytes]:
    rnd = random.Random(1234)
    return rnd.randbytes(BIG), rnd.randbytes(BIG)


@pytest.fixture
def listener() -> Any:
    lst = Listener()
    yield lst
    lst.close()


class RelayContract:
    """Mixin: subclasses set `backend`."""

    backend: str
    relay_kwargs: dict[str, Any] = {}   # e.g. procs=2: the same contract, in child processes

    @pytest.fixture
    async def make(self) -> AsyncIterator[Callable[..., tuple[Relay, Reports]]]:
        made: list[Relay] = []

        def make(**kw: Any) -> tuple[Relay, Reports]:
            relay = create_relay(self.backend, **{"threads": 2, **self.relay_kwargs, **kw})
            reports = Reports()
            relay.start(reports)
            made.append(relay)
            return relay, reports

        yield make
        for relay in made:
            await relay.close()

    @pytest.fixture
    async def relay(self, make: Callable[..., tuple[Relay, Reports]]) -> tuple[Relay, Reports]:
        return make()

    @staticmethod
    def session(relay: Relay, listener: Listener, sid: int) -> tuple[socket.socket, socket.socket]:
        """Start relaying a fresh client/node pair; returns our client end and our node end."""
        client, a = listener.pair()
        node, b = listener.pair()
        relay.add(sid, a, b)
        assert a.fileno() == -1 and b.fileno() == -1  # ownership moved to the relay
        return client, node

    async def test_backend_name(self, relay: tuple[Relay, Reports]) -> None:
        assert relay[0].backend == self.backend

    async def test_large_transfer_both_ways(self, relay, listener, big_payloads) -> None:
        r, reports = relay
        up, down = big_payloads
        client, node = self.session(r, listener, 1)

        async def side(sock: socket.socket, data: bytes) -> tuple[int, str]:
            async def send() -> None:
                await send_all(sock, data)
                sock.shutdown(socket.SHUT_WR)
            _, got = await asyncio.gather(send(), recv_until_eof(sock))
            return got

        got_at_client, got_at_node = await asyncio.wait_for(
            asyncio.gather(side(client, up), side(node, down)), 120)
        assert got_at_node == (BIG, sha(up))
        assert got_at_client == (BIG, sha(down))
        rep = await reports.wait(1)
        assert rep.reason is FinishReason.EOF, rep
        assert (rep.bytes_a_to_b, rep.bytes_b_to_a) == (BIG, BIG)
        assert rep.error == "" and rep.duration > 0
        assert reports.wrong_thread == 0
        client.close()
        node.close()

    async def test_half_close_client_first(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 2)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"request")
        client.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(node) == (7, sha(b"request"))  # FIN forwarded after data
        answer = random.Random(2).randbytes(3 << 20)
        await send_all(node, answer)  # the client still receives after its half-close
        node.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(client) == (len(answer), sha(answer))
        rep = await reports.wait(2)
        assert rep.reason is FinishReason.EOF
        assert (rep.bytes_a_to_b, rep.bytes_b_to_a) == (7, len(answer))
        client.close()
        node.close()

    async def test_short_answer_and_fin_after_half_close(self, relay, listener) -> None:
        """The node's short answer and its FIN arrive together after the client half-closed:
        that socket is then hung up and no longer watched, so whatever read it must read on
        to the end of stream (a copy path that stopped after one short read stalled here)."""
        r, reports = relay
        loop = asyncio.get_running_loop()
        for sid in range(900, 920):
            client, node = self.session(r, listener, sid)
            await loop.sock_sendall(client, b"bye")
            client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(recv_until_eof(node), 5) == (3, sha(b"bye"))
            node.send(b"x" * 100)             # answer and FIN back to back
            node.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(recv_until_eof(client), 5) == (100, sha(b"x" * 100))
            assert (await reports.wait(sid)).reason is FinishReason.EOF
            client.close()
            node.close()

    async def test_half_close_node_first(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 3)
        loop = asyncio.get_running_loop()
        banner = b"SSH-2.0-edgegw\r\n"
        await loop.sock_sendall(node, banner)
        node.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(client) == (len(banner), sha(banner))
        upload = random.Random(3).randbytes(2 << 20)
        await send_all(client, upload)
        client.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(node) == (len(upload), sha(upload))
        rep = await reports.wait(3)
        assert rep.reason is FinishReason.EOF
        assert (rep.bytes_a_to_b, rep.bytes_b_to_a) == (len(upload), len(banner))
        client.close()
        node.close()

    async def test_early_bytes_and_small_messages(self, relay, listener) -> None:
        """Bytes sent before the hand-over go out; 64-byte messages round-trip one by one."""
        r, reports = relay
        client, a = listener.pair()
        node, b = listener.pair()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"SSH-2.0-client\r\n")  # waits in a's kernel buffer
        r.add(4, a, b)
        assert await recv_exactly(node, 16) == b"SSH-2.0-client\r\n"
        for i in range(200):
            msg = struct.pack("!I", i) * 16
            await loop.sock_sendall(client, msg)
            assert await asyncio.wait_for(recv_exactly(node, 64), 30) == msg
            await loop.sock_sendall(node, msg[::-1])
            assert await asyncio.wait_for(recv_exactly(client, 64), 30) == msg[::-1]
        client.close()
        node.close()
        rep = await reports.wait(4)
        assert (rep.bytes_a_to_b, rep.bytes_b_to_a) == (16 + 200 * 64, 200 * 64)

    async def test_urgent_data_is_stepped_over(self, relay, listener) -> None:
        """A client's MSG_OOB byte (SSH has no use for one) is dropped, as recv() drops it, and
        the stream goes on past it. splice() stops at an urgent mark: a relay that only spliced
        held the rest of the stream back and spun on the still-readable socket."""
        r, reports = relay
        client, a = listener.pair()
        node, b = listener.pair()
        loop = asyncio.get_running_loop()
        rnd = random.Random(9)
        sent = b""
        for size in (64 << 10, 1 << 20):   # the first waits for the hand-over, the second not
            bulk, tail = rnd.randbytes(size), rnd.randbytes(1000)
            await loop.sock_sendall(client, bulk)
            client.send(b"!", socket.MSG_OOB)
            await loop.sock_sendall(client, tail)
            if not sent:
                r.add(12, a, b)
            assert await asyncio.wait_for(recv_exactly(node, size + 1000), 30) == bulk + tail
            sent += bulk + tail
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        assert time.process_time() - cpu < 0.25   # no thread spins on the urgent mark
        more = rnd.randbytes(4 << 20)
        await send_all(client, more)
        client.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(node) == (len(more), sha(more))
        node.close()
        rep = await reports.wait(12)
        assert rep.reason is FinishReason.EOF, rep
        assert rep.bytes_a_to_b == len(sent) + len(more)
        client.close()

    async def test_peer_reset(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 5)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"x" * 100)
        assert await recv_exactly(node, 100) == b"x" * 100
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        rep = await reports.wait(5)
        assert rep.reason is FinishReason.RESET, rep
        assert rep.error  # strerror of the failing call
        assert rep.bytes_a_to_b == 100
        assert await sees_end(node)  # the other side was closed too
        node.close()

    async def test_node_reset_while_client_sends(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 6)
        node.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        node.close()
        loop = asyncio.get_running_loop()

        async def keep_sending() -> None:
            try:
                while 6 not in reports.by_id:
                    await loop.sock_sendall(client, b"y" * 65536)
            except (ConnectionResetError, BrokenPipeError):
                pass

        await asyncio.wait_for(keep_sending(), 30)
        rep = await reports.wait(6)
        assert rep.reason is FinishReason.RESET, rep
        assert rep.error
        assert await sees_end(client)
        client.close()

    async def test_idle_timeout(self, make, listener) -> None:
        r, reports = make(idle_timeout=0.3)
        client, node = self.session(r, listener, 7)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"hello")
        assert await recv_exactly(node, 5) == b"hello"
        rep = await reports.wait(7)  # nothing more moves
        assert rep.reason is FinishReason.IDLE
        # not ended early; the pure-Python relay's times are event-loop times, whose
        # differences round (uvloop's clock ticks in ms: T - (T - 0.3) can be 0.29999999999995)
        assert rep.bytes_a_to_b == 5 and rep.duration >= 0.3 - 1e-9
        assert await sees_end(client) and await sees_end(node)
        client.close()
        node.close()

    async def test_fin_timeout_ends_a_session_one_side_left(self, make, listener) -> None:
        """The node closed its side; a client that never closes its own would hold both
        descriptors forever (idle_timeout is off by default). Until one side closes, the
        shorter fin_timeout does not apply, however quiet the session is."""
        r, reports = make(idle_timeout=0.0, fin_timeout=0.4)
        client, node = self.session(r, listener, 17)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"ping")
        assert await recv_exactly(node, 4) == b"ping"
        await asyncio.sleep(0.8)
        assert 17 not in reports.by_id          # quiet, but both sides open: kept
        node.shutdown(socket.SHUT_WR)
        assert await sees_end(client)            # EOF forwarded; the client stays silent
        rep = await reports.wait(17)
        assert rep.reason is FinishReason.IDLE, rep
        assert 1.2 - 0.05 <= rep.duration < 10, rep
        client.close()
        node.close()

    async def test_fin_timeout_waits_for_a_half_closed_session_that_moves(self, make,
                                                                          listener) -> None:
        """Bytes still flowing the other way after one side closed keep the session."""
        r, reports = make(fin_timeout=0.3)
        client, node = self.session(r, listener, 18)
        loop = asyncio.get_running_loop()
        client.shutdown(socket.SHUT_WR)          # the client is done sending
        for _ in range(8):
            await loop.sock_sendall(node, b"x" * 100)
            assert await recv_exactly(client, 100) == b"x" * 100
            await asyncio.sleep(0.1)
        assert 18 not in reports.by_id
        node.shutdown(socket.SHUT_WR)
        rep = await reports.wait(18)
        assert rep.reason is FinishReason.EOF and rep.bytes_b_to_a == 800, rep
        client.close()
        node.close()

    async def test_kill(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 8)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(node, b"abc")
        assert await recv_exactly(client, 3) == b"abc"
        assert r.kill(8) is True
        rep = await reports.wait(8)
        assert rep.reason is FinishReason.KILLED and rep.bytes_b_to_a == 3
        assert await sees_end(client) and await sees_end(node)
        assert r.kill(8) is False
        assert r.kill(2**64 - 1) is False
        client.close()
        node.close()

    async def test_many_concurrent_sessions(self, relay, listener) -> None:
        r, reports = relay
        n = 200
        rnd = random.Random(200)
        payloads = {sid: (rnd.randbytes(rnd.randrange(1, 256 << 10)),
                          rnd.randbytes(rnd.randrange(0, 256 << 10)))
                    for sid in range(1000, 1000 + n)}
        ends = {sid: self.session(r, listener, sid) for sid in payloads}

        async def one(sid: int) -> None:
            client, node = ends[sid]
            up, down = payloads[sid]

            async def pump(sock: socket.socket, data: bytes) -> tuple[int, str]:
                async def send() -> None:
                    await send_all(sock, data)
                    sock.shutdown(socket.SHUT_WR)
                return (await asyncio.gather(send(), recv_until_eof(sock)))[1]

            at_client, at_node = await asyncio.gather(pump(client, up), pump(node, down))
            assert at_node == (len(up), sha(up)), sid
            assert at_client == (len(down), sha(down)), sid

        await asyncio.wait_for(asyncio.gather(*(one(sid) for sid in payloads)), 120)
        for sid, (up, down) in payloads.items():
            rep = await reports.wait(sid)
            assert rep.reason is FinishReason.EOF, rep
            assert (rep.bytes_a_to_b, rep.bytes_b_to_a) == (len(up), len(down))
            for s in ends[sid]:
                s.close()
        st = r.stats()
        assert st.active_sessions == 0 and st.total_sessions == n
        assert st.bytes_total == sum(len(u) + len(d) for u, d in payloads.values())
        assert not reports.duplicates and reports.wrong_thread == 0

    async def test_no_descriptor_leak(self, listener) -> None:
        # One session first: the loop's lazily opened descriptors (uvloop keeps one on
        # /dev/null) are not the relay's.
        warm = create_relay(self.backend, **{"threads": 1, **self.relay_kwargs})
        warm_reports = Reports()
        warm.start(warm_reports)
        for end in self.session(warm, listener, 99):
            end.close()
        await warm_reports.wait(99)
        await warm.close()
        before = open_fds()
        relay = create_relay(self.backend, **{"threads": 2, **self.relay_kwargs})
        reports = Reports()
        relay.start(reports)
        loop = asyncio.get_running_loop()
        ours = []
        for sid in range(10):
            client, node = self.session(relay, listener, sid)
            ours += [client, node]
            await loop.sock_sendall(client, b"z" * 100_000)
        ours[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ours[0].close()  # session 0: reset
        relay.kill(1)  # session 1: killed
        ours[4].shutdown(socket.SHUT_WR)  # session 2: clean end
        ours[5].shutdown(socket.SHUT_WR)
        for sid in (0, 1, 2):
            await reports.wait(sid)
        await relay.close()  # the rest: shutdown, with bytes possibly still in pipes
        assert len(reports.by_id) == 10
        for s in ours:
            s.close()
        assert open_fds() == before

    async def test_close_with_live_sessions(self, make, listener) -> None:
        r, reports = make()
        loop = asyncio.get_running_loop()
        ends = [self.session(r, listener, sid) for sid in range(20, 30)]
        for client, node in ends:
            await loop.sock_sendall(client, b"ping")
            assert await recv_exactly(node, 4) == b"ping"
        await r.close()
        assert sorted(reports.by_id) == list(range(20, 30))
        assert {rep.reason for rep in reports.by_id.values()} == {FinishReason.SHUTDOWN}
        assert all(rep.bytes_a_to_b == 4 for rep in reports.by_id.values())
        for client, node in ends:
            assert await sees_end(client) and await sees_end(node)
            client.close()
            node.close()
        assert r.kill(20) is False
        with pytest.raises(RuntimeError):
            r.add(99, *listener.pair())
        await r.close()  # idempotent

    async def test_duplicate_id_rejected(self, relay, listener) -> None:
        r, reports = relay
        client, node = self.session(r, listener, 40)
        c2, a2 = listener.pair()
        n2, b2 = listener.pair()
        with pytest.raises(FileExistsError, match="40"):
            r.add(40, a2, b2)
        assert a2.fileno() != -1 and b2.fileno() != -1  # still the caller's
        for s in (c2, a2, n2, b2):
            s.close()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"still works")
        assert await recv_exactly(node, 11) == b"still works"
        client.close()
        node.close()
        assert (await reports.wait(40)).bytes_a_to_b == 11
        c3, n3 = self.session(r, listener, 40)  # the id is free again once reported
        c3.close()
        n3.close()
        await reports.wait(40)

    async def test_stats(self, relay, listener) -> None:
        r, reports = relay
        st = r.stats()
        assert isinstance(st, RelayStats) and st.backend == self.backend
        assert (st.active_sessions, st.total_sessions, st.bytes_total) == (0, 0, 0)
        client, node = self.session(r, listener, 50)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"q" * 1000)
        assert await recv_exactly(node, 1000) == b"q" * 1000
        st = r.stats()
        assert (st.active_sessions, st.total_sessions, st.bytes_total) == (1, 1, 1000)
        client.close()
        node.close()
        await reports.wait(50)
        st = r.stats()
        assert (st.active_sessions, st.total_sessions) == (0, 1)

    async def test_idle_sessions_hold_no_buffers(self, relay, listener) -> None:
        """Pipes (splice) or buffers (select) are held only while bytes are in flight."""
        r, reports = relay
        loop = asyncio.get_running_loop()
        ends = [self.session(r, listener, sid) for sid in range(60, 80)]
        for i, (client, node) in enumerate(ends):
            data = bytes([i]) * 300_000
            await send_all(client, data)
            assert await recv_exactly(node, len(data)) == data
            await loop.sock_sendall(node, b"ok")
            assert await recv_exactly(client, 2) == b"ok"
        for _ in range(300):  # the engine gives them back right after the last write
            st = r.stats()
            if st.pipes_in_use == 0 and st.buffers_in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert (st.pipes_in_use, st.buffers_in_use) == (0, 0)
        assert st.active_sessions == 20
        if self.backend == "splice":
            assert 0 < st.pipes_pooled <= 2 * 64  # pooled for reuse, capped per thread
        if self.backend == "select":
            assert 0 < st.buffers_pooled <= 2 * 64
        for client, node in ends:
            client.close()
            node.close()


C_BACKENDS = set(available_backends()) - {"python"}


@pytest.mark.skipif("splice" not in C_BACKENDS, reason="C engine with splice() not available")
class TestSpliceRelay(RelayContract):
    backend = "splice"

    async def test_pipe_size_refused_falls_back(self, make, listener) -> None:
        r, reports = make(pipe_size=1 << 30)  # far above pipe-max-size: sized down, still works
        client, node = self.session(r, listener, 1)
        data = random.Random(5).randbytes(4 << 20)
        await send_all(client, data)
        client.shutdown(socket.SHUT_WR)
        assert await recv_until_eof(node) == (len(data), sha(data))
        node.close()
        client.close()
        assert (await reports.wait(1)).bytes_a_to_b == len(data)


@pytest.mark.skipif("select" not in C_BACKENDS, reason="C engine not built")
class TestSelectRelay(RelayContract):
    backend = "select"


class TestPythonRelay(RelayContract):
    backend = "python"


class TestPythonRelayOnUvloop(RelayContract):
    """The processes run on uvloop (edgegw.eventloop); its transports deliver bytes in a
    different order around connection_made than asyncio's."""

    backend = "python"
    event_loop = "uvloop"   # see pytest_asyncio_loop_factories in conftest.py

    async def test_runs_on_uvloop(self) -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


@pytest.mark.skipif("splice" not in C_BACKENDS, reason="C engine with splice() not available")
class TestProcRelay(RelayContract):
    """The same contract with the engine in two child processes (edgegw.relay.procs)."""

    backend = "splice"
    relay_kwargs = {"procs": 2}

    async def test_stats(self, relay, listener) -> None:
        # bytes and pipes come from the relay processes' own reports: running sessions too,
        # a second or so late
        r, reports = relay
        assert (r.stats().active_sessions, r.stats().total_sessions) == (0, 0)
        client, node = self.session(r, listener, 50)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"q" * 1000)
        assert await recv_exactly(node, 1000) == b"q" * 1000
        assert (r.stats().active_sessions, r.stats().total_sessions) == (1, 1)
        st = await _stats_until(r, lambda st: st.bytes_total == 1000)
        assert st.active_sessions == 1                       # counted while it runs
        client.close()
        node.close()
        await reports.wait(50)
        st = await _stats_until(r, lambda st: st.active_sessions == 0)
        assert (st.total_sessions, st.bytes_total) == (1, 1000)

    # pipes live in the relay processes, whose engine TestSpliceRelay covers
    test_idle_sessions_hold_no_buffers = None  # type: ignore[assignment]


# ---- the C engine's API ------------------------------------------------------------------

@pytest.mark.skipif(not C_BACKENDS, reason="C engine not built")
@pytest.mark.parametrize("backend", sorted(C_BACKENDS))
def test_add_racing_close_loses_no_session(backend: str) -> None:
    """add() from one thread while another closes the engine: every add that succeeded is
    reported and its descriptors are closed (an ADD queued after close()'s last pass was lost,
    with both of its fds)."""
    from edgegw import _relay
    before = open_fds()
    for round_ in range(150):
        engine = _relay.Engine(backend, threads=4)
        added: list[int] = []

        def adder() -> None:
            for sid in itertools.count():
                a, b = socket.socketpair()
                try:
                    engine.add(sid, a.fileno(), b.fileno())
                except OSError:
                    a.close()
                    b.close()
                    return
                a.detach()
                b.detach()
                added.append(sid)

        thread = threading.Thread(target=adder)
        thread.start()
        time.sleep(0.0003 * (round_ % 7))
        engine.close()
        thread.join()
        reported = {report[0] for report in engine.drain(1 << 20)}
        assert set(added) <= reported, f"round {round_}: {sorted(set(added) - reported)}"
    assert open_fds() == before


# Out of descriptors when bytes must wait for a full destination: with no pipe to be had, the
# splice backend copies through a buffer of the session's own, so the session goes on and
# every byte arrives, in order; also when descriptors come back mid-session and the direction
# takes a pipe again. In a child process, as the test lowers its open-files limit.
_EMFILE_SCRIPT = """
import hashlib, json, os, resource, socket, sys, threading, time
from edgegw import _relay
ls = socket.create_server(("127.0.0.1", 0))
def pair(rcvbuf=0):
    c = socket.socket()
    if rcvbuf:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    c.connect(ls.getsockname())
    return c, ls.accept()[0]
engine = _relay.Engine("splice", pool_max=0)
client, a = pair()
node, b = pair(rcvbuf=4096)          # the node does not read at first: the relay's writes stall
b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
engine.add(1, a.detach(), b.detach())
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1, hard))
fill = []
try:
    while True:
        fill.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
sent = hashlib.sha256()
def send(data):
    client.sendall(data)
    sent.update(data)
def writer():
    for i in range(400):             # 1000-byte messages take the copy path, 64 KiB the splice path
        send(bytes([i % 251]) * (1000 if i % 4 else 65536))
    client.shutdown(socket.SHUT_WR)
thread = threading.Thread(target=writer)
thread.start()
time.sleep(0.5)                      # the destination stays full a while: the rest must wait
stalled = engine.stats()["buffers_in_use"]
if sys.argv[1] == "give-back":       # other sessions ended: the next pipe2() succeeds
    for fd in fill:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    time.sleep(0.3)                  # past the engine's pipe retry delay
got, n = hashlib.sha256(), 0
while chunk := node.recv(1 << 16):
    got.update(chunk)
    n += len(chunk)
thread.join()
node.send(b"reply")                  # and the other way, still without a descriptor to spare
node.shutdown(socket.SHUT_WR)
reply = client.recv(100)
deadline = time.monotonic() + 10
reports = []
while not reports and time.monotonic() < deadline:
    reports = engine.drain()
    time.sleep(0.05)
print(json.dumps({"stalled": stalled, "intact": got.digest() == sent.digest(), "bytes": n,
                  "reply": reply.decode(), "report": list(reports[0]) if reports else None,
                  "after": engine.stats()["buffers_in_use"]}))
"""


@pytest.mark.skipif("splice" not in C_BACKENDS, reason="C engine with splice() not available")
@pytest.mark.parametrize("descriptors", ["kept-out", "give-back"])
def test_no_descriptor_for_a_pipe_copies_instead(descriptors: str) -> None:
    out = subprocess.run([sys.executable, "-c", _EMFILE_SCRIPT, descriptors],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stalled"] == 1      # the bytes the full destination refused, in a buffer
    assert result["intact"] and result["bytes"] == 100 * 65536 + 300 * 1000
    assert result["reply"] == "reply"
    report = result["report"]
    assert report is not None and report[4] == "eof", report
    assert report[1:3] == [100 * 65536 + 300 * 1000, 5]
    assert result["after"] == 0


# ---- backend selection -------------------------------------------------------------------

def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unknown relay backend 'nope'"):
        create_relay("nope")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="splice() is Linux's")
def test_default_backend_without_usable_splice(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    import edgegw.relay as relay_mod
    monkeypatch.delenv("EDGEGW_RELAY_BACKEND", raising=False)
    assert relay_mod.splice_works()                    # this machine's kernel splices
    assert default_backend() == "splice"

    def refused(*args: object) -> int:
        raise OSError(38, "Function not implemented")   # what a sandbox answers

    monkeypatch.setattr(relay_mod.os, "splice", refused)
    with caplog.at_level(logging.WARNING, logger="edgegw.relay"):
        assert not relay_mod.splice_works()
        assert default_backend() == "select"
    assert "splice() is not usable here" in caplog.text


def test_default_backend_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEGW_RELAY_BACKEND", raising=False)
    assert default_backend() == ("splice" if sys.platform.startswith("linux") else "select")
    monkeypatch.setenv("EDGEGW_RELAY_BACKEND", "python")
    assert default_backend() == "python"
    assert create_relay().backend == "python"


def test_available_backends() -> None:
    backends = available_backends()
    assert backends[-1] == "python"
    if sys.platform.startswith("linux") and "select" in backends:
        assert backends[:2] == ["splice", "select"]


def test_missing_c_engine_warns_loudly(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "edgegw._relay", None)  # import now fails
    with caplog.at_level(logging.WARNING, logger="edgegw.relay"):
        relay = create_relay("splice")
    assert relay.backend == "python"
    assert available_backends() == ["python"]
    [rec] = [r for r in caplog.records if r.name == "edgegw.relay"]
    assert rec.levelno == logging.WARNING
    assert "C ENGINE MISSING" in rec.getMessage() and "C compiler" in rec.getMessage()


async def _stats_until(r, cond, timeout: float = 5.0):
    """The relay's stats once cond(stats) holds; the last ones seen fail the test otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    st = r.stats()
    while not cond(st) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        st = r.stats()
    assert cond(st), st
    return st
