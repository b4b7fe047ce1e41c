"""The node's own admission of offers, against a scripted gateway over real sockets: a node
in-process (its PNC link, Data dials and forwarder real), the gateway's side played by the test
with the PNC state machine."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path
from typing import AsyncIterator

import pytest

from edgegw.netaddr import HostPort
from edgegw.pnc import Connection, Role, dataauth
from edgegw.pnc.events import (
    PROTOCOL_VERSION, Accept, Closed, Event, GatewayHello, Load, NodeHello, Offer, Ping, Reject,
)
from edgegw.sockio import recv_exact
import internal.gateway_link as gateway_link
from internal.defender import Defender
from internal.forward import ForwardService
from internal.gateway_link import GatewayLink, node_tls_context
from internal.home import NodeHome
from internal.node import Node, NodeSettings
from internal.store.base import Store


class ScriptedGateway:
    """A PNC port the node dials (the test is the TLS client, as a gateway is) and a Data port
    that takes every session proof and holds the connection."""

    def __init__(self) -> None:
        self.pnc = socket.create_server(("127.0.0.1", 0))
        self.data = socket.create_server(("127.0.0.1", 0))
        for s in (self.pnc, self.data):
            s.setblocking(False)
        self.held: list[socket.socket] = []
        self.dialed = 0                                  # Data connections accepted
        self.challenge_gate: asyncio.Event | None = None  # set: send the challenge
        self._pending: list[Event] = []   # events read but not asked for yet
        self._data_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None   # the PNC, once attached

    @property
    def pnc_addr(self) -> HostPort:
        return HostPort("127.0.0.1", self.pnc.getsockname()[1])

    async def attach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Connection]:
        loop = asyncio.get_running_loop()
        self._data_task = asyncio.create_task(self._serve_data())
        sock, _ = await asyncio.wait_for(loop.sock_accept(self.pnc), 10)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="node")
        self._writer = writer
        conn = Connection(Role.GATEWAY)
        hello = await self.next_event(reader, conn, NodeHello)
        assert isinstance(hello, NodeHello)
        return reader, writer, conn

    async def next_event(self, reader: asyncio.StreamReader, conn: Connection,
                         *types: type) -> Event:
        while True:
            for event in self._pending:
                self._pending.remove(event)
                if isinstance(event, types):
                    return event
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the node closed the PNC"
            self._pending.extend(conn.receive_data(data))

    async def _serve_data(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.data)
            self.dialed += 1
            if self.challenge_gate is not None:
                await self.challenge_gate.wait()
            _, challenge = dataauth.make_challenge()
            await loop.sock_sendall(sock, challenge)
            await recv_exact(sock, dataauth.PROOF_LEN)
            self.held.append(sock)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._data_task is not None:
            self._data_task.cancel()
            await asyncio.gather(self._data_task, return_exceptions=True)
        for s in (self.pnc, self.data, *self.held):
            s.close()


@contextlib.asynccontextmanager
async def _forwarding(node_home: Path, *, capacity: int = 0, gated: bool = False,
                      **settings: object
                      ) -> AsyncIterator[tuple[ScriptedGateway, Node, socket.socket]]:
    """A started node of forward mode (no SSH keys or users needed) attached to a scripted
    gateway only, and its forward target (listening, never answering unless accepted).
    `gated`: the gateway's Data port holds each challenge until `gw.challenge_gate` is set.
    All closed after."""
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.setblocking(False)
    gw = ScriptedGateway()
    if gated:
        gw.challenge_gate = asyncio.Event()
    service = ForwardService(HostPort("127.0.0.1", upstream.getsockname()[1]),
                             capacity=capacity)
    node = Node(NodeHome.load(node_home), service,
                NodeSettings([gw.pnc_addr], capacity=capacity, pool_size=0, node_id="n1",
                             **settings))  # type: ignore[arg-type]
    node.start()
    try:
        yield gw, node, upstream
    finally:
        await node.close()
        await gw.close()
        upstream.close()


async def test_offers_in_one_burst_are_not_accepted_beyond_capacity(node_home: Path) -> None:
    """Two offers read together (a gateway's burst, or two gateways' offers before the first
    Data connection is up) were both accepted by a node of capacity 1: a session counts only
    once it runs, after its Data connection is dialed, so the second offer saw it free."""
    async with _forwarding(node_home, capacity=1) as (gw, node, upstream):
        reader, writer, conn = await gw.attach()
        burst = conn.send(GatewayHello(PROTOCOL_VERSION, "gw", gw.data.getsockname()[1], 1000,
                                       bytes(32)))
        for sid in (1, 2):
            burst += conn.send(Offer(sid, bytes([sid]) * 32, "192.0.2.1", 4000 + sid, 5000))
        writer.write(burst)
        answers = {}
        for _ in range(2):
            event = await gw.next_event(reader, conn, Accept, Reject)
            answers[event.session_id] = event  # type: ignore[union-attr]
        assert answers[1] == Accept(1)
        assert answers[2] == Reject(2, "capacity", retry_elsewhere=True)


class _Owner:
    """A node that only says hello."""

    node_id = "n1"

    def hello(self) -> NodeHello:
        return NodeHello(PROTOCOL_VERSION, self.node_id, 0, 100, 0, False)

    def on_attached(self, link: GatewayLink) -> None: ...
    def on_detached(self, link: GatewayLink) -> None: ...
    def on_offer(self, link: GatewayLink, offer: Offer) -> None: ...
    def on_closed(self, link: GatewayLink, closed: Closed) -> None: ...


@contextlib.asynccontextmanager
async def _link_to_script(node_home: Path, heartbeat_timeout: float
                          ) -> AsyncIterator[tuple[GatewayLink, asyncio.StreamReader,
                                                   asyncio.StreamWriter, Connection]]:
    """A node's PNC link (hello only) attached to a scripted gateway: the link, and the
    gateway's reader, writer and PNC state; all stopped after."""
    home = NodeHome.load(node_home)
    gw = ScriptedGateway()
    link = GatewayLink(_Owner(), gw.pnc_addr, node_tls_context(home.tls_cert, home.tls_key),
                       heartbeat_timeout=heartbeat_timeout)
    task = asyncio.create_task(link.run_forever())
    writer = None
    try:
        reader, writer, conn = await gw.attach()
        yield link, reader, writer, conn
    finally:
        if writer is not None:
            writer.transport.abort()
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gw.close()


