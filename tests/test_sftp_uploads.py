"""Uploads: atomic (killed clients leave nothing), resumable, quota-bound while data arrives."""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import FXF_CREAT, FXF_EXCL, FXF_READ, FXF_WRITE

from internal.sftp.paths import is_temp_name
from internal.sftp.filecopy import copy_file
from internal.sftp.temps import exclusive_temp_name, sweep_temps
from internal.store.base import Perm
from tests.sshutil import NodeUnderTest, start_node, stop_node, tree

MiB = 1 << 20


def temps(root: Path) -> list[str]:
    return [n for n in tree(root) if is_temp_name(os.fsencode(os.path.basename(n)))]


@pytest.mark.parametrize("victim", ["sftp", "ssh too"])
async def test_killed_mid_upload_leaves_the_old_file(sshnode: NodeUnderTest, tmp_path: Path,
                                                victim: str) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "big.bin").write_bytes(b"old content")        # must survive the failed overwrite
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(2048 * MiB)                            # sparse: cheap to make, slow to send
    proc = await sshnode.start_sftp("alice", key)
    assert proc.stdin is not None
    proc.stdin.write(f"put {src} big.bin\n".encode())
    await proc.stdin.drain()
    for _ in range(500):                                  # until data is flowing
        found = temps(home)
        if found and (home / found[0]).stat().st_size > MiB:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the upload never started")
    if victim == "sftp":
        proc.kill()                                       # its ssh sees EOF and ends the channel
    else:
        _kill_tree(proc.pid)
    await proc.wait()
    await sshnode.wait_idle()
    assert (home / "big.bin").read_bytes() == b"old content"
    # all that is left besides is the new data up to the old size, for a resume (the node's
    # own, hidden: tests/test_sftp_resume.py)
    assert [(home / n).read_bytes() for n in temps(home)] == [bytes(len(b"old content"))]
    closes = sshnode.events("file.close", username="alice")
    assert closes and closes[-1].detail["result"].startswith("aborted")


