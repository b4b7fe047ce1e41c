"""Direct (`--listen`) clients of a node process count as relayed ones do: a drain closes the
direct listener and waits for their sessions; the load the node reports includes them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from internal.home import NodeHome
from tests.procs import SSH_OPTS, Proc, free_port, start_gateway, start_node
from tests.test_gateway_metrics import wait_for


def test_drain_waits_for_direct_sessions_and_closes_the_listener(
        tmp_path: Path, node_home: Path, alice: tuple[str, Path], procs: list[Proc]) -> None:
    user, key = alice
    port = free_port()
    node = start_node(tmp_path, node_home, [], "--listen", f"127.0.0.1:{port}",
                      "--drain-timeout", "60", wait=False)
    procs.append(node)
    node.wait_log(r"node \S+ started")
    src = tmp_path / "direct.bin"
    src.write_bytes(os.urandom(3 << 20))
    up = _slow_upload(port, user, key, src)
    try:
        _wait_for_bytes(node_home / "files" / user)   # the upload has started
        node.send_signal(signal.SIGTERM)
        node.wait_log(r"draining: 1 sessions running")
        # a new direct client during the drain: refused (the listener is closed), not
        # accepted and then cut off; the gateways send theirs to other nodes
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert node.popen is not None and node.popen.poll() is None, \
            "the node exited with a session running:\n" + node.text()[-4000:]
        assert up.poll() is None, "the upload ended before the test could check the drain"
        stderr = up.stderr.read() if up.wait(60) and up.stderr else ""
        assert up.returncode == 0, f"upload cut off by the drain:\n{stderr}{node.text()[-4000:]}"
        assert node.popen.wait(30) == 0, node.text()[-4000:]
        assert (node_home / "files" / user / "direct.bin").read_bytes() == src.read_bytes()
        assert "drain timeout" not in node.text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _wait_for_bytes(directory: Path, timeout: float = 20.0) -> None:
    """Until some file under `directory` (an upload's temporary) holds data."""
    deadline = time.monotonic() + timeout
    while not (directory.exists() and any(f.is_file() and f.stat().st_size
                                          for f in directory.rglob("*"))):
        assert time.monotonic() < deadline, f"no upload under {directory} in {timeout}s"
        time.sleep(0.05)


def _slow_upload(port: int, user: str, key: Path, src: Path) -> subprocess.Popen[str]:
    """`sftp put` at ~1 MB/s: it runs for seconds."""
    up = subprocess.Popen(["sftp", "-b", "-", "-l", "8000", "-P", str(port), "-i", str(key),
                           *SSH_OPTS, f"{user}@127.0.0.1"], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert up.stdin is not None
    up.stdin.write(f"put {src} {src.name}\n")
    up.stdin.close()
    return up


def test_direct_sessions_count_in_the_load_reported_to_gateways(
        tmp_path: Path, node_home: Path, alice: tuple[str, Path], procs: list[Proc]) -> None:
    user, key = alice
    mport, port = free_port(), free_port()
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--metrics",
                       f"127.0.0.1:{mport}")
    procs.append(gw)
    gw.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    procs.append(start_node(tmp_path, node_home, [gw], "--listen", f"127.0.0.1:{port}"))
    sessions = ("edgegw_gateway_node_sessions", (("node", NodeHome.load(node_home).node_id),))
    assert wait_for(mport, lambda m: sessions in m)[sessions] == 0
    src = tmp_path / "loaded.bin"
    src.write_bytes(os.urandom(3 << 20))
    up = _slow_upload(port, user, key, src)
    try:
        _wait_for_bytes(node_home / "files" / user)
        # the gateway balances by this: a node busy with direct clients is not idle
        assert wait_for(mport, lambda m: m[sessions] == 1)[sessions] == 1
        assert up.poll() is None, "the upload ended before the load was checked"
        assert up.wait(60) == 0, up.stderr.read() if up.stderr else ""
        assert wait_for(mport, lambda m: m[sessions] == 0)[sessions] == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
