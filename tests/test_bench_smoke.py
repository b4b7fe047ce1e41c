"""Smoke test of the benchmark suite: it runs, stops what it starts, and writes the JSON and
SVG with the expected structure. No figure is asserted: figures come from `python -m bench`
runs, never from a test."""
from __future__ import annotations

import json
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
                    "edgegw-gateway",
         "--sessions", "200", "--sftp-mib", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=140)
    assert cp.returncode == 0, cp.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    assert data["schema"] == "edgegw-bench/1"
    for key in ("cpu_model", "cores", "kernel", "python", "haproxy", "iperf3", "openssh",
                "edgegw"):
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
    for part in ("onehop", "latency"):
        assert data["parts"][part]["paths"]["edgegw-splice-1hop"]["status"] == "ok", part
    svg = (tmp_path / "latest.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "== relay" in cp.stdout
