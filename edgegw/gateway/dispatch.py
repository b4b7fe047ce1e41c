"""One external client, from accept to hand-off: choose a node, offer, fail over, pair.

A node with a pre-opened Data connection gets the client at once: the assignment written on that
connection carries the client's address, and the node answers with one byte on it (no PNC round
trip). Otherwise, or when a pooled connection stays silent, the client is offered over the PNC
and the node dials a Data connection for it.
The client's bytes are never read here; its SSH banner waits in the kernel until the relay
engine starts moving it.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Literal, TypeVar

from edgegw.gateway.offers import DataFailed, PeerLost, PendingOffer
from edgegw.gateway.peers import Peer, PooledData
from edgegw.pnc import RemoteProtocolError, dataauth
from edgegw.pnc.events import Offer, Reject

if TYPE_CHECKING:
    from edgegw.gateway.server import Gateway

log = logging.getLogger("edgegw.gateway.session")

T = TypeVar("T")
Paired = tuple[int, socket.socket]   # an offer's answer: the session id and its Data socket


async def dispatch_client(gw: "Gateway", sock: socket.socket, ip: str, port: int) -> bool:
    """True once the client is the relay's; False when it was closed here (logged)."""
    cfg = gw.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.grace_period
    tried: set[Peer] = set()
    failed = 0   # offers and assignments that came to nothing
    who = f"{ip}:{port}"
    try:
        while True:
            peer = gw.peers.choose(tried)
            if peer is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if failed:
                        log.warning("client %s: no node took it within %.0fs (%d attempts "
                                    "failed, above); closed", who, cfg.grace_period, failed)
                    else:
                        log.warning("client %s: no node available for %.0fs; closed", who,
                                    cfg.grace_period)
                    gw.counters.refused["no_node"] += 1
                    return False
                await gw.peers.wait_changed(min(remaining, 0.5))
                tried = {p for p in tried if p.alive}  # a node may have freed capacity
                if not gw.peers.choose(tried):
                    tried.clear()
                continue
            # The client's last option: a busy node is waited for (see _await_answer)
            hold = deadline if gw.peers.choose(tried | {peer}) is None else None
            if peer.pool:
                data = await _assign_pooled(gw, peer, ip, port, who, hold)
            else:
                data = await _offer_to(gw, peer, ip, port, who, hold)
            if data is None:
                tried.add(peer)
                failed += 1
                continue
            if data is False:
                gw.counters.refused["rejected"] += 1
                return False
            session_id, data_sock = data
            relayed = gw.start_session(session_id, peer, sock, data_sock, ip, port)
            sock = None  # type: ignore[assignment]  # the relay's, or closed by start_session
            return relayed
    finally:
        if sock is not None:
            sock.close()


async def _await_answer(peer: Peer, attempt: Callable[[], Awaitable[T]], timeout: float,
                        hold_until: float | None) -> T:
    """What `attempt()` awaits (the node's answer), within `timeout`; asyncio.TimeoutError if not.

    With `hold_until` (loop time: the node is the client's last option, and the client may wait
    that long), an answer still missing is waited for while the node shows no sign that its
    loop has run since it was asked: no Ping sent after that has been answered. Such a node is
    busy (a burst of SSH handshakes on few CPUs), not one that lost the message, and giving up
    on it cycled the client between equally busy nodes, each attempt adding to their work,
    until its grace period ran out. A node that answers Pings but not this has lost it; one
    that answers nothing is detached by the heartbeat."""
    loop = asyncio.get_running_loop()
    asked = time.monotonic()
    try:
        return await asyncio.wait_for(attempt(), timeout)
    except asyncio.TimeoutError:
        if hold_until is None:
            raise
    seen_alive = False
    while peer.alive and not seen_alive and loop.time() < hold_until:
        seen_alive = peer.answered_ping > asked   # then one last poll: its answer may travel
        try:                                      # with its Pong
            return await asyncio.wait_for(attempt(),
                                          min(SLOW_NODE_POLL, hold_until - loop.time()))
        except asyncio.TimeoutError:
            pass
    raise asyncio.TimeoutError


