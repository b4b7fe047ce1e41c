"""Offers in flight: single-use session secrets, the node's answer, and the Data socket."""
from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Container

from edgegw.gateway.peers import Peer
from edgegw.pnc.events import Accept, Reject


class PeerLost(Exception):
    """The node's PNC connection closed while an offer to it was open."""


class DataFailed(Exception):
    """The node accepted the offer, then rejected it: it could not open the Data connection."""


@dataclass(eq=False)
class PendingOffer:
    session_id: int
    secret: bytes
    peer: Peer
    client_ip: str
    client_port: int
    expires: float                 # monotonic; a Data proof after this is refused
    answer: asyncio.Future[Accept | Reject] = field(default_factory=asyncio.Future)
    data: asyncio.Future[socket.socket] = field(default_factory=asyncio.Future)
    accepted: bool = False


class OfferTable:
    def __init__(self) -> None:
        self._offers: dict[int, PendingOffer] = {}

    def __len__(self) -> int:
        return len(self._offers)

    def new_id(self, also_taken: Container[int] = ()) -> int:
        """A random non-zero session id used by no offer in flight nor in `also_taken`."""
        while True:
            sid = secrets.randbits(64)
            if sid and sid not in self._offers and sid not in also_taken:
                return sid

    def create(self, peer: Peer, client_ip: str, client_port: int, ttl: float,
               also_taken: Container[int] = ()) -> PendingOffer:
        sid = self.new_id(also_taken)
        offer = PendingOffer(sid, secrets.token_bytes(32), peer, client_ip, client_port,
                             time.monotonic() + ttl)
        self._offers[sid] = offer
        peer.pending += 1
        return offer

    def discard(self, offer: PendingOffer) -> None:
        if self._offers.pop(offer.session_id, None) is offer:
            offer.peer.pending -= 1
        for fut in (offer.answer, offer.data):
            if not fut.done():
                fut.cancel()

    def answer(self, peer: Peer, event: Accept | Reject) -> bool:
        """Deliver a node's answer; answers for unknown offers or from the wrong peer are ignored.
        A Reject after its Accept, before the Data connection, ends the wait for that
        connection (the node could not open it)."""
        offer = self._offers.get(event.session_id)
        if offer is None or offer.peer is not peer:
            return False
        if offer.answer.done():
            if not (offer.accepted and isinstance(event, Reject) and not offer.data.done()):
                return False
            offer.data.set_exception(DataFailed(event.reason))
            return True
        offer.accepted = isinstance(event, Accept)
        offer.answer.set_result(event)
        return True

    def claim(self, session_id: int) -> PendingOffer | None:
        """The live offer a Data connection claims to prove, or None (unknown or expired)."""
        offer = self._offers.get(session_id)
        if offer is None or offer.data.done() or time.monotonic() > offer.expires:
            return None
        return offer

    def fail_peer(self, peer: Peer) -> None:
        for offer in list(self._offers.values()):
            if offer.peer is peer:
                for fut in (offer.answer, offer.data):
                    if not fut.done():
                        fut.set_exception(PeerLost(peer.describe()))
