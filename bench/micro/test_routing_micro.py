"""The gateway's per-client decisions: pick the least-loaded node, open and settle an offer."""
from __future__ import annotations

import asyncio

import pytest

from edgegw.gateway.offers import OfferTable
from edgegw.gateway.peers import Peer, PeerRegistry
from edgegw.pnc.events import Accept


def _registry(n: int) -> PeerRegistry:
    reg = PeerRegistry()
    for i in range(n):
        reg.add(Peer(f"node-{i}", "x", lambda e: None, b"k" * 32, active=i % 7, weight=1 + i % 3))
    return reg


@pytest.mark.parametrize("nodes", [2, 16, 128])
def test_choose_least_loaded(benchmark, nodes: int) -> None:  # type: ignore[no-untyped-def]
    reg = _registry(nodes)
    peer = benchmark(reg.choose)
    assert peer is not None and peer.load == min(p.load for p in reg.peers)


def test_offer_create_answer_discard(benchmark) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    table = OfferTable()
    peer = Peer("node", "x", lambda e: None, b"k" * 32)

    async def one() -> None:
        offer = table.create(peer, "198.51.100.7", 40000, ttl=5.0)
        assert table.answer(peer, Accept(offer.session_id))
        table.discard(offer)

    try:
        benchmark(lambda: loop.run_until_complete(one()))
        assert len(table) == 0 and peer.pending == 0
    finally:
        loop.close()
