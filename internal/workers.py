"""`--workers N`: N node processes over one home, each a separate PNC peer of every gateway.

asyncssh does its crypto and SFTP work in one thread per process, so a node uses every core
only by running several processes. The supervisor starts them, passes SIGTERM (drain) and
SIGINT (stop) on, and restarts a worker that dies unexpectedly. With `--metrics` it serves
the sum of its workers' metrics (internal/metrics.py), the workers none of their own.

A worker is ready once it has written its pid file (internal/runtime.py does that after its
service and listener are up). One that exits before that at first start failed on something
every worker would (the home, the store, the listen address): restarting it would only loop,
so the supervisor stops the others and fails with it. A worker that dies after running is
restarted, unless workers keep dying (CRASH_LIMIT in CRASH_WINDOW): then the supervisor gives
up too, leaving the restart policy to whatever runs it (systemd, an orchestrator).
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
from pathlib import Path

from edgegw.metrics_http import MetricsEndpoint, MetricsServer

log = logging.getLogger("edgegw.node.workers")

RESTART_DELAY = 1.0
POLL_INTERVAL = 0.2
CRASH_LIMIT = 5          # restarts allowed within CRASH_WINDOW seconds, over all workers
CRASH_WINDOW = 60.0
# options the supervisor keeps to itself (each takes a value); workers get their own
_SUPERVISOR_ONLY = ("--workers", "--node-id", "--metrics", "--metrics-allow",
                    "--metrics-cert", "--metrics-key", "--metrics-client-ca")


# Set by the supervisor in each worker's environment: its pid (see follow_supervisor).
SUPERVISOR_ENV = "EDGEGW_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def follow_supervisor() -> None:
    """In a worker: drain and exit (SIGTERM) when the supervisor dies, however it dies. A
    supervisor killed with SIGKILL cannot pass a signal on, and workers left running would
    attach again, beside the new supervisor's, under the same node ids."""
    parent = os.environ.pop(SUPERVISOR_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervisor: %s",
                    os.strerror(ctypes.get_errno()))
    if str(os.getppid()) != parent:     # it died before the request above took effect
        raise SystemExit(f"the worker supervisor (pid {parent}) is gone")


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


class WorkersFailed(Exception):
    """The supervisor gave up: a worker could not start, or workers kept crashing."""


def supervise(argv: list[str], workers: int, node_id: str, run_dir: Path,
              metrics: MetricsEndpoint | None = None) -> int:
    """Run the workers until they stop; `run_dir` is where they write their pid files.
    Raises WorkersFailed when the supervisor gives up (the workers are stopped by then)."""
    metrics_dir = tempfile.mkdtemp(prefix="edgegw-node-metrics-") if metrics else None
    try:
        if metrics is not None and metrics_dir is not None:
            _serve_metrics(metrics, metrics_dir)
        return _supervise(argv, workers, node_id, run_dir, metrics_dir)
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


def _supervise(argv: list[str], workers: int, node_id: str, run_dir: Path,
               metrics_dir: str | None) -> int:
    from internal.metrics import MULTIPROC_ENV, worker_exited

    procs: dict[int, subprocess.Popen[bytes]] = {}
    ready: set[int] = set()          # pids of workers seen serving
    restarted: set[int] = set()      # worker indexes that have been restarted
    due: dict[int, float] = {}       # worker index -> when to restart it
    done: set[int] = set()           # worker indexes that are over
    crashes: list[float] = []        # when workers died (but at first start): crash guard
    stopping = False
    stop_signal: int = signal.SIGTERM   # what stop_all sent, for workers started after it
    failure: str | None = None       # why the supervisor gave up
    env = dict(os.environ, **({MULTIPROC_ENV: metrics_dir} if metrics_dir else {}),
               **{SUPERVISOR_ENV: str(os.getpid())})

    def spawn(index: int) -> None:
        procs[index] = subprocess.Popen(worker_args(argv, index, node_id), env=env)
        log.info("worker %d started (pid %d)", index, procs[index].pid)
        if stopping:    # the signal came while it was being started: stop_all missed it
            procs[index].send_signal(stop_signal)

    def is_ready(proc: subprocess.Popen[bytes]) -> bool:
        # the pid file goes when the worker exits cleanly, so remember it while it is there
        if proc.pid not in ready and (run_dir / f"node-{proc.pid}.pid").exists():
            ready.add(proc.pid)
        return proc.pid in ready

    def stop_all(sig: int) -> None:
        nonlocal stopping, stop_signal
        stopping = True
        stop_signal = sig
        done.update(due)            # restarts not yet made are off
        due.clear()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    def give_up(why: str) -> None:
        nonlocal failure
        failure = why               # the CLI's error line; the log says what happens now
        log.warning("giving up: stopping the other workers")
        stop_all(signal.SIGTERM)    # drain; it also ends a worker still starting, quietly

    def forward(sig: int, _frame: object) -> None:
        stop_all(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(1, workers + 1):
        spawn(index)
    while len(done) < len(procs):
        time.sleep(POLL_INTERVAL)
        now = time.monotonic()
        for index, when in list(due.items()):
            if now >= when and due.pop(index, None) is not None:   # stop_all may clear due
                spawn(index)
        for index, proc in list(procs.items()):
            if index in done or index in due:
                continue
            code = proc.poll()
            if code is None:
                is_ready(proc)
                continue
            if metrics_dir is not None:
                worker_exited(proc.pid, metrics_dir)
            if stopping or code == 0:  # stopped or drained (`edgegw internal drain`): done
                done.add(index)
                continue
            if not is_ready(proc) and index not in restarted:
                done.add(index)
                give_up(f"worker {index} (pid {proc.pid}) exited with {code} before it was "
                        "ready (its error is above)")
                continue
            crashes[:] = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
            if len(crashes) > CRASH_LIMIT:
                done.add(index)
                give_up(f"workers died {len(crashes)} times within {CRASH_WINDOW:.0f}s "
                        f"(last: worker {index}, pid {proc.pid}, exit status {code})")
                continue
            log.warning("worker %d (pid %d) exited with %d; restarting", index, proc.pid, code)
            restarted.add(index)
            due[index] = now + RESTART_DELAY
    if failure is not None:
        raise WorkersFailed(failure)
    return 0 if all(p.returncode == 0 for p in procs.values()) else 1
