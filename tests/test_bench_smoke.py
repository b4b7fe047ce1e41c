"""Smoke test of the benchmark suite: it runs, stops what it starts, and writes the JSON and
SVG with the expected structure. No figure is asserted: figures come from `python -m bench`
runs, never from a test."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = {"relay", "onehop", "latency", "sessions", "session_setup", "sftp"}


@pytest.mark.timeout(150)
def test_bench_quick_writes_results(tmp_path: Path) -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path),
         "--paths", "direct,haproxy-splice,edgegw-splice,edgegw-splice-1hop,openssh,edgegw-node,"
                    "edgegw-gateway,edgegw-gateway-sndbuf,edgegw-gateway-kernelcc,"
                    "edgegw-node-via-haproxy-splice,"
                    "edgegw-node-via-haproxy-splice-sndbuf",
         "--sessions", "200", "--sftp-mib", "8",
         "--gateway-args", "--congestion-node reno", "--node-args", "--congestion-gateway reno"],
        cwd=REPO, capture_output=True, text=True, timeout=140)
    assert cp.returncode == 0, cp.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["schema"] == "edgegw-bench/1"
    for key in ("cpu_model", "cores", "kernel", "free_page_reporting", "page_reporting_hold_s",
                "tcp_congestion_control",
                "default_qdisc", "uptime_s", "python", "haproxy", "iperf3", "openssh", "edgegw"):
        assert key in data["machine"]
    assert PARTS <= set(data["parts"])
    for name, part in data["parts"].items():
        assert part["paths"], name
        for path, res in part["paths"].items():
            assert res["status"] in ("ok", "skipped", "failed"), (name, path)
            if res["status"] != "ok":
                assert res["reason"], (name, path)
            for metric, m in res["metrics"].items():
                assert {"unit", "min", "median", "max", "n", "values"} <= set(m), metric
                assert m["min"] <= m["median"] <= m["max"]
                assert len(m["values"]) == m["n"] >= 1
    # the ceiling path needs only iperf3 and gcc, which the suite documents as required
    assert data["parts"]["latency"]["paths"]["direct"]["status"] == "ok"
    # edgegw's own paths need nothing but the suite: the gateway as one hop (its node hands
    # Data connections to netload) carried bytes and echoes
    # (with the options given to every gateway and to every node dialing one)
    for part in ("onehop", "latency"):
        assert data["parts"][part]["paths"]["edgegw-splice-1hop"]["status"] == "ok", part
    assert data["options"]["node_args"] == "--congestion-gateway reno"
    # each edgegw process said what it chose: the run's options, after the relay comparisons'
    # pin to the kernel's default (onehop, relay), and instead of the default (sftp)
    assert "Data connections reno" in data["parts"]["onehop"]["notes"]["tcp edgegw-splice-1hop"]
    relayed = data["parts"]["relay"]["notes"]["tcp edgegw-splice"]
    assert "Data connections reno" in relayed and "node: reno" in relayed
    assert "clients the kernel's default" in relayed
    sftp_tcp = data["parts"]["sftp"]["notes"]["tcp edgegw-gateway"]
    assert "node: reno" in sftp_tcp
    # auto gives clients cubic where it may be set and is not the default: then a gateway with
    # the kernel's algorithm towards clients runs beside the default one
    cubic_runs = data["machine"]["tcp_congestion_control"] != "cubic" and _may_set("cubic")
    assert ("gateway-sndbuf: clients cubic for those whose handshake" in sftp_tcp) == cubic_runs
    assert ("gateway-kernelcc: clients the kernel's default" in sftp_tcp) == cubic_runs
    # the node moved files directly, through its gateway (with the defaults, with fixed send
    # buffers, and with the kernel's algorithm towards clients where that differs), and behind
    # the peer relay (with the kernel's send buffers and with fixed ones)
    sftp = data["parts"]["sftp"]["paths"]
    behind = ["edgegw-node", "edgegw-gateway", "edgegw-gateway-sndbuf"] + (
        ["edgegw-node-via-haproxy-splice", "edgegw-node-via-haproxy-splice-sndbuf"]
        if data["machine"]["haproxy"] != "missing" else [])
    if cubic_runs:
        behind.append("edgegw-gateway-kernelcc")
    else:
        assert sftp["edgegw-gateway-kernelcc"]["status"] == "skipped"
    for path in behind:
        assert sftp[path]["status"] == "ok", (path, sftp[path]["reason"])
        assert sftp[path]["metrics"]["up_aes"]["median"] > 0
    svg = (tmp_path / "latest.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "== relay" in cp.stdout
    assert f"tcp {data['machine']['tcp_congestion_control']}/" in cp.stdout


def _may_set(algorithm: str) -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, algorithm.encode())
        except OSError:
            return False
    return True


def _virtio_device(root: Path, name: str, device_id: int, features: str, bound: bool) -> None:
    dev = root / name
    dev.mkdir()
    (dev / "device").write_text(f"0x{device_id:04x}\n")
    (dev / "features").write_text(features + "\n")
    if bound:
        (dev / "driver").mkdir()


def test_free_page_reporting_is_read_from_the_balloon_device(tmp_path: Path) -> None:
    from bench.procs import free_page_reporting
    bit5 = "0000010" + "0" * 57          # features: one digit per bit, bit 0 first
    _virtio_device(tmp_path, "virtio0", 0x0002, bit5, bound=True)      # a block device
    assert free_page_reporting(tmp_path) is None
    _virtio_device(tmp_path, "virtio1", 0x0005, "0110000" + "0" * 57, bound=True)
    assert free_page_reporting(tmp_path) is None                        # balloon, no reporting
    _virtio_device(tmp_path, "virtio2", 0x0005, bit5, bound=False)
    assert free_page_reporting(tmp_path) is None                        # driver unbound
    _virtio_device(tmp_path, "virtio3", 0x0005, bit5, bound=True)
    assert free_page_reporting(tmp_path) == "virtio3"
    assert free_page_reporting(tmp_path / "absent") is None
    from bench.procs import page_reporting_hold_s
    hold = tmp_path / "min_free_ms"
    assert page_reporting_hold_s(hold) is None                          # not in this kernel
    hold.write_text("100000\n")
    assert page_reporting_hold_s(hold) == 100.0


def test_sftp_warns_of_what_makes_tmpfs_transfers_slow_by_turns() -> None:
    from bench.sftp import FRESH_BOOT_S, memory_warnings
    assert memory_warnings(None, None) == {}
    assert memory_warnings(None, FRESH_BOOT_S) == {}                      # booted long enough ago
    fresh = memory_warnings(None, 120)
    assert list(fresh) == ["boot"] and "booted 120 s ago" in fresh["boot"]
    both = memory_warnings("virtio0", 30)
    assert set(both) == {"memory", "boot"} and "(virtio0)" in both["memory"]
    assert "3.5x" in memory_warnings("virtio0", None, 2.0)["memory"]   # reported at once
    held = memory_warnings("virtio0", None, 100.0)["memory"]
    assert "stayed free for 100 s" in held and "3.5x" not in held