def _kill_tree(pid: int) -> None:
    """Kill sftp and the ssh it started, so the TCP connection just drops."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, children)]:
        os.kill(p, signal.SIGKILL)


async def test_reput_and_append_resume(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    data = os.urandom(3 * MiB + 123)
    src = tmp_path / "file.bin"
    src.write_bytes(data)
    (home / "file.bin").write_bytes(data[:MiB])           # what an interrupted put left
    run = await sshnode.sftp("alice", key, f"reput {src} file.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "file.bin").read_bytes() == data
    opens = sshnode.events("file.open", username="alice")
    assert opens[-1].detail["resume"] is True

    # asyncssh's append mode: the existing bytes are kept, the new ones land at the end
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            async with sftp.open("file.bin", "ab") as f:
                await f.write(b"tail")
    assert (home / "file.bin").read_bytes() == data + b"tail"
    assert temps(home) == []


async def test_overwrite_is_atomic_and_keeps_mode(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "doc.txt").write_text("v1")
    os.chmod(home / "doc.txt", 0o640)
    (tmp_path / "doc.txt").write_text("version two")
    run = await sshnode.sftp("alice", key, f"put {tmp_path / 'doc.txt'} doc.txt\nls -a\n")
    assert run.returncode == 0, run.output
    assert (home / "doc.txt").read_text() == "version two"
    assert (home / "doc.txt").stat().st_mode & 0o777 == 0o640
    assert ".edgegw-upload" not in run.stdout


async def test_quota_bytes_enforced_during_upload(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=2 * MiB)
    (tmp_path / "small.bin").write_bytes(os.urandom(MiB))
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * MiB))
    run = await sshnode.sftp("alice", key, f"put {tmp_path / 'small.bin'} a.bin\n")
    assert run.returncode == 0, run.output
    run = await sshnode.sftp("alice", key, f"put {tmp_path / 'big.bin'} b.bin\n")
    assert run.returncode != 0
    assert "Failure" in run.stderr or "failure" in run.stderr.lower(), run.output
    assert not (home / "b.bin").exists()
    assert temps(home) == []
    used = sum(p.stat().st_size for p in home.iterdir())
    assert used <= 2 * MiB

    # a client that shows the server's message sees why
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPError) as err:
                await sftp.put(str(tmp_path / "big.bin"), "c.bin")
    assert "quota exceeded" in str(err.value.reason)
    assert not (home / "c.bin").exists()

    # deleting frees space again, arithmetic only
    run = await sshnode.sftp("alice", key, f"rm a.bin\nput {tmp_path / 'small.bin'} d.bin\n"
                                           f"put {tmp_path / 'small.bin'} e.bin\n")
    assert run.returncode == 0, run.output


async def test_quota_files(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice", quota_files=2)
    (tmp_path / "x").write_text("x")
    run = await sshnode.sftp("alice", key, "".join(f"put {tmp_path / 'x'} f{i}\n"
                                                   for i in range(3)))
    assert run.returncode != 0
    assert sorted(tree(home)) == ["f0", "f1"]
    # overwriting an existing file does not need a new slot
    run = await sshnode.sftp("alice", key, f"put {tmp_path / 'x'} f1\n")
    assert run.returncode == 0, run.output


def test_sweep_removes_only_stale_temporaries(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    stale = tmp_path / "d" / ".edgegw-upload-0123456789abcdef.tmp"
    stale.write_text("partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / ".edgegw-upload-fedcba9876543210.tmp"  # another node's upload in flight
    fresh.write_text("in flight")
    (tmp_path / "keep.tmp").write_text("user data")
    assert sweep_temps(tmp_path, older_than=3600) == 1
    assert tree(tmp_path) == {"d", "keep.tmp", fresh.name}


async def test_a_write_only_handle_reads_nothing(sshnode: NodeUnderTest) -> None:
    """Writing into an existing file starts from a copy of it: without READ in the open, that
    copy must not be readable, or a user who may only upload could download any file."""
    home, key = sshnode.keyed_user("alice", permissions=frozenset(
        {Perm.LIST, Perm.UPLOAD, Perm.OVERWRITE}))
    (home / "secret.txt").write_bytes(b"not for alice")
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("secret.txt", FXF_WRITE, encoding=None) as f:
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="not opened for that"):
                await f.read(100, 0)
            await f.write(b"NOT", 0)
    assert (home / "secret.txt").read_bytes() == b"NOT for alice"


async def test_an_exclusive_create_holds_the_name_from_open(sshnode: NodeUnderTest) -> None:
    """CREAT|EXCL (lock files): the second open of the name fails at once, in another session
    too, though the file appears only when the first upload completes."""
    home, key = sshnode.keyed_user("alice")
    excl = FXF_WRITE | FXF_CREAT | FXF_EXCL
    async with sshnode.sftp_client("alice", key) as sftp, \
            sshnode.sftp_client("alice", key) as other:
        async with sftp.open("job.lock", excl, encoding=None) as f:
            await f.write(b"owner 1", 0)
            with pytest.raises(asyncssh.SFTPFailure, match="already exists"):
                await other.open("job.lock", excl, encoding=None)
            assert not (home / "job.lock").exists()
        assert (home / "job.lock").read_bytes() == b"owner 1"
        with pytest.raises(asyncssh.SFTPFailure, match="already exists"):
            await other.open("job.lock", excl, encoding=None)
    # a crashed session's exclusive temporary (nothing holds it) does not block the name
    (home / "job.lock").unlink()
    left = home / os.fsdecode(exclusive_temp_name(b"job.lock"))
    left.write_bytes(b"left by a crash")
    os.utime(left, (time.time() - 60, time.time() - 60))
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("job.lock", excl, encoding=None) as f:
            await f.write(b"owner 2", 0)
    assert (home / "job.lock").read_bytes() == b"owner 2"
    assert temps(home) == []


async def test_writing_into_a_sparse_file_copies_no_holes(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    with open(home / "sparse.img", "wb") as f:
        f.write(b"head")
        f.seek(4096 * MiB)
        f.write(b"tail")
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("sparse.img", FXF_READ | FXF_WRITE, encoding=None) as f:
            await f.write(b"HEAD", 0)
            assert await f.read(4, 4096 * MiB) == b"tail"
    st = (home / "sparse.img").stat()
    assert st.st_size == 4096 * MiB + 4
    assert st.st_blocks * 512 < 16 * MiB        # the 4 GiB hole stayed a hole
    with open(home / "sparse.img", "rb") as f:
        assert f.read(4) == b"HEAD"
        f.seek(2048 * MiB)
        assert f.read(4) == b"\0" * 4


def test_copy_keeps_holes_without_copy_file_range(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.write(b"a" * 5000)
        f.seek(64 * MiB)
        f.write(b"b" * 5000)
    with open(src, "rb") as s, open(dst, "w+b") as d:
        d.write(b"stale content")
        d.flush()
        copy_file(s.fileno(), d.fileno())
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 4 * MiB


def test_sweep_spares_a_temporary_a_live_upload_holds(tmp_path: Path) -> None:
    """A client may pause for longer than the sweep's age limit; its upload's lock says it is
    alive (in another process here: a child holds it)."""
    temp = tmp_path / ".edgegw-upload-00112233445566ff.tmp"
    temp.write_text("paused upload")
    os.utime(temp, (time.time() - 7200, time.time() - 7200))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); sys.stdin.read()"), str(temp)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert sweep_temps(tmp_path, older_than=3600) == 0
        assert temp.exists()
    finally:
        holder.communicate("")
    assert sweep_temps(tmp_path, older_than=3600) == 1
    assert not temp.exists()


async def test_renaming_a_file_onto_itself_frees_no_quota(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("a.bin", "wb") as f:
            await f.write(b"a" * (4 * MiB))
        os.link(home / "a.bin", home / "b.bin")       # another name of the same file
        for old, new in (("a.bin", "a.bin"), ("a.bin", "./a.bin"), ("a.bin", "b.bin")) * 3:
            await sftp.posix_rename(old, new)
        async with sftp.open("c.bin", "wb") as f:
            await f.write(b"c" * (4 * MiB))
        with pytest.raises(asyncssh.SFTPError, match="quota"):
            async with sftp.open("d.bin", "wb") as f:
                await f.write(b"d" * (4 * MiB))
    assert not (home / "d.bin").exists()


async def test_a_close_the_client_sent_commits_though_it_left_at_once(
        sshnode: NodeUnderTest) -> None:
    """WRITE, CLOSE, then the channel's end (EOF and close) without waiting for the answers:
    the client did close the file after its last write, so the upload is complete; only
    handles a client leaves open are dropped."""
    home, key = sshnode.keyed_user("alice")

    def packet(kind: int, body: bytes) -> bytes:
        return struct.pack(">IB", len(body) + 1, kind) + body

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)
        writer.write(packet(1, struct.pack(">I", 3)))                      # INIT
        await reader.readexactly(struct.unpack(">I", await reader.readexactly(4))[0])
        writer.write(packet(3, struct.pack(">I", 1) + string(b"sent.bin") +
                            struct.pack(">II", 0x1a, 0)))                  # OPEN write|creat|trunc
        reply = await reader.readexactly(struct.unpack(">I", await reader.readexactly(4))[0])
        assert reply[0] == 102, reply                                      # HANDLE
        handle = reply[9:]
        writer.write(packet(6, struct.pack(">I", 2) + string(handle) + struct.pack(">Q", 0) +
                            string(b"D" * 100_000)))                       # WRITE
        writer.write(packet(4, struct.pack(">I", 3) + string(handle)))     # CLOSE
        writer.write_eof()
        writer.close()
        await asyncio.sleep(0.5)
    await sshnode.wait_idle()
    assert (home / "sent.bin").read_bytes() == b"D" * 100_000
    assert temps(home) == []


async def test_a_session_the_node_ends_is_audited_with_its_bytes(sshnode: NodeUnderTest) -> None:
    """Shutting down (or a drain that timed out) ends running sessions: their record says so
    and carries the bytes their open files moved, which asyncssh only hands back as it closes
    those files after the connection ended."""
    home, key = sshnode.keyed_user("alice")
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            f = await sftp.open("partial.bin", "wb")
            await f.write(b"x" * MiB)
            await sshnode.service.close()
            with pytest.raises((asyncssh.Error, OSError)):
                await f.write(b"y", MiB)
    await sshnode.wait_idle()
    sshnode.audit.flush()
    ends = sshnode.store.query_audit(kind="session.disconnect")
    assert len(ends) == 1
    assert ends[0].detail["reason"] == "node shutting down"
    assert ends[0].detail["bytes_in"] == MiB
    assert not (home / "partial.bin").exists() and temps(home) == []


async def test_a_crashed_sessions_temporary_goes_at_startup(sshnode: NodeUnderTest,
                                                           tmp_path: Path) -> None:
    """A node that starts sweeps what a crashed one left: temporaries nobody holds, a minute
    old (not an hour), while a live upload's stays however long its client pauses."""
    home, key = sshnode.keyed_user("alice")
    left = home / ".edgegw-upload-0011223344556677.tmp"
    left.write_bytes(b"x" * MiB)
    os.utime(left, (time.time() - 120, time.time() - 120))
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("paused.bin", "wb") as f:
            await f.write(b"p")
            live = [home / n for n in temps(home) if home / n != left]
            assert len(live) == 1
            os.utime(live[0], (time.time() - 7200, time.time() - 7200))
            restarted = await start_node(tmp_path)       # another node process, same home
            try:
                assert (await restarted.sftp("alice", key, "ls\n")).returncode == 0
                for _ in range(100):
                    if not left.exists():
                        break
                    await asyncio.sleep(0.05)
                assert not left.exists()
                assert live[0].exists()
            finally:
                await stop_node(restarted)
    assert (home / "paused.bin").read_bytes() == b"p"