async def _offer_to(gw: "Gateway", peer: Peer, ip: str, port: int, who: str,
                    hold: float | None = None) -> Paired | None | Literal[False]:
    """Offer the client to one node. (id, data socket) if paired; None: try another; False: give
    up. `hold`: see _await_answer."""
    if not peer.alive:
        # Detached while a pooled connection of its was tried: its link is gone, so an offer
        # would go nowhere, and fail_peer (which ends open offers at once) has already run.
        log.info("client %s: node %s was detached; trying another node", who, peer.node_id)
        return None
    cfg = gw.config
    lifetime = cfg.offer_timeout + cfg.data_timeout  # answer, then prove the Data connection
    offer = gw.offers.create(peer, ip, port, lifetime, gw.sessions)
    paired = False
    t0 = time.perf_counter()
    try:
        peer.send(Offer(offer.session_id, offer.secret, ip, port,
                        int(lifetime * 1000)))
        log.debug("client %s: offered as %016x to node %s", who, offer.session_id, peer.node_id)
        if hold is not None:   # not past the offer's lifetime
            hold = min(hold, asyncio.get_running_loop().time() + offer.expires - time.monotonic())
        try:
            answer = await _await_answer(peer, lambda: asyncio.shield(offer.answer),
                                         cfg.offer_timeout, hold)
        except asyncio.TimeoutError:
            log.warning("client %s: node %s did not answer offer %016x within %.1fs; "
                        "trying another node", who, peer.node_id, offer.session_id,
                        time.perf_counter() - t0)
            return None
        log.debug("client %s: node %s answered offer %016x in %.2f ms", who, peer.node_id,
                  offer.session_id, (time.perf_counter() - t0) * 1000)
        if isinstance(answer, Reject):
            if answer.retry_elsewhere:
                log.info("client %s: node %s declined (%s); trying another node", who,
                         peer.node_id, answer.reason)
                return None
            log.info("client %s: rejected by node %s: %s; closed", who, peer.node_id,
                     answer.reason)
            return False
        # within the offer's lifetime: a proof after it is refused
        data_sock = await asyncio.wait_for(asyncio.shield(offer.data), max(
            min(cfg.data_timeout, offer.expires - time.monotonic()), 0))
        paired = True
        log.debug("client %s: offer %016x paired in %.2f ms", who, offer.session_id,
                  (time.perf_counter() - t0) * 1000)
        return offer.session_id, data_sock
    except asyncio.TimeoutError:
        log.warning("client %s: node %s accepted offer %016x but never proved a Data "
                    "connection; trying another node", who, peer.node_id, offer.session_id)
        return None
    except DataFailed as exc:
        log.warning("client %s: node %s accepted offer %016x but could not open its Data "
                    "connection (%s); trying another node", who, peer.node_id,
                    offer.session_id, exc)
        return None
    except PeerLost:
        log.warning("client %s: node %s went away during the offer; trying another node",
                    who, peer.node_id)
        return None
    finally:
        if not paired:
            _close_unused_data(offer)
        gw.offers.discard(offer)


async def _assign_pooled(gw: "Gateway", peer: Peer, ip: str, port: int, who: str,
                         hold: float | None = None) -> Paired | None | Literal[False]:
    """Give the client to one of the peer's pre-opened Data connections; same answers as
    _offer_to. A connection found dead (the node closed it, or something on the way dropped
    it) is skipped for the peer's next one, and after the last, the client is offered."""
    while peer.pool:
        result = await _assign_on(gw, peer, peer.pool.popleft(), ip, port, who, hold)
        if result is _Unanswered.SILENT:
            # Silence, not a reset, is what a stateful firewall that lost its state table (a
            # restart, a failover) leaves behind, and every pooled connection of this node went
            # through it: drop them all rather than wait on each in turn. The node's PNC is
            # heartbeated, so offer the client there; the node dials a fresh connection.
            log.warning("node %s: a pooled data connection went silent; dropped it and the "
                        "%d others, offering over the PNC until the node opens new ones",
                        peer.node_id, peer.drop_pool())
            break
        if result is not _Unanswered.STALE:
            return result
    return await _offer_to(gw, peer, ip, port, who, hold)


class _Unanswered(enum.Enum):
    """Why _assign_on got no answer on a pooled connection."""
    STALE = "stale"     # that connection was dead before the node could answer
    SILENT = "silent"   # no answer on it in time


# A node answers an assignment from its event loop as soon as it reads it; a pooled connection
# silent for this long is taken as dead (at most the offer timeout), unless the node is the
# client's last option and looks busy (_await_answer).
POOL_ANSWER_TIMEOUT = 1.0

# How often a wait for a busy node's answer looks at its Pings again.
SLOW_NODE_POLL = 0.25



async def _assign_on(gw: "Gateway", peer: Peer, pooled: PooledData, ip: str, port: int, who: str,
                     hold: float | None) -> Paired | None | Literal[False] | _Unanswered:
    loop = asyncio.get_running_loop()
    timeout = min(POOL_ANSWER_TIMEOUT, gw.config.offer_timeout)
    session_id = gw.offers.new_id(gw.sessions)
    paired = False
    peer.pending += 1
    t0 = time.perf_counter()
    try:
        assignment = dataauth.Assignment(session_id, ip, port)
        await loop.sock_sendall(pooled.sock, dataauth.encode_assignment(
            assignment, peer.pool_key, pooled.nonce, pooled.ident))
        raw = await _await_answer(peer, lambda: loop.sock_recv(pooled.sock, 1), timeout, hold)
        if not raw:
            raise ConnectionError("closed by the node")
        answer = dataauth.parse_answer(raw)
        if answer == dataauth.ANSWER_ACCEPT:
            paired = True
            log.debug("client %s: assigned as %016x to node %s in %.2f ms", who, session_id,
                      peer.node_id, (time.perf_counter() - t0) * 1000)
            return session_id, pooled.sock
        if answer == dataauth.ANSWER_RETRY:
            log.info("client %s: node %s declined; trying another node", who, peer.node_id)
            return None
        log.info("client %s: refused by node %s (its log says why); closed", who, peer.node_id)
        return False
    except asyncio.TimeoutError:
        log.warning("client %s: node %s did not answer assignment %016x on a pooled data "
                    "connection within %.1fs", who, peer.node_id, session_id,
                    time.perf_counter() - t0)
        return _Unanswered.SILENT
    except RemoteProtocolError as exc:
        log.warning("client %s: node %s answered the assignment with garbage (%s); trying "
                    "another node", who, peer.node_id, exc)
        return None
    except (ConnectionError, OSError) as exc:
        log.info("client %s: a pooled data connection of %s was dead (%s); trying its next",
                 who, peer.node_id, exc)
        return _Unanswered.STALE
    finally:
        peer.pending -= 1
        if not paired:
            pooled.sock.close()


def _close_unused_data(offer: PendingOffer) -> None:
    """A Data socket that arrived for an offer we gave up on must not leak."""
    fut = offer.data
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        fut.result().close()
