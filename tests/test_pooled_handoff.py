"""Pooled Data connections, both ends, over real sockets: the gateway's assignment and the
node's one-byte answer, with every answer, a silence, a close and garbage."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from types import SimpleNamespace
from typing import AsyncIterator

import pytest

from edgegw.gateway.dispatch import SLOW_NODE_POLL, _assign_pooled
from edgegw.gateway.offers import OfferTable
from edgegw.gateway.peers import Peer, PooledData
from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.pnc.events import Event, Offer
from edgegw.sockio import KEEPALIVE_IDLE, recv_exact
from internal.data_dial import dial_slots
from internal.data_pool import DataPool

KEY = bytes(range(32))
NONCE = bytes(range(50, 82))


def _gateway(offer_timeout: float = 2.0) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(offer_timeout=offer_timeout, data_timeout=1.0),
                           offers=OfferTable(), sessions={})


def _pooled_peer(sent: list[Event] | None = None) -> tuple[Peer, socket.socket]:
    peer = Peer("n1", "x", (sent if sent is not None else []).append, KEY)
    return peer, _add_pooled(peer)


def _add_pooled(peer: Peer) -> socket.socket:
    """One more pooled connection for `peer`; returns the node's end."""
    gw_end, node_end = socket.socketpair()
    gw_end.setblocking(False)
    node_end.setblocking(False)
    peer.pool.append(PooledData(gw_end, NONCE, 9))
    return node_end


async def _node_answers(node_end: socket.socket, answer: bytes | None) -> dataauth.Assignment:
    """Read and check the assignment like a node would, then answer (None: close)."""
    loop = asyncio.get_running_loop()
    wire = await recv_exact(node_end, dataauth.ASSIGN_LEN)
    assignment = dataauth.parse_assignment(wire, KEY, NONCE, 9)
    if answer is None:
        node_end.close()
    else:
        await loop.sock_sendall(node_end, answer)
    return assignment


@pytest.mark.parametrize("answer,expect", [
    (bytes((dataauth.ANSWER_ACCEPT,)), "paired"),
    (bytes((dataauth.ANSWER_RETRY,)), None),       # another node may take the client
    (bytes((dataauth.ANSWER_REFUSE,)), False),     # close the client
    (b"S", None),                                  # not an answer we know
])
async def test_gateway_acts_on_the_node_answer(answer: bytes | None, expect: object) -> None:
    gw = _gateway()
    peer, node_end = _pooled_peer()
    gw_end = peer.pool[0].sock
    node = asyncio.create_task(_node_answers(node_end, answer))
    result = await _assign_pooled(gw, peer, "198.51.100.7", 40100, "c")  # type: ignore[arg-type]
    assignment = await node
    assert (assignment.client_ip, assignment.client_port) == ("198.51.100.7", 40100)
    assert peer.pending == 0 and not peer.pool
    if expect == "paired":
        assert isinstance(result, tuple) and result == (assignment.session_id, gw_end)
        assert gw_end.fileno() >= 0                 # handed over open
        gw_end.close()
    else:
        assert result is expect
        assert gw_end.fileno() == -1                # never leaked
    node_end.close()


async def test_bytes_after_the_accept_are_left_for_the_relay() -> None:
    """The node sends its SSH version line with the answer: the gateway takes the one answer
    byte and leaves the banner in the socket for the relay to pass on to the client."""
    gw = _gateway()
    peer, node_end = _pooled_peer()
    gw_end = peer.pool[0].sock
    banner = b"SSH-2.0-edgegw\r\n"
    node = asyncio.create_task(_node_answers(node_end, bytes((dataauth.ANSWER_ACCEPT,)) + banner))
    result = await _assign_pooled(gw, peer, "198.51.100.7", 40100, "c")  # type: ignore[arg-type]
    await node
    assert isinstance(result, tuple) and result[1] is gw_end
    assert await recv_exact(gw_end, len(banner)) == banner
    gw_end.close()
    node_end.close()


async def test_dead_pooled_connection_is_skipped_for_the_next() -> None:
    gw = _gateway()
    peer, dead = _pooled_peer()
    dead.close()                                    # e.g. dropped by a firewall, or the node
    alive = _add_pooled(peer)
    node = asyncio.create_task(_node_answers(alive, bytes((dataauth.ANSWER_ACCEPT,))))
    result = await _assign_pooled(gw, peer, "192.0.2.8", 2222, "c")  # type: ignore[arg-type]
    assignment = await node
    assert isinstance(result, tuple) and result[0] == assignment.session_id
    assert assignment.client_ip == "192.0.2.8" and not peer.pool and peer.pending == 0
    result[1].close()
    alive.close()


