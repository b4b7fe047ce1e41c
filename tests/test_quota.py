"""Quota figures shared by every process serving a user's root: the ledger, and two real node
processes on one home racing uploads for the last megabytes."""
from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

import asyncssh
import pytest

from internal.sftp.paths import QUOTA_LEDGER
from internal.sftp.quota import CHUNK, Ledger, QuotaBook, QuotaExceeded, Usage, scan_home
from internal.store.base import User
from tests.procs import Proc, edgegw_cmd, free_port
from tests.sshutil import NodeUnderTest

MiB = 1 << 20


def _usage(root: Path, limit: int) -> Usage:
    ledger = Ledger.join(str(root))
    assert ledger is not None, "this file system has no locks"
    return Usage("alice", ledger, 0, 0, limit, None)


def test_the_ledger_is_shared_and_rescanned_by_the_first_to_take_it(tmp_path: Path) -> None:
    (tmp_path / "old.bin").write_bytes(b"o" * MiB)
    first = _usage(tmp_path, 10 * MiB)           # alone: scans the root
    assert first.used() == (MiB, 1)
    first.charge(3 * MiB)
    second = _usage(tmp_path, 10 * MiB)          # another holder: the live figures, no scan
    assert second.used() == (4 * MiB, 1)
    with pytest.raises(QuotaExceeded, match="already uses 4.0 MiB"):
        second.charge(7 * MiB)
    second.charge(6 * MiB)
    with pytest.raises(QuotaExceeded):
        first.charge(1)
    second.adjust(-6 * MiB)                      # say, a file was removed
    first.close()
    second.close()
    third = _usage(tmp_path, 10 * MiB)           # nobody holds it now: figures from the disk
    assert third.used() == (MiB, 1)
    third.close()


def test_a_rescan_keeps_figures_that_another_holder_or_an_upload_took_from(
        tmp_path: Path) -> None:
    (tmp_path / "old.bin").write_bytes(b"o" * MiB)
    first = _usage(tmp_path, 10 * MiB)
    second = _usage(tmp_path, 10 * MiB)          # another process, as far as locks go
    second.charge(2 * MiB)                       # an upload of its, under way
    (tmp_path / "new.bin").write_bytes(b"n" * MiB)
    assert not first.rescan(str(tmp_path))
    assert first.used() == (3 * MiB, 1)          # its upload still counted
    second.adjust(-2 * MiB)
    second.close()
    first.charge(MiB, ahead=True)                # took ahead here: a scan would drop that
    assert not first.rescan(str(tmp_path))
    first.settle()
    assert first.rescan(str(tmp_path))           # alone, nothing taken: from the disk
    assert first.used() == (2 * MiB, 2)
    third = _usage(tmp_path, 10 * MiB)           # still held: live figures, no scan
    assert third.used() == (2 * MiB, 2)
    first.close()
    third.close()


async def test_changes_made_while_a_quota_is_scanned_are_rescanned_or_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "old.bin").write_bytes(b"o" * MiB)
    user = User(name="alice", home=str(tmp_path), quota_bytes=10 * MiB)
    book = QuotaBook()
    usage = await book.share(user, 1, lambda: False)    # nothing changed: scanned once
    assert usage.used() == (MiB, 1)
    with book.unmetered("alice"):                       # a session without a share stores
        (tmp_path / "during.bin").write_bytes(b"d" * MiB)
    assert await book.share(user, 1, lambda: False) is usage
    assert usage.used() == (2 * MiB, 2)                 # scanned again
    with book.unmetered("alice"):
        (tmp_path / "more.bin").write_bytes(b"m" * MiB)
    await book.share(user, 1, lambda: True)             # a channel here charges already
    assert usage.used() == (2 * MiB, 2)
    assert "may be off by those changes" in caplog.text
    caplog.clear()
    await book.share(user, 1, lambda: False)            # reported once, not again
    assert not caplog.text
    for _ in range(4):
        book.release("alice")
    assert await book.acquire(user) is not usage        # let go: figures taken anew
    book.release("alice")


