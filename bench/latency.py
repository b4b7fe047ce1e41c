"""64-byte ping-pong round trips and connect+echo+close cycles through each path."""
from __future__ import annotations

from bench import netload
from bench.peers import (
    Ctx, EdgegwGatewayOneHop, alive, choose, record_tcp, relay_paths, start_all, stop_all,
)
from bench.procs import log
from bench.report import Metric, PartResult, Results

METRICS = [
    Metric("rtt_p50", "64B RTT p50", "µs", "{:.1f}"),
    Metric("rtt_p99", "64B RTT p99", "µs", "{:.1f}"),
    Metric("cycle_p50", "conn+echo+close p50", "µs", "{:.0f}"),
    Metric("cycle_p99", "conn+echo+close p99", "µs", "{:.0f}"),
]


def run(ctx: Ctx, results: Results, *, quick: bool, repeat: int,
        only: set[str] | None = None) -> PartResult:
    part = results.part(PartResult(
        "latency", "latency: 64-byte ping-pong and connect+first-byte+close (C client)",
        METRICS, baselines=["direct", "haproxy-splice"], ratio_metrics=["rtt_p50", "cycle_p50"]))
    rtts, cycles = (2000, 200) if quick else (20000, 2000)
    part.notes["samples"] = f"{rtts} round trips on one connection (after {rtts // 10 + 10} " \
                            f"warm-up), {cycles} connect+echo+close cycles, per path per rep"
    paths = choose(relay_paths(one_hop=EdgegwGatewayOneHop()), only, quick)
    started = netload.start_echo_or_skip(ctx, part, paths)
    if started is None:
        return part
    echo, port = started
    running = []
    try:
        running = start_all(paths, ctx, port, part.skip)
        record_tcp(part, running)
        total, step = repeat * len(running), 0
        for rep in range(repeat):
            for path in running:
                step += 1
                log(f"latency [{step}/{total}] rep {rep + 1} {path.name}")
                if not alive(part, path):
                    continue
                limit = 10 if quick else 120
                pp = netload.client(ctx.workdir, "pingpong", path.port, rtts, timeout=limit)
                if pp.get("hung"):
                    path.mark_broken(f"ping-pong through {path.name} hung")
                if pp.get("n"):
                    part.add(path.name, "rtt_p50", rep, pp["p50"])
                    part.add(path.name, "rtt_p99", rep, pp["p99"])
                else:
                    part.fail(path.name, f"ping-pong failed: {pp}")
                if path.broken:
                    part.fail(path.name, path.broken)
                    continue
                cy = netload.client(ctx.workdir, "cycle", path.port, cycles, timeout=limit)
                if cy.get("hung"):
                    part.fail(path.name, f"connect+echo+close cycles hung ({limit}s)")
                    path.mark_broken(f"cycles through {path.name} hung")
                if cy.get("n"):
                    part.add(path.name, "cycle_p50", rep, cy["p50"])
                    part.add(path.name, "cycle_p99", rep, cy["p99"])
                if cy.get("failed"):
                    part.path(path.name).info[f"cycle_failures_rep{rep}"] = cy["failed"]
    finally:
        stop_all(running)
        echo.stop()
    return part
