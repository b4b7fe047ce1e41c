"""One source address cannot hold the PNC or Data port's unauthenticated slots
(--max-handshakes-per-address), and refusals a peer can repeat per connection are logged a
bounded number of times however many connections it makes."""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from edgegw.logthrottle import LogThrottle
from edgegw.pnc import dataauth
from tests.procs import Proc, free_port, sftp_batch, start_gateway, start_node
from tests.test_gateway_metrics import scrape, wait_for

# The TLS handshake deadline of a PNC connection (GatewayConfig.tls_handshake_timeout).
TLS_HANDSHAKE_TIMEOUT = 10.0
PROOF_TIMEOUT = 30.0   # set for the test: the idle Data connections outlive it


def _connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def _refused_sample(listener: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("edgegw_gateway_handshakes_refused_total",
            (("listener", listener), ("reason", "address_limit")))


def _first_byte(sock: socket.socket) -> bytes:
    """What the gateway said first: b"" if it closed the connection without a word."""
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("port", ["data", "pnc"])
def test_one_address_cannot_hold_every_handshake_slot(tmp_path: Path, node_home: Path,
                                                      procs: list[Proc], port: str) -> None:
    """As many idle connections from 127.0.0.1 as --max-handshakes: only
    --max-handshakes-per-address of them are held (the rest closed at accept), so a node's
    connection from 127.0.0.2 is served (challenge, or TLS ClientHello) before the idle ones'
    deadlines, instead of waiting in the backlog until they pass."""
    mport = free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--max-handshakes", "8",
                       "--max-handshakes-per-address", "4", "--proof-timeout",
                       str(PROOF_TIMEOUT), "--metrics", f"127.0.0.1:{mport}")
    procs.append(gw)
    gw.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    number = gw.data if port == "data" else gw.pnc
    idle_deadline = TLS_HANDSHAKE_TIMEOUT if port == "pnc" else PROOF_TIMEOUT
    started = time.monotonic()
    idle = [_connect(number, "127.0.0.1") for _ in range(8)]
    probe = None
    try:
        first = [_first_byte(s) for s in idle]
        assert sum(1 for b in first if b) == 4           # held: the gateway spoke first
        assert sum(1 for b in first if not b) == 4       # over the cap: closed at accept
        gw.wait_log(rf"{port} connection from 127\.0\.0\.1 closed: 4 from that address not "
                    r"yet authenticated")
        probe = _connect(number, "127.0.0.2")
        said = probe.recv(1)
        assert said == (dataauth.CHALLENGE_MAGIC[:1] if port == "data" else b"\x16")
        assert time.monotonic() - started < idle_deadline   # not after they timed out
        assert "Traceback" not in gw.text()
        # the refusals are counted for their listener, and only there
        m = scrape(mport)
        other = "pnc" if port == "data" else "data"
        assert m[_refused_sample(port)] == 4
        assert m[_refused_sample(other)] == 0
    finally:
        for s in idle if probe is None else (*idle, probe):
            s.close()
    assert gw.popen is not None and gw.popen.poll() is None


