"""Shared fixtures: node homes with a user, gateways and nodes as real processes."""
from __future__ import annotations

import asyncio
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


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts goes here and is stopped by PID afterwards."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


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
