"""`edgegw serve --metrics`: what a Prometheus scrape of a real gateway shows, and how the
scrape endpoint answers what is not a scrape."""
from __future__ import annotations

import asyncio
import http.client
import logging
import os
import socket
import ssl
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from edgegw import metrics_http
from edgegw.gateway.config import GatewayConfig
from edgegw.gateway.dispatch import dispatch_client
from edgegw.gateway.metrics import GatewayCollector
from edgegw.gateway.peers import Peer, PooledData
from edgegw.gateway.server import Gateway
from edgegw.metrics_http import MetricsEndpoint, MetricsServer, registry_of, tls_context
from edgegw.netaddr import HostPort
from edgegw.pnc import dataauth
from edgegw.sockio import recv_exact
from internal.home import NodeHome, make_node_certificate
from tests.procs import Proc, edgegw_cmd, free_port, sftp_batch, start_gateway, start_node
from tests.relay_helpers import Listener, open_fds, sees_end


def make_cert(directory: Path, name: str = "metrics") -> tuple[Path, Path]:
    """A self-signed certificate and its key (an HTTPS endpoint's, or a scraper's)."""
    key_pem, cert_pem = make_node_certificate(name)
    (directory / f"{name}.crt").write_bytes(cert_pem)
    (directory / f"{name}.key").write_bytes(key_pem)
    return directory / f"{name}.crt", directory / f"{name}.key"


