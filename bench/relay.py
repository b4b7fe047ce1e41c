"""Raw TCP relay throughput and relay CPU per GB: iperf3 through each path, interleaved."""
from __future__ import annotations

import json
import subprocess

from bench.peers import (
    Ctx, choose, record_tcp, relay_paths, start_all, stop_all, stream_rounds,
)
from bench.procs import Proc, Skip, cpu_seconds, need, wait_port
from bench.report import Metric, PartResult, Results
from edgegw.sockio import free_port

METRICS = [
    Metric("gbps_1", "1 stream", "Gbit/s", "{:.2f}"),
    Metric("gbps_4", "4 streams", "Gbit/s", "{:.2f}"),
    Metric("cpu_gb_1", "relay CPU 1s", "s/GB", "{:.3f}"),
    Metric("cpu_gb_4", "relay CPU 4s", "s/GB", "{:.3f}"),
    Metric("node_cpu_gb_1", "node CPU 1s", "s/GB", "{:.3f}"),
    Metric("node_cpu_gb_4", "node CPU 4s", "s/GB", "{:.3f}"),
]


def iperf3(port: int, seconds: float, streams: int, grace: float = 15) -> dict:
    args = [need("iperf3"), "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
            "-P", str(streams), "-J", "--connect-timeout", "10000"]
    for attempt in range(3):
        try:
            cp = subprocess.run(args, capture_output=True, text=True, timeout=seconds + grace)
        except subprocess.TimeoutExpired:
            return {"error": f"iperf3 did not finish within {seconds + grace:.0f}s", "hung": True}
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError:
            data = {"error": (cp.stderr or cp.stdout).strip()[-300:] or "no output"}
        if "busy" in str(data.get("error", "")) and attempt < 2:
            import time
            time.sleep(1.0)
            continue
        return data
    return data


def run(ctx: Ctx, results: Results, *, quick: bool, repeat: int,
        only: set[str] | None = None) -> PartResult:
    part = results.part(PartResult(
        "relay", "relay: iperf3 throughput and relay CPU per GB received", METRICS,
        baselines=["direct", "haproxy-splice"], ratio_metrics=["gbps_1", "gbps_4"]))
    seconds = 1 if quick else 3
    part.notes["iperf3_seconds"] = seconds
    part.notes["cpu"] = ("relay = the relay process tree's utime+stime delta over the iperf3 "
                         "run / GB received; for edgegw-<backend> 'relay' is the gateway and "
                         "'node' the internal node (second hop, --forward)")
    paths = choose(relay_paths(), only, quick)
    try:
        need("iperf3")
    except Skip as exc:
        for p in paths:
            part.skip(p.name, str(exc))
        return part
    server_port = free_port()
    server = Proc("iperf3-server", [need("iperf3"), "-s", "-B", "127.0.0.1", "-p",
                                    str(server_port)], ctx.workdir / "iperf3-server.log").start()
    running = []
    try:
        wait_port(server_port, proc=server)
        running = start_all(paths, ctx, server_port, part.skip)
        record_tcp(part, running)
        for rep, streams, path in stream_rounds(part, running, repeat, "relay"):
            pids = path.pids()
            before = {r: cpu_seconds(pid) for r, pid in pids.items()}
            data = iperf3(path.port, seconds, streams, grace=5 if quick else 15)
            after = {r: cpu_seconds(pid) for r, pid in pids.items()}
            if "error" in data:
                part.fail(path.name, f"iperf3 {streams} stream(s): {data['error']}")
                if data.get("hung"):
                    path.mark_broken(f"iperf3 hung through {path.name}")
                continue
            recv = data["end"]["sum_received"]
            gb = recv["bytes"] / 1e9
            part.add(path.name, f"gbps_{streams}", rep, recv["bits_per_second"] / 1e9)
            role = "gateway" if "gateway" in pids else "relay"
            if role in pids and gb > 0:
                part.add(path.name, f"cpu_gb_{streams}", rep,
                         (after[role] - before[role]) / gb)
            if "node" in pids and gb > 0:
                part.add(path.name, f"node_cpu_gb_{streams}", rep,
                         (after["node"] - before["node"]) / gb)
    finally:
        stop_all(running)
        server.stop()
    return part
