"""Failover inside the gateway, over real sockets and its relay engine: a client whose node
went away while the gateway waited on it goes to the next node at once."""
from __future__ import annotations

import asyncio
from pathlib import Path

from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.dispatch import POOL_ANSWER_TIMEOUT, dispatch_client
from edgegw.gateway.peers import Peer, PooledData
from edgegw.gateway.server import Gateway
from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.pnc.events import Event, Offer
from edgegw.sockio import recv_exact
from tests.relay_helpers import Listener, recv_exactly

KEY = bytes(range(32))
NONCE = bytes(range(50, 82))
OFFER_TIMEOUT = 3.0


async def test_a_node_detached_during_a_pooled_assignment_is_not_offered_the_client(
        node_home: Path) -> None:
    """Node a is chosen and its pooled connection stays silent (it hangs); its heartbeat
    detaches it meanwhile. The client used to be offered to a anyway, over a link that was
    gone, and waited the whole --offer-timeout before node b got it; now b gets it as soon as
    the silence is noticed."""
    here = HostPort("127.0.0.1", 0)
    gw = Gateway(GatewayConfig(here, here, here, node_home / "gateway-trust.pem",
                               offer_timeout=OFFER_TIMEOUT))
    gw.relay.start(gw._on_relay_finished)
    sent_a: list[Event] = []
    a = Peer("a", "127.0.0.1:1", sent_a.append, KEY)
    b = Peer("b", "127.0.0.1:2", lambda event: None, KEY, active=1)   # a is less loaded
    listener = Listener()
    ours = []
    try:
        for peer in (a, b):
            node_end, gw_end = listener.pair()
            gw_end.setblocking(False)
            peer.pool.append(PooledData(gw_end, NONCE, 9))
            ours.append(node_end)
            gw.attach(peer)
        silent_a, node_b = ours
        client_far, client = listener.pair()
        client.setblocking(False)
        ours.append(client_far)

        async def node_b_accepts() -> None:
            wire = await recv_exact(node_b, dataauth.ASSIGN_LEN)
            assert dataauth.parse_assignment(wire, KEY, NONCE, 9).client_port == 40000
            await asyncio.get_running_loop().sock_sendall(
                node_b, bytes((dataauth.ANSWER_ACCEPT,)))

        accepted = asyncio.create_task(node_b_accepts())
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, gw.detach, a)   # a's heartbeat gives up on it
        t0 = loop.time()
        assert await dispatch_client(gw, client, "192.0.2.1", 40000)
        elapsed = loop.time() - t0
        await accepted
        assert not any(isinstance(e, Offer) for e in sent_a)   # nothing offered to a
        assert elapsed < POOL_ANSWER_TIMEOUT + OFFER_TIMEOUT / 2, elapsed
        # and the client is b's: its bytes reach b through the relay
        await loop.sock_sendall(client_far, b"SSH-2.0-client\r\n")
        assert await recv_exactly(node_b, 16) == b"SSH-2.0-client\r\n"
        assert a.pending == 0 and not a.pool and len(gw.offers) == 0
    finally:
        for s in ours:
            s.close()
        listener.close()
        await gw.relay.close()
