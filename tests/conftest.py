"""Shared fixtures: node homes with a user, gateways and nodes as real processes."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest

from tests.procs import GatewayProc, Proc, add_user, init_home, make_key, start_gateway, start_node

pytest_plugins = ["tests.store_fixtures", "tests.sshutil"]  # store and node fixtures


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> Mapping[str, Callable[[], Any]]:
    """asyncio's loop for in-process async tests; uvloop (what the processes run on, see
    edgegw.eventloop) for a test class that says `event_loop = "uvloop"`."""
    if getattr(getattr(item, "cls", None), "event_loop", "asyncio") == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def _processes_naming(path: str) -> dict[int, str]:
    """Processes (other than this one) whose command line names `path`."""
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue        # gone meanwhile, or a kernel thread
        if path in argv:
            found[int(entry.name)] = argv
    return found


@pytest.fixture(autouse=True)
def no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used a temporary directory leaves no process naming it (a gateway, a node,
    a client's ssh orphaned when its sftp was killed): one still running a few seconds after
    the test's own fixtures stopped theirs fails the test, and is killed."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    path = str(request.getfixturevalue("tmp_path"))
    yield
    deadline = time.monotonic() + 3.0
    while (left := _processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes outlived the test: {left}"


class _ErrorRecords(logging.Handler):
    """edgegw's errors logged with a traceback: what its code says of an exception nothing
    handled (internal.ssh.transport logs asyncssh's internal errors so). asyncio's own reports
    are left out here: it makes some when a future is collected, in whichever test runs then;
    the processes' logs are checked for them (`procs`)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.records.append(record)


@pytest.fixture(autouse=True)
def unhandled_errors() -> Iterator[list[logging.LogRecord]]:
    """An unhandled exception reported by edgegw's code running in the test's own process
    fails the test; a test that expects one asks for this list and removes what it expected."""
    handler = _ErrorRecords()
    logger = logging.getLogger("edgegw")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
    assert not handler.records, "unhandled exceptions: " + "; ".join(
        f"{r.name}: {r.getMessage()}" for r in handler.records)


@pytest.fixture
def node_home(tmp_path: Path) -> Path:
    return init_home(tmp_path / "home")


@pytest.fixture
def user_key(tmp_path: Path) -> Path:
    return make_key(tmp_path / "alice_key")


@pytest.fixture
def alice(node_home: Path, user_key: Path) -> tuple[str, Path]:
    add_user(node_home, "alice", user_key)
    return "alice", user_key


# What no edgegw process may log, whatever a test did to it: an exception nothing handled.
_UNHANDLED = ("Traceback (most recent call last)", "exception was never retrieved")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts goes here and is stopped by PID afterwards; then none of
    them may have logged an unhandled exception."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()
    for proc in started:
        text = proc.text()
        for marker in _UNHANDLED:
            at = text.find(marker)
            assert at < 0, f"{proc.name} logged an unhandled exception:\n{text[at - 300:at + 3000]}"


@pytest.fixture
def gateway(tmp_path: Path, node_home: Path, procs: list[Proc]) -> GatewayProc:
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    return gw


@pytest.fixture
def node(tmp_path: Path, node_home: Path, gateway: GatewayProc, alice: tuple[str, Path],
         procs: list[Proc]) -> Proc:
    n = start_node(tmp_path, node_home, [gateway])
    procs.append(n)
    return n
