"""Many sessions at once through one gateway: 200 OpenSSH clients each upload 16 MiB; every
stored file must be complete and correct, and the gateway must end with no session left."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import SSH_OPTS, Proc, start_gateway, start_node

SESSIONS = 200
SIZE = 16 << 20


@pytest.mark.slow
def test_200_concurrent_sftp_uploads(tmp_path: Path, node_home: Path, alice: tuple[str, Path],
                                     procs: list[Proc]) -> None:
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--log-level", "info")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw], "--workers", "2", "--log-level", "info",
                            wait=False))
    gw.wait_log(r"-w1 attached")
    gw.wait_log(r"-w2 attached")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(SIZE))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    clients = []
    for i in range(SESSIONS):
        args = ["sftp", "-b", "-", "-P", str(gw.external), "-i", str(key), *SSH_OPTS,
                f"{user}@127.0.0.1"]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write(f"put {src} up-{i:03d}.bin\n")
        proc.stdin.close()
        clients.append(proc)
    failures = []
    deadline = time.monotonic() + 600
    for i, proc in enumerate(clients):
        code = proc.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            failures.append((i, code, proc.stderr.read() if proc.stderr else ""))
    # the gateway's and node's warnings say why (an offer unanswered, a Data connection refused)
    assert not failures, (failures[:5], _warnings(gw.text()), _warnings(procs[-1].text()))
    home = node_home / "files" / user
    for i in range(SESSIONS):
        assert hashlib.sha256((home / f"up-{i:03d}.bin").read_bytes()).hexdigest() == want, i
    # every relayed session was reported closed, with at least the file's bytes upstream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and gw.count(r"closed \(") < SESSIONS:
        time.sleep(0.2)
    ups = [int(m) for m in re.findall(r"closed \(\w+\) up=(\d+)", gw.text())]
    assert len(ups) == SESSIONS and min(ups) > SIZE


def _warnings(log: str, most: int = 20) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line][:most]