async def test_last_dead_pooled_connection_falls_back_to_an_offer() -> None:
    gw = _gateway(offer_timeout=0.2)
    sent: list[Event] = []
    peer, dead = _pooled_peer(sent)
    dead.close()
    assert await _assign_pooled(gw, peer, "192.0.2.9", 2223, "c") is None  # type: ignore[arg-type]
    offers = [e for e in sent if isinstance(e, Offer)]
    assert [(o.client_ip, o.client_port) for o in offers] == [("192.0.2.9", 2223)]
    assert peer.pending == 0 and len(gw.offers) == 0


async def test_silent_pooled_connection_drops_the_pool_and_offers_over_the_pnc() -> None:
    """A firewall that lost its state leaves every pooled connection silent, not reset: the
    first silence drops them all and the client is offered on the PNC, at once, instead of
    waiting out each connection in turn."""
    gw = _gateway(offer_timeout=0.3)
    sent: list[Event] = []
    peer, silent = _pooled_peer(sent)
    others = [_add_pooled(peer) for _ in range(3)]
    gw_ends = [p.sock for p in peer.pool]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        # The node never answers the offer either: the gateway gives up on it for another.
        assert await _assign_pooled(gw, peer, "::1", 1, "c") is None  # type: ignore[arg-type]
        elapsed = loop.time() - t0
        assert [(o.client_ip, o.client_port) for o in sent if isinstance(o, Offer)] == [("::1", 1)]
        assert not peer.pool and peer.pending == 0 and len(gw.offers) == 0
        assert all(s.fileno() == -1 for s in gw_ends)        # none leaked
        for node_end in others:                              # the node sees them closed
            assert await asyncio.wait_for(loop.sock_recv(node_end, 1), 1) == b""
        assert elapsed < 0.3 * 2 + 0.3                       # one silence, not four
    finally:
        for s in [silent, *others]:
            s.close()


async def test_a_silent_pooled_connection_of_a_node_answering_pings_is_dropped_though_last() -> None:
    """The client's last node is waited for only while it looks busy. One whose PNC answers
    Pings sent after the assignment has lost it (a firewall dropped the connection): the
    gateway gives up on it after the answer timeout and a poll, as with other nodes."""
    gw = _gateway(offer_timeout=0.3)
    peer, silent = _pooled_peer()
    loop = asyncio.get_running_loop()

    async def answering_pings() -> None:
        while True:
            peer.answered_ping = time.monotonic()
            await asyncio.sleep(0.02)

    pinger = asyncio.create_task(answering_pings())
    t0 = loop.time()
    try:
        assert await _assign_pooled(gw, peer, "::1", 1, "c", loop.time() + 10) is None  # type: ignore[arg-type]
        assert loop.time() - t0 < 0.3 + 2 * SLOW_NODE_POLL + 0.3 + 0.5   # not the 10 s
    finally:
        pinger.cancel()
        silent.close()


async def test_a_busy_last_node_answering_late_keeps_the_client() -> None:
    """No Ping answered since the assignment: a busy node, waited for as the client's last."""
    gw = _gateway(offer_timeout=0.3)
    peer, node_end = _pooled_peer()
    gw_end = peer.pool[0].sock
    others = [_add_pooled(peer) for _ in range(2)]

    async def late() -> dataauth.Assignment:
        await asyncio.sleep(1.0)
        return await _node_answers(node_end, bytes((dataauth.ANSWER_ACCEPT,)))

    node = asyncio.create_task(late())
    loop = asyncio.get_running_loop()
    result = await _assign_pooled(gw, peer, "192.0.2.3", 3, "c", loop.time() + 5)  # type: ignore[arg-type]
    assignment = await node
    assert isinstance(result, tuple) and result == (assignment.session_id, gw_end)
    assert len(peer.pool) == 2               # the pool was not dropped as silent
    peer.drop_pool()
    for s in [gw_end, node_end, *others]:
        s.close()


