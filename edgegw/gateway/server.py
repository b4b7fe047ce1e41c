"""The gateway process: three listeners, the attached nodes, and the relay engine.

It holds no private key, reads no client byte and writes no file: decisions are the nodes',
bytes are the relay engine's.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

from edgegw.acceptor import Acceptor
from edgegw.gateway.bans import BanTable
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.data_listener import handle_data_connection
from edgegw.gateway.data_listener import log as data_log
from edgegw.gateway.dispatch import dispatch_client
from edgegw.gateway.metrics import GatewayCollector, GatewayCounters
from edgegw.gateway.node_link import NodeLink
from edgegw.gateway.offers import OfferTable
from edgegw.gateway.peers import Peer, PeerRegistry
from edgegw.gateway.proxy_accept import read_proxy_header
from edgegw.gateway.tls import NODE_TLS_NAME, gateway_context
from edgegw.logthrottle import LogThrottle
from edgegw.metrics_http import MetricsServer, registry_of
from edgegw.netaddr import ip_in_networks, normalize_ip
from edgegw.pnc.events import Closed
from edgegw.relay import RelayReport, create_relay
from edgegw.sockio import (
    ClientCongestion, listen_socket, resolve_client_congestion, resolve_congestion,
    set_keepalive, set_nodelay, set_sndbuf,
)

log = logging.getLogger("edgegw.gateway")

# A listener at its cap of unauthenticated connections says so at most this often.
CAP_LOG_EVERY = 10.0


@dataclass(slots=True)
class _Session:
    peer: Peer
    client: str
    ip: str


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.tls = gateway_context(config.trust)
        self.tls_name = NODE_TLS_NAME
        self.peers = PeerRegistry()
        self.offers = OfferTable()
        self.bans = BanTable()
        self.relay = create_relay(config.relay_backend, threads=config.relay_threads,
                                  pipe_size=config.pipe_size, idle_timeout=config.idle_timeout,
                                  fin_timeout=config.fin_timeout,
                                  procs=config.relay_procs,
                                  coalesce_us=config.relay_coalesce_us,
                                  sched_batch=config.relay_sched_batch)
        self.sessions: dict[int, _Session] = {}
        self._listeners: dict[str, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._acceptors: dict[str, Acceptor] = {}
        self._pending_clients = 0
        self._per_address: Counter[str] = Counter()   # client connections held, by source
        self._handshaking = {"pnc": 0, "data": 0}   # connections not yet authenticated
        # the same, by source address (only those with one open: the table cannot grow)
        self._handshaking_from: dict[str, Counter[str]] = {"pnc": Counter(), "data": Counter()}
        self.log_limited = LogThrottle(log)   # lines a flood of connections would repeat
        self.data_log = LogThrottle(data_log)
        self._cap_log = LogThrottle(log, CAP_LOG_EVERY)
        self.counters = GatewayCounters()
        self.metrics: MetricsServer | None = None
        self._client_cc = ClientCongestion("", "", "")   # start() resolves the configured one

    @property
    def pending_clients(self) -> int:
        """Clients accepted and waiting for a node."""
        return self._pending_clients

    @property
    def handshaking(self) -> dict[str, int]:
        """PNC and Data connections accepted and not yet authenticated, per listener."""
        return dict(self._handshaking)

    @property
    def data_port(self) -> int:
        return self._listeners["data"].getsockname()[1]

    def address(self, name: str) -> tuple[str, int]:
        """Bound address of the 'external', 'pnc' or 'data' listener (port 0 resolved)."""
        return self._listeners[name].getsockname()[:2]

    async def start(self) -> None:
        cfg = self.config
        self._client_cc = resolve_client_congestion(cfg.congestion_client)
        node_cc, node_said = resolve_congestion(cfg.congestion_node)
        for name, addr, cc in (("external", cfg.external, self._client_cc.listener),
                               ("pnc", cfg.pnc, ""),
                               ("data", cfg.data, node_cc)):
            self._listeners[name] = listen_socket(addr, cfg.backlog, congestion=cc)
        if cfg.metrics is not None:
            self.metrics = MetricsServer(cfg.metrics, registry_of(GatewayCollector(self)))
            await self.metrics.start()
        self.relay.start(self._on_relay_finished)
        handlers: dict[str, Callable[[socket.socket, tuple], Awaitable[None]]] = {
            "external": self._on_client, "pnc": self._on_node, "data": self._on_data}
        for name, handler in handlers.items():
            acceptor = Acceptor(name, self._listeners[name], functools.partial(
                self._spawn_handler, name, handler))
            acceptor.start()
            self._acceptors[name] = acceptor
        log.info("gateway %s listening: external=%s pnc=%s data=%s relay=%s loop=%s",
                 cfg.gateway_id, _fmt(self.address("external")), _fmt(self.address("pnc")),
                 _fmt(self.address("data")),
                 self.relay.backend + (f" in {cfg.relay_procs} processes" if cfg.relay_procs
                                       else ""),
                 type(asyncio.get_running_loop()).__module__.split(".")[0])
        log.info("TCP congestion control: clients %s; Data connections %s",
                 self._client_cc.said, node_said)

    async def close(self) -> None:
        for acceptor in self._acceptors.values():
            acceptor.close()
        for sock in self._listeners.values():
            sock.close()
        if self.metrics is not None:
            await self.metrics.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self.peers.peers:
            self.detach(peer)
        await self.relay.close()
        log.info("gateway %s stopped", self.config.gateway_id)

    # -- accepted connections ------------------------------------------------------------

    def _spawn_handler(self, name: str,
                       handler: Callable[[socket.socket, tuple], Awaitable[None]],
                       sock: socket.socket, addr: tuple) -> None:
        if name in self._handshaking:   # counted here, so that the cap holds within a batch
            if not self._handshake_started(name, addr[0]):
                sock.close()
                return
        task = asyncio.create_task(self._guarded(name, handler, sock, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, name: str,
                       handler: Callable[[socket.socket, tuple], Awaitable[None]],
                       sock: socket.socket, addr: tuple) -> None:
        """Run one connection's handler; a bug in it closes that connection, not the gateway."""
        try:
            await handler(sock, addr)
        except asyncio.CancelledError:
            sock.close()  # no-op once the relay has detached it
            raise
        except Exception:
            log.exception("%s connection from %s: internal error; closed it", name, addr[0])
            sock.close()  # no-op once the relay has detached it

    async def _on_client(self, sock: socket.socket, addr: tuple) -> None:
        # an IPv4 listener's peer address is already canonical; IPv6 may be v4-mapped
        ip = addr[0] if sock.family == socket.AF_INET else normalize_ip(addr[0])
        port = addr[1]
        if self.config.proxy_protocol_from and ip_in_networks(ip, self.config.proxy_protocol_from):
            real = await read_proxy_header(sock, ip, port, self.log_limited)
            if real is None:
                self.counters.refused["proxy_header"] += 1
                sock.close()
                return
            ip, port = real
        if self.bans.banned(ip):
            self.log_limited.log("banned", logging.INFO, "client %s:%d dropped: address is banned",
                                 ip, port)
            self.counters.refused["banned"] += 1
            sock.close()
            return
        cap = self.config.max_per_address
        if cap and self._per_address[ip] >= cap:
            self.log_limited.log("address_limit", logging.INFO,
                                 "client %s:%d dropped: %d connections from that address "
                                 "already (--max-per-address)", ip, port, self._per_address[ip])
            self.counters.refused["address_limit"] += 1
            sock.close()
            return
        if self._pending_clients >= self.config.max_pending:
            self.log_limited.log("waiting_limit", logging.WARNING,
                                 "client %s:%d dropped: %d clients already waiting for a node",
                                 ip, port, self._pending_clients)
            self.counters.refused["waiting_limit"] += 1
            sock.close()
            return
        set_nodelay(sock)
        set_sndbuf(sock, self.config.sndbuf_client)
        cc = self._client_cc.settle(sock)   # before the relay sends it anything
        self.counters.client_congestion[cc or "kernel"] += 1
        self._pending_clients += 1
        self._per_address[ip] += 1
        relayed = False
        try:
            relayed = await dispatch_client(self, sock, ip, port)
        finally:
            self._pending_clients -= 1
            if not relayed:   # else the relay's report of the session's end releases it
                self._release_address(ip)

    def _release_address(self, ip: str) -> None:
        self._per_address[ip] -= 1
        if self._per_address[ip] <= 0:
            del self._per_address[ip]   # a table of every address ever seen would only grow

    async def _on_node(self, sock: socket.socket, addr: tuple) -> None:
        # Counted as handshaking by _spawn_handler; NodeLink.run says once, whatever happens,
        # when the TLS handshake verified the node or failed.
        set_nodelay(sock)  # asyncio only does it for sockets made with proto=IPPROTO_TCP
        await NodeLink(self, sock, addr).run(
            on_authenticated=lambda: self._authenticated("pnc", addr[0]))

    async def _on_data(self, sock: socket.socket, addr: tuple) -> None:
        try:
            set_nodelay(sock)
            set_sndbuf(sock, self.config.sndbuf_node)  # its congestion control: the listener's
            set_keepalive(sock)  # pooled ones idle between sessions
            await handle_data_connection(self, sock, addr)
        finally:
            self._authenticated("data", addr[0])

    def _handshake_started(self, name: str, ip: str) -> bool:
        """Unauthenticated connections cost a task each until their deadline: at the cap the
        listener stops accepting, and the next ones wait in the kernel's backlog until one
        ends. Dropping them instead dropped a node's own Data connections whenever a burst of
        clients made it dial faster than the gateway's loop took the proofs.

        One source address may hold only max_handshaking_per_address of them: more are closed
        here (False), so that one host cannot fill the cap and leave the nodes in the backlog.
        """
        per_address = self.config.max_handshaking_per_address
        held = self._handshaking_from[name]
        if per_address and held[ip] >= per_address:
            self.log_limited.log(f"{name}_address_limit", logging.WARNING,
                                 "%s connection from %s closed: %d from that address not yet "
                                 "authenticated (--max-handshakes-per-address)", name, ip,
                                 held[ip])
            self.counters.handshakes_refused[name] += 1
            return False
        held[ip] += 1
        self._handshaking[name] += 1
        acceptor = self._acceptors.get(name)
        if self._handshaking[name] >= self.config.max_handshaking and acceptor is not None \
                and not acceptor.paused:
            acceptor.pause()   # a flood pauses it again each time a slot frees
            self._cap_log.log(name, logging.WARNING,
                              "%s listener: %d connections not yet authenticated; accepting "
                              "more once one is (said once per %.0fs)", name,
                              self._handshaking[name], CAP_LOG_EVERY)
        return True

    def _authenticated(self, name: str, ip: str) -> None:
        held = self._handshaking_from[name]
        held[ip] -= 1
        if held[ip] <= 0:
            del held[ip]
        self._handshaking[name] -= 1
        acceptor = self._acceptors.get(name)
        if self._handshaking[name] < self.config.max_handshaking and acceptor is not None \
                and acceptor.paused:
            log.debug("%s listener: accepting again", name)
            acceptor.resume()

    # -- called by links and dispatch -------------------------------------------------------

    def attach(self, peer: Peer) -> None:
        self.peers.add(peer)

    def detach(self, peer: Peer) -> None:
        if peer.alive or peer in self.peers.peers:
            self.peers.remove(peer)
            self.offers.fail_peer(peer)
        peer.drop_pool()

    def ban(self, ip: str, until: float, reason: str, peer: Peer) -> None:
        try:
            self.bans.add(ip, until)
        except ValueError:
            log.warning("node %s sent a ban for invalid address %r; ignored", peer.node_id, ip)
            return
        log.info("ban %s for %.0fs (from node %s: %s)", ip, until - time.time(), peer.node_id,
                 reason)

    def unban(self, ip: str, peer: Peer) -> None:
        try:
            if self.bans.remove(ip):
                log.info("ban on %s lifted by node %s", ip, peer.node_id)
        except ValueError:
            log.warning("node %s sent an unban for invalid address %r; ignored", peer.node_id, ip)

    def start_session(self, session_id: int, peer: Peer, client: socket.socket,
                      data: socket.socket, ip: str, port: int) -> bool:
        """Hand the pair to the relay; False (both sockets closed, logged) if it refused."""
        try:
            self.relay.add(session_id, client, data)
        except Exception as exc:  # engine out of memory, relay process gone, ...
            log.error("session %016x: client %s:%d closed: the relay cannot take it: %s",
                      session_id, ip, port, exc)
            client.close()
            data.close()   # the node sees its Data connection end
            self.counters.refused["relay_error"] += 1
            return False
        self.sessions[session_id] = _Session(peer, f"{ip}:{port}", ip)
        peer.active += 1  # until the node's next Load report says otherwise
        log.debug("session %016x: client %s:%d paired with node %s", session_id, ip, port,
                  peer.node_id)
        return True

    def _on_relay_finished(self, report: RelayReport) -> None:
        info = self.sessions.pop(report.session_id, None)
        if info is not None:
            self._release_address(info.ip)
        self.counters.session_finished(report)
        log.info("session %016x: client %s closed (%s%s) up=%d down=%d in %.1fs, node %s",
                 report.session_id, info.client if info else "?", report.reason.value,
                 f": {report.error}" if report.error else "", report.bytes_a_to_b,
                 report.bytes_b_to_a, report.duration, info.peer.node_id if info else "?")
        if info is not None and info.peer.alive:
            info.peer.send(Closed(report.session_id, report.bytes_a_to_b, report.bytes_b_to_a,
                                  int(report.duration * 1000), report.reason.value))


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


async def run_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    gw = Gateway(config)
    await gw.start()
    try:
        await stop.wait()
    finally:
        await gw.close()
