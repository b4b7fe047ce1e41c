"""One relay hop, C stream client -> relay -> C sink: throughput and relay CPU per GB.

The relay part measures edgegw's whole TCP path with iperf3, which needs the node to relay a
second time (--forward) because iperf3's server can only accept. Here the far end is netload's
sink, which also takes descriptors: the node hands it each Data connection
(bench/handoff_node.py), so the gateway is one hop, as HAProxy is, and the same C programs load
every path.
"""
from __future__ import annotations

from bench import netload
from bench.peers import (
    Ctx, Direct, EdgegwEngine, EdgegwGatewayOneHop, HAProxy, RelayPath, choose, record_tcp,
    start_all, stop_all, stream_rounds,
)
from bench.procs import Skip, cpu_seconds
from bench.report import Metric, PartResult, Results

METRICS = [
    Metric("gbps_1", "1 stream", "Gbit/s", "{:.2f}"),
    Metric("gbps_4", "4 streams", "Gbit/s", "{:.2f}"),
    Metric("cpu_gb_1", "relay CPU 1s", "s/GB", "{:.3f}"),
    Metric("cpu_gb_4", "relay CPU 4s", "s/GB", "{:.3f}"),
]


def paths() -> list[RelayPath]:
    return [Direct(), EdgegwGatewayOneHop(), EdgegwEngine("splice"), HAProxy(splice=True),
            HAProxy(splice=False)]


def run(ctx: Ctx, results: Results, *, quick: bool, repeat: int,
        only: set[str] | None = None) -> PartResult:
    part = results.part(PartResult(
        "onehop", "one relay hop: C stream -> relay -> C sink, throughput and relay CPU per GB",
        METRICS, baselines=["direct", "haproxy-splice"], ratio_metrics=["gbps_1", "gbps_4"]))
    seconds = 1 if quick else 3
    part.notes["stream_seconds"] = seconds
    part.notes["cpu"] = ("relay = the relay process's utime+stime over the run / GB delivered; "
                         "for edgegw-splice-1hop the gateway process, whose node hands each "
                         "Data connection to the sink")
    chosen = choose(paths(), only, quick)
    try:
        sink, sink_port = netload.start_server(ctx, "sink")
    except Skip as exc:
        for p in chosen:
            part.skip(p.name, str(exc))
        return part
    running = []
    try:
        running = start_all(chosen, ctx, sink_port, part.skip)
        record_tcp(part, running)
        for rep, streams, path in stream_rounds(part, running, repeat, "onehop"):
            pids = path.pids()
            role = "gateway" if "gateway" in pids else "relay"
            before = cpu_seconds(pids[role]) if role in pids else 0.0
            data = netload.stream(ctx.workdir, path.port, seconds, streams)
            after = cpu_seconds(pids[role]) if role in pids else 0.0
            if "error" in data:
                part.fail(path.name, f"{streams} stream(s): {data['error']}")
                if data.get("hung"):
                    path.mark_broken(f"stream through {path.name} hung")
                continue
            gb = data["bytes"] / 1e9
            part.add(path.name, f"gbps_{streams}", rep, data["gbps"])
            if role in pids and gb > 0:
                part.add(path.name, f"cpu_gb_{streams}", rep, (after - before) / gb)
    finally:
        stop_all(running)
        sink.stop()
    return part
