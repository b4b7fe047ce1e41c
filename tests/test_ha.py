"""High availability with real processes: several nodes and gateways on a shared PostgreSQL
store, load-aware balancing, failover, heartbeats, drain, grace period, PROXY protocol."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgegw import proxyproto
from tests.procs import (
    SSH_OPTS, GatewayProc, Proc, add_user, edgegw_cmd, free_port, init_home, make_key,
    sftp_batch, start_gateway, start_node,
)

pytestmark = pytest.mark.postgres


class Cluster:
    """N node homes sharing one PostgreSQL store and one files root; a joint trust file."""

    def __init__(self, tmp: Path, db: str, n: int) -> None:
        self.tmp = tmp
        self.files = tmp / "shared-files"
        self.homes = [init_home(tmp / f"home{i}", "--db", db, "--node-id", f"n{i}",
                                "--files-root", str(self.files)) for i in range(n)]
        self.trust = tmp / "trust.pem"
        self.trust.write_bytes(b"".join((h / "gateway-trust.pem").read_bytes()
                                        for h in self.homes))
        self.key = make_key(tmp / "bob_key")
        add_user(self.homes[0], "bob", self.key)

    def sftp(self, gw: GatewayProc, commands: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return sftp_batch(gw.external, "bob", self.key, commands, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Cluster:
    return Cluster(tmp_path, pg_url, 2)


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"sftp failed:\n{res.stdout}\n{res.stderr}"


def _served(gw: Proc) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in re.findall(r"paired with node (\S+)", gw.text()):
        counts[node] = counts.get(node, 0) + 1
    return counts


def test_two_nodes_share_load(cluster: Cluster, procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust)
    procs.append(gw)
    for i, home in enumerate(cluster.homes):
        procs.append(start_node(cluster.tmp, home, [gw], name=f"n{i}"))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cluster.sftp(gw, "ls\n"), range(40)))
    for res in results:
        _ok(res)
    served = _served(gw)
    assert sum(served.values()) == 40
    assert set(served) == {"n0", "n1"} and min(served.values()) >= 8, served


def test_user_added_on_one_node_logs_in_through_the_other(cluster: Cluster,
                                                          procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust)
    procs.append(gw)
    procs.append(start_node(cluster.tmp, cluster.homes[1], [gw], name="n1"))
    key = make_key(cluster.tmp / "carol_key")
    add_user(cluster.homes[0], "carol", key)
    _ok(sftp_batch(gw.external, "carol", key, "ls\n"))
    assert _served(gw) == {"n1": 1}


def _slow_upload(cluster: Cluster, gw: GatewayProc, src: Path, name: str,
                 bind: str) -> subprocess.Popen[str]:
    args = ["sftp", "-b", "-", "-l", "40000", "-P", str(gw.external), "-i", str(cluster.key),
            *SSH_OPTS, "-o", f"BindAddress={bind}", "bob@127.0.0.1"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(f"put {src} {name}\n")
    proc.stdin.close()
    return proc


def _node_of(gw: Proc, ip: str) -> str:
    return gw.wait_log(rf"client {re.escape(ip)}:\d+ paired with node (\S+)").group(1)


def test_kill_node_mid_transfer(cluster: Cluster, procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust)
    procs.append(gw)
    nodes = {f"n{i}": start_node(cluster.tmp, h, [gw], name=f"n{i}")
             for i, h in enumerate(cluster.homes)}
    procs.extend(nodes.values())
    src = cluster.tmp / "big.bin"
    src.write_bytes(os.urandom(24 << 20))  # ~5 s at the 40 Mbit/s client limit
    up1 = _slow_upload(cluster, gw, src, "one.bin", "127.0.0.21")
    victim = _node_of(gw, "127.0.0.21")
    up2 = _slow_upload(cluster, gw, src, "two.bin", "127.0.0.22")
    survivor = _node_of(gw, "127.0.0.22")
    assert victim != survivor, "least-loaded routing should have split the two uploads"
    time.sleep(1.0)
    nodes[victim].send_signal(signal.SIGKILL)
    assert up1.wait(30) != 0                       # the client sees the disconnect
    assert up2.wait(60) == 0, up2.stderr.read() if up2.stderr else ""
    home = cluster.files / "bob"
    assert not (home / "one.bin").exists()         # no partial file under the final name
    assert (home / "two.bin").read_bytes() == src.read_bytes()
    t0 = time.monotonic()
    _ok(cluster.sftp(gw, "ls\n"))                  # new sessions work at once
    assert time.monotonic() - t0 < 10


def test_stopped_node_is_bypassed_then_used_again(cluster: Cluster, procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust, "--heartbeat-timeout", "2")
    procs.append(gw)
    n0 = start_node(cluster.tmp, cluster.homes[0], [gw], name="n0")
    n1 = start_node(cluster.tmp, cluster.homes[1], [gw], name="n1")
    procs += [n0, n1]
    n0.send_signal(signal.SIGSTOP)
    try:
        gw.wait_log(r"node n0@\S+ has not answered a ping for", timeout=10)
        for _ in range(4):
            _ok(cluster.sftp(gw, "ls\n"))
        assert set(_served(gw)) == {"n1"}
    finally:
        n0.send_signal(signal.SIGCONT)
    n0.wait_log(r"attached to gateway gateway .*\n(.|\n)*attached to gateway gateway ", timeout=20)
    with ThreadPoolExecutor(4) as pool:
        for res in pool.map(lambda _: cluster.sftp(gw, "ls\n"), range(12)):
            _ok(res)
    assert _served(gw).get("n0", 0) >= 2


def test_two_by_two_any_one_process_down(cluster: Cluster, procs: list[Proc]) -> None:
    gws = [start_gateway(cluster.tmp, cluster.trust, name=f"g{i}") for i in range(2)]
    procs.extend(gws)
    nodes = [start_node(cluster.tmp, h, gws, name=f"n{i}") for i, h in enumerate(cluster.homes)]
    procs.extend(nodes)
    for gw in gws:
        _ok(cluster.sftp(gw, "ls\n"))
    for victim in nodes:
        victim.send_signal(signal.SIGSTOP)
        try:
            for gw in gws:
                _ok(cluster.sftp(gw, "ls\n"))
        finally:
            victim.send_signal(signal.SIGCONT)
    for i, victim in enumerate(gws):
        victim.stop()
        _ok(cluster.sftp(gws[1 - i], "ls\n"))
        gws[i] = start_gateway(cluster.tmp, cluster.trust, name=f"g{i}",
                               ports=(victim.external, victim.pnc, victim.data))
        procs.append(gws[i])
        for node in nodes:
            node.wait_log(rf"attached to gateway g{i} (.|\n)*attached to gateway g{i} ", timeout=20)


def test_drain_finishes_running_transfers(cluster: Cluster, procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust)
    procs.append(gw)
    nodes = {f"n{i}": start_node(cluster.tmp, h, [gw], name=f"n{i}")
             for i, h in enumerate(cluster.homes)}
    procs.extend(nodes.values())
    src = cluster.tmp / "mid.bin"
    src.write_bytes(os.urandom(12 << 20))
    up = _slow_upload(cluster, gw, src, "drained.bin", "127.0.0.31")
    busy = _node_of(gw, "127.0.0.31")
    home_idx = int(busy[1:])
    drain = subprocess.Popen(edgegw_cmd("internal", "drain", "--home",
                                        str(cluster.homes[home_idx])),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gw.wait_log(rf"node {busy} is draining")
    for _ in range(3):
        _ok(cluster.sftp(gw, "ls\n"))
    other = "n1" if busy == "n0" else "n0"
    assert _served(gw)[other] == 3
    assert up.wait(60) == 0
    assert drain.wait(60) == 0, drain.stdout.read() if drain.stdout else ""
    assert nodes[busy].popen is not None and nodes[busy].popen.wait(10) == 0
    assert (cluster.files / "bob" / "drained.bin").read_bytes() == src.read_bytes()


def test_grace_period_holds_client_until_a_node_attaches(tmp_path: Path, node_home: Path,
                                                         alice: tuple[str, Path],
                                                         procs: list[Proc]) -> None:
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    client = threading.Thread(target=lambda: result.update(
        r=sftp_batch(gw.external, user, key, "ls\n")))
    client.start()
    time.sleep(3)
    procs.append(start_node(tmp_path, node_home, [gw]))
    client.join(60)
    _ok(result["r"])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_from_trusted_balancer(tmp_path: Path, node_home: Path,
                                              alice: tuple[str, Path], procs: list[Proc],
                                              version: str) -> None:
    """A TCP balancer on 127.0.0.40 prepends PROXY headers; the node audits the real client."""
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem",
                       "--proxy-protocol-from", "127.0.0.40/32")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw]))
    lb_port = free_port()
    stop = threading.Event()
    lb = threading.Thread(target=_balancer, args=(lb_port, gw.external, version, stop), daemon=True)
    lb.start()
    try:
        _ok(sftp_batch(lb_port, user, key, "ls\n", bind="127.0.0.41"))
    finally:
        stop.set()
    gw.wait_log(r"client 127\.0\.0\.41:\d+ paired")
    audit = subprocess.run(edgegw_cmd("internal", "audit", "--home", str(node_home), "--ip",
                                      "127.0.0.41", "--json"), capture_output=True, text=True)
    assert audit.returncode == 0 and "127.0.0.41" in audit.stdout
    # the same header from an address that is not a trusted balancer is not believed: it is
    # relayed as client bytes, the SSH server refuses it, the connection closes
    with socket.create_connection(("127.0.0.1", gw.external)) as s:
        s.sendall(proxyproto.build_v1(("203.0.113.9", 5555), ("127.0.0.1", gw.external)))
        s.settimeout(20)
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        assert b"203.0.113.9" not in received
    gw.wait_log(r"client 127\.0\.0\.1:\d+ closed")
    assert "203.0.113.9" not in gw.text()


def _balancer(port: int, target: int, version: str, stop: threading.Event) -> None:
    build = proxyproto.build_v1 if version == "v1" else proxyproto.build_v2
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                client, addr = server.accept()
            except socket.timeout:
                continue
            up = socket.socket()
            up.bind(("127.0.0.40", 0))
            up.connect(("127.0.0.1", target))
            up.sendall(build(addr[:2], ("127.0.0.1", port)))
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_ban_reaches_every_gateway_through_every_node(cluster: Cluster,
                                                      procs: list[Proc]) -> None:
    """A ban made on one node's home (shared store) is pushed to both gateways."""
    gws = [start_gateway(cluster.tmp, cluster.trust, name=f"g{i}") for i in range(2)]
    procs.extend(gws)
    procs.append(start_node(cluster.tmp, cluster.homes[1], gws, name="n1"))
    subprocess.run(edgegw_cmd("internal", "ban", "add", "127.0.0.77", "--home",
                              str(cluster.homes[0]), "--duration", "1h", "--reason", "test"),
                   check=True, capture_output=True)
    for gw in gws:
        gw.wait_log(r"ban 127\.0\.0\.77 ", timeout=15)
        with socket.socket() as s:
            s.bind(("127.0.0.77", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", gw.external))
            assert s.recv(10) == b""
        gw.wait_log(r"client 127\.0\.0\.77:\d+ dropped: address is banned")
    subprocess.run(edgegw_cmd("internal", "ban", "remove", "127.0.0.77", "--home",
                              str(cluster.homes[0])), check=True, capture_output=True)
    for gw in gws:
        gw.wait_log(r"ban on 127\.0\.0\.77 lifted", timeout=15)
    _ok(cluster.sftp(gws[0], "ls\n", bind="127.0.0.77"))


def test_workers_attach_as_separate_peers(cluster: Cluster, procs: list[Proc]) -> None:
    gw = start_gateway(cluster.tmp, cluster.trust)
    procs.append(gw)
    node = start_node(cluster.tmp, cluster.homes[0], [gw], "--workers", "2", name="n0",
                      wait=False)
    procs.append(node)
    gw.wait_log(r"node n0-w1 attached")
    gw.wait_log(r"node n0-w2 attached")
    with ThreadPoolExecutor(4) as pool:
        for res in pool.map(lambda _: cluster.sftp(gw, "ls\n"), range(12)):
            _ok(res)
    assert set(_served(gw)) == {"n0-w1", "n0-w2"}
    drain = subprocess.run(edgegw_cmd("internal", "drain", "--home", str(cluster.homes[0])),
                           capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stdout + drain.stderr
    assert node.popen is not None and node.popen.wait(20) == 0
