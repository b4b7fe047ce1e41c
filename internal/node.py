"""The internal node at run time: links to gateways, offers in, sessions out, load and bans.

Decisions (admit or reject an offer) are the service's; this module turns them into PNC
messages, dials the Data connection, tracks load for the gateways' balancing, and drains.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Coroutine

from edgegw.netaddr import HostPort
from edgegw.pnc import RemoteProtocolError, dataauth
from edgegw.pnc.events import (
    Accept, Ban, Closed, Load, NodeHello, Offer, PROTOCOL_VERSION, Reject, Unban,
)
from internal.audit import AuditLog
from internal.data_dial import dial_session
from internal.data_pool import DEFAULT_SIZE as DEFAULT_POOL_SIZE, DataPool
from internal.gateway_link import GatewayLink, node_tls_context
from internal.home import NodeHome
from internal.ipmatch import banned_by
from internal.metrics import GATEWAYS_ATTACHED
from internal.session import SessionContext, SessionService
from internal.store.base import BanEntry

log = logging.getLogger("edgegw.node")

RETRYABLE = {"capacity", "draining"}  # another node may take the client
LOAD_INTERVAL = 0.02                   # seconds between two load reports, at most


@dataclass
class NodeSettings:
    gateways: list[HostPort]
    capacity: int = 0
    weight: int = 100
    drain_timeout: float = 60.0
    backoff_max: float = 5.0
    node_id: str | None = None
    pool_size: int = DEFAULT_POOL_SIZE   # pre-opened Data connections per gateway (0: dial)
    data_congestion: str = ""            # TCP congestion control of Data connections ("": default)


class Node:
    def __init__(self, home: NodeHome, service: SessionService, settings: NodeSettings,
                 audit: AuditLog | None = None) -> None:
        self.home = home
        self.node_id = settings.node_id or home.node_id
        self.service = service
        self.settings = settings
        self.audit = audit
        self.draining = False
        tls = node_tls_context(home.tls_cert, home.tls_key)
        self.links = [GatewayLink(self, gw, tls, backoff_max=settings.backoff_max)
                      for gw in settings.gateways]
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct: set[asyncio.Task[None]] = set()   # sessions of direct (--listen) clients
        self._link_tasks: list[asyncio.Task[None]] = []
        self._load_timer: asyncio.TimerHandle | None = None
        self._bans: dict[str, BanEntry] = {}
        self._pools: dict[GatewayLink, DataPool] = {}
        # Sessions admitted that the service does not count yet (their Data connection is being
        # dialed, or their task has not run): capacity, load and drain must count them, or offers
        # read together all find the node free and a drain ends (and cuts off) a client just
        # accepted.
        self._starting = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._link_tasks = [asyncio.create_task(link.run_forever()) for link in self.links]

    async def drain(self) -> None:
        """No new sessions; let running ones finish (up to drain_timeout); then stop."""
        if not self.draining:
            self.draining = True
            log.info("draining: %d sessions running, waiting up to %.0fs", self.active,
                     self.settings.drain_timeout)
            self._send_load(urgent=True)
        try:
            await asyncio.wait_for(self.idle.wait(), self.settings.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout: closing %d sessions still running", self.active)

    async def close(self) -> None:
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
        for link in self.links:
            await link.stop()
        for task in self._link_tasks:
            task.cancel()
        await asyncio.gather(*self._link_tasks, return_exceptions=True)
        await self.service.close()
        if self._direct:   # disconnected by the service: let them report their end first
            await asyncio.wait(list(self._direct), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def active(self) -> int:
        """Sessions running or admitted and starting."""
        return self.service.active + self._starting

    # -- LinkOwner ------------------------------------------------------------------------

    def hello(self) -> NodeHello:
        return NodeHello(PROTOCOL_VERSION, self.node_id, self.settings.capacity,
                         self.settings.weight, self.active, self.draining)

    def on_attached(self, link: GatewayLink) -> None:
        self._count_attached()
        if self.settings.pool_size > 0:
            pool = DataPool(link, self.settings.pool_size,
                            lambda assignment, sock: self._assigned(link, assignment, sock),
                            congestion=self.settings.data_congestion)
            self._pools[link] = pool
            pool.fill()
        now = time.time()
        for entry in self._bans.values():  # a gateway that (re)attaches learns current bans
            if entry.until > now:
                link.send(Ban(entry.ip, entry.until, entry.reason))

    def _count_attached(self, leaving: GatewayLink | None = None) -> None:
        """The attached-gateways gauge (`leaving` still has its gateway while it detaches)."""
        GATEWAYS_ATTACHED.set(sum(1 for x in self.links
                                  if x.gateway is not None and x is not leaving))

    def on_detached(self, link: GatewayLink) -> None:
        self._count_attached(leaving=link)
        pool = self._pools.pop(link, None)
        if pool is not None:
            pool.close()
        log.info("detached from gateway %s", link.target)

    def on_offer(self, link: GatewayLink, offer: Offer) -> None:
        sid = f"{offer.session_id:016x}"
        log.debug("session %s: client %s:%d offered by %s", sid, offer.client_ip,
                  offer.client_port, link.gateway_id)
        pool = self._pools.get(link)
        if pool is not None:
            pool.offered()
        # expires_ms counts from when the gateway sent the offer, so it has lapsed by this
        # deadline at the latest; the gateway refuses a proof after it (its own lifetime check),
        # and a Data connection proven later would only be closed under the session.
        deadline = asyncio.get_running_loop().time() + offer.expires_ms / 1000
        if offer.expires_ms == 0:
            log.info("session %s from %s: client %s:%d: the offer has already expired", sid,
                     link.gateway_id, offer.client_ip, offer.client_port)
            link.send(Reject(offer.session_id, "offer expired", retry_elsewhere=True))
            return
        reason = self._admit(link, sid, offer.client_ip, offer.client_port)
        if reason is not None:
            link.send(Reject(offer.session_id, reason, retry_elsewhere=reason in RETRYABLE))
            return
        link.send(Accept(offer.session_id))
        self._admitted()
        self._spawn(self._dial_and_serve(link, offer, deadline))

    def _admit(self, link: GatewayLink, sid: str, ip: str, port: int) -> str | None:
        """Why the client may not start a session here, or None."""
        reason = self._refusal(ip)
        if reason is not None:
            log.info("session %s from %s: client %s:%d rejected: %s", sid, link.gateway_id,
                     ip, port, reason)
        return reason

    def _refusal(self, ip: str) -> str | None:
        """Why a client (relayed or direct) may not start a session here, or None."""
        reason = "draining" if self.draining else self.service.admit(ip)
        capacity = self.settings.capacity
        if reason is None and capacity and self.active >= capacity:
            reason = "capacity"
        return reason

    def on_closed(self, link: GatewayLink, closed: Closed) -> None:
        if self.audit is not None:
            self.audit.record("session.closed", session_id=f"{closed.session_id:016x}",
                              gateway=link.gateway_id,
                              detail={"bytes_up": closed.bytes_up, "bytes_down": closed.bytes_down,
                                      "duration_ms": closed.duration_ms, "reason": closed.reason})

    # -- bans (from the defender or the operator) -----------------------------------------

    def banned(self, ip: str) -> bool:
        """From memory: the bans last read from the store (refreshed every second); an
        unparsable address counts as banned, as with the Defender."""
        now = time.time()
        return banned_by(ip, [b.ip for b in self._bans.values() if b.until > now])

    def push_ban(self, entry: BanEntry) -> None:
        self._bans[entry.ip] = entry
        for link in self.links:
            link.send(Ban(entry.ip, entry.until, entry.reason))

    def push_unban(self, ip: str) -> None:
        self._bans.pop(ip, None)
        for link in self.links:
            link.send(Unban(ip))

    # -- sessions -------------------------------------------------------------------------

    def _assigned(self, link: GatewayLink, assignment: dataauth.Assignment,
                  sock: socket.socket) -> None:
        """The gateway handed a client to one of our pooled Data connections: answer on it."""
        session_id, ip, port = assignment
        log.debug("session %016x: client %s:%d assigned by %s", session_id, ip, port,
                  link.gateway_id)
        reason = self._admit(link, f"{session_id:016x}", ip, port)
        if reason is None:
            answer = dataauth.ANSWER_ACCEPT
        else:
            answer = dataauth.ANSWER_RETRY if reason in RETRYABLE else dataauth.ANSWER_REFUSE
        # Accepted: the SSH version line goes out with the answer, in the same segment. The
        # gateway hands the client to its relay as soon as it reads the answer, and the banner
        # is then already there to pass on, instead of following once the SSH connection is
        # set up here (a few hundred µs that the client would wait on).
        banner = self.service.banner if reason is None else b""
        message = bytes((answer,)) + banner
        try:
            sent = sock.send(message)  # a few bytes into an empty send buffer: never blocks
            if sent != len(message):
                raise OSError(f"sent {sent} of {len(message)} bytes")
        except OSError as exc:
            log.warning("session %016x: pooled data connection to %s failed: %s", session_id,
                        link.gateway_id, exc)
            reason = reason or "data connection failed"
        if reason is not None:
            sock.close()
            return
        self._admitted()
        self._spawn(self._serve(link, session_id, ip, port, sock, banner_sent=bool(banner)))

    def _admitted(self) -> None:
        """A session was admitted: it counts as active (and the node as busy) from here."""
        self._starting += 1
        self.idle.clear()

    async def _dial_and_serve(self, link: GatewayLink, offer: Offer, deadline: float) -> None:
        sock = None
        loop = asyncio.get_running_loop()
        try:
            # no longer than the offer lives: the gateway would refuse the proof
            sock = await dial_session(link.data_addr, offer.session_id, offer.secret, link.dials,
                                      deadline, self.settings.data_congestion)
        except (OSError, asyncio.TimeoutError, ConnectionError, RemoteProtocolError) as exc:
            if loop.time() >= deadline:
                log.warning("session %016x: the offer from %s expired before its Data "
                            "connection was proven; dropped", offer.session_id, link.gateway_id)
            else:
                log.warning("session %016x: could not open the Data connection to %s: %s; "
                            "the gateway tries another node", offer.session_id,
                            link.gateway_id, exc or "timeout")
                # After our Accept: the gateway takes this as the end of the offer, instead of
                # holding the client until its data timeout
                link.send(Reject(offer.session_id, "data connection failed",
                                 retry_elsewhere=True))
            return
        finally:
            if sock is None:
                self._starting -= 1   # admitted, but it will not be served
                if self.active == 0:
                    self.idle.set()
        await self._serve(link, offer.session_id, offer.client_ip, offer.client_port, sock)

    def serve_direct(self, sock: socket.socket, ip: str, port: int) -> None:
        """A client of the direct listener (`--listen`). Admitted and counted as relayed ones
        are: a drain refuses it and waits for its session, and capacity and load include it."""
        reason = self._refusal(ip)
        if reason is not None:
            log.info("refused direct connection from %s:%d: %s", ip, port, reason)
            sock.close()
            return
        self._admitted()
        ctx = SessionContext(secrets.token_hex(8), ip, port, "")
        task = self._spawn(self._run(sock, ctx))
        self._direct.add(task)
        task.add_done_callback(self._direct.discard)

    async def _serve(self, link: GatewayLink, session_id: int, ip: str, port: int,
                     sock: socket.socket, *, banner_sent: bool = False) -> None:
        ctx = SessionContext(f"{session_id:016x}", ip, port, link.gateway_id)
        await self._run(sock, ctx, banner_sent=banner_sent)

    async def _run(self, sock: socket.socket, ctx: SessionContext, *,
                   banner_sent: bool = False) -> None:
        """Serve an admitted session (counted in _starting until the service counts it)."""
        self._send_load()
        try:
            # the service counts it from here: serve_socket counts before its first await
            self._starting -= 1
            result = await self.service.serve_socket(sock, ctx, banner_sent=banner_sent)
            log.debug("session %s ended: %s", ctx.session_id, result.reason)
        finally:
            sock.close()
            if self.active == 0:
                self.idle.set()
            self._send_load()

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception())

    def _send_load(self, urgent: bool = False) -> None:
        """Coalesce load reports: at most one per LOAD_INTERVAL, whatever the churn. The
        gateway counts the sessions it pairs itself; this corrects it (ended sessions, other
        gateways' sessions). A change of draining is sent at once."""
        if urgent:
            self._flush_load()
            return
        if self._load_timer is None:
            self._load_timer = asyncio.get_running_loop().call_later(LOAD_INTERVAL,
                                                                     self._flush_load)

    def _flush_load(self) -> None:
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
        load = Load(self.active, self.settings.capacity, self.settings.weight, self.draining)
        for link in self.links:
            link.send(load)