class _FakeLink:
    """What a DataPool needs of its GatewayLink."""

    def __init__(self, port: int) -> None:
        self.target = HostPort("127.0.0.1", port)
        self.data_addr = self.target
        self.gateway = SimpleNamespace(pool_key=KEY)
        self.connected = False   # no refill: each test controls the connections it sees
        self.dials = dial_slots()


async def _proven(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                  ) -> tuple[bytes, dataauth.Proof]:
    """The gateway's side of a pooled connection's proof: challenge, then check the answer."""
    nonce, challenge = dataauth.make_challenge()
    writer.write(challenge)
    proof = dataauth.parse_proof(await reader.readexactly(dataauth.PROOF_LEN))
    assert dataauth.verify_pool_proof(proof, KEY, nonce)
    return nonce, proof


async def _data_port(handler) -> tuple[asyncio.AbstractServer, int]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def _pool_on(handler, size: int) -> AsyncIterator[DataPool]:  # type: ignore[no-untyped-def]
    """A pool of `size`, filling, against a Data port served by `handler`; closed after."""
    server, port = await _data_port(handler)
    link = _FakeLink(port)
    link.connected = True
    pool = DataPool(link, size, lambda a, s: s.close())  # type: ignore[arg-type]
    try:
        pool.fill()
        yield pool
    finally:
        link.connected = False
        pool.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("forge", [False, True])
async def test_node_pool_checks_the_assignment(forge: bool, caplog) -> None:  # type: ignore[no-untyped-def]
    """A good assignment reaches the node with the client's address; a forged one (another
    link's key) is logged and closed, and nothing is served on it."""
    got: list[tuple[dataauth.Assignment, socket.socket]] = []
    done = asyncio.Event()
    closed_by_node = asyncio.Event()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce, proof = await _proven(reader, writer)
        key = bytes(32) if forge else KEY
        writer.write(dataauth.encode_assignment(
            dataauth.Assignment(77, "203.0.113.5", 5555), key, nonce, proof.ident))
        if await reader.read(1) == b"":
            closed_by_node.set()
        writer.close()

    server, port = await _data_port(gateway)
    pool = DataPool(_FakeLink(port), 1,  # type: ignore[arg-type]
                    lambda a, s: (got.append((a, s)), done.set()))
    try:
        pool.fill()
        if forge:
            await asyncio.wait_for(closed_by_node.wait(), 5)
            assert not got
            assert "bad assignment" in caplog.text and "wrong mac" in caplog.text
        else:
            await asyncio.wait_for(done.wait(), 5)
            (assignment, sock), = got
            assert assignment == dataauth.Assignment(77, "203.0.113.5", 5555)
            # pooled connections idle between sessions: keepalive keeps firewalls from
            # dropping them silently
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
            sock.close()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


