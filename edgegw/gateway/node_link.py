"""One node attached over the PNC, from the gateway's side: hello, heartbeats, answers, bans.

The node dialed us over TCP; we run TLS as the *client* and verify its certificate. The protocol
itself is the sans-IO `edgegw.pnc.Connection`; this module only moves its bytes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING, Callable

from edgegw.gateway.peers import Peer
from edgegw.pnc import MAX_TEXT, Connection, LocalProtocolError, RemoteProtocolError, Role
from edgegw.pnc.events import (
    PROTOCOL_VERSION, Accept, Ban, Closed, Event, GatewayHello, Goodbye, Load, NodeHello, Ping,
    Pong, Reject, Unban,
)
from edgegw.pnc.liveness import Liveness

if TYPE_CHECKING:
    from edgegw.gateway.config import GatewayConfig
    from edgegw.gateway.server import Gateway

log = logging.getLogger("edgegw.gateway.pnc")

READ_SIZE = 65536

# Session reports (Closed) only feed the node's audit trail, so they wait up to this long and
# go out together: a busy gateway then sends one TLS record per batch, and the node wakes once
# for it, instead of both doing so between every two sessions' setups. Anything else sent
# meanwhile goes out at once, after them (frames stay in order).
REPORT_DELAY = 0.05

# A node id shown in a reason is cut to this many characters of its repr: it is the peer's.
SHOWN_ID = 80


def fit_reason(reason: str) -> str:
    """`reason` cut to the PNC's text cap (UTF-8 bytes, on a character boundary), so that a
    long id or address in it cannot make the frame unsendable."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_TEXT:
        return reason
    return raw[:MAX_TEXT - 3].decode("utf-8", "ignore") + "..."


def _show_id(node_id: str) -> str:
    text = repr(node_id)
    return text if len(text) <= SHOWN_ID else text[:SHOWN_ID - 3] + "..."