def test_a_flood_of_refused_connections_logs_a_bounded_number_of_lines(
        tmp_path: Path, node_home: Path, procs: list[Proc]) -> None:
    """Connections refused at accept (over --max-handshakes-per-address on Data, over
    --max-per-address on the external port) and Data connections with a bad proof or none:
    40 of each give at most two log lines per reason, while the refusal metric counts all."""
    mport = free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--max-handshakes-per-address",
                       "2", "--max-per-address", "1", "--grace-period", "60", "--metrics",
                       f"127.0.0.1:{mport}")
    procs.append(gw)
    gw.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    flood = 40
    held = [_connect(gw.data, "127.0.0.1") for _ in range(2)]
    held.append(_connect(gw.external, "127.0.0.3"))   # waits for a node: no node is attached
    try:
        for s in held[:2]:
            assert s.recv(1)                             # a challenge: held unauthenticated
        waiting = ("edgegw_gateway_clients_waiting", ())
        assert wait_for(mport, lambda m: m[waiting] == 1)[waiting] == 1
        for _ in range(flood):
            with _connect(gw.data, "127.0.0.1") as s:
                assert _first_byte(s) == b""             # over the per-address cap
            with _connect(gw.external, "127.0.0.3") as s:
                assert _first_byte(s) == b""             # over --max-per-address
            with _connect(gw.data, "127.0.0.2") as s:    # a proof of the wrong kind
                s.recv(dataauth.CHALLENGE_LEN, socket.MSG_WAITALL)
                s.sendall(b"\xff" * dataauth.PROOF_LEN)
                assert _first_byte(s) == b""
            with _connect(gw.data, "127.0.0.2") as s:    # a session proof for no offer
                nonce = dataauth.parse_challenge(
                    s.recv(dataauth.CHALLENGE_LEN, socket.MSG_WAITALL))
                s.sendall(dataauth.session_proof(b"\x01" * 32, 0x1234, nonce))
                assert _first_byte(s) == b""
    finally:
        for s in held:
            s.close()
    m = scrape(mport)
    assert m[("edgegw_gateway_clients_refused_total", (("reason", "address_limit"),))] == flood
    assert m[_refused_sample("data")] == flood   # exact, though the log line is throttled
    assert m[_refused_sample("pnc")] == 0
    for line in (r"data connection from 127\.0\.0\.1 closed: 2 from that address",
                 r"client 127\.0\.0\.3:\d+ dropped: 1 connections from that address",
                 r"data connection from 127\.0\.0\.2:\d+: bad proof",
                 r"data connection from 127\.0\.0\.2:\d+: no live offer"):
        assert 1 <= gw.count(line) <= 2, (line, gw.text()[-4000:])
    assert gw.popen is not None and gw.popen.poll() is None


def test_log_throttle_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    """One line per key per period; the next one says how many were not logged; keys are
    independent."""
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("test.throttle"), every=10.0,
                           clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.throttle"):
        assert throttle.log("a", logging.INFO, "refused %s", "x")
        for _ in range(5):
            assert not throttle.log("a", logging.INFO, "refused %s", "x")
        assert throttle.log("b", logging.WARNING, "other")
        now[0] = 10.0
        assert throttle.log("a", logging.INFO, "refused %s", "y")
        now[0] = 25.0
        assert throttle.log("a", logging.INFO, "refused %s", "z")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "other", "refused y (5 more like it not logged since the last)",
        "refused z"]


def test_a_nodes_dial_refused_at_the_cap_is_dialed_again(tmp_path: Path, node_home: Path,
                                                         alice: tuple[str, Path],
                                                         procs: list[Proc]) -> None:
    """The gateway closes a Data connection beyond --max-handshakes-per-address at accept, the
    node's own included (a burst of offers, two workers on one host). The node dials it again
    while the offer lives: the client gets its session once a slot frees, instead of after the
    gateway's data timeout (5 s) or not at all."""
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--max-handshakes-per-address",
                       "2", "--proof-timeout", "1.5", "--log-level", "info")
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw], "--pool-size", "0")
    procs.append(node)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(64 << 10))
    idle = [_connect(gw.data, "127.0.0.1") for _ in range(2)]   # the node's address's slots
    try:
        assert all(_first_byte(s) == dataauth.CHALLENGE_MAGIC[:1] for s in idle)
        started = time.monotonic()
        run = sftp_batch(gw.external, user, key, f"put {src} up.bin\n")
        took = time.monotonic() - started
    finally:
        for s in idle:
            s.close()
    assert run.returncode == 0, run.stderr
    assert (node_home / "files" / user / "up.bin").read_bytes() == src.read_bytes()
    gw.wait_log(r"data connection from 127\.0\.0\.1 closed: 2 from that address")
    node.wait_log(r"Data connection to 127\.0\.0\.1:\d+ failed \(.*\); again in")
    assert "never proved a Data connection" not in gw.text()
    assert took < 5.0, took                  # the held slots' 1.5 s, not the data timeout
