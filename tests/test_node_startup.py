"""`edgegw internal serve` on a broken home: one `Error:` line naming the file, a non-zero exit,
no traceback; and with --workers, a supervisor that fails with a worker that cannot start
instead of restarting it forever."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from internal.home import NodeHome
from internal.workers import CRASH_LIMIT
from tests.procs import Proc, edgegw_cmd


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edgegw_cmd(*args), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _corrupt_host_key(home: Path) -> str:
    (home / "ssh" / "host_ed25519_key").write_text("garbage\n")
    return f"cannot read host key {home}/ssh/host_ed25519_key: Invalid private key"


def _no_host_keys(home: Path) -> str:
    for key in (home / "ssh").glob("host_*"):
        key.unlink()
    return f"no SSH host keys in {home}/ssh; create one with: edgegw internal hostkey rotate"


def _corrupt_certificate(home: Path) -> str:
    (home / "pnc" / "node.crt").write_text("junk\n")
    return f"the PNC certificate {home}/pnc/node.crt is not a PEM certificate"


def _corrupt_tls_key(home: Path) -> str:
    (home / "pnc" / "node.key").write_text("junk\n")
    return f"the PNC key {home}/pnc/node.key is not an unencrypted PEM private key"


def _nul_in_db(home: Path) -> str:
    cfg = json.loads((home / "node.json").read_text())
    cfg["db"] = f"sqlite:///{home}/x\0.db"
    (home / "node.json").write_text(json.dumps(cfg))
    return f"{home}/node.json: field 'db' holds a NUL byte"


def _deep_json(home: Path) -> str:
    (home / "node.json").write_text("[" * 100_000 + "]" * 100_000)
    return f"cannot read {home}/node.json: JSON nested too deeply"


@pytest.mark.parametrize("breakage", [_corrupt_host_key, _no_host_keys, _corrupt_certificate,
                                      _corrupt_tls_key, _nul_in_db, _deep_json])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_broken_home_is_one_error_line(node_home: Path, breakage: Callable[[Path], str],
                                       workers: str) -> None:
    message = breakage(node_home)
    res = _run("internal", "serve", "--home", str(node_home), "--listen", "127.0.0.1:0",
               "--gateway", "127.0.0.1:9", "--workers", workers)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"Error: {message}"), res.stderr
    assert "worker" not in res.stderr   # refused before any worker started


@pytest.mark.parametrize("breakage", [_nul_in_db, _deep_json])
def test_broken_node_json_in_admin_commands(node_home: Path,
                                            breakage: Callable[[Path], str]) -> None:
    message = breakage(node_home)
    for args in (["user", "list"], ["audit"], ["ban", "list"], ["hostkey", "list"]):
        res = _run("internal", *args, "--home", str(node_home))
        assert res.returncode == 1 and "Traceback" not in res.stderr, (args, res.stderr)
        assert res.stderr.startswith(f"Error: {message}"), (args, res.stderr)


def _wait_exit(proc: Proc, timeout: float) -> int:
    assert proc.popen is not None
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the supervisor still runs after {timeout}s:\n"
                             f"{proc.text()[-4000:]}") from None


def test_workers_failing_at_startup_stop_the_supervisor(tmp_path: Path,
                                                        procs: list[Proc]) -> None:
    """A store nobody can open fails every worker the same way: no restarts, the supervisor
    exits non-zero after the workers' own error lines."""
    home = NodeHome.init(tmp_path / "home", db_url=f"sqlite:///{tmp_path}/missing/x.db").path
    node = Proc("node", edgegw_cmd("internal", "serve", "--home", str(home), "--listen",
                                   "127.0.0.1:0", "--workers", "3"),
                tmp_path / "node.log").start()
    procs.append(node)
    assert _wait_exit(node, 20) == 1
    text = node.text()
    assert "restarting" not in text and "Traceback" not in text, text
    assert f"Error: cannot open sqlite:///{tmp_path}/missing/x.db: directory" in text
    assert re.search(r"Error: worker \d \(pid \d+\) exited with 1 before it was ready", text)
    assert text.count("started (pid") == 3      # each started once, none again


def _worker_pid(node: Proc, index: int) -> int:
    return int(re.findall(rf"worker {index} started \(pid (\d+)\)", node.text())[-1])


