"""Build and drive bench/netload.c (echo and sink servers, latency and stream clients),
compiled on the fly."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.peers import Ctx, RelayPath
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


def start_server(ctx: Ctx, mode: str = "echo") -> tuple[Proc, int]:
    """`netload echo|sink` on a free port, also taking descriptors on a Unix socket that
    ctx.fdsocks records for the port (EdgegwGatewayOneHop's node hands connections there)."""
    exe = build(ctx.workdir)
    port = free_port()
    fdsock = ctx.workdir / f"{mode}-{port}.sock"
    p = Proc(mode, [str(exe), mode, str(port), str(fdsock)],
             ctx.workdir / f"{mode}-{port}.log").start()
    wait_port(port, proc=p)
    ctx.fdsocks[port] = fdsock
    return p, port


def start_echo_or_skip(ctx: Ctx, part: PartResult,
                       paths: list[RelayPath]) -> tuple[Proc, int] | None:
    """The echo server every path of a part relays to; None (every path skipped) without it."""
    try:
        return start_server(ctx, "echo")
    except Skip as exc:
        for p in paths:
            part.skip(p.name, str(exc))
        return None


def stream(workdir: Path, port: int, seconds: float, streams: int) -> dict:
    """`netload stream`: bytes delivered by `streams` connections in about `seconds`."""
    exe = build(workdir)
    try:
        cp = subprocess.run([str(exe), "stream", str(port), str(seconds), str(streams)],
                            capture_output=True, text=True, timeout=seconds + 40)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {seconds + 40:.0f}s", "hung": True}
    try:
        data = json.loads(cp.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (cp.stderr or cp.stdout).strip()[-300:] or "no output"}
    if data.get("failed"):
        data["error"] = f"{data['failed']} of {streams} stream(s) failed"
    return data


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
