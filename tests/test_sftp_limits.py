"""What one client may ask of the node: open handles, bytes per READ, offsets and sizes.

Some requests are sent raw through the client's protocol handler (`sftp._handler`): no
well-behaved client sends them, which is the point.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import asyncssh
import pytest

from internal.sftp import server as sftp_server
from tests.sshutil import NodeUnderTest


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_open_handles_are_capped_per_session(sshnode: NodeUnderTest, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.node.sftp")
    cap = sftp_server.MAX_HANDLES
    home, key = sshnode.keyed_user("alice")
    (home / "f.txt").write_text("x")
    fds_before = open_fds()
    async with sshnode.sftp_client("alice", key) as sftp:
        # pipelined OPENs, as a hostile client sends them: exactly `cap` get a handle
        opened = await asyncio.gather(*(sftp.open(f"hold{i}", "w") for i in range(cap + 20)),
                                      return_exceptions=True)
        handles = [h for h in opened if isinstance(h, asyncssh.SFTPClientFile)]
        refused = [e for e in opened if isinstance(e, asyncssh.SFTPFailure)]
        assert len(handles) == cap and len(refused) == 20, opened[-1]
        assert all("too many open handles" in e.reason for e in refused)
        assert open_fds() - fds_before < 2 * cap + 50     # an upload holds two
        with pytest.raises(asyncssh.SFTPFailure, match="too many open handles"):
            await sftp.open("f.txt")
        with pytest.raises(asyncssh.SFTPFailure, match="too many open handles"):
            await sftp.listdir(".")
        # the cap is per session: other sessions of the same user are not held up
        async with sshnode.sftp_client("alice", key) as other:
            assert "f.txt" in await other.listdir(".")
        # a closed handle makes room again
        await handles.pop().close()
        async with sftp.open("f.txt") as f:
            assert await f.read() == "x"
        for h in handles:
            await h.close()
        # directory handles count too, until the client closes them
        dirs = [await sftp._handler.opendir(b".") for _ in range(cap)]
        with pytest.raises(asyncssh.SFTPFailure, match="too many open handles"):
            await sftp.open("f.txt")
        await sftp._handler.close(dirs.pop())
        async with sftp.open("f.txt") as f:
            assert await f.read() == "x"
    refusals = [r for r in caplog.records if "too many open handles" in r.getMessage()]
    assert len(refusals) == 23, [r.getMessage() for r in refusals]
    assert "user=alice client=127.0.0.1 op=open path=/hold" in refusals[0].getMessage()
    await sshnode.wait_idle()
    assert not [p for p in home.iterdir() if p.name.startswith(".edgegw-upload-")]


async def test_reads_are_capped(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    content = os.urandom(8 << 20)
    (home / "big.bin").write_bytes(content)
    async with sshnode.sftp_client("alice", key) as sftp:
        # what limits@openssh.com tells clients is what the server keeps (asyncssh's client
        # keeps only the lengths of what it asked: read the reply itself for the handles)
        assert sftp.limits.max_read_len == sftp_server.MAX_READ
        limits = asyncssh.sftp.SFTPLimits.decode(
            await sftp._handler._make_request(b"limits@openssh.com"))
        assert (limits.max_read_len, limits.max_open_handles) == (sftp_server.MAX_READ,
                                                                  sftp_server.MAX_HANDLES)
        async with sftp.open("big.bin", "rb") as f:
            data, _ = await sftp._handler.read(f._handle, 0, 2**32 - 1)
        assert len(data) == sftp_server.MAX_READ
        assert data == content[:len(data)]
        # a client asking for big blocks gets short reads and asks again for the rest
        async with sftp.open("big.bin", "rb", block_size=4 << 20) as f:
            assert await f.read() == content
    await sshnode.wait_idle()
    closes = sshnode.events("file.close", username="alice")
    assert sorted(e.detail["bytes_read"] for e in closes) == [sftp_server.MAX_READ, len(content)]


async def test_offsets_beyond_a_file_are_invalid_arguments(
        sshnode: NodeUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.node.sftp")
    home, key = sshnode.keyed_user("alice")
    (home / "dl").write_bytes(b"data")
    async with sshnode.sftp_client("alice", key) as sftp:
        h = sftp._handler
        async with sftp.open("dl", "rb") as f:
            for off in (2**63 - 1, 2**63, 2**64 - 1):
                with pytest.raises(asyncssh.SFTPError, match="invalid argument"):
                    await h.read(f._handle, off, 10)
        async with sftp.open("up.bin", "wb") as up:
            await up.write(b"ok")
            for off in (2**63 - 2, 2**63, 2**64 - 1):
                with pytest.raises(asyncssh.SFTPError, match="invalid argument"):
                    await h.write(up._handle, off, b"abc")
            for size in (2**63, 2**64 - 1):
                with pytest.raises(asyncssh.SFTPError, match="invalid argument"):
                    await up.setstat(asyncssh.SFTPAttrs(size=size))
                with pytest.raises(asyncssh.SFTPError, match="invalid argument"):
                    await sftp.setstat("dl", asyncssh.SFTPAttrs(size=size))
        # refused before anything was touched: the upload still commits
    assert (home / "up.bin").read_bytes() == b"ok"
    assert (home / "dl").read_bytes() == b"data"
    assert "unexpected error" not in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_write_of_nothing_costs_nothing(sshnode: NodeUnderTest) -> None:
    """A WRITE (or copy-data) of no bytes stores nothing, wherever it points: it was charged
    to the quota up to its offset, and past the quota failed the whole upload."""
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 20)
    (home / "src").write_bytes(b"src")
    async with sshnode.sftp_client("alice", key) as sftp:
        h = sftp._handler
        async with sftp.open("src", "rb") as src, sftp.open("up.bin", "wb") as up:
            await up.write(b"data")
            await h.write(up._handle, 2**40, b"")
            await sftp.remote_copy(src, up, 10, 0, 2**40)     # from past the source's end
            assert (await up.stat()).size == 4
    assert (home / "up.bin").read_bytes() == b"data"


async def test_a_client_that_stops_reading_stops_being_answered(sshnode: NodeUnderTest) -> None:
    """READs cost a client 30 bytes each and their answers 255 KiB: sent by the thousand with
    the client's socket left unread, they once made the node hold every answer. Now the node
    takes the next request only once the last answers are on their way, so what it reads for
    that client stays within its window and buffers (the audit counts it at the close)."""
    home, key = sshnode.keyed_user("alice")
    (home / "big.bin").write_bytes(os.urandom(1 << 20))
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            handle = await sftp._handler.open(b"big.bin", asyncssh.FXF_READ,
                                              asyncssh.SFTPAttrs())
            conn._transport.pause_reading()       # answers pile up on the node's side
            reads = [asyncio.ensure_future(sftp._handler.read(handle, 0, sftp_server.MAX_READ))
                     for _ in range(1000)]
            await asyncio.sleep(2)
            conn.abort()
            await asyncio.gather(*reads, return_exceptions=True)
    await sshnode.wait_idle()
    closes = [e for e in sshnode.store.query_audit(kind="file.close") if e.username == "alice"]
    assert len(closes) == 1
    read = closes[0].detail["bytes_read"]
    assert 0 < read < 48 * (1 << 20), read     # 1000 answers would be 255 MiB
