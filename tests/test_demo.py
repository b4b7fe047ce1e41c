"""`edgegw demo`, the README's first command: what it prints works, and it stops cleanly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import asyncssh

from tests.procs import Proc, edgegw_cmd


def _start_demo(tmp: Path, workdir: Path, name: str) -> Proc:
    demo = Proc(name, edgegw_cmd("demo", "--port", "0", "--dir", str(workdir)),
                tmp / f"{name}.log").start()
    demo.wait_log(r"Ctrl-C stops both\.")
    demo.wait_log(r"attached to gateway demo-gateway ")   # (the first of the node's workers)
    return demo


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def _stop(demo: Proc) -> str:
    """SIGINT to the demo alone (as `kill -INT`): it must stop its gateway and node."""
    kids = _children(demo.pid)
    assert len(kids) == 2, kids   # the gateway and the node (whose workers are its own)
    assert demo.popen is not None
    demo.send_signal(signal.SIGINT)
    assert demo.popen.wait(30) == 0
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"pid {pid} left running"
    return demo.text()


async def test_demo_prints_commands_that_work_and_stops_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = _start_demo(tmp_path, workdir, "demo")
    try:
        out = demo.text()
        cmd = re.search(r"^Try \(key\): +(sftp .*)$", out, re.M)
        assert cmd is not None, out
        args = cmd.group(1).split()
        data = b"from the demo's own command\n"
        (tmp_path / "hello.txt").write_bytes(data)
        res = subprocess.run([*args[:-1], "-b", "-", "-o", "BatchMode=yes", args[-1]],
                             input="put hello.txt\nls -l\n", capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "hello.txt" in res.stdout
        assert (workdir / "node-home" / "files" / "demo" / "hello.txt").read_bytes() == data

        password = re.search(r"^or \(password '([^']+)'\): +sftp .* -P (\d+) (\w+)@", out, re.M)
        assert password is not None, out
        pw, port, user = password.group(1), int(password.group(2)), password.group(3)
        async with asyncssh.connect("127.0.0.1", port, username=user, password=pw,
                                    known_hosts=None, client_keys=None) as conn:
            async with conn.start_sftp_client() as sftp:
                names = await sftp.listdir(".")
                assert [n for n in names if n not in (".", "..")] == ["hello.txt"]

        audit = re.search(r"^Audit trail: +edgegw (internal audit --home \S+)$", out, re.M)
        assert audit is not None, out
        trail = subprocess.run(edgegw_cmd(*audit.group(1).split(), "--json"),
                               capture_output=True, text=True, timeout=60)
        assert trail.returncode == 0, trail.stderr
        events = [json.loads(line) for line in trail.stdout.splitlines() if line.strip()]
        closes = [e for e in events if e["kind"] == "file.close"]
        assert [(e["detail"]["path"], e["detail"]["bytes_written"], e["user"], e["gateway"],
                 e["ip"]) for e in closes] == [
            ("/hello.txt", len(data), "demo", "demo-gateway", "127.0.0.1")], trail.stdout
    finally:
        log = _stop(demo)
    assert "Traceback" not in log and "Warning" not in log, log
    assert not re.search(r" (WARNING|ERROR) ", log), log

    # The same --dir again: the home and the key are reused, not refused.
    again = _start_demo(tmp_path, workdir, "demo-again")
    log = _stop(again)
    assert "reusing the node home" in log


def test_demo_on_a_home_without_its_key_says_so(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    _stop(_start_demo(tmp_path, workdir, "demo"))
    (workdir / "demo_key").unlink()
    res = subprocess.run(edgegw_cmd("demo", "--port", "0", "--dir", str(workdir)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        f"Error: {workdir}/node-home is a node home but {workdir}/demo_key is gone: "
        f"remove {workdir} or pick another --dir")