def test_an_upload_takes_ahead_and_gives_back_what_it_did_not_use(tmp_path: Path) -> None:
    upload, other = _usage(tmp_path, 4 * CHUNK), _usage(tmp_path, 4 * CHUNK)
    upload.charge(1000, ahead=True)              # one locked update for a chunk of writes
    assert other.used() == (CHUNK, 0)
    for _ in range(100):
        upload.charge(1000, ahead=True)
    assert other.used() == (CHUNK, 0)
    upload.settle()                              # the upload ended
    assert other.used() == (101_000, 0)
    upload.charge(4 * CHUNK - 101_000 - 10, ahead=True)   # near the limit: only what is left
    other.charge(10)
    with pytest.raises(QuotaExceeded):
        other.charge(1)
    upload.close()
    other.close()


async def test_uploads_through_two_node_processes_share_one_quota(sshnode: NodeUnderTest,
                                                                  tmp_path: Path) -> None:
    """The default `--workers` runs one process per CPU, and nodes may share a files root:
    two 8 MiB uploads racing for a 10 MiB quota through two processes store at most one."""
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    port = free_port()
    other = Proc("other", edgegw_cmd("internal", "serve", "--home", str(sshnode.home.path),
                                     "--listen", f"127.0.0.1:{port}", "--workers", "1"),
                 tmp_path / "other.log").start()
    try:
        await asyncio.to_thread(other.wait_log, r"serving SSH/SFTP directly")

        async def upload(node_port: int, name: str) -> bool:
            async with asyncssh.connect("127.0.0.1", node_port, username="alice",
                                        client_keys=[str(key)], known_hosts=None) as conn:
                async with conn.start_sftp_client() as sftp:
                    try:
                        async with sftp.open(name, "wb") as f:
                            for i in range(32):
                                await f.write(b"u" * (MiB // 4), i * (MiB // 4))
                                await asyncio.sleep(0.005)   # interleave the two
                        return True
                    except asyncssh.SFTPError as exc:
                        assert "quota exceeded" in exc.reason, exc.reason
                        return False

        stored = await asyncio.gather(upload(sshnode.port, "f0.bin"), upload(port, "f1.bin"))
    finally:
        other.stop()
    assert sum(stored) <= 1, stored
    on_disk = sum(p.stat().st_size for p in home.glob("f*.bin"))
    assert on_disk <= 10 * MiB
    assert sorted(p.name for p in home.glob("f*.bin")) == \
        [f"f{i}.bin" for i, ok in enumerate(stored) if ok]


if sys.platform != "linux":   # pragma: no cover
    pytestmark = pytest.mark.skip(reason="the ledger's locks are tested on Linux")


async def test_the_ledger_is_the_nodes_not_the_users(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("a.txt", "w") as f:
            await f.write("a")
        assert (home / ".edgegw-quota").exists()
        assert ".edgegw-quota" not in await sftp.listdir(".")
        for attempt in (sftp.open(".edgegw-quota"), sftp.remove(".edgegw-quota"),
                        sftp.rename("a.txt", ".edgegw-quota"), sftp.stat(".edgegw-quota")):
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await attempt
    assert (home / "a.txt").read_text() == "a"


async def test_no_link_leads_to_the_ledger(sshnode: NodeUnderTest) -> None:
    """Neither a link the user makes nor one found on disk reaches the ledger: truncating it
    through a link would reset the user's figures."""
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("a.bin", "wb") as f:
            await f.write(b"a" * MiB)
        ledger = (home / ".edgegw-quota").read_bytes()
        for target in (".edgegw-quota", "/.edgegw-quota", "sub/../.edgegw-quota"):
            with pytest.raises(asyncssh.SFTPPermissionDenied, match="node's own files"):
                await sftp.symlink(target, "q")
        (home / "planted").symlink_to(".edgegw-quota")     # restored from a backup, say
        for attempt in (sftp.setstat("planted", asyncssh.SFTPAttrs(size=0)),
                        sftp.open("planted", "wb"), sftp.open("planted"),
                        sftp.stat("planted"), sftp.truncate("planted", 0)):
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await attempt
        assert (home / ".edgegw-quota").read_bytes() == ledger
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            async with sftp.open("b.bin", "wb") as f:
                await f.write(b"b" * (10 * MiB))


def _ledger(home: Path) -> tuple[int, int]:
    """The figures of the user's ledger (bytes, files)."""
    return struct.unpack(">QQ", (home / QUOTA_LEDGER.decode()).read_bytes()[:16])


async def test_a_new_size_is_not_counted_twice_under_an_upload_in_place(
        sshnode: NodeUnderTest) -> None:
    """A SETSTAT of the size of a file an upload writes in place (x.filepart) would be counted
    by both: truncating it gave its bytes back twice, and the figures fell below what is
    stored, for a quota without end. It waits for the upload, as a second writer does."""
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    (home / "other.bin").write_bytes(b"o" * 300_000)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("x.filepart", "wb") as f:
            await f.write(b"a" * 100_000)
            with pytest.raises(asyncssh.SFTPFailure, match="another handle"):
                await sftp.truncate("x.filepart", 0)
        assert _ledger(home) == scan_home(home) == (400_000, 2)
        await sftp.truncate("x.filepart", 10)            # once the upload is closed
        assert _ledger(home) == scan_home(home) == (300_010, 2)


async def test_a_new_size_counts_for_every_name_of_the_file(sshnode: NodeUnderTest) -> None:
    """The quota counts a file once per name (hard links too, as its rescan does): a new size
    changes them all. Counted once, growing a linked file and removing its names stored the
    growth for nothing."""
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("x", "wb") as f:
            await f.write(b"x" * 1000)
        await sftp.link("x", "y")
        await sftp.truncate("x", 100_000)
        assert _ledger(home) == scan_home(home) == (200_000, 2)
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            await sftp.truncate("y", 6 * MiB)           # 12 MiB for the two names
        await sftp.truncate("y", 10)
        assert _ledger(home) == scan_home(home) == (20, 2)


async def test_a_new_size_the_file_system_refuses_is_not_charged(
        sshnode: NodeUnderTest) -> None:
    """A SETSTAT of size is charged before the file grows; if the file system refuses the
    size (EFBIG: ext4 and others stop at 16 TiB), the charge is given back."""
    home, key = sshnode.keyed_user("alice", quota_bytes=2 ** 62)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("x", "wb") as f:
            await f.write(b"x" * 1000)
        try:
            await sftp.truncate("x", 2 ** 61)
        except asyncssh.SFTPError:
            pass   # refused by the file system (ext4); on tmpfs it is taken
        size = (home / "x").stat().st_size
        assert _ledger(home) == scan_home(home) == (size, 1)


async def test_a_file_written_in_place_grows_under_one_name(sshnode: NodeUnderTest) -> None:
    """An upload in place (x.filepart) grows every hard link of its file, and would count the
    growth once: linked before or during the upload, growth is refused."""
    home, key = sshnode.keyed_user("alice", quota_bytes=10 * MiB)
    async with sshnode.sftp_client("alice", key) as sftp:
        async with sftp.open("x.filepart", "wb") as f:
            await f.write(b"a" * 10)
            await sftp.link("x.filepart", "y")
            with pytest.raises(asyncssh.SFTPFailure, match="other names"):
                await f.write(b"a" * 100_000, 10)
        assert _ledger(home) == scan_home(home) == (20, 2)
        async with sftp.open("x.filepart", "ab") as f:
            with pytest.raises(asyncssh.SFTPFailure, match="other names"):
                await f.write(b"b" * 100_000)
        await sftp.remove("y")
        async with sftp.open("x.filepart", "ab") as f:     # one name again
            await f.write(b"b" * 100_000)
    assert (home / "x.filepart").read_bytes() == b"a" * 10 + b"b" * 100_000
    assert _ledger(home) == scan_home(home) == (100_010, 1)
