"""Attached nodes and how the gateway picks one for a new client (least loaded by weight)."""
from __future__ import annotations

import asyncio
import random
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from edgegw.pnc.events import Event


# Pre-opened Data connections the gateway holds for one node (one PNC peer: each worker of a
# node is its own peer, with its own pool key). A node keeps --pool-size of them (default 32,
# at most 256); twice that maximum leaves room for replacements crossing used ones, while a
# node whose refill loops cannot take the gateway's descriptor table from the clients.
MAX_POOLED = 512


class PooledData(NamedTuple):
    """A pre-opened Data connection, with what its assignment must be bound to."""

    sock: socket.socket
    nonce: bytes     # the challenge nonce this connection was proven over
    ident: int       # the node's id for it


@dataclass(eq=False)
class Peer:
    """One node attached over one PNC connection."""

    node_id: str
    address: str
    send: Callable[[Event], None]
    pool_key: bytes
    capacity: int = 0
    weight: int = 1
    active: int = 0               # sessions the node reports running
    draining: bool = False
    pending: int = 0              # offers sent, not yet answered or paired
    alive: bool = True
    answered_ping: float = 0.0    # monotonic send time of the newest Ping the node answered
    pool: deque[PooledData] = field(default_factory=deque)  # pre-opened Data connections

    @property
    def load(self) -> float:
        return (self.active + self.pending + 1) / max(self.weight, 1)

    def available(self) -> bool:
        if not self.alive or self.draining:
            return False
        return self.capacity <= 0 or self.active + self.pending < self.capacity

    def drop_pool(self) -> int:
        """Close every pre-opened Data connection held for this node; returns how many."""
        dropped = len(self.pool)
        while self.pool:
            self.pool.popleft().sock.close()
        return dropped

    def describe(self) -> str:
        return f"{self.node_id}@{self.address}"


class PeerRegistry:
    def __init__(self) -> None:
        self._peers: list[Peer] = []
        self._changed = asyncio.Event()

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers)

    def add(self, peer: Peer) -> None:
        self._peers.append(peer)
        self.changed()

    def find(self, node_id: str) -> Peer | None:
        """The attached peer with this node id, if any."""
        return next((p for p in self._peers if p.node_id == node_id), None)

    def remove(self, peer: Peer) -> None:
        peer.alive = False
        if peer in self._peers:
            self._peers.remove(peer)
        self.changed()

    def changed(self) -> None:
        """Wake clients waiting for a node (a node attached, or its load/drain state moved)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def choose(self, exclude: set[Peer] | frozenset[Peer] = frozenset()) -> Peer | None:
        """The least-loaded available peer by weight; ties broken at random."""
        best: list[Peer] = []
        best_load = 0.0
        for peer in self._peers:
            if peer in exclude or not peer.available():
                continue
            load = peer.load
            if not best or load < best_load:
                best, best_load = [peer], load
            elif load == best_load:
                best.append(peer)
        return random.choice(best) if best else None

    async def wait_changed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
