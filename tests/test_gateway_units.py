"""Gateway pieces without sockets: addresses, bans, least-loaded choice, offers, PNC report
batching."""
from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import time

import pytest

from edgegw.gateway import node_link
from edgegw.gateway.bans import BanTable
from edgegw.gateway.offers import OfferTable, PeerLost
from edgegw.gateway.peers import Peer, PeerRegistry
from edgegw.netaddr import HostPort, ip_in_networks, normalize_ip, parse_hostport, parse_networks
from edgegw.pnc import Connection, Role
from edgegw.pnc.events import (
    PROTOCOL_VERSION, Accept, Closed, GatewayHello, NodeHello, Offer, Ping,
)
from edgegw.sockio import free_port


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:22") == HostPort("127.0.0.1", 22)
    assert parse_hostport("[::1]:2222") == HostPort("::1", 2222)
    assert str(HostPort("::1", 1)) == "[::1]:1"
    for bad in ["nohost", "h:port", "h:70000", "::1:22", "[::1]22", ":22"]:
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_networks_and_ips() -> None:
    assert normalize_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert len(parse_networks(["10.0.0.0/8", "::1"])) == 2
    with pytest.raises(ValueError, match="not an IP"):
        parse_networks(["10.0.0.0/33"])


def test_free_port_avoids_ephemeral_range() -> None:
    """Ports for child servers must not be ones an outgoing connect can take meanwhile."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(v) for v in f.read().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    for port in ports:
        assert not low <= port <= high, port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    """Both processes start with this: two descriptors per relayed session."""
    code = ("import resource as r\n"
            "soft, hard = r.getrlimit(r.RLIMIT_NOFILE)\n"
            "r.setrlimit(r.RLIMIT_NOFILE, (256, hard))\n"
            "from edgegw.limits import raise_fd_limit\n"
            "got = raise_fd_limit()\n"
            "print(got, r.getrlimit(r.RLIMIT_NOFILE)[0], hard)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    got, soft, hard = (int(v) for v in out)
    assert got == soft and (soft == hard or hard == resource.RLIM_INFINITY) and soft > 256


def test_ban_table_expires() -> None:
    bans = BanTable()
    now = time.time()
    bans.add("10.0.0.0/24", now + 60)
    bans.add("192.0.2.1", now - 1)
    assert bans.banned("10.0.0.7", now)
    assert not bans.banned("10.0.1.7", now)
    assert not bans.banned("192.0.2.1", now)
    assert len(bans) == 1          # the expired one was forgotten
    assert bans.remove("10.0.0.0/24")
    assert not bans.banned("10.0.0.7", now)


def _peer(name: str, **kw: object) -> Peer:
    return Peer(name, "x", lambda e: None, b"k" * 32, **kw)  # type: ignore[arg-type]


async def test_least_loaded_by_weight() -> None:
    reg = PeerRegistry()
    a, b, c = _peer("a", active=4, weight=1), _peer("b", active=4, weight=4), _peer("c", draining=True)
    for p in (a, b, c):
        reg.add(p)
    assert reg.choose() is b                    # 5/4 < 5/1; c is draining
    assert reg.choose({b}) is a
    full = _peer("full", capacity=2, active=2, weight=1000)
    reg.add(full)
    assert reg.choose() is b                    # at capacity: never chosen
    picks = {reg.choose().node_id for _ in range(50)}  # type: ignore[union-attr]
    assert picks == {"b"}


async def test_offer_table_single_use_and_peer_loss() -> None:
    table = OfferTable()
    peer = _peer("a")
    offer = table.create(peer, "192.0.2.1", 1000, ttl=5)
    assert peer.pending == 1
    assert table.answer(peer, Accept(offer.session_id))
    assert not table.answer(_peer("other"), Accept(offer.session_id))
    assert table.claim(offer.session_id) is offer
    offer.data.set_result(None)  # type: ignore[arg-type]
    assert table.claim(offer.session_id) is None   # used
    second = table.create(peer, "192.0.2.1", 1001, ttl=5)
    table.fail_peer(peer)
    with pytest.raises(PeerLost):
        await second.answer
    for o in (offer, second):
        table.discard(o)
    assert peer.pending == 0 and len(table) == 0
    expired = table.create(peer, "192.0.2.1", 1002, ttl=-1)
    assert table.claim(expired.session_id) is None
    table.discard(expired)
    await asyncio.sleep(0)


class _Writer:
    """What NodeLink writes, one entry per write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False


def _link_with_node() -> tuple[node_link.NodeLink, _Writer, Connection]:
    """A NodeLink past the hellos, writing into a _Writer; and the node's end of the PNC."""
    link = node_link.NodeLink(None, None, ("127.0.0.1", 1))  # type: ignore[arg-type]
    node = Connection(Role.NODE)
    node.receive_data(link.conn.send(GatewayHello(PROTOCOL_VERSION, "gw", 1, 1000, bytes(32))))
    link.conn.receive_data(node.send(NodeHello(PROTOCOL_VERSION, "n", 10, 1, 0, False)))
    writer = _Writer()
    link.writer = writer  # type: ignore[assignment]
    return link, writer, node


async def test_session_reports_go_out_in_one_write_after_the_delay(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(node_link, "REPORT_DELAY", 0.05)
    link, writer, node = _link_with_node()
    reports = [Closed(i, 10 * i, i, 5, "eof") for i in range(1, 4)]
    for report in reports:
        link.send(report)
    assert writer.writes == []                  # held back
    await asyncio.sleep(0.15)
    assert len(writer.writes) == 1              # one write (one TLS record) for the batch
    assert node.receive_data(writer.writes[0]) == reports
    await asyncio.sleep(0.1)
    assert len(writer.writes) == 1              # the timer fired once


async def test_anything_else_goes_out_at_once_after_held_reports() -> None:
    link, writer, node = _link_with_node()
    link.send(Ping(1))
    assert node.receive_data(b"".join(writer.writes)) == [Ping(1)]
    link.send(Closed(7, 1, 2, 3, "eof"))
    offer = Offer(8, bytes(32), "192.0.2.1", 4000, 1000)
    link.send(offer)
    assert len(writer.writes) == 2
    assert node.receive_data(writer.writes[1]) == [Closed(7, 1, 2, 3, "eof"), offer]
    await asyncio.sleep(node_link.REPORT_DELAY * 2)
    assert len(writer.writes) == 2              # nothing left behind to flush


def test_allow_lists_match_addresses_in_the_form_clients_arrive() -> None:
    """--proxy-protocol-from and --metrics-allow: an IPv4-mapped network matches IPv4 clients,
    a zoned one the zoneless address, and a mapped client address an IPv4 network."""
    assert ip_in_networks("10.1.2.3", parse_networks(["::ffff:10.0.0.0/104"]))
    assert ip_in_networks("fe80::1", parse_networks(["fe80::1%eth0"]))
    assert ip_in_networks("::ffff:10.1.2.3", parse_networks(["10.0.0.0/8"]))
    assert not ip_in_networks("11.1.2.3", parse_networks(["::ffff:10.0.0.0/104"]))
