"""The node's own admission of offers, against a scripted gateway over real sockets: a node
in-process (its PNC link, Data dials and forwarder real), the gateway's side played by the test
with the PNC state machine."""
from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from edgegw.netaddr import HostPort
from edgegw.pnc import Connection, Role, dataauth
from edgegw.pnc.events import (
    PROTOCOL_VERSION, Accept, Closed, Event, GatewayHello, NodeHello, Offer, Ping, Reject,
)
from edgegw.sockio import recv_exact
from internal.forward import ForwardService
from internal.gateway_link import GatewayLink, node_tls_context
from internal.home import NodeHome
from internal.node import Node, NodeSettings


class ScriptedGateway:
    """A PNC port the node dials (the test is the TLS client, as a gateway is) and a Data port
    that takes every session proof and holds the connection."""

    def __init__(self) -> None:
        self.pnc = socket.create_server(("127.0.0.1", 0))
        self.data = socket.create_server(("127.0.0.1", 0))
        for s in (self.pnc, self.data):
            s.setblocking(False)
        self.held: list[socket.socket] = []
        self._pending: list[Event] = []   # events read but not asked for yet
        self._data_task: asyncio.Task[None] | None = None

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
            _, challenge = dataauth.make_challenge()
            await loop.sock_sendall(sock, challenge)
            await recv_exact(sock, dataauth.PROOF_LEN)
            self.held.append(sock)

    async def close(self) -> None:
        if self._data_task is not None:
            self._data_task.cancel()
            await asyncio.gather(self._data_task, return_exceptions=True)
        for s in (self.pnc, self.data, *self.held):
            s.close()


async def test_offers_in_one_burst_are_not_accepted_beyond_capacity(node_home: Path) -> None:
    """Two offers read together (a gateway's burst, or two gateways' offers before the first
    Data connection is up) were both accepted by a node of capacity 1: a session counts only
    once it runs, after its Data connection is dialed, so the second offer saw it free."""
    upstream = socket.create_server(("127.0.0.1", 0))   # the forward target; never answers
    gw = ScriptedGateway()
    service = ForwardService(HostPort("127.0.0.1", upstream.getsockname()[1]), capacity=1)
    node = Node(NodeHome.load(node_home), service,
                NodeSettings([gw.pnc_addr], capacity=1, pool_size=0, node_id="n1"))
    node.start()
    writer = None
    try:
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
    finally:
        if writer is not None:
            writer.close()
        await node.close()
        await gw.close()
        upstream.close()


class _Owner:
    """A node that only says hello."""

    node_id = "n1"

    def hello(self) -> NodeHello:
        return NodeHello(PROTOCOL_VERSION, self.node_id, 0, 100, 0, False)

    def on_attached(self, link: GatewayLink) -> None: ...
    def on_detached(self, link: GatewayLink) -> None: ...
    def on_offer(self, link: GatewayLink, offer: Offer) -> None: ...
    def on_closed(self, link: GatewayLink, closed: Closed) -> None: ...


async def test_gateway_that_sends_without_reading_cannot_fill_the_node_memory(
        node_home: Path) -> None:
    """A gateway that floods the PNC (pings) and reads nothing: the node queued every answer
    in memory (more than twice what the gateway sent, without end). It now stops reading until
    the gateway takes its answers, and drops the link when the gateway stays silent."""
    home = NodeHome.load(node_home)
    gw = ScriptedGateway()
    link = GatewayLink(_Owner(), gw.pnc_addr, node_tls_context(home.tls_cert, home.tls_key),
                       heartbeat_timeout=1.0)
    task = asyncio.create_task(link.run_forever())
    writer = None
    try:
        reader, writer, conn = await gw.attach()
        writer.write(conn.send(GatewayHello(PROTOCOL_VERSION, "gw", 1, 300, bytes(32))))
        writer.transport.pause_reading()              # never read the node's answers again
        chunk = b"".join(conn.send(Ping(i)) for i in range(40_000))   # ~0.5 MiB
        sent = most_queued = 0

        async def flood() -> None:
            nonlocal sent, most_queued
            while sent < 32 << 20:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if link._writer is not None:
                    most_queued = max(most_queued, link._writer.transport.get_write_buffer_size())

        dropped = False
        try:
            await asyncio.wait_for(flood(), 6)
        except ConnectionError:
            dropped = True
        except asyncio.TimeoutError:
            pass
        assert most_queued < 1 << 20, (most_queued, sent)
        assert sent < 32 << 20, sent
        assert dropped        # by its heartbeat: it saw nothing from the gateway meanwhile
    finally:
        if writer is not None:
            writer.transport.abort()
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gw.close()
