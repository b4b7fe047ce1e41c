"""TCP options of the relay's sockets, seen by the kernel (ss) with real processes: send
buffers and congestion control as asked, the Data hop's default, and --congestion-client auto
choosing per client by the handshake's round trip (a far client from a network namespace
whose packets this test delays)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from edgegw.sockio import CC_AUTO, NEAR_RTT_US, resolve_congestion
from tests.farhost import FarHost
from tests.procs import SSH_OPTS, Proc, free_port, sftp_batch, start_gateway, start_node


def _kernel_cc() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def _other_congestion_control() -> str:
    """An algorithm that is not the kernel's default, so the test sees it was chosen."""
    return "reno" if _kernel_cc() != "reno" else "cubic"


def _sockets(filter_: str) -> list[tuple[int, str]]:
    """(sk_sndbuf, congestion control) of every established TCP socket `filter_` selects,
    as ss reports them (skmem's tb, and the algorithm's name)."""
    out = subprocess.run(["ss", "-tmniH", "state", "established", filter_],
                         capture_output=True, text=True, check=True).stdout
    socks = re.split(r"\n(?=\S)", out.strip())   # a socket's lines: the first, then indented
    found = []
    for text in filter(None, socks):
        tb = re.search(r"\btb(\d+)", text)
        algo = re.search(r"\s(reno|cubic|bbr\d?|dctcp|htcp|vegas|westwood|bic)\b", text)
        assert tb and algo, text
        found.append((int(tb.group(1)), algo.group(1)))
    return found


def _roundtrip(port: int, user: str, key: Path, tmp: Path, data: bytes,
               host: str = "127.0.0.1", on: tuple[str, ...] = ()) -> None:
    """One SFTP session to host:port (run by the `on` prefix: another namespace) puts `data`
    and gets it back; the copy must be identical."""
    (tmp / "x.bin").write_bytes(data)
    (tmp / "y.bin").unlink(missing_ok=True)
    res = sftp_batch(port, user, key, "put x.bin\nget x.bin y.bin\n", cwd=tmp, host=host,
                     on=on)
    assert res.returncode == 0, f"sftp failed:\n{res.stdout}\n{res.stderr}"
    assert (tmp / "y.bin").read_bytes() == data


@contextlib.contextmanager
def _held_session(port: int, user: str, key: Path, host: str = "127.0.0.1",
                  on: tuple[str, ...] = ()) -> Iterator[None]:
    """An interactive sftp session to host:port, logged in and idle, for the body."""
    held = subprocess.Popen([*on, "sftp", "-P", str(port), "-i", str(key), *SSH_OPTS,
                             f"{user}@{host}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert held.stdin is not None and held.stdout is not None
        held.stdin.write("pwd\n")
        held.stdin.flush()
        while "Remote working directory" not in (line := held.stdout.readline()):
            assert line, "sftp exited before it logged in"
        yield
    finally:
        # sftp's ssh child too: killed alone, sftp left it holding a connection into a
        # namespace about to be deleted, where nothing would ever close it
        os.killpg(held.pid, signal.SIGKILL)
        held.wait()


def test_send_buffers_and_congestion_control_end_to_end(
        tmp_path: Path, node_home: Path, procs: list[Proc], alice: tuple[str, Path]) -> None:
    """--sndbuf-client / --sndbuf-node / --congestion-client / --congestion-node on the
    gateway and --congestion-gateway on the node: each socket of the relay gets what was asked
    (the kernel doubles a send buffer's figure), and files still arrive intact."""
    user, key = alice
    cc = _other_congestion_control()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--sndbuf-client", "65536",
                       "--sndbuf-node", "98304", "--congestion-client", cc,
                       "--congestion-node", cc, name="gw-tcp")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw], "--congestion-gateway", cc))
    _roundtrip(gw.external, user, key, tmp_path, os.urandom(8 << 20))
    with _held_session(gw.external, user, key):
        assert _sockets(f"sport = :{gw.external}") == [(2 * 65536, cc)]
        gateway_ends = _sockets(f"sport = :{gw.data}")   # the session's, and pooled ones
        assert gateway_ends and set(gateway_ends) == {(2 * 98304, cc)}
        node_ends = _sockets(f"dport = :{gw.data}")
        assert len(node_ends) == len(gateway_ends)
        assert {algo for _, algo in node_ends} == {cc}


