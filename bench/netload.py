"""Build and drive bench/netload.c (echo server and latency clients), compiled on the fly."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.peers import RelayPath
from bench.procs import Proc, Skip, need, wait_port
from bench.report import PartResult
from edgegw.sockio import free_port

SOURCE = Path(__file__).with_name("netload.c")


def build(workdir: Path) -> Path:
    gcc = need("gcc")
    exe = workdir / "netload"
    if not exe.exists():
        cp = subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(SOURCE)],
                            capture_output=True, text=True)
        if cp.returncode != 0:
            raise Skip(f"cannot build netload.c: {cp.stderr.strip()[-400:]}")
    return exe


def start_echo(workdir: Path) -> tuple[Proc, int]:
    exe = build(workdir)
    port = free_port()
    p = Proc("echo", [str(exe), "echo", str(port)], workdir / f"echo-{port}.log").start()
    wait_port(port, proc=p)
    return p, port


def start_echo_or_skip(workdir: Path, part: PartResult,
                       paths: list[RelayPath]) -> tuple[Proc, int] | None:
    """The echo server every path of a part relays to; None (every path skipped) without it."""
    try:
        return start_echo(workdir)
    except Skip as exc:
        for p in paths:
            part.skip(p.name, str(exc))
        return None


def client(workdir: Path, mode: str, port: int, count: int, size: int = 64,
           timeout: float = 300.0) -> dict:
    """Run one client mode; returns its JSON (microsecond percentiles, failures)."""
    exe = build(workdir)
    try:
        cp = subprocess.run([str(exe), mode, str(port), str(count), str(size)],
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "n": 0, "failed": count, "hung": True,
                "error": f"did not finish within {timeout:.0f}s"}
    try:
        return json.loads(cp.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"mode": mode, "n": 0, "failed": count, "error": cp.stderr.strip()[-300:]}