def test_worker_that_ran_is_restarted_until_workers_keep_dying(node_home: Path, tmp_path: Path,
                                                               procs: list[Proc]) -> None:
    node = Proc("node", edgegw_cmd("internal", "serve", "--home", str(node_home), "--listen",
                                   "127.0.0.1:0", "--workers", "2"),
                tmp_path / "node.log").start()
    procs.append(node)
    for index in (1, 2):
        node.wait_log(rf"node \S+-w{index} started")
    for kills in range(1, CRASH_LIMIT + 2):
        os.kill(_worker_pid(node, 1), signal.SIGKILL)
        if kills <= CRASH_LIMIT:     # restarted, even when it dies again before it is ready
            deadline = time.monotonic() + 20
            while node.count(r"worker 1 started") <= kills:
                assert time.monotonic() < deadline, node.text()[-4000:]
                time.sleep(0.05)
    assert _wait_exit(node, 30) == 1
    text = node.text()
    assert text.count("exited with -9; restarting") == CRASH_LIMIT, text
    assert f"Error: workers died {CRASH_LIMIT + 1} times within 60s" in text, text
    assert "Traceback" not in text


def test_workers_stop_when_the_supervisor_is_killed(node_home: Path, tmp_path: Path,
                                                    procs: list[Proc]) -> None:
    """SIGKILL leaves the supervisor no chance to pass a signal on: the workers learn of its
    death from the kernel and drain, instead of serving on beside a restarted supervisor's."""
    node = Proc("node", edgegw_cmd("internal", "serve", "--home", str(node_home), "--listen",
                                   "127.0.0.1:0", "--workers", "2"),
                tmp_path / "node.log").start()
    procs.append(node)
    for index in (1, 2):
        node.wait_log(rf"node \S+-w{index} started")
    workers = [_worker_pid(node, 1), _worker_pid(node, 2)]
    node.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, node.text()[-4000:]
        time.sleep(0.05)
    assert node.count(r"node \S+-w\d stopped") == 2, node.text()[-4000:]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_drain_never_signals_a_process_a_crashed_node_left_its_pid_to(node_home: Path,
                                                                       tmp_path: Path,
                                                                       procs: list[Proc]) -> None:
    """A node killed with SIGKILL (or a host crash) leaves its pid file; its pid may belong to
    another program by now. A running node holds a lock on its file: one nobody holds is
    removed, its pid left alone."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        run = node_home / "run"
        run.mkdir(exist_ok=True)
        (run / f"node-{bystander.pid}.pid").write_text(f"{bystander.pid}\n")
        out = _run("internal", "drain", "--home", str(node_home), "--timeout", "5")
        assert out.returncode == 1 and "no node is running" in out.stderr, out
        assert bystander.poll() is None
        assert not (run / f"node-{bystander.pid}.pid").exists()
        node = Proc("node", edgegw_cmd("internal", "serve", "--home", str(node_home),
                                       "--listen", "127.0.0.1:0", "--workers", "1"),
                    tmp_path / "node.log").start()
        procs.append(node)
        node.wait_log(r"node \S+ started")
        (run / f"node-{bystander.pid}.pid").write_text(f"{bystander.pid}\n")   # again
        out = _run("internal", "drain", "--home", str(node_home), "--timeout", "30")
        assert out.returncode == 0, out
        assert f"draining 1 node process(es): {node.pid}" in out.stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# The supervisor, with SIGTERM arriving while it starts its first worker: the moment a service
# manager stops a node that is still starting (run as a real process, the timing forced).
_STOPPED_WHILE_STARTING = """
import os, signal, subprocess, sys
real = subprocess.Popen
class Popen(real):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "--node-id" in args[0] and not getattr(Popen, "fired", False):   # a worker
            Popen.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
subprocess.Popen = Popen
sys.argv[0] = "edgegw"
from edgegw.cli import main
main()
"""


def test_supervisor_stopped_while_it_starts_workers_stops_them_all(node_home: Path,
                                                                   tmp_path: Path,
                                                                   procs: list[Proc]) -> None:
    """A stop signal while the supervisor was still starting workers reached only those it
    had recorded: the others served on, and the supervisor waited for them forever."""
    node = Proc("node", [sys.executable, "-c", _STOPPED_WHILE_STARTING, "internal", "serve",
                         "--home", str(node_home), "--listen", "127.0.0.1:0", "--workers", "2"],
                tmp_path / "node.log").start()
    procs.append(node)
    _wait_exit(node, 30)    # non-zero: a worker stopped before it was up dies of the signal
    assert node.count(r"worker \d started") == 2
    assert not any(_running(_worker_pid(node, index)) for index in (1, 2)), node.text()