async def test_node_replaces_pooled_connections_the_gateway_lost(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An offer over the PNC while a pooled connection sat idle means the gateway no longer has
    it (dropped as silent, or lost behind a firewall): the node closes it and dials a new one,
    instead of waiting minutes for keepalive to notice."""
    import internal.data_pool as data_pool
    monkeypatch.setattr(data_pool, "STALE_AFTER", 0.3)
    proven: asyncio.Queue[int] = asyncio.Queue()
    closed: asyncio.Queue[int] = asyncio.Queue()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, proof = await _proven(reader, writer)
        await proven.put(proof.ident)
        if await reader.read(1) == b"":      # never assigned: wait for the node to let go
            await closed.put(proof.ident)
        writer.close()

    async with _pool_on(gateway, 1) as pool:
        first = await asyncio.wait_for(proven.get(), 5)
        pool.offered()                       # too soon: it may still be in the gateway's pool
        await asyncio.sleep(0.4)
        assert proven.empty() and closed.empty()
        pool.offered()
        assert await asyncio.wait_for(closed.get(), 5) == first
        second = await asyncio.wait_for(proven.get(), 5)
        assert second != first


async def test_node_keeps_pooled_connections_whose_assignment_it_has_not_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A burst of clients takes the whole pool and the next ones are offered over the PNC; a
    busy node can read such an offer before the assignments on its pooled connections. Those
    hold an assignment: they are the gateway's, not lost, and closing them made the gateway
    fail those clients over (every one of 200 concurrent uploads had to succeed)."""
    import internal.data_pool as data_pool
    monkeypatch.setattr(data_pool, "STALE_AFTER", 0.1)
    pools: list[DataPool] = []
    assigned: list[dataauth.Assignment] = []
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce, proof = await _proven(reader, writer)
        await asyncio.sleep(0.2)             # proven longer than STALE_AFTER
        writer.write(dataauth.encode_assignment(
            dataauth.Assignment(5, "192.0.2.44", 4444), KEY, nonce, proof.ident))
        # On loopback the assignment is in the node's receive buffer now, and the node's loop
        # (this one) has not run since: an offer read at this moment
        pools[0].offered()
        try:
            ended.set_result(await reader.read(1))
        except ConnectionError:              # closed with the assignment unread: a reset
            ended.set_result(b"reset")
        writer.close()

    server, port = await _data_port(gateway)
    pools.append(DataPool(_FakeLink(port), 1,  # type: ignore[arg-type]
                          lambda a, s: (assigned.append(a), s.close())))
    try:
        pools[0].fill()
        assert await asyncio.wait_for(ended, 5) == b""   # closed by the handler, after use
        assert assigned == [dataauth.Assignment(5, "192.0.2.44", 4444)]
    finally:
        pools[0].close()
        server.close()
        await server.wait_closed()


async def test_node_pool_dials_again_after_the_gateway_refused_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A gateway that drops a burst of pooled connections unproven (restarting, or its
    handshake cap full during a flood) gets the pool back once it takes them again: the pool
    stops dialing after a few failures in a row, then tries one after a backoff, and refills
    once that one is proven (it used to stop for good)."""
    import internal.data_pool as data_pool
    monkeypatch.setattr(data_pool, "RETRY_MIN", 0.05)
    refuse = 6
    proven: asyncio.Queue[int] = asyncio.Queue()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refuse
        if refuse > 0:
            refuse -= 1
            writer.close()
            return
        _, proof = await _proven(reader, writer)
        await proven.put(proof.ident)
        await reader.read(1)
        writer.close()

    async with _pool_on(gateway, 4):
        idents = {await asyncio.wait_for(proven.get(), 10) for _ in range(4)}
        assert len(idents) == 4 and refuse == 0


async def test_node_pool_backs_off_when_the_gateway_closes_them_after_the_proof() -> None:
    """A gateway that reads the proof and closes the connection at once (it no longer counts
    this link among its nodes, or a hostile one) made the pool redial in a tight loop: every
    proof counted as a working dial, so each close was replaced at once (thousands of dials a
    second). Such a close now counts as a failed dial, and the pool backs off."""
    dials = 0

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dials
        dials += 1
        try:
            await _proven(reader, writer)
        finally:
            writer.close()

    async with _pool_on(gateway, 4):
        await asyncio.sleep(1.5)
        # the first batch, then at most a few more after a backoff (it was thousands)
        assert 4 <= dials <= 16, dials


async def test_node_pool_backoff_starts_at_retry_min_when_the_whole_pool_fails(caplog) -> None:  # type: ignore[no-untyped-def]
    """A full pool whose dials all fail at once (a gateway restart, a firewall) counted each
    failure as a doubling: 32 failures gave 2**29 s, capped to RETRY_MAX, so the first retry
    came after 30 s. The backoff now doubles per round of failures: about RETRY_MIN, then
    twice that, one dial per round."""
    import internal.data_pool as data_pool
    dialed: list[float] = []
    loop = asyncio.get_running_loop()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialed.append(loop.time())
        writer.close()                       # refused before the challenge

    caplog.set_level("WARNING", logger="edgegw.node.pool")
    async with _pool_on(gateway, 32):
        deadline = loop.time() + 3 * data_pool.RETRY_MIN + 3
        while len(dialed) < 34 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert len(dialed) >= 34, f"{len(dialed)} dials; {caplog.text}"
        first_retry, second_retry = dialed[32] - dialed[31], dialed[33] - dialed[32]
        # each retry: 0.5 s after the failure, then RETRY_MIN * 2**round with ±20 % jitter
        least = data_pool.RETRY_MIN
        assert 0.5 + 0.8 * least <= first_retry <= 0.5 + 1.2 * least + 0.5, first_retry
        assert 0.5 + 1.6 * least <= second_retry <= 0.5 + 2.4 * least + 0.5, second_retry
        assert len(dialed) == 34             # one dial per round, not the whole pool