async def test_a_second_rewrite_of_a_file_waits_for_the_first(sshnode: NodeUnderTest) -> None:
    """A write into an existing file works on a copy that replaces it at close: a second such
    handle (same session or another) would silently undo the first one's blocks, so it is
    refused, with a reason, until the first is closed."""
    home, key = sshnode.keyed_user("alice")
    (home / "db.bin").write_bytes(b"." * 8)
    rw = FXF_READ | FXF_WRITE
    async with sshnode.sftp_client("alice", key) as sftp, \
            sshnode.sftp_client("alice", key) as other:
        first = await sftp.open("db.bin", rw, encoding=None)
        await first.write(b"AA", 0)
        for client in (sftp, other):
            with pytest.raises(asyncssh.SFTPFailure, match="being written through another"):
                await client.open("db.bin", rw, encoding=None)
        async with other.open("db.bin", "rb") as reader:        # reading is not held up
            assert await reader.read() == b"." * 8
        await first.close()
        async with other.open("db.bin", rw, encoding=None) as second:
            await second.write(b"BB", 6)
    assert (home / "db.bin").read_bytes() == b"AA....BB"


async def test_rmdir_of_a_directory_that_lists_as_empty(sshnode: NodeUnderTest) -> None:
    """A crash's temporary inside a directory does not keep it (it lists as empty); a live
    upload into it does, with a reason, and a real file is never removed with it."""
    home, key = sshnode.keyed_user("alice")
    for d in ("crashed", "busy", "full"):
        (home / d).mkdir()
    left = home / "crashed" / ".edgegw-upload-0011223344556677.tmp"
    left.write_bytes(b"left by a crash")
    os.utime(left, (time.time() - 60, time.time() - 60))
    (home / "full" / "kept.txt").write_text("kept")
    async with sshnode.sftp_client("alice", key) as sftp:
        assert set(await sftp.listdir("crashed")) <= {".", ".."}
        await sftp.rmdir("crashed")
        async with sftp.open("busy/upload.bin", "wb") as f:
            await f.write(b"x" * 1000)
            with pytest.raises(asyncssh.SFTPError, match="upload into it is in progress"):
                await sftp.rmdir("busy")
        assert (home / "busy" / "upload.bin").read_bytes() == b"x" * 1000
        with pytest.raises(asyncssh.SFTPError, match="not empty"):
            await sftp.rmdir("full")
    assert not (home / "crashed").exists()
    assert (home / "full" / "kept.txt").read_text() == "kept"