async def test_gateway_that_sends_without_reading_cannot_fill_the_node_memory(
        node_home: Path) -> None:
    """A gateway that floods the PNC (pings) and reads nothing: the node queued every answer
    in memory (more than twice what the gateway sent, without end). It now answers all the
    Pings of a read with one Pong, stops reading while the gateway leaves its answers unread,
    and drops the link as the gateway answers none of its Pings. The flood is bounded by time,
    not bytes: how much a node parses before its heartbeat fires depends on the machine."""
    async with _link_to_script(node_home, 1.0) as (link, reader, writer, conn):
        writer.write(conn.send(GatewayHello(PROTOCOL_VERSION, "gw", 1, 300, bytes(32))))
        writer.transport.pause_reading()              # never read the node's answers again
        chunk = b"".join(conn.send(Ping(i)) for i in range(40_000))   # ~0.5 MiB
        sent = most_queued = 0

        async def flood() -> None:
            nonlocal sent, most_queued
            while True:                               # until the node drops the link
                writer.write(chunk)
                await writer.drain()
                # drain() returns without yielding while the protocol is not paused, and once
                # the node has closed the link TLS writes are dropped, not paused: without a
                # turn of the loop, connection_lost (which makes drain raise) and the timeout
                # never ran, and the test spun for ever logging every write
                await asyncio.sleep(0)
                sent += len(chunk)
                if link._writer is not None:
                    most_queued = max(most_queued, link._writer.transport.get_write_buffer_size())

        dropped = False
        try:
            await asyncio.wait_for(flood(), 8)
        except ConnectionError:
            dropped = True
        except asyncio.TimeoutError:
            pass
        assert sent > 1 << 20, sent                   # it did flood
        assert most_queued < 1 << 20, (most_queued, sent)
        assert dropped        # by its heartbeat: its Pings went unanswered




async def test_drain_waits_for_a_session_whose_data_connection_is_being_dialed(
        node_home: Path) -> None:
    """A session accepted while its Data connection was still being dialed did not clear
    `idle` (nor count in `active`): a drain then ended at once, and stopping the node cut off
    the client it had just accepted. It now counts as active and the drain waits for it."""
    loop = asyncio.get_running_loop()
    drain = far_end = None
    # the Data dial hangs until the test lets it go (gated)
    async with _forwarding(node_home, gated=True, drain_timeout=10.0) as (gw, node, upstream):
        try:
            reader, writer, conn = await gw.attach()
            writer.write(conn.send(GatewayHello(PROTOCOL_VERSION, "gw", gw.data.getsockname()[1],
                                                1000, bytes(32)))
                         + conn.send(Offer(7, bytes([7]) * 32, "192.0.2.1", 4007, 5000)))
            assert await gw.next_event(reader, conn, Accept, Reject) == Accept(7)
            while gw.dialed == 0:                # the node is dialing
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(node.drain())
            await asyncio.sleep(0.5)
            assert not drain.done()              # it used to end here, with the session cut off
            load = await gw.next_event(reader, conn, Load)
            assert isinstance(load, Load) and load.draining
            assert load.active == 1              # the starting session is load
            gw.challenge_gate.set()              # the dial completes: the session is served
            far_end, _ = await asyncio.wait_for(loop.sock_accept(upstream), 5)
            await asyncio.sleep(0.2)
            assert not drain.done()
            far_end.close()                      # the session ends on both sides
            while not gw.held:
                await asyncio.sleep(0.01)
            gw.held[0].close()
            await asyncio.wait_for(drain, 5)     # then the drain ends
            assert node.active == 0
        finally:
            if drain is not None and not drain.done():
                drain.cancel()
            if far_end is not None:
                far_end.close()


