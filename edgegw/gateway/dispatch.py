"""One external client, from accept to hand-off: choose a node, offer, fail over, pair.

The client's bytes are never read here; its SSH banner waits in the kernel until the relay
engine starts moving it.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from edgegw.gateway.offers import PeerLost, PendingOffer
from edgegw.gateway.peers import Peer
from edgegw.pnc import dataauth
from edgegw.pnc.events import Offer, Reject

if TYPE_CHECKING:
    from edgegw.gateway.server import Gateway

log = logging.getLogger("edgegw.gateway.session")


async def dispatch_client(gw: "Gateway", sock: socket.socket, ip: str, port: int) -> None:
    cfg = gw.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.grace_period
    tried: set[Peer] = set()
    who = f"{ip}:{port}"
    try:
        while True:
            peer = gw.peers.choose(tried)
            if peer is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("client %s: no node available for %.0fs; closed", who,
                                cfg.grace_period)
                    return
                await gw.peers.wait_changed(min(remaining, 0.5))
                tried = {p for p in tried if p.alive}  # a node may have freed capacity
                if not gw.peers.choose(tried):
                    tried.clear()
                continue
            data = await _offer_to(gw, peer, ip, port, who)
            if data is None:
                tried.add(peer)
                continue
            if data is False:
                return
            session_id, data_sock = data
            gw.start_session(session_id, peer, sock, data_sock, ip, port)
            sock = None  # type: ignore[assignment]  # owned by the relay now
            return
    finally:
        if sock is not None:
            sock.close()


async def _offer_to(gw: "Gateway", peer: Peer, ip: str, port: int,
                    who: str) -> tuple[int, socket.socket] | None | bool:
    """Offer the client to one node. (id, data socket) if paired; None: try another; False: give up."""
    cfg = gw.config
    lifetime = cfg.offer_timeout + cfg.data_timeout  # answer, then prove the Data connection
    offer = gw.offers.create(peer, ip, port, lifetime)
    paired = False
    t0 = time.perf_counter()
    try:
        peer.send(Offer(offer.session_id, offer.secret, ip, port,
                        int(lifetime * 1000)))
        log.debug("client %s: offered as %016x to node %s", who, offer.session_id, peer.node_id)
        try:
            answer = await asyncio.wait_for(asyncio.shield(offer.answer), cfg.offer_timeout)
        except asyncio.TimeoutError:
            log.warning("client %s: node %s did not answer offer %016x within %.1fs; "
                        "trying another node", who, peer.node_id, offer.session_id,
                        cfg.offer_timeout)
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
        if answer.pooled:
            data_sock = await _take_pooled(gw, peer, cfg.data_timeout)
            try:
                await asyncio.get_running_loop().sock_sendall(
                    data_sock, dataauth.encode_assignment(offer.session_id))
            except OSError:
                data_sock.close()
                raise
        else:
            data_sock = await asyncio.wait_for(asyncio.shield(offer.data), cfg.data_timeout)
        paired = True
        log.debug("client %s: offer %016x paired in %.2f ms", who, offer.session_id,
                  (time.perf_counter() - t0) * 1000)
        return offer.session_id, data_sock
    except asyncio.TimeoutError:
        log.warning("client %s: node %s accepted offer %016x but never proved a Data "
                    "connection; trying another node", who, peer.node_id, offer.session_id)
        return None
    except PeerLost:
        log.warning("client %s: node %s went away during the offer; trying another node",
                    who, peer.node_id)
        return None
    except (ConnectionError, OSError) as exc:
        log.warning("client %s: pooled data connection of %s failed (%s); trying another node",
                    who, peer.node_id, exc)
        return None
    finally:
        if not paired:
            _close_unused_data(offer)
        gw.offers.discard(offer)


async def _take_pooled(gw: "Gateway", peer: Peer, timeout: float) -> socket.socket:
    """One of the peer's pre-opened Data connections; the node may still be proving it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not peer.pool:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise asyncio.TimeoutError
        if not peer.alive:
            raise PeerLost(peer.describe())
        await gw.peers.wait_changed(remaining)
    sock = peer.pool.popleft()
    gw.peers.changed()
    return sock


def _close_unused_data(offer: PendingOffer) -> None:
    """A Data socket that arrived for an offer we gave up on must not leak."""
    fut = offer.data
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        fut.result().close()
