"""`edgegw internal serve --metrics`: a node's logins, sessions, bytes and gateway links, summed
over its worker processes, scraped over real HTTP while OpenSSH clients use it."""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import (Proc, edgegw_cmd, free_port, make_key, sftp_batch, start_gateway,
                         start_node)
from tests.test_gateway_metrics import get_metrics, make_cert, scrape, wait_for


def _value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_node_metrics_count_logins_sessions_bytes_and_links(tmp_path: Path, node_home: Path,
                                                            procs: list[Proc], alice,
                                                            workers: str) -> None:
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    mport = free_port()
    node = start_node(tmp_path, node_home, [gw], "--workers", workers, "--metrics",
                      f"127.0.0.1:{mport}", wait=False)
    procs.append(node)
    node.wait_log(rf"metrics at http://127.0.0.1:{mport}/metrics")
    links = int(workers)
    m = wait_for(mport, lambda m: _value(m, "edgegw_node_gateways_attached") == links, 30)
    assert _value(m, "edgegw_node_gateways_attached") == links

    stranger = make_key(tmp_path / "stranger")               # not alice's key: refused
    assert sftp_batch(gw.external, user, stranger, "ls\n").returncode != 0
    data = os.urandom(2 << 20)
    (tmp_path / "x.bin").write_bytes(data)
    res = sftp_batch(gw.external, user, key, "put x.bin\nget x.bin y.bin\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "y.bin").read_bytes() == data

    m = wait_for(mport, lambda m: _value(m, "edgegw_node_session_bytes_total", direction="out")
              >= len(data) and _value(m, "edgegw_node_sessions_active") == 0, 30)
    assert _value(m, "edgegw_node_audit_events_total", kind="auth", result="ok") == 1
    assert _value(m, "edgegw_node_audit_events_total", kind="auth", result="failed") >= 1
    assert _value(m, "edgegw_node_audit_events_total", kind="session.connect", result="") == 2
    assert _value(m, "edgegw_node_audit_events_total", kind="session.disconnect",
                  result="") == 2
    assert _value(m, "edgegw_node_sessions_active") == 0
    # SFTP sessions count the file bytes they moved
    assert _value(m, "edgegw_node_session_bytes_total", direction="in") == len(data)
    assert _value(m, "edgegw_node_session_bytes_total", direction="out") == len(data)
    if workers == "1":
        assert _value(m, "process_open_fds") > 0                 # one process: its own figures
        return

    # a worker that dies is restarted; its links leave the sum, its counts stay in it
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", node.text())]
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    node.wait_log(r"worker 1 \(pid \d+\) exited with -9; restarting")
    node.wait_log(r"worker 1 started \(pid \d+\)", start=node.text().index("restarting"))
    m = wait_for(mport, lambda m: _value(m, "edgegw_node_gateways_attached") == 2
              and len(re.findall(r"attached to gateway", node.text())) >= 3, 30)
    time.sleep(0.5)                               # a stale gauge would show as 3 by now
    m = scrape(mport)
    assert _value(m, "edgegw_node_gateways_attached") == 2
    assert _value(m, "edgegw_node_audit_events_total", kind="auth", result="ok") == 1
    assert node.stop() == 0
    assert not list(Path("/tmp").glob(f"edgegw-node-metrics-*/*_{pids[1]}.db"))


def test_node_metrics_https_and_allow_with_workers(tmp_path: Path, node_home: Path,
                                                   procs: list[Proc]) -> None:
    """The supervisor serves the sum over HTTPS to allowed scrapers only; its workers, which
    serve none, start without those options."""
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    mport = free_port()
    cert, key = make_cert(tmp_path)
    node = start_node(tmp_path, node_home, [gw], "--workers", "2", "--metrics",
                      f"127.0.0.1:{mport}", "--metrics-allow", "127.0.0.3/32",
                      "--metrics-cert", str(cert), "--metrics-key", str(key), wait=False)
    procs.append(node)
    node.wait_log(rf"metrics at https://127.0.0.1:{mport}/metrics")
    with pytest.raises((ssl.SSLError, ConnectionError)):   # off --metrics-allow: closed
        get_metrics(mport, "127.0.0.1", cert)
    deadline = time.monotonic() + 30
    while _value(scrape(mport, "127.0.0.3", cert), "edgegw_node_gateways_attached") != 2:
        assert time.monotonic() < deadline, node.text()[-2000:]
        time.sleep(0.1)
    assert "needs --metrics" not in node.text()
    assert node.stop() == 0


def test_node_metrics_bad_address(node_home: Path) -> None:
    busy = free_port()
    with socket.create_server(("127.0.0.1", busy)):
        for workers, value, message in (("1", "9100", "expected HOST:PORT"),
                                        ("1", f"127.0.0.1:{busy}", "cannot listen on"),
                                        ("2", f"127.0.0.1:{busy}", "cannot listen on")):
            res = subprocess.run(edgegw_cmd("internal", "serve", "--home", str(node_home),
                                            "--gateway", "127.0.0.1:1", "--workers", workers,
                                            "--metrics", value),
                                 capture_output=True, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
            assert res.returncode != 0 and message in res.stderr, (workers, value, res.stderr)
            assert "Traceback" not in res.stderr