async def test_expired_offers_are_neither_accepted_nor_dialed_late(
        node_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The node ignored Offer.expires_ms: it accepted an offer that had already lapsed and
    dialed it, and a Data connection proven after the offer lapsed (the gateway refuses it)
    was served as a session anyway (a forward to the upstream, audit records, a confusing
    log). Now a lapsed offer is declined and a dial stops when the offer lapses."""
    loop = asyncio.get_running_loop()
    # gated: the Data port answers late (a full backlog)
    async with _forwarding(node_home, gated=True) as (gw, node, upstream):
        reader, writer, conn = await gw.attach()
        writer.write(conn.send(GatewayHello(PROTOCOL_VERSION, "gw", gw.data.getsockname()[1],
                                            1000, bytes(32)))
                     + conn.send(Offer(1, bytes([1]) * 32, "192.0.2.1", 4001, 0)))
        assert await gw.next_event(reader, conn, Accept, Reject) == \
            Reject(1, "offer expired", retry_elsewhere=True)
        await asyncio.sleep(0.2)
        assert gw.dialed == 0

        writer.write(conn.send(Offer(2, bytes([2]) * 32, "192.0.2.1", 4002, 300)))
        assert await gw.next_event(reader, conn, Accept, Reject) == Accept(2)
        await asyncio.sleep(0.6)             # the offer lapses while the node dials
        assert gw.dialed == 1
        assert node.active == 0 and node.idle.is_set()
        assert "expired before its Data connection was proven" in caplog.text
        gw.challenge_gate.set()              # too late: nothing may be proven nor served
        await asyncio.sleep(0.3)
        assert not gw.held
        try:
            far_end, _ = await asyncio.wait_for(loop.sock_accept(upstream), 0.3)
        except asyncio.TimeoutError:
            pass
        else:
            far_end.close()
            raise AssertionError("the lapsed offer was served")


@pytest.mark.parametrize("interval_ms", [0xFFFF_FFFF, 1])
async def test_gateway_heartbeat_interval_is_bounded(
        node_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        interval_ms: int) -> None:
    """The node took the gateway's heartbeat interval as it came: up to 2**32 ms, so the
    gateway could switch the node's pings and its silence detection off (a link to a hung
    gateway was never dropped). It is now bounded both ways, with a warning."""
    monkeypatch.setattr(gateway_link, "HEARTBEAT_MAX", 0.2, raising=False)  # short test
    loop = asyncio.get_running_loop()
    async with _link_to_script(node_home, 0.5) as (link, reader, writer, conn):
        writer.write(conn.send(GatewayHello(PROTOCOL_VERSION, "gw", 1, interval_ms, bytes(32))))
        t0 = loop.time()
        pings = 0
        # The gateway reads but never answers: the node must ping, then drop the link.
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            pings += sum(isinstance(e, Ping) for e in conn.receive_data(data))
        elapsed = loop.time() - t0
        assert "asks for a heartbeat every" in caplog.text
        if interval_ms > 1000:
            assert pings >= 1 and elapsed < 2.0, (pings, elapsed)
        else:   # 1 ms: at most one ping per HEARTBEAT_MIN, not a tight loop
            assert pings <= elapsed / 0.05 + 2, (pings, elapsed)


def test_node_and_defender_agree_on_unparsable_addresses(node_home: Path, store: Store) -> None:
    """Node.banned (what admission uses) took an unparsable client address as not banned,
    Defender.banned as banned. Both fail closed now (none reaches them: the PNC codec and
    Data assignments carry valid addresses only)."""
    node = Node(NodeHome.load(node_home), ForwardService(HostPort("127.0.0.1", 9)),
                NodeSettings([], pool_size=0, node_id="n1"))
    defender = Defender(store)
    for ip in ("nonsense", "", "10.0.0.1/8"):
        assert defender.banned(ip) is not None
        assert node.banned(ip) is True
    assert defender.banned("192.0.2.1") is None
    assert node.banned("192.0.2.1") is False
