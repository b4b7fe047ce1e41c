"""The node's control channel to one gateway: dial out, be the TLS server, speak the PNC.

Redials forever with exponential backoff and full jitter, so that a fleet of nodes does not
reconnect in lockstep after a gateway restart.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from pathlib import Path
from typing import Protocol

from edgegw.netaddr import HostPort
from edgegw.sockio import connect_tcp
from edgegw.pnc import Connection, LocalProtocolError, RemoteProtocolError, Role
from edgegw.pnc.events import (
    Closed, Event, GatewayHello, Goodbye, NodeHello, Offer, Ping, Pong, PROTOCOL_VERSION,
)
from edgegw.pnc.liveness import Liveness
from internal.data_dial import dial_slots

log = logging.getLogger("edgegw.node.pnc")

READ_SIZE = 65536
CONNECT_TIMEOUT = 5.0

# The node pings at the heartbeat interval of the gateway's hello and drops a link whose
# gateway has left a Ping unanswered for three of them (or heartbeat_timeout if longer). That
# value is the gateway's (up to 2**32 ms on the wire): bounded, so that a gateway cannot make
# the node ping in a tight loop, nor switch its liveness check off.
HEARTBEAT_MIN = 0.05   # the gateway's own --heartbeat-interval minimum
HEARTBEAT_MAX = 10.0   # a Ping unanswered for 30 s drops the link, whatever the gateway says


def node_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


class LinkOwner(Protocol):
    """What a link needs from the node that owns it."""

    node_id: str

    def hello(self) -> NodeHello: ...
    def on_attached(self, link: "GatewayLink") -> None: ...
    def on_detached(self, link: "GatewayLink") -> None: ...
    def on_offer(self, link: "GatewayLink", offer: Offer) -> None: ...
    def on_closed(self, link: "GatewayLink", closed: Closed) -> None: ...


class GatewayLink:
    def __init__(self, owner: LinkOwner, target: HostPort, tls: ssl.SSLContext, *,
                 backoff_base: float = 0.2, backoff_max: float = 5.0,
                 heartbeat_timeout: float = 3.0) -> None:
        self.owner = owner
        self.target = target
        self.tls = tls
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.heartbeat_timeout = heartbeat_timeout
        self.gateway: GatewayHello | None = None
        self.connected = False
        self._writer: asyncio.StreamWriter | None = None
        self._conn: Connection | None = None
        self._stopping = False
        self._liveness = Liveness()
        self._interval = 1.0   # heartbeat interval, seconds (the gateway's, bounded)
        self.dials = dial_slots()   # its Data connections between dial and proof

    @property
    def data_addr(self) -> HostPort:
        assert self.gateway is not None
        return HostPort(self.target.host, self.gateway.data_port)

    @property
    def gateway_id(self) -> str:
        return self.gateway.gateway_id if self.gateway else str(self.target)

    def send(self, event: Event) -> bool:
        """Queue an event; False when the link is down (the caller decides what that means)."""
        if not self.connected or self._writer is None or self._conn is None:
            return False
        if self._writer.is_closing():
            return False
        try:
            self._writer.write(self._conn.send(event))
        except LocalProtocolError:
            log.exception("gateway %s: refusing to send %r", self.target, event)
            return False
        return True

    async def run_forever(self) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except ssl.SSLError as exc:
                log.log(self._level(logging.WARNING), "gateway %s: TLS failed: %s",
                        self.target, exc)
            except RemoteProtocolError as exc:
                log.log(self._level(logging.WARNING), "gateway %s: protocol error: %s",
                        self.target, exc)
            # UnicodeError: a name the resolver's idna codec refuses (it is not an OSError);
            # logged and redialed like any other failure rather than ending the task
            except (OSError, UnicodeError, asyncio.TimeoutError, ConnectionError) as exc:
                log.log(self._level(logging.INFO if attempt else logging.WARNING),
                        "gateway %s: %s", self.target, str(exc) or type(exc).__name__)
            if self._stopping:
                break
            if time.monotonic() - started > 10:
                attempt = 0  # it was up for a while: start the backoff over
            delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(max(delay, 0.05))

    def _level(self, level: int) -> int:
        """How loud a link's end is: the gateway closing it after our own goodbye (the node
        stopping) is what was asked for, not a problem."""
        return logging.DEBUG if self._stopping else level

    async def stop(self, reason: str = "node shutting down") -> None:
        self._stopping = True
        if self.connected:
            self.send(Goodbye(reason))
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                self._writer.transport.abort()

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = await connect_tcp(self.target, CONNECT_TIMEOUT)
        reader = asyncio.StreamReader(limit=READ_SIZE * 4)
        protocol = asyncio.StreamReaderProtocol(reader)
        # Roles reversed: we dialed, but we are the TLS server the gateway verifies.
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.tls, ssl_handshake_timeout=10.0)
        except ConnectionError as exc:
            # all the node sees of a refusal: the gateway logs why
            raise ConnectionError(
                f"the gateway closed the connection during the TLS handshake "
                f"({type(exc).__name__}; the gateway's log says why: a node whose certificate "
                f"is not in its --trust file is refused so)") from exc
        self._writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._conn = Connection(Role.NODE)
        self.connected = True
        self._interval = 1.0
        heartbeat: asyncio.Task[None] | None = None
        try:
            self.send(self.owner.hello())
            self._liveness = Liveness()
            heartbeat = asyncio.create_task(self._heartbeat())
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("gateway closed the connection")
                for event in self._conn.receive_data(data):
                    if self._handle(event):
                        return
                if (seq := self._liveness.answer()) is not None:    # one Pong per read
                    self.send(Pong(seq))
                # Read on only once the gateway takes our answers (pongs, accepts): one that
                # sends without reading would otherwise have them queued in memory without
                # end. It cannot answer our Pings meanwhile, so the heartbeat drops the link.
                await self._writer.drain()
                if len(data) == READ_SIZE:
                    # A full read: more may be buffered, and neither read nor drain waits
                    # then. Let the sessions and the heartbeat run between the reads of a
                    # gateway that sends without pause. (Not after every read: under load
                    # each yield is a whole turn of a busy loop, and offers would queue.)
                    await asyncio.sleep(0)
        finally:
            self.connected = False
            if heartbeat is not None:
                heartbeat.cancel()
            if self.gateway is not None:
                self.owner.on_detached(self)
            self.gateway = None
            self._writer.transport.abort()

    def _handle(self, event: Event) -> bool:
        if isinstance(event, GatewayHello):
            self.gateway = event
            log.info("attached to gateway %s at %s (data port %d)", event.gateway_id,
                     self.target, event.data_port)
            asked = event.heartbeat_interval_ms / 1000
            self._interval = min(max(asked, HEARTBEAT_MIN), HEARTBEAT_MAX)
            if self._interval != asked:
                log.warning("gateway %s asks for a heartbeat every %gs; using %gs (from %gs "
                            "to %gs)", self.target, asked, self._interval, HEARTBEAT_MIN,
                            HEARTBEAT_MAX)
            self.owner.on_attached(self)
        elif isinstance(event, Offer):
            self.owner.on_offer(self, event)
        elif isinstance(event, Closed):
            self.owner.on_closed(self, event)
        elif isinstance(event, Ping):
            self._liveness.pinged(event.seq)
        elif isinstance(event, Pong):
            self._liveness.pong(event.seq)
        elif isinstance(event, Goodbye):
            log.info("gateway %s said goodbye: %s", self.target, event.reason)
            return True
        return False

    async def _heartbeat(self) -> None:
        while True:
            interval = self._interval
            await asyncio.sleep(interval)
            now = time.monotonic()
            late = self._liveness.overdue(now)
            if late > max(self.heartbeat_timeout, 3 * interval):
                log.warning("gateway %s has not answered a ping for %.1fs; reconnecting",
                            self.target, late)
                if self._writer is not None:
                    self._writer.transport.abort()
                return
            self.send(Ping(self._liveness.ping(now)))


__all__ = ["GatewayLink", "LinkOwner", "node_tls_context", "PROTOCOL_VERSION"]
