"""`--workers N`: N node processes over one home, each a separate PNC peer of every gateway.

asyncssh does its crypto and SFTP work in one thread per process, so a node uses every core
only by running several processes. The supervisor starts them, passes SIGTERM (drain) and
SIGINT (stop) on, and restarts a worker that dies unexpectedly. With `--metrics` it serves
the sum of its workers' metrics (internal/metrics.py), the workers none of their own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from edgegw.metrics_http import MetricsEndpoint, MetricsServer

log = logging.getLogger("edgegw.node.workers")

RESTART_DELAY = 1.0
# options the supervisor keeps to itself (each takes a value); workers get their own
_SUPERVISOR_ONLY = ("--workers", "--node-id", "--metrics", "--metrics-allow",
                    "--metrics-cert", "--metrics-key", "--metrics-client-ca")


def worker_args(argv: list[str], index: int, node_id: str) -> list[str]:
    """The command line of worker `index`: this one, with one worker and its own node id."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _SUPERVISOR_ONLY:
            skip = True  # its value follows
        elif not arg.startswith(tuple(f"{opt}=" for opt in _SUPERVISOR_ONLY)):
            out.append(arg)
    return [sys.executable, "-m", "edgegw", *out, "--workers", "1", "--reuse-port",
            "--node-id", f"{node_id}-w{index}"]


def supervise(argv: list[str], workers: int, node_id: str,
              metrics: MetricsEndpoint | None = None) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="edgegw-node-metrics-") if metrics else None
    try:
        if metrics is not None and metrics_dir is not None:
            _serve_metrics(metrics, metrics_dir)
        return _supervise(argv, workers, node_id, metrics_dir)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_metrics(endpoint: MetricsEndpoint, path: str) -> None:
    """The workers' summed metrics at the endpoint, served by an event loop in a thread of its own
    (the supervisor itself only polls its workers). Binding fails here, before any worker
    starts."""
    from internal.metrics import multiprocess_registry

    server = MetricsServer(endpoint, multiprocess_registry(path))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(server.start())
    except BaseException:
        loop.close()
        raise
    threading.Thread(target=loop.run_forever, name="edgegw-metrics", daemon=True).start()


def _supervise(argv: list[str], workers: int, node_id: str, metrics_dir: str | None) -> int:
    from internal.metrics import MULTIPROC_ENV, worker_exited

    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    env = dict(os.environ, **({MULTIPROC_ENV: metrics_dir} if metrics_dir else {}))

    def spawn(index: int) -> None:
        procs[index] = subprocess.Popen(worker_args(argv, index, node_id), env=env)
        log.info("worker %d started (pid %d)", index, procs[index].pid)

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(1, workers + 1):
        spawn(index)
    done: set[int] = set()
    while len(done) < len(procs):
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None or index in done:
                continue
            if metrics_dir is not None:
                worker_exited(proc.pid, metrics_dir)
            if stopping or code == 0:  # stopped or drained (`edgegw internal drain`): done
                done.add(index)
                continue
            log.warning("worker %d (pid %d) exited with %d; restarting", index, proc.pid, code)
            time.sleep(RESTART_DELAY)
            spawn(index)
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1