def test_by_default_the_data_hop_and_near_clients_run_cubic(
        tmp_path: Path, node_home: Path, procs: list[Proc], alice: tuple[str, Path]) -> None:
    """Without --congestion-* options both ends of the Data hop get cubic where the process
    may set it ("auto"), and so does a client on this host (its handshake took far under a
    millisecond); each process logs what it chose."""
    user, key = alice
    default = _kernel_cc()
    data_cc = resolve_congestion(CC_AUTO)[0] or default
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", name="gw-cc")
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw])
    procs.append(node)
    if data_cc == default:
        gw.wait_log(rf"TCP congestion control: clients the kernel's default, {default}")
    else:
        gw.wait_log(rf"TCP congestion control: clients {data_cc} for those whose handshake "
                    rf"took under 1 ms, {default} \(the kernel's default\) for the rest \(auto\); "
                    rf"Data connections {data_cc}\b")
    node.wait_log(rf"Data connections: TCP congestion control {data_cc}\b")
    with _held_session(gw.external, user, key):
        assert [algo for _, algo in _sockets(f"sport = :{gw.external}")] == [data_cc]
        ends = _sockets(f"sport = :{gw.data}") + _sockets(f"dport = :{gw.data}")
        assert ends and {algo for _, algo in ends} == {data_cc}


def test_a_nodes_direct_clients_get_the_same_choice(
        tmp_path: Path, node_home: Path, procs: list[Proc], alice: tuple[str, Path]) -> None:
    """The node's own listener (--listen) chooses for its clients as the gateway does, so
    that a client is served alike whether it comes through a gateway or straight to a node;
    --congestion-client kernel there leaves every client on the kernel's default."""
    user, key = alice
    near_cc = resolve_congestion(CC_AUTO)[0] or _kernel_cc()
    for option, expected in (("auto", near_cc), ("kernel", _kernel_cc())):
        port = free_port()
        node = start_node(tmp_path, node_home, [], "--listen", f"127.0.0.1:{port}",
                          "--congestion-client", option, name=f"node-{option}", wait=False)
        procs.append(node)
        node.wait_log(r"serving SSH/SFTP directly on 127\.0\.0\.1:\d+ \(TCP congestion "
                      r"control: ")
        with _held_session(port, user, key):
            assert [algo for _, algo in _sockets(f"sport = :{port}")] == [expected], option
        node.stop()


def _metric(port: int, name: str) -> dict[str, float]:
    """Samples of one metric family on the gateway's /metrics, by their label values."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}_total\{{\w+="([^"]*)"\}} (\S+)$', text, re.M)}


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and TUN devices for a far host")
def test_auto_gives_far_clients_the_kernels_choice(
        tmp_path: Path, node_home: Path, procs: list[Proc], alice: tuple[str, Path]) -> None:
    """A client 4 ms away (another namespace, its packets held 2 ms each way; auto's bound
    is 1 ms) keeps the kernel's algorithm (bbr, where that is the default: what pacing is
    for), a client on this host runs cubic, the metrics count both, and a file crosses the
    far connection intact."""
    user, key = alice
    near_cc, said = resolve_congestion(CC_AUTO)
    if not near_cc:
        pytest.skip(f"auto chooses the same for every client here: {said}")
    far_cc = _kernel_cc()
    with FarHost(delay=2 * NEAR_RTT_US / 1e6) as far:   # a round trip of 4 x the bound
        ext, metrics = free_port(), free_port()
        gw = start_gateway(tmp_path, node_home / "gateway-trust.pem",
                           "--external", f"0.0.0.0:{ext}", "--metrics", f"127.0.0.1:{metrics}",
                           ports=(ext, free_port(), free_port()), name="gw-far")
        procs.append(gw)
        procs.append(start_node(tmp_path, node_home, [gw]))
        on_far = tuple(far.exec())
        _roundtrip(ext, user, key, tmp_path, os.urandom(4 << 20), host=far.here, on=on_far)
        with _held_session(ext, user, key, host=far.here, on=on_far), \
                _held_session(ext, user, key):
            far_socks = _sockets(f"sport = :{ext} and dst {far.address}")
            near_socks = _sockets(f"sport = :{ext} and dst 127.0.0.1")
            assert [algo for _, algo in far_socks] == [far_cc]
            assert [algo for _, algo in near_socks] == [near_cc]
        assert _metric(metrics, "edgegw_gateway_client_connections") == {near_cc: 1,
                                                                          far_cc: 2}
