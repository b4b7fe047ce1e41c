"""A refused operation leaves a trace: one log line and one audit event per refused request,
with the user, the real client address, the operation and the path."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh
import pytest

from internal.store.base import Perm
from tests.sshutil import NodeUnderTest


async def test_refusals_are_logged_and_audited(sshnode: NodeUnderTest, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.node.sftp")
    home, key = sshnode.keyed_user("alice")
    rhome, rkey = sshnode.keyed_user("reader",
                                     permissions=frozenset({Perm.LIST, Perm.DOWNLOAD}))
    (rhome / "report.csv").write_text("a,b\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, home / "esc")       # a way out of the home, planted on the node
    async with sshnode.sftp_client("alice", key) as sftp:
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.stat("esc/secret.txt")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.open("esc/secret.txt")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove("esc/secret.txt")
        with pytest.raises(asyncssh.SFTPError, match="invalid file name"):
            await sftp.mkdir("a\0b")
        await sftp.stat("/")                    # allowed: no trace
    # and from OpenSSH's client, a permission the user lacks
    run = await sshnode.sftp("reader", rkey, "rm report.csv\n")
    assert run.returncode != 0 and "Permission denied" in run.stderr, run.output
    await sshnode.wait_idle()

    expected = {("alice", "stat", "/esc/secret.txt"), ("alice", "open", "/esc/secret.txt"),
                ("alice", "remove", "/esc/secret.txt"), ("alice", "mkdir", "a\0b"),
                ("reader", "remove", "/report.csv")}
    events = sshnode.events("sftp.refused")
    assert sorted((e.username, e.detail["op"], e.detail["path"]) for e in events) \
        == sorted(expected)
    for e in events:
        assert e.client_ip == "127.0.0.1" and e.session_id, e
        assert e.detail["result"] == "refused" and e.detail["reason"], e
    assert "outside your home" in next(e for e in events if e.detail["op"] == "stat"
                                       ).detail["reason"]
    assert "may not delete files" in next(e for e in events if e.username == "reader"
                                          ).detail["reason"]

    lines = [r.getMessage() for r in caplog.records
             if r.name == "edgegw.node.sftp" and r.getMessage().startswith("refused:")]
    assert len(lines) == len(expected), lines           # one line per refused request
    assert all(r.levelno == logging.INFO for r in caplog.records
               if r.getMessage().startswith("refused:"))
    assert ("refused: user=alice client=127.0.0.1 op=stat path=/esc/secret.txt: permission "
            "denied: the path leads outside your home directory") in lines
    assert any(line.startswith(r"refused: user=alice client=127.0.0.1 op=mkdir path=a\x00b:")
               for line in lines), lines
    assert any(line.startswith("refused: user=reader client=127.0.0.1 op=remove "
                               "path=/report.csv: permission denied: you may not delete")
               for line in lines), lines
