"""Server-side copies (copy-data: OpenSSH's `cp`): whole, bounded by the quota, and only between
handles opened for it."""
from __future__ import annotations

import os
import struct

import asyncssh
import pytest
from asyncssh.constants import FXF_CREAT, FXF_READ, FXF_WRITE

from internal.sftp.paths import QUOTA_LEDGER, is_temp_name
from internal.sftp.quota import scan_home
from tests.sshutil import NodeUnderTest, tree

MiB = 1 << 20


async def test_cp_copies_the_whole_file(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    data = os.urandom(3 * MiB + 17)            # many times the largest read a client may ask
    (home / "a.bin").write_bytes(data)
    (home / "old.bin").write_bytes(b"x" * (5 * MiB))
    run = await sshnode.sftp("alice", key, "cp a.bin b.bin\ncp a.bin old.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "b.bin").read_bytes() == data
    assert (home / "old.bin").read_bytes() == data     # truncated, then copied over
    closes = sshnode.events("file.close", username="alice")
    written = [e.detail["bytes_written"] for e in closes if e.detail["path"] == "/b.bin"]
    assert written == [len(data)]


async def test_a_copy_of_a_range(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    data = os.urandom(MiB)
    (home / "a.bin").write_bytes(data)
    (home / "b.bin").write_bytes(bytes(600_000))
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("a.bin", "rb") as src, sftp.open("b.bin", "r+b") as dst:
            await sftp.remote_copy(src, dst, 1000, 500_000, 64)
            await sftp.remote_copy(src, dst, len(data) - 10, 1000, 700_000)  # to its end
    assert (home / "b.bin").read_bytes() == (bytes(64) + data[1000:501_000] + bytes(199_936)
                                             + data[-10:])


async def test_a_copy_beyond_the_quota_stores_nothing(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=5 * MiB)
    (home / "a.bin").write_bytes(os.urandom(3 * MiB))
    async with sshnode.sftp_client("alice", key) as sftp:
        with pytest.raises(asyncssh.SFTPError, match="quota exceeded"):
            await sftp.copy("a.bin", "b.bin", remote_only=True)
    await sshnode.wait_idle()
    assert tree(home) == {"a.bin"}
    ledger = struct.unpack(">QQ", (home / QUOTA_LEDGER.decode()).read_bytes()[:16])
    assert ledger == scan_home(home) == (3 * MiB, 1)


async def test_copies_need_a_readable_source_and_a_writable_target(
        sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "a.bin").write_bytes(b"secret" * 1000)
    async with sshnode.sftp_client("alice", key) as sftp:
        handler = sftp._handler
        ro = await handler.open(b"a.bin", FXF_READ, asyncssh.SFTPAttrs())
        wo = await handler.open(b"b.bin", FXF_WRITE | FXF_CREAT, asyncssh.SFTPAttrs())
        rw = await handler.open(b"c.bin", FXF_READ | FXF_WRITE | FXF_CREAT,
                                asyncssh.SFTPAttrs())
        with pytest.raises(asyncssh.SFTPPermissionDenied, match="opened for that"):
            await handler.copy_data(ro, 0, 0, ro, 100)            # into a read-only handle
        await handler.copy_data(ro, 0, 0, wo, 0)
        with pytest.raises(asyncssh.SFTPPermissionDenied, match="opened for that"):
            await handler.copy_data(wo, 0, 0, rw, 0)              # out of a write-only one
        await handler.write(rw, 0, b"0123456789")
        with pytest.raises(asyncssh.SFTPError, match="source and target overlap"):
            await handler.copy_data(rw, 0, 8, rw, 4)              # onto itself, overlapping
        await handler.copy_data(rw, 0, 4, rw, 10)
        with pytest.raises(asyncssh.SFTPError, match="invalid file handle"):
            await handler.copy_data(b"nope", 0, 0, wo, 0)
        for h in (ro, wo, rw):
            await handler.close(h)
    assert (home / "b.bin").read_bytes() == b"secret" * 1000
    assert (home / "c.bin").read_bytes() == b"01234567890123"
    assert not [n for n in tree(home) if is_temp_name(os.fsencode(n))]