def get_metrics(port: int, source: str = "127.0.0.1", ca: Path | None = None,
                client: tuple[Path, Path] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of GET /metrics on 127.0.0.1:port, sent from `source`;
    over HTTPS, trusting the certificate `ca`, if given, and presenting `client` (cert, key)."""
    if ca is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                          source_address=(source, 0))
    else:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.check_hostname = False    # its name is not 127.0.0.1; the chain is still checked
        if client is not None:
            ctx.load_cert_chain(*client)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           source_address=(source, 0), context=ctx)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return resp.status, resp.headers["Content-Type"], resp.read().decode()
    finally:
        conn.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, source: str = "127.0.0.1", ca: Path | None = None,
           client: tuple[Path, Path] | None = None) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    status, ctype, text = get_metrics(port, source, ca, client)
    assert status == 200, (status, text)
    assert ctype.startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(port: int, cond, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if cond(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.mark.parametrize("relay_procs", ["0", "2"])
def test_a_scrape_follows_sessions_nodes_and_refusals(tmp_path: Path, node_home: Path,
                                                      procs: list[Proc], alice, relay_procs):
    user, key = alice
    mport = free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--metrics",
                       f"127.0.0.1:{mport}", "--grace-period", "0", "--relay-procs",
                       relay_procs)
    procs.append(gw)
    gw.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    m = scrape(mport)
    assert m[("edgegw_gateway_nodes", ())] == 0
    assert m[("edgegw_gateway_sessions_total", ())] == 0
    assert m[("edgegw_gateway_info", (("gateway_id", "gateway"), ("relay_backend", "splice"),
                                      ("relay_procs", relay_procs),
                                      ("version", metadata.version("edgegw"))))] == 1

    with socket.create_connection(("127.0.0.1", gw.external)) as c:   # no node: closed
        c.settimeout(10)
        assert c.recv(1) == b""
    m = wait_for(mport, lambda m: m[("edgegw_gateway_clients_refused_total",
                                     (("reason", "no_node"),))] == 1)
    assert m[("edgegw_gateway_clients_refused_total", (("reason", "no_node"),))] == 1
    assert m[("edgegw_gateway_clients_refused_total", (("reason", "banned"),))] == 0

    procs.append(start_node(tmp_path, node_home, [gw]))
    node_id = NodeHome.load(node_home).node_id
    m = wait_for(mport, lambda m: m[("edgegw_gateway_nodes", ())] == 1 and any(
        k[0] == "edgegw_gateway_node_pooled_data" and v > 0 for k, v in m.items()))
    pooled = {k[1]: v for k, v in m.items() if k[0] == "edgegw_gateway_node_pooled_data"}
    assert list(pooled) == [(("node", node_id),)] and pooled[(("node", node_id),)] > 0, pooled

    data = os.urandom(3 << 20)
    (tmp_path / "x.bin").write_bytes(data)
    res = sftp_batch(gw.external, user, key, "put x.bin\nget x.bin y.bin\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "y.bin").read_bytes() == data

    def finished_bytes(m) -> tuple[float, float]:
        return tuple(m[("edgegw_gateway_finished_session_bytes_total", (("direction", d),))]
                     for d in ("upload", "download"))

    # the relay processes' counters arrive just after the session's report: wait for both
    m = wait_for(mport, lambda m: m[("edgegw_gateway_sessions_finished_total",
                                     (("reason", "eof"),))] == 1
                 and m[("edgegw_gateway_sessions_active", ())] == 0
                 and m[("edgegw_gateway_relayed_bytes_total", ())] == sum(finished_bytes(m)))
    assert m[("edgegw_gateway_sessions_total", ())] == 1
    assert m[("edgegw_gateway_sessions_finished_total", (("reason", "eof"),))] == 1
    assert m[("edgegw_gateway_sessions_finished_total", (("reason", "reset"),))] == 0
    up, down = finished_bytes(m)
    assert len(data) < up < len(data) * 1.1 and len(data) < down < len(data) * 1.1, (up, down)
    assert m[("edgegw_gateway_relayed_bytes_total", ())] == up + down
    assert m[("edgegw_gateway_relay_buffers", (("state", "in_use"),))] == 0
    assert m[("edgegw_gateway_handshakes", (("listener", "pnc"),))] == 0
    assert m[("edgegw_gateway_bans", ())] == 0
    assert m[("edgegw_gateway_clients_waiting", ())] == 0

    subprocess.run(edgegw_cmd("internal", "ban", "add", "127.0.0.77", "--home", str(node_home),
                              "--duration", "1h", "--reason", "test"),
                   check=True, capture_output=True)
    gw.wait_log(r"ban 127\.0\.0\.77 ", timeout=15)
    with socket.socket() as c:                                 # a banned address: closed
        c.bind(("127.0.0.77", 0))
        c.settimeout(10)
        c.connect(("127.0.0.1", gw.external))
        assert c.recv(1) == b""
    m = wait_for(mport, lambda m: m[("edgegw_gateway_clients_refused_total",
                                     (("reason", "banned"),))] == 1)
    assert m[("edgegw_gateway_clients_refused_total", (("reason", "banned"),))] == 1
    assert m[("edgegw_gateway_bans", ())] == 1
    assert gw.stop() == 0


def _refused(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("edgegw_gateway_clients_refused_total", (("reason", reason),))


def test_clients_without_a_valid_proxy_header_are_counted(tmp_path: Path, node_home: Path,
                                                           procs: list[Proc]) -> None:
    """Connections from a --proxy-protocol-from balancer that do not start with a valid PROXY
    header are closed, and counted as proxy_header (they were closed uncounted); the log has
    one line for them (a balancer's health checks repeat them for ever)."""
    mport = free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--proxy-protocol-from",
                       "127.0.0.1/32", "--metrics", f"127.0.0.1:{mport}")
    procs.append(gw)
    gw.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    for first in (b"SSH-2.0-OpenSSH_9.6\r\n",            # a balancer not sending headers
                  b"PROXY TCP4 nonsense\r\n") * 3:       # a malformed one
        with socket.create_connection(("127.0.0.1", gw.external), timeout=10) as c:
            c.sendall(first)
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:                  # closed with our bytes unread
                pass
    m = wait_for(mport, lambda m: m[_refused("proxy_header")] == 6)
    assert m[_refused("proxy_header")] == 6
    assert sum(v for (name, _), v in m.items()
               if name == "edgegw_gateway_clients_refused_total") == 6   # and only there
    assert "Traceback" not in gw.text()
    assert gw.text().count("(trusted balancer)") == 1, gw.text()


async def test_a_client_the_relay_cannot_take_is_counted(node_home: Path) -> None:
    """A node accepts the client on a pooled Data connection, but the relay engine refuses
    the pair (here: closed; out of memory or descriptors, a relay process gone): both
    connections are closed and the client is counted as relay_error (it was counted
    nowhere)."""
    here = HostPort("127.0.0.1", 0)
    gw = Gateway(GatewayConfig(here, here, here, node_home / "gateway-trust.pem"))
    await gw.relay.close()
    key, nonce = bytes(range(32)), bytes(32)
    peer = Peer("n1", "127.0.0.1:1", lambda event: None, key)
    gw.attach(peer)
    listener = Listener()
    try:
        client_far, client = listener.pair()
        node_end, gw_data = listener.pair()
        gw_data.setblocking(False)
        peer.pool.append(PooledData(gw_data, nonce, 9))

        async def node() -> None:
            loop = asyncio.get_running_loop()
            wire = await recv_exact(node_end, dataauth.ASSIGN_LEN)
            dataauth.parse_assignment(wire, key, nonce, 9)
            await loop.sock_sendall(node_end, bytes((dataauth.ANSWER_ACCEPT,)))

        answered = asyncio.create_task(node())
        client.setblocking(False)
        assert await dispatch_client(gw, client, "192.0.2.1", 40000) is False
        await answered
        for far in (client_far, node_end):               # both see their connection end
            assert await sees_end(far, 5)
        refused = {s.labels["reason"]: s.value for fam in GatewayCollector(gw).collect()
                   if fam.name == "edgegw_gateway_clients_refused" for s in fam.samples}
        assert refused["relay_error"] == 1
        assert sum(refused.values()) == 1
    finally:
        for s in (client_far, node_end):
            s.close()
        listener.close()


def test_https_scrapes_by_certificate_from_metrics_allow_only(
        tmp_path: Path, node_home: Path, procs: list[Proc]) -> None:
    mport = free_port()
    cert, key = make_cert(tmp_path)
    scraper = make_cert(tmp_path, "scraper")      # self-signed: its own CA
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--metrics",
                       f"127.0.0.1:{mport}", "--metrics-allow", "127.0.0.2/32",
                       "--metrics-allow", "::1", "--metrics-cert", str(cert),
                       "--metrics-key", str(key), "--metrics-client-ca", str(scraper[0]))
    procs.append(gw)
    gw.wait_log(rf"metrics at https://127.0.0.1:{mport}/metrics")
    with pytest.raises((ssl.SSLError, ConnectionError)):   # closed at accept, before TLS
        get_metrics(mport, "127.0.0.1", cert, scraper)
    gw.wait_log(r"metrics: connection from 127\.0\.0\.1 closed: address not in "
                r"--metrics-allow")
    assert scrape(mport, "127.0.0.2", cert, scraper)[("edgegw_gateway_nodes", ())] == 0
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        get_metrics(mport, "127.0.0.2")                      # plain HTTP: no answer
    gw.wait_log(r"metrics: connection from 127\.0\.0\.2 closed: TLS handshake failed")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get_metrics(mport, "127.0.0.2", cert)                # no client certificate
    gw.wait_log(r"TLS handshake failed \(PEER_DID_NOT_RETURN_A_CERTIFICATE\)")
    assert gw.stop() == 0


