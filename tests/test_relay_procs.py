"""Relay processes (`edgegw serve --relay-procs N`): what only they can do or suffer.

The shared relay contract runs against them in test_relay.py (TestProcRelay); here: sessions
spread over the processes, the gateway keeps none of their descriptors, a relay process that
dies is replaced and its sessions are reported, and bad messages on the control socket."""
from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from edgegw.relay import FinishReason, available_backends, create_relay, wire
from edgegw.relay.base import RelayReport, RelayStats
from edgegw.relay.procs import ProcRelay
from tests.relay_helpers import Listener, Reports, open_fds, recv_exactly

pytestmark = pytest.mark.skipif("splice" not in available_backends(),
                                reason="C engine with splice() not available")


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


async def _echo_ok(client: socket.socket, node: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, data)
    assert await recv_exactly(node, len(data)) == data


async def test_sessions_spread_and_gateway_keeps_no_descriptors(listener) -> None:
    relay = create_relay("splice", procs=2)
    assert isinstance(relay, ProcRelay)
    reports = Reports()
    relay.start(reports)
    try:
        before = open_fds()
        ends = []
        for sid in range(1, 9):
            client, a = listener.pair()
            node, b = listener.pair()
            relay.add(sid, a, b)
            ends.append((client, node))
            await _echo_ok(client, node, b"sid %d" % sid)
        # our side holds only our own ends: the relay's ends went to the processes
        assert open_fds() == before + 2 * len(ends)
        pids = [p.popen.pid for p in relay._procs]
        held = [len(_socket_inodes(pid)) for pid in pids]
        assert all(h >= 2 * 3 for h in held), held        # 8 sessions over 2: 4 each
        for client, node in ends:
            client.close()
            node.close()
        for sid in range(1, 9):
            assert (await reports.wait(sid)).reason is FinishReason.EOF
    finally:
        await relay.close()


async def test_a_dead_relay_process_is_replaced_and_its_sessions_reported(listener) -> None:
    relay = create_relay("splice", procs=2)
    reports = Reports()
    relay.start(reports)
    try:
        ends = {}
        for sid in range(1, 5):
            client, a = listener.pair()
            node, b = listener.pair()
            relay.add(sid, a, b)
            ends[sid] = (client, node)
            await _echo_ok(client, node, b"x")
        victim = relay._procs[0]
        doomed = set(victim.sessions)
        assert doomed
        os.kill(victim.popen.pid, signal.SIGKILL)
        for sid in doomed:
            rep = await reports.wait(sid)
            assert rep.reason is FinishReason.ERROR and "exited" in rep.error
        for _ in range(200):                              # a replacement is started
            if len(relay._procs) == 2 and victim not in relay._procs:
                break
            await asyncio.sleep(0.01)
        assert len(relay._procs) == 2 and victim not in relay._procs
        for sid in set(ends) - doomed:                    # the others never noticed
            await _echo_ok(*ends[sid], b"still here")
        client, a = listener.pair()                       # and new sessions still work
        node, b = listener.pair()
        relay.add(99, a, b)
        await _echo_ok(client, node, b"new")
        for c, n in [*ends.values(), (client, node)]:
            c.close()
            n.close()
        await reports.wait(99)
        assert not reports.duplicates
    finally:
        await relay.close()


async def test_relay_process_exits_when_the_gateway_goes_away() -> None:
    """No orphan keeps sessions open after its gateway died (control socket closed)."""
    relay = create_relay("splice", procs=1)
    relay.start(Reports())
    proc = relay._procs[0]
    asyncio.get_running_loop().remove_reader(proc.ctrl.fileno())
    proc.ctrl.close()                                     # what the gateway's death looks like
    for _ in range(500):
        if proc.popen.poll() is not None:
            break
        await asyncio.sleep(0.01)
    assert proc.popen.returncode == 0
    relay._procs.clear()
    await relay.close()


def test_wire_messages_round_trip_and_reject_garbage() -> None:
    rep = RelayReport(7, 1 << 40, 3, 1.5, FinishReason.RESET, "Connection reset by peer")
    assert wire.parse_done(wire.done(rep)) == rep
    long = RelayReport(8, 0, 0, 0.0, FinishReason.ERROR, "é" * 5000)   # cut, still decodes
    assert len(wire.done(long)) <= wire.MAX_MESSAGE
    assert wire.parse_done(wire.done(long)).error.startswith("éé")
    assert wire.parse_command(wire.command(wire.KILL, 5)) == (wire.KILL, 5)
    for bad in (b"", b"\x01", wire.command(wire.ADD, 1) + b"x", b"\x09" + bytes(8)):
        with pytest.raises(ValueError):
            wire.parse_command(bad)
    for bad in (b"", bytes(33), wire.done(rep)[:-30], b"\x04" + bytes(31) + b"\xff"):
        with pytest.raises(ValueError):
            wire.parse_done(bad)
    st = RelayStats("splice", 2, 9, 1 << 50, 1, 3, 0, 0)
    assert wire.parse_report(wire.stats(st)) == RelayStats("", 2, 9, 1 << 50, 1, 3, 0, 0)
    assert wire.parse_report(wire.done(rep)) == rep
    for bad in (wire.stats(st)[:-1], wire.stats(st) + b"x", b"\x05"):
        with pytest.raises(ValueError):
            wire.parse_report(bad)


async def test_garbage_on_the_control_socket_is_ignored(listener) -> None:
    """A relay process logs and drops a bad command (and any descriptors sent with it)."""
    relay = create_relay("splice", procs=1)
    reports = Reports()
    relay.start(reports)
    try:
        proc = relay._procs[0]
        stray_a, stray_b = socket.socketpair()
        socket.send_fds(proc.ctrl, [b"\x09garbage!"], [stray_a.fileno()])
        stray_a.close()
        proc.ctrl.send(wire.command(wire.KILL, 12345))    # unknown session: nothing happens
        client, a = listener.pair()
        node, b = listener.pair()
        relay.add(1, a, b)
        await _echo_ok(client, node, b"fine")
        stray_b.settimeout(5)
        assert stray_b.recv(1) == b""      # the stray descriptor was closed, not leaked
        client.close()
        node.close()
        assert (await reports.wait(1)).reason is FinishReason.EOF
        assert proc.popen.poll() is None
    finally:
        await relay.close()


async def test_an_add_with_a_descriptor_that_is_no_socket_closes_both(listener) -> None:
    """An ADD whose second descriptor is no socket is refused, and both descriptors are
    closed (the one that could not be wrapped as a socket leaked)."""
    relay = create_relay("splice", procs=1)
    relay.start(Reports())
    r, w = os.pipe()
    os.set_blocking(w, False)
    sock_a, sock_b = socket.socketpair()
    try:
        proc = relay._procs[0]
        socket.send_fds(proc.ctrl, [wire.command(wire.ADD, 77)], [sock_a.fileno(), r])
        sock_a.close()
        os.close(r)
        sock_b.settimeout(5)
        assert sock_b.recv(1) == b""       # the socket was closed
        deadline = asyncio.get_running_loop().time() + 5
        with pytest.raises(BrokenPipeError):   # no reader left: the pipe was closed too
            while asyncio.get_running_loop().time() < deadline:
                try:
                    os.write(w, b"x" * 4096)
                except BlockingIOError:        # full: still held open over there
                    await asyncio.sleep(0.05)
        assert proc.popen.poll() is None
    finally:
        os.close(w)
        sock_b.close()
        await relay.close()
