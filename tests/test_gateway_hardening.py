"""Gateway hardening: ban lookups that do not grow with the table, --metrics-allow enforced at
accept, a node id too long to quote whole in a Goodbye, a node that sends without reading, and
one that opens pooled Data connections without end."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from pathlib import Path

import pytest

from edgegw import metrics_http
from edgegw.gateway import node_link
from edgegw.gateway.bans import BanTable
from edgegw.gateway.peers import MAX_POOLED
from edgegw.metrics_http import MetricsEndpoint, MetricsServer, registry_of
from edgegw.netaddr import HostPort, parse_networks
from edgegw.pnc import MAX_TEXT, Connection, Role, dataauth
from edgegw.pnc.events import PROTOCOL_VERSION, Closed, GatewayHello, Goodbye, NodeHello, Ping
from tests.procs import Proc, free_port, start_gateway
from tests.test_gateway_metrics import _One, wait_for
from tests.test_gateway_units import _link_with_node

# -- bans ---------------------------------------------------------------------------------------


def test_host_and_network_bans_with_expiry() -> None:
    bans = BanTable()
    now = 1_000_000.0
    bans.add("192.0.2.1", now + 60)
    bans.add("2001:db8::1", now + 60)
    bans.add("198.51.100.0/24", now + 30)
    bans.add("2001:db8:1::/48", now + 60)
    bans.add("203.0.113.9/32", now + 60)          # a /32 is a host ban
    assert bans.banned("192.0.2.1", now) and not bans.banned("192.0.2.2", now)
    assert bans.banned("2001:db8::1", now) and not bans.banned("2001:db8::2", now)
    assert bans.banned("198.51.100.77", now) and not bans.banned("198.51.101.1", now)
    assert bans.banned("2001:db8:1::42", now) and not bans.banned("2001:db8:2::1", now)
    assert bans.banned("203.0.113.9", now)
    assert bans.banned("::ffff:192.0.2.1", now)              # IPv4-mapped: the IPv4 address
    assert bans.banned("::ffff:198.51.100.5", now)
    bans.add("::ffff:192.0.2.50", now + 60)                  # a mapped ban: the IPv4 address
    assert bans.banned("192.0.2.50", now)
    assert len(bans) == 6
    bans.add("192.0.2.1", now + 10)                          # never shortens a ban
    assert bans.banned("192.0.2.1", now + 20)
    assert not bans.banned("198.51.100.77", now + 30)       # expired at `until`
    assert len(bans) == 5                                    # and forgotten
    bans.add("198.51.100.0/24", now + 90)                    # banned again after expiry
    assert bans.banned("198.51.100.77", now + 40)
    assert bans.remove("::ffff:192.0.2.50") and not bans.banned("192.0.2.50", now + 40)
    assert not bans.remove("192.0.2.50")
    assert not bans.remove("198.51.100.77")                  # a host inside a network ban
    assert bans.remove("198.51.100.0/24") and not bans.banned("198.51.100.77", now + 40)
    assert not bans.banned("192.0.2.1", now + 61)           # every one expires
    assert not bans.banned("2001:db8:1::42", now + 61) and len(bans) == 0


def test_bans_are_stored_in_the_form_lookups_ask_for() -> None:
    """Clients are looked up without an IPv6 zone and with IPv4-mapped addresses as IPv4: a
    ban written with a zone, or as an IPv4-mapped network, must be stored that way too, or it
    never matches (and cannot be lifted by the plain address)."""
    bans = BanTable()
    now = 1_000_000.0
    bans.add("fe80::1%eth0", now + 60)
    assert bans.banned("fe80::1", now) and bans.banned("fe80::1%eth1", now)
    bans.add("fe80::1", now + 90)                            # the same ban, extended
    assert len(bans) == 1 and bans.banned("fe80::1", now + 80)
    bans.add("fe80::%eth0/64", now + 60)
    bans.add("::ffff:198.51.100.0/120", now + 60)            # IPv4-mapped: 198.51.100.0/24
    assert bans.banned("fe80::77", now) and not bans.banned("fe80:1::77", now)
    assert bans.banned("198.51.100.9", now) and bans.banned("::ffff:198.51.100.9", now)
    assert not bans.banned("198.51.101.9", now) and len(bans) == 3
    assert bans.remove("fe80::/64") and not bans.banned("fe80::77", now)
    assert bans.remove("fe80::1") and not bans.banned("fe80::1", now)
    assert bans.remove("198.51.100.0/24") and not bans.banned("198.51.100.9", now)
    assert len(bans) == 0


def test_extended_then_lifted_bans_leave_no_stale_expiry() -> None:
    """Each add() queues an expiry; bans extended or lifted many times must not keep them."""
    bans = BanTable()
    for i in range(10_000):
        bans.add("192.0.2.1", 1000.0 + i)
        bans.add(f"10.0.{i // 256}.{i % 256}", 1000.0)
        assert bans.remove(f"10.0.{i // 256}.{i % 256}")
    assert len(bans._expiry) <= 2 * len(bans) + 64
    assert bans.banned("192.0.2.1", 10_998.0) and not bans.banned("192.0.2.1", 10_999.0)
    assert len(bans) == 0 and bans._expiry == []


def test_50000_host_bans_are_looked_up_not_scanned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bans = BanTable()
    now = time.time()
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for i in range(50_000):
        bans.add(str(ipaddress.IPv4Address(base + i)), now + 3600)
    bans.add("192.0.2.0/24", now + 3600)
    checks: list[object] = []
    contains = ipaddress._BaseNetwork.__contains__  # type: ignore[attr-defined]

    def counted(net, addr):  # type: ignore[no-untyped-def]
        checks.append(net)
        return contains(net, addr)

    monkeypatch.setattr(ipaddress._BaseNetwork, "__contains__", counted)
    assert bans.banned("10.0.195.79", now)                   # the 49,999th host
    assert not bans.banned("10.1.0.0", now)
    assert bans.banned("192.0.2.7", now)
    assert len(checks) <= 3                                  # the network ban only, per lookup
    assert len(bans._networks) == 1 and len(bans) == 50_001


# -- --metrics-allow at accept --------------------------------------------------------------------


async def test_sources_off_metrics_allow_cannot_take_the_scrape_slots(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgegw.metrics")
    srv = MetricsServer(MetricsEndpoint(HostPort("127.0.0.1", 0),
                                        allow=parse_networks(["127.0.0.2/32"])),
                        registry_of(_One()))
    await srv.start()
    port = srv.address[1]
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(metrics_http.MAX_CONNECTIONS + 4):    # from 127.0.0.1, saying nothing
            _, writer = await asyncio.open_connection("127.0.0.1", port,
                                                      local_addr=("127.0.0.1", 0))
            idle.append(writer)
        await asyncio.sleep(0.1)
        assert not srv._tasks                                # none of them took a slot
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=("127.0.0.2", 0))
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"edgegw_test_value 42.0" in reply
        refused = [r.getMessage() for r in caplog.records
                   if "not in --metrics-allow" in r.getMessage()]
        assert len(refused) == 1, refused                    # one line for the whole burst
        assert "from 127.0.0.1 closed" in refused[0]
        assert not any("scrapes already open" in r.getMessage() for r in caplog.records)
    finally:
        for w in idle:
            w.close()
        await srv.close()


async def test_refused_metrics_connection_is_closed_at_once() -> None:
    srv = MetricsServer(MetricsEndpoint(HostPort("127.0.0.1", 0),
                                        allow=parse_networks(["127.0.0.2/32"])),
                        registry_of(_One()))
    await srv.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.address[1])
        try:
            got = await asyncio.wait_for(reader.read(), 2)   # EOF well before HEAD_TIMEOUT
        except ConnectionResetError:
            got = b""
        assert got == b""
        writer.close()
    finally:
        await srv.close()


# -- node ids too long to quote ------------------------------------------------------------------


def test_a_reason_over_the_cap_is_cut_to_fit() -> None:
    link, writer, node = _link_with_node()
    long = "é" * 300                                         # 600 bytes of UTF-8
    link.send(Goodbye(f"node id {long} is already attached"))
    (bye,) = node.receive_data(b"".join(writer.writes))
    assert isinstance(bye, Goodbye) and bye.reason.startswith("node id éé")
    assert len(bye.reason.encode()) <= MAX_TEXT and bye.reason.endswith("...")
    assert node_link.fit_reason("short") == "short"


def test_duplicate_long_node_id_gets_a_goodbye(tmp_path: Path, node_home: Path,
                                               procs: list[Proc]) -> None:
    """A real gateway: a second link with the same 250-byte node id is sent a Goodbye that
    fits the cap, and the gateway logs no traceback."""
    from internal.home import NodeHome   # the node's certificate, as a node presents it
    home = NodeHome(node_home, "", "", node_home)
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(home.tls_cert, home.tls_key)
    hello = NodeHello(PROTOCOL_VERSION, "n" * 250, 10, 1, 0, False)
    links: list[ssl.SSLSocket] = []

    def link() -> tuple[ssl.SSLSocket, Connection]:
        raw = socket.create_connection(("127.0.0.1", gw.pnc), timeout=10)
        tls = ctx.wrap_socket(raw, server_side=True)         # the gateway is the TLS client
        links.append(tls)
        conn = Connection(Role.NODE)
        tls.sendall(conn.send(hello))
        return tls, conn

    try:
        link()
        gw.wait_log(r"node n+ attached from")
        tls, conn = link()
        events: list[object] = []
        while data := tls.recv(65536):                       # until the gateway closes it
            events += conn.receive_data(data)
        assert isinstance(events[0], GatewayHello) and isinstance(events[-1], Goodbye)
        reason = events[-1].reason
        assert reason.startswith("node id 'nnn") and "is already attached" in reason
        assert len(reason.encode()) <= MAX_TEXT
        gw.wait_log(r"pnc peer \S+ refused: node id 'n+\.\.\. is already attached")
        text = gw.text()
        assert "Traceback" not in text and "internal error" not in text
    finally:
        for tls in links:
            tls.close()
    assert gw.stop() == 0


async def test_session_reports_with_long_reasons_still_go_out() -> None:
    link, writer, node = _link_with_node()
    link.send(Closed(1, 2, 3, 4, "ü" * MAX_TEXT))            # 512 bytes of UTF-8
    await asyncio.sleep(node_link.REPORT_DELAY * 3)
    (report,) = node.receive_data(b"".join(writer.writes))
    assert isinstance(report, Closed) and report.reason.endswith("...")
    assert len(report.reason.encode()) <= MAX_TEXT


# -- a node that sends and never reads ----------------------------------------------------------


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_node_that_never_reads_cannot_grow_the_gateways_buffers(
        tmp_path: Path, node_home: Path, procs: list[Proc]) -> None:
    """A node flooding Pings while it reads nothing: the gateway answers the Pings of a read
    with one Pong and stops reading the node while its answers back up, instead of buffering
    Pongs without bound, and the heartbeat detaches the node, which cannot answer the
    gateway's Pings. The flood is bounded by time, not bytes: how much the gateway parses
    before its heartbeat fires depends on the machine."""
    from internal.home import NodeHome   # the node's certificate, as a node presents it
    home = NodeHome(node_home, "", "", node_home)
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(home.tls_cert, home.tls_key)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)     # takes little of the Pongs
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", gw.pnc))
    tls = ctx.wrap_socket(raw, server_side=True)         # the gateway is the TLS client
    try:
        conn = Connection(Role.NODE)
        tls.sendall(conn.send(NodeHello(PROTOCOL_VERSION, "flood", 10, 1, 0, False)))
        while not conn.receive_data(tls.recv(65536)):    # its GatewayHello; then read nothing
            pass
        gw.wait_log(r"node flood attached")
        before = _rss_kb(gw.pid)
        pings = conn.send(Ping(1)) * 5000                # 65 kB of Pings
        sent = 0
        deadline = time.monotonic() + 15
        tls.settimeout(2.0)
        try:
            while time.monotonic() < deadline:       # until the gateway detaches us
                tls.sendall(pings)
                sent += len(pings)
        except OSError:   # the gateway detached us (or stopped reading us: a timeout)
            pass
        grown = _rss_kb(gw.pid) - before
        # what it did not take waits in the kernel's buffers (a few MB on loopback)
        assert sent > 1 << 20, sent                      # it did flood
        assert grown < 8 << 10, f"the gateway grew by {grown} kB"
        gw.wait_log(r"node flood@\S+ has not answered a ping for [\d.]+s: detaching it",
                    timeout=15)
        assert "Traceback" not in gw.text()
    finally:
        tls.close()
    assert gw.popen is not None and gw.popen.poll() is None


# -- a node whose pool refill loops ---------------------------------------------------------------


def test_a_node_cannot_pool_data_connections_without_bound(
        tmp_path: Path, node_home: Path, procs: list[Proc]) -> None:
    """A node (a bug in its refill, or a hostile host with its certificate) proving pooled
    Data connections without end: the gateway keeps MAX_POOLED of them for it and closes the
    rest once proven, counted, in a throttled log line, instead of filling its descriptor
    table until client accepts fail."""
    from internal.home import NodeHome   # the node's certificate, as a node presents it
    home = NodeHome(node_home, "", "", node_home)
    mport = free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--heartbeat-timeout", "120",
                       "--metrics", f"127.0.0.1:{mport}")
    procs.append(gw)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(home.tls_cert, home.tls_key)
    raw = socket.create_connection(("127.0.0.1", gw.pnc), timeout=10)
    tls = ctx.wrap_socket(raw, server_side=True)         # the gateway is the TLS client
    pooled: list[socket.socket] = []
    extra = 3
    try:
        conn = Connection(Role.NODE)
        tls.sendall(conn.send(NodeHello(PROTOCOL_VERSION, "looper", 0, 1, 0, False)))
        events: list[object] = []
        while not events:
            events = conn.receive_data(tls.recv(65536))
        hello = events[0]
        assert isinstance(hello, GatewayHello)
        gw.wait_log(r"node looper attached")
        for ident in range(1, MAX_POOLED + extra + 1):   # one after another, as a refill
            s = socket.create_connection(("127.0.0.1", hello.data_port), timeout=10)
            pooled.append(s)
            nonce = dataauth.parse_challenge(s.recv(dataauth.CHALLENGE_LEN, socket.MSG_WAITALL))
            s.sendall(dataauth.pool_proof(hello.pool_key, ident, nonce))
        refused = ("edgegw_gateway_pooled_data_refused_total", ())
        held = ("edgegw_gateway_node_pooled_data", (("node", "looper"),))
        m = wait_for(mport, lambda m: m.get(refused) == extra and m.get(held) == MAX_POOLED)
        assert (m.get(refused), m.get(held)) == (extra, MAX_POOLED)
        closed = 0
        for s in pooled:                                 # the gateway's closes have been sent
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:                      # held, waiting for an assignment
                pass
        assert closed == extra
        line = r"node looper already holds \d+ pooled data connections; closed"
        assert 1 <= gw.count(line) <= 2, gw.text()[-4000:]
        assert "Traceback" not in gw.text()
    finally:
        for s in pooled:
            s.close()
        tls.close()
    assert gw.popen is not None and gw.popen.poll() is None