# -- the endpoint itself, in-process -----------------------------------------------------------

class _One:
    def collect(self):
        yield GaugeMetricFamily("edgegw_test_value", "A value.", value=42)


@pytest.fixture
async def server(monkeypatch):
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 0.3)
    srv = MetricsServer(MetricsEndpoint(HostPort("127.0.0.1", 0)), registry_of(_One()))
    await srv.start()
    yield srv
    await srv.close()


async def test_https_endpoint_closes_failed_handshakes(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(metrics_http, "HEAD_TIMEOUT", 0.3)
    caplog.set_level(logging.INFO, "edgegw.metrics")
    cert, key = make_cert(tmp_path)
    srv = MetricsServer(MetricsEndpoint(HostPort("127.0.0.1", 0), tls=tls_context(cert, key)),
                        registry_of(_One()))
    await srv.start()
    try:
        port = srv.address[1]
        before = open_fds()
        status, _, body = await asyncio.to_thread(get_metrics, port, "127.0.0.1", cert)
        assert status == 200 and "\nedgegw_test_value 42.0\n" in body
        try:                                                        # plain HTTP
            plain = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            plain = b""
        assert plain == b"" or not plain.startswith(b"HTTP/")
        assert await _exchange(port, b"") == b""                    # says nothing: timed out
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(ssl.SSLError):                           # trusts another cert
            await asyncio.to_thread(get_metrics, port, "127.0.0.1", make_cert(other)[0])
        await asyncio.sleep(0.1)
        failed = [r.getMessage() for r in caplog.records if "TLS handshake failed" in
                  r.getMessage()]
        assert len(failed) == 3, failed
        assert "HTTP_REQUEST" in failed[0] and "longer than 0.3 seconds" in failed[1]
        assert open_fds() == before
    finally:
        await srv.close()


def test_tls_context_says_what_is_wrong(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    with pytest.raises(ValueError, match="cannot read .*missing.pem: No such file"):
        tls_context(tmp_path / "missing.pem", key)
    with pytest.raises(ValueError, match="cannot load the certificate"):
        tls_context(key, None)                                      # a key, no certificate
    (tmp_path / "b").mkdir()
    _, other_key = make_cert(tmp_path / "b")
    with pytest.raises(ValueError, match="cannot load the certificate"):
        tls_context(cert, other_key)                                # not its key
    with pytest.raises(ValueError, match="cannot load the client CA"):
        tls_context(cert, key, key)                                 # a key, no CA certificate
    assert tls_context(cert, key).verify_mode == ssl.CERT_NONE
    assert tls_context(cert, key, cert).verify_mode == ssl.CERT_REQUIRED


async def _exchange(port: int, request: bytes, *, close_write: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if close_write:
        writer.write_eof()
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5)   # the server closes after one reply
    writer.close()
    return reply


async def test_the_endpoint_answers_a_scrape_and_refuses_the_rest(server, caplog) -> None:
    caplog.set_level(logging.INFO, "edgegw.metrics")
    port = server.address[1]
    before = open_fds()
    ok = await _exchange(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in ok
    assert b"\nedgegw_test_value 42.0\n" in ok
    head = await _exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    cases = [
        (b"GET /metrics\r\n\r\n", b"400 Bad Request"),                  # HTTP/0.9
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n", b"400 Bad Request"),   # TLS hello
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n", b"400 Bad Request"),  # cut short
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405 Method Not Allowed"),
        (b"GET / HTTP/1.1\r\n\r\n", b"404 Not Found"),
        (b"GET /metrics/../x HTTP/1.1\r\n\r\n", b"404 Not Found"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
         b"431 Request Header Fields Too Large"),
    ]
    for request, status in cases:
        reply = await _exchange(port, request, close_write=True)
        assert reply.startswith(b"HTTP/1.1 " + status + b"\r\n"), (request[:40], reply[:80])
        assert b"edgegw_test_value" not in reply
    assert b"Allow: GET, HEAD\r\n" in await _exchange(port, b"PUT /metrics HTTP/1.1\r\n\r\n")
    slow = await _exchange(port, b"GET /metr")                         # never finishes
    assert slow.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == len(cases) + 2, refused
    await asyncio.sleep(0.05)
    assert open_fds() == before


async def test_too_many_open_scrapes_are_closed_at_once(server, caplog) -> None:
    port = server.address[1]
    idle = [await asyncio.open_connection("127.0.0.1", port)
            for _ in range(metrics_http.MAX_CONNECTIONS)]
    await asyncio.sleep(0.05)
    try:
        extra = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    except ConnectionResetError:     # closed with the request unread
        extra = b""
    assert extra == b""                                                 # closed, no reply
    assert any("scrapes already open" in r.getMessage() for r in caplog.records)
    for _, writer in idle:
        writer.close()
    await asyncio.sleep(0.4)                                            # their 408s went out
    ok = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK")
