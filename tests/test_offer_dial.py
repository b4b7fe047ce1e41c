"""An offered session's Data connection, over real sockets: the node's dial (dialed again when
the gateway closes it unproven, at most MAX_DIALS at once per link) and the gateway's wait for
it (a Reject after the Accept ends that wait at once)."""
from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from edgegw.gateway.dispatch import _offer_to
from edgegw.gateway.offers import OfferTable
from edgegw.gateway.peers import Peer
from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.pnc.events import Accept, Event, Offer, Reject
from internal import data_dial
from internal.data_dial import dial_session, dial_slots

SECRET = bytes(range(32))
SID = 0x1234


async def _challenge_and_check(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> bool:
    """The gateway's side of a session proof: challenge, then check the answer."""
    nonce, challenge = dataauth.make_challenge()
    writer.write(challenge)
    proof = dataauth.parse_proof(await reader.readexactly(dataauth.PROOF_LEN))
    return dataauth.verify_session_proof(proof, SECRET, nonce)


async def test_a_session_dial_closed_before_its_challenge_is_dialed_again() -> None:
    """The gateway closes Data connections beyond its per-address handshake cap at accept: the
    node dials again while the offer lives, and the proof then goes through."""
    attempts = 0
    proven = asyncio.Event()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            writer.close()                   # refused at the cap
            return
        if await _challenge_and_check(reader, writer):
            proven.set()
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        sock = await dial_session(HostPort("127.0.0.1", port), SID, SECRET, dial_slots(),
                                  loop.time() + 5)
        await asyncio.wait_for(proven.wait(), 5)
        assert attempts == 3
        sock.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_session_dial_gives_up_when_the_offer_ends() -> None:
    closes = 0

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closes
        closes += 1
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        with pytest.raises(ConnectionError):
            await dial_session(HostPort("127.0.0.1", port), SID, SECRET, dial_slots(), t0 + 0.4)
        assert loop.time() - t0 < 0.4 + 0.2
        assert 2 <= closes <= 10             # dialed again, with pauses between
    finally:
        server.close()
        await server.wait_closed()


async def test_a_link_has_at_most_max_dials_unproven_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A burst of offers must not become a burst of dials beyond what the gateway takes from
    one address: the rest wait for a slot."""
    monkeypatch.setattr(data_dial, "MAX_DIALS", 4)
    slots = dial_slots()
    held: list[asyncio.StreamWriter] = []
    release = asyncio.Event()
    peak = 0
    connected = 0

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal peak, connected
        connected += 1
        peak = max(peak, connected)
        await release.wait()                 # the challenge comes late: each dial holds a slot
        connected -= 1
        await _challenge_and_check(reader, writer)
        held.append(writer)

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    addr = HostPort("127.0.0.1", port)
    dials = [asyncio.create_task(dial_session(addr, SID, SECRET, slots, loop.time() + 10))
             for _ in range(12)]
    try:
        await asyncio.sleep(0.3)
        assert connected == 4 and peak == 4
        release.set()
        socks = await asyncio.wait_for(asyncio.gather(*dials), 10)
        assert len(socks) == 12 and peak == 4
        for s in socks:
            s.close()
    finally:
        release.set()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_reject_after_the_accept_fails_over_at_once() -> None:
    """A node that accepted an offer and then could not open its Data connection says so; the
    gateway offers the client elsewhere at once instead of after its data timeout."""
    sent: list[Event] = []
    peer = Peer("n1", "x", sent.append, bytes(32))
    gw = SimpleNamespace(config=SimpleNamespace(offer_timeout=2.0, data_timeout=5.0),
                         offers=OfferTable(), sessions={})
    loop = asyncio.get_running_loop()

    async def node() -> None:
        while not sent:
            await asyncio.sleep(0.01)
        offer, = sent
        assert isinstance(offer, Offer)
        assert gw.offers.answer(peer, Accept(offer.session_id))
        await asyncio.sleep(0.05)
        assert gw.offers.answer(peer, Reject(offer.session_id, "data connection failed", True))
        # a second one is for an offer that is over
        assert not gw.offers.answer(peer, Reject(offer.session_id, "again", True))

    t0 = loop.time()
    answering = asyncio.create_task(node())
    result = await _offer_to(gw, peer, "192.0.2.1", 1000, "c")  # type: ignore[arg-type]
    await answering
    assert result is None                    # try another node
    assert loop.time() - t0 < 1.0
    assert len(gw.offers) == 0 and peer.pending == 0


async def test_a_reject_after_the_data_connection_changes_nothing() -> None:
    table = OfferTable()
    peer = Peer("n1", "x", lambda e: None, bytes(32))
    offer = table.create(peer, "192.0.2.1", 1000, 5.0)
    assert table.answer(peer, Accept(offer.session_id))
    a, b = socket.socketpair()
    claimed = table.claim(offer.session_id)
    assert claimed is offer
    offer.data.set_result(a)
    assert not table.answer(peer, Reject(offer.session_id, "late", True))
    assert offer.data.result() is a
    other = Peer("n2", "y", lambda e: None, bytes(32))
    assert not table.answer(other, Reject(offer.session_id, "not its offer", True))
    a.close()
    b.close()
    table.discard(offer)