class NodeLink:
    def __init__(self, gw: "Gateway", sock: socket.socket, addr: tuple) -> None:
        self.gw = gw
        self.sock = sock
        self.addr = f"{addr[0]}:{addr[1]}"
        self.conn = Connection(Role.GATEWAY)
        self.peer: Peer | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._liveness = Liveness()
        self._counted = False
        self._reports: list[bytes] = []
        self._report_timer: asyncio.TimerHandle | None = None

    def send(self, event: Event) -> None:
        if self.writer is None or self.writer.is_closing():
            return
        if isinstance(event, (Goodbye, Closed)):   # reasons may quote what the peer sent
            if (reason := fit_reason(event.reason)) is not event.reason:
                event = dataclasses.replace(event, reason=reason)
        data = self.conn.send(event)
        if isinstance(event, Closed):
            self._reports.append(data)
            if self._report_timer is None:
                self._report_timer = asyncio.get_running_loop().call_later(
                    REPORT_DELAY, self._flush_reports)
            return
        if self._reports:
            data = self._take_reports() + data
        self.writer.write(data)

    def _take_reports(self) -> bytes:
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        data = b"".join(self._reports)
        self._reports.clear()
        return data

    def _flush_reports(self) -> None:
        self._report_timer = None
        data = self._take_reports()
        if data and self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self, on_authenticated: Callable[[], None]) -> None:
        """Serve the link until it closes; `on_authenticated` runs once, when the TLS
        handshake verified the node or failed (either way it no longer counts as pending)."""
        cfg = self.gw.config
        try:
            await self._run(cfg, on_authenticated)
        finally:
            if not self._counted:
                on_authenticated()

    async def _run(self, cfg: "GatewayConfig", on_authenticated: Callable[[], None]) -> None:
        try:
            reader, self.writer = await asyncio.open_connection(
                sock=self.sock, ssl=self.gw.tls, server_hostname=self.gw.tls_name,
                ssl_handshake_timeout=cfg.tls_handshake_timeout)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            log.warning("pnc peer %s refused: TLS verification failed (%s); is its certificate "
                        "in --trust?", self.addr, getattr(exc, "verify_message", None) or exc)
            self.sock.close()
            return
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("pnc peer %s: TLS handshake failed: %s", self.addr, exc or "timeout")
            self.sock.close()
            return
        self._counted = True
        on_authenticated()
        pool_key = secrets.token_bytes(32)
        try:
            self.send(GatewayHello(PROTOCOL_VERSION, cfg.gateway_id, self.gw.data_port,
                                   int(cfg.heartbeat_interval * 1000), pool_key))
            hello, early = await asyncio.wait_for(self._first_hello(reader),
                                                  cfg.heartbeat_timeout * 3)
            if (other := self.gw.peers.find(hello.node_id)) is not None:
                # Two processes with one id (a home copied, or workers left running by a
                # killed supervisor) would split one node's sessions, leases and metrics; a
                # node that restarted before its old link timed out is let in once it has.
                log.warning("pnc peer %s refused: node id %s is already attached from %s",
                            self.addr, _show_id(hello.node_id), other.address)
                self.send(Goodbye(f"node id {_show_id(hello.node_id)} is already attached to "
                                  f"gateway {cfg.gateway_id}"))
                return
            self.peer = Peer(hello.node_id, self.addr, self.send, pool_key,
                             capacity=hello.capacity, weight=max(1, hello.weight),
                             active=hello.active, draining=hello.draining)
            self.gw.attach(self.peer)
            log.info("node %s attached from %s (capacity=%d weight=%d)", hello.node_id,
                     self.addr, hello.capacity, hello.weight)
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                if not self._handle_all(early):
                    await self._read_loop(reader)
            finally:
                heartbeat.cancel()
        except RemoteProtocolError as exc:
            log.warning("pnc peer %s: protocol error: %s; closing", self.addr, exc)
        except LocalProtocolError as exc:   # our bug: one line, not a traceback per link
            log.error("pnc peer %s: cannot send to it (%s); closing", self.addr, exc)
        except asyncio.TimeoutError:
            log.warning("pnc peer %s: no hello in time; closing", self.addr)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            log.info("pnc peer %s: connection lost: %s", self.addr, exc)
        finally:
            await self._close()

    async def _first_hello(self, reader: asyncio.StreamReader) -> tuple[NodeHello, list[Event]]:
        """The node's hello, and any events that arrived in the same read after it."""
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("closed before hello")
            events = self.conn.receive_data(data)
            if events:  # the state machine guarantees the first event is the hello
                hello = events[0]
                assert isinstance(hello, NodeHello)
                return hello, events[1:]

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        assert self.writer is not None
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                log.info("node %s closed the pnc",
                         self.peer.describe() if self.peer else self.addr)
                return
            if self._handle_all(self.conn.receive_data(data)):
                return
            # What we read may have made us write (a Pong per Ping): a node that sends and
            # never reads would grow our write buffer without bound. Read no more from it
            # until it takes what we wrote; if it never does, it cannot answer our Pings
            # either, and the heartbeat detaches it.
            await self.writer.drain()
            if len(data) == READ_SIZE:
                # A full read: more may be buffered, and neither read nor drain waits then.
                # Let clients, offers and the heartbeat run between the reads of a node that
                # sends without pause. (Not after every read: under load each yield is a
                # whole turn of a busy loop, and answers would queue.)
                await asyncio.sleep(0)

    def _handle_all(self, events: list[Event]) -> bool:
        """Apply what one read brought, then answer its Pings with one Pong; True means the
        link should close."""
        for event in events:
            if self._handle(event):
                return True
        if (seq := self._liveness.answer()) is not None:
            self.send(Pong(seq))
        return False

    def _handle(self, event: Event) -> bool:
        """Apply one event; True means the link should close."""
        peer = self.peer
        assert peer is not None
        if isinstance(event, (Accept, Reject)):
            if not self.gw.offers.answer(peer, event):
                log.debug("node %s answered unknown/expired offer %016x", peer.node_id,
                          event.session_id)
        elif isinstance(event, Load):
            peer.active, peer.capacity = event.active, event.capacity
            peer.weight, was_draining = max(1, event.weight), peer.draining
            peer.draining = event.draining
            if peer.draining and not was_draining:
                log.info("node %s is draining: no new sessions go to it", peer.node_id)
            self.gw.peers.changed()
        elif isinstance(event, Ping):
            self._liveness.pinged(event.seq)
        elif isinstance(event, Pong):
            if self._liveness.pong(event.seq):
                peer.answered_ping = self._liveness.answered_at
        elif isinstance(event, Ban):
            self.gw.ban(event.ip, event.until, event.reason, peer)
        elif isinstance(event, Unban):
            self.gw.unban(event.ip, peer)
        elif isinstance(event, Goodbye):
            log.info("node %s said goodbye: %s", peer.node_id, event.reason)
            return True
        return False

    async def _heartbeat(self) -> None:
        cfg = self.gw.config
        assert self.peer is not None
        while True:
            await asyncio.sleep(cfg.heartbeat_interval)
            now = time.monotonic()
            late = self._liveness.overdue(now)
            if late > cfg.heartbeat_timeout:
                log.warning("node %s has not answered a ping for %.1fs: detaching it",
                            self.peer.describe(), late)
                self.gw.detach(self.peer)
                if self.writer is not None:
                    self.writer.transport.abort()
                return
            self.send(Ping(self._liveness.ping(now)))

    async def _close(self) -> None:
        if self.peer is not None:
            self.gw.detach(self.peer)
            log.info("node %s detached", self.peer.describe())
        if self.writer is not None:
            self._flush_reports()   # sessions that ended before the link did
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                self.writer.transport.abort()