@pytest.mark.parametrize("exists", [False, True])
def test_a_durable_commit_syncs_the_data_and_then_the_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool) -> None:
    """Without the directory's fsync after the rename a power cut may bring back the old file
    (or nothing) after the client was told its upload was stored."""
    from internal.sftp.paths import Jail
    from internal.sftp.uploads import Upload
    if exists:
        (tmp_path / "f.bin").write_bytes(b"old")
    jail = Jail(tmp_path)
    upload = Upload.start(jail, jail.resolve(b"f.bin"), b"/f.bin", truncate=True,
                          append=False, exclusive=False, create=True, perms=0o644, usage=None)
    upload.write(0, b"new data")
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        synced.append(("dir" if is_dir else "file", (tmp_path / "f.bin").exists()
                       and (tmp_path / "f.bin").read_bytes() == b"new data"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    upload.commit(durable=True)
    assert synced == [("file", False), ("dir", True)]


async def test_a_left_handle_that_fails_to_close_does_not_stop_the_cleanup(
        sshnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Handles a client leaves open are closed when its channel ends; one that fails (here:
    a.bin's abort, say the disk failing) is logged and the others are still closed."""
    from internal.sftp.uploads import Upload
    home, key = sshnode.keyed_user("alice")
    abort = Upload.abort

    def failing_abort(self: Upload, **kw: bool) -> None:
        if self.client_path == b"/a.bin":
            raise OSError(errno.EIO, "Input/output error")
        abort(self, **kw)
    monkeypatch.setattr(Upload, "abort", failing_abort)
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        sftp = await conn.start_sftp_client()
        for name in ("a.bin", "b.bin"):
            f = await sftp.open(name, "wb")
            await f.write(b"x" * 100_000)
        conn.abort()
    await sshnode.wait_idle()
    deadline = time.monotonic() + 5
    while sum(is_temp_name(os.fsencode(os.path.basename(n))) for n in tree(home)) > 1:
        assert time.monotonic() < deadline, tree(home)
        await asyncio.sleep(0.02)
    assert "closing /a.bin after the session ended failed" in caplog.text
    assert not (home / "a.bin").exists() and not (home / "b.bin").exists()
