"""Resuming an overwrite that was cut off: OpenSSH's reput must give the new file, never the old
file's head with the new file's tail (internal.sftp.cutoffs)."""
from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from pathlib import Path
from typing import Callable

import asyncssh
import pytest

from internal.sftp import cutoffs
from internal.sftp.paths import QUOTA_LEDGER, is_temp_name
from internal.sftp.quota import scan_home
from internal.sftp.temps import sweep_temps
from tests.sshutil import NodeUnderTest, start_node, stop_node, tree

MiB = 1 << 20
# OpenSSH's sftp -l (Kbit/s): slow enough to cut an upload off part way on loopback.
SLOW = ["-l", "40000"]


def temps(root: Path) -> dict[str, int]:
    return {n: (root / n).stat().st_size for n in tree(root)
            if is_temp_name(os.fsencode(os.path.basename(n)))}


def ledger(root: Path) -> int:
    """The bytes the user's quota ledger holds (no session may be running)."""
    return struct.unpack(">QQ", (root / QUOTA_LEDGER.decode()).read_bytes()[:16])[0]


def overwrite_setup(node: NodeUnderTest, tmp_path: Path, old_size: int
                    ) -> tuple[Path, Path, Path, bytes, bytes]:
    """A user with a quota and an old f.bin, and a new 24 MiB f.bin to upload over it:
    (home, key, the new file's path, old, new)."""
    home, key = node.keyed_user("alice", quota_bytes=1 << 30)
    old, new = os.urandom(old_size), os.urandom(24 * MiB)
    (home / "f.bin").write_bytes(old)
    src = tmp_path / "f.bin"
    src.write_bytes(new)
    return home, key, src, old, new


async def cut_off(node: NodeUnderTest, key: Path, command: str,
                  under_way: Callable[[], bool]) -> None:
    """Run `command` in OpenSSH's sftp, slowed down, and drop the connection once
    `under_way()` says the upload has got far enough."""
    proc = await node.start_sftp("alice", key, options=SLOW)
    assert proc.stdin is not None
    proc.stdin.write(f"{command}\n".encode())
    await proc.stdin.drain()
    for _ in range(1000):
        if under_way():
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the upload never got under way")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in [proc.pid, *map(int, children)]:     # sftp and its ssh: the TCP connection drops
        os.kill(pid, signal.SIGKILL)
    await proc.wait()
    await node.wait_idle()


async def cut_off_put(node: NodeUnderTest, home: Path, key: Path, src: Path, name: str,
                      after: int) -> None:
    """`put src name`, the connection dropped once the upload holds more than `after` bytes."""
    await cut_off(node, key, f"put {src} {name}",
                  lambda: any(size > after for size in temps(home).values()))


async def test_a_reput_after_a_cut_off_overwrite_gives_the_new_file(
        sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key, src, old, new = overwrite_setup(sshnode, tmp_path, 2 * MiB)

    await cut_off_put(sshnode, home, key, src, "f.bin", after=4 * MiB)
    assert (home / "f.bin").read_bytes() == old               # the overwrite never happened
    kept = temps(home)
    assert list(kept.values()) == [len(old)], kept             # the new data, to the old size
    assert ledger(home) == scan_home(home)[0] == len(old) * 2  # and it counts for the quota

    run = await sshnode.sftp("alice", key, f"reput {src} f.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "f.bin").read_bytes() == new
    assert temps(home) == {}
    assert ledger(home) == scan_home(home)[0] == len(new)


async def test_a_resume_of_an_overwrite_cut_off_early_is_refused(
        sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key, src, old, new = overwrite_setup(sshnode, tmp_path, 8 * MiB)

    await cut_off_put(sshnode, home, key, src, "f.bin", after=256 * 1024)
    (kept,) = temps(home).values()
    assert 0 < kept < len(old)
    run = await sshnode.sftp("alice", key, f"reput {src} f.bin\n")
    assert run.returncode != 0
    assert (home / "f.bin").read_bytes() == old
    async with sshnode.sftp_client("alice", key) as sftp:     # OpenSSH shows no open's reason
        with pytest.raises(asyncssh.SFTPFailure) as err:
            await sftp.open("f.bin", "ab")
    assert "cut off after" in err.value.reason, err.value.reason
    assert "upload the whole file again" in err.value.reason
    assert ledger(home) == scan_home(home)[0] == len(old) + kept

    # an upload of the whole file is what the message says to do, and needs no kept data
    run = await sshnode.sftp("alice", key, f"put {src} f.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "f.bin").read_bytes() == new
    assert temps(home) == {}
    assert ledger(home) == scan_home(home)[0] == len(new)


async def test_a_resume_continues_what_a_killed_node_left(sshnode: NodeUnderTest,
                                                          tmp_path: Path) -> None:
    """A node killed mid-overwrite leaves its temporary unlocked under the overwrite's stem."""
    home, key = sshnode.keyed_user("alice")
    old, new = os.urandom(MiB), os.urandom(3 * MiB)
    (home / "f.bin").write_bytes(old)
    stem = cutoffs.stem(b"f.bin", os.lstat(home / "f.bin"))
    (home / cutoffs.live_name(stem).decode()).write_bytes(new[:2 * MiB])
    src = tmp_path / "f.bin"
    src.write_bytes(new)
    run = await sshnode.sftp("alice", key, f"reput {src} f.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "f.bin").read_bytes() == new
    assert temps(home) == {}


async def test_an_append_to_a_file_not_cut_off_appends(sshnode: NodeUnderTest,
                                                       tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "log.txt").write_bytes(b"first\n")
    (tmp_path / "log.txt").write_bytes(b"first\nsecond\n")
    run = await sshnode.sftp("alice", key, f"reput {tmp_path / 'log.txt'} log.txt\n")
    assert run.returncode == 0, run.output
    assert (home / "log.txt").read_bytes() == b"first\nsecond\n"
    assert temps(home) == {}


def test_the_sweep_keeps_cut_off_data_for_a_day(tmp_path: Path) -> None:
    st = os.lstat(tmp_path)
    day_old, hour_old = time.time() - cutoffs.KEEP - 60, time.time() - 3600
    expired = tmp_path / cutoffs.kept_name(cutoffs.stem(b"a", st)).decode()
    recent = tmp_path / cutoffs.kept_name(cutoffs.stem(b"b", st)).decode()
    crashed = tmp_path / cutoffs.live_name(cutoffs.stem(b"c", st)).decode()
    for path, when in ((expired, day_old), (recent, hour_old), (crashed, hour_old)):
        path.write_bytes(b"data")
        os.utime(path, (when, when))
    assert sweep_temps(tmp_path, older_than=60) == 1
    adopted = cutoffs.kept_name(cutoffs.stem(b"c", st)).decode()
    assert tree(tmp_path) == {recent.name, adopted}      # a crash's overwrite is kept too


async def test_kept_data_goes_with_its_file(sshnode: NodeUnderTest) -> None:
    """Removing or renaming a file drops what was kept for resuming its overwrite, and the
    quota gives it back."""
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 30)
    for name in ("gone.bin", "moved.bin", "other.bin"):
        (home / name).write_bytes(os.urandom(MiB))
        kept = cutoffs.kept_name(cutoffs.stem(name.encode(), os.lstat(home / name)))
        (home / kept.decode()).write_bytes(os.urandom(MiB // 2))
    run = await sshnode.sftp("alice", key, "rm gone.bin\nrename moved.bin new.bin\n")
    assert run.returncode == 0, run.output
    assert list(temps(home).values()) == [MiB // 2]       # other.bin's, untouched
    assert ledger(home) == scan_home(home)[0] == 2 * MiB + MiB // 2


async def test_a_clients_own_temporary_is_written_in_place_and_resumes(
        sshnode: NodeUnderTest, tmp_path: Path) -> None:
    """WinSCP uploads to NAME.filepart and renames it when done: such a name is written in
    place, so a cut-off upload stays there and a resume continues it where it stopped."""
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 30)
    new = os.urandom(24 * MiB)
    src = tmp_path / "f.bin"
    src.write_bytes(new)
    part = home / "f.bin.filepart"
    await cut_off(sshnode, key, f"put {src} {part.name}",
                  lambda: part.exists() and part.stat().st_size > 4 * MiB)
    stored = part.read_bytes()
    assert 4 * MiB < len(stored) < len(new) and new.startswith(stored)
    assert temps(home) == {}
    assert ledger(home) == scan_home(home)[0] == len(stored)

    run = await sshnode.sftp("alice", key, f"reput {src} f.bin.filepart\n"
                                           "rename f.bin.filepart f.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "f.bin").read_bytes() == new
    assert tree(home) == {"f.bin"}
    assert ledger(home) == scan_home(home)[0] == len(new)
    opens = sshnode.events("file.open", username="alice")
    assert opens[-1].detail["resume"] is True and opens[-1].detail["in_place"] is True
    closes = sshnode.events("file.close", username="alice")
    assert closes[-1].detail["bytes_written"] == len(new) - len(stored)   # only the rest


async def test_without_partial_suffixes_every_upload_is_whole(tmp_path: Path) -> None:
    node = await start_node(tmp_path, partial_suffixes=())
    try:
        home, key = node.keyed_user("alice")
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(24 * MiB))
        await cut_off(node, key, f"put {src} f.bin.filepart",
                      lambda: any(size > MiB for size in temps(home).values()))
        assert tree(home) == set()          # cut off: nothing under the name
    finally:
        await stop_node(node)


async def test_rmdir_gives_back_what_was_kept_in_it(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 30)
    (home / "d").mkdir()
    (home / "f.bin").write_bytes(os.urandom(MiB))
    stale = cutoffs.kept_name(cutoffs.stem(b"gone.bin", os.lstat(home / "f.bin")))
    (home / "d" / stale.decode()).write_bytes(os.urandom(MiB // 2))   # its file went earlier
    run = await sshnode.sftp("alice", key, "rmdir d\n")
    assert run.returncode == 0, run.output
    assert tree(home) == {"f.bin"}
    assert ledger(home) == scan_home(home)[0] == MiB


async def test_kept_data_that_expires_leaves_the_quota(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 30)
    (home / "f.bin").write_bytes(os.urandom(MiB))
    stale = cutoffs.kept_name(cutoffs.stem(b"gone.bin", os.lstat(home / "f.bin")))
    kept = home / stale.decode()
    kept.write_bytes(os.urandom(MiB // 2))
    day_old = time.time() - cutoffs.KEEP - 60
    os.utime(kept, (day_old, day_old))
    async with sshnode.sftp_client("alice", key) as sftp:    # its session holds the ledger
        assert await sftp.listdir(".") == [".", "..", "f.bin"]
        assert ledger(home) == MiB + MiB // 2
        await asyncio.to_thread(sshnode.service._sweep)      # the node's periodic sweep
        assert not kept.exists()
        assert ledger(home) == scan_home(home)[0] == MiB


async def test_a_failed_resume_keeps_what_it_resumed_from(sshnode: NodeUnderTest) -> None:
    """An overwrite cut off, then a resume that fails (here: over quota) and is closed: the
    data kept for resuming stays, so the next resume still gives the new file, not the new
    file's tail on the old file's head."""
    K = 1024
    home, key = sshnode.keyed_user("alice", quota_bytes=550 * K)
    old, new = os.urandom(300 * K), os.urandom(400 * K)
    (home / "f.bin").write_bytes(old)
    (home / "other.bin").write_bytes(os.urandom(200 * K))
    stem = cutoffs.stem(b"f.bin", os.lstat(home / "f.bin"))
    (home / cutoffs.kept_name(stem).decode()).write_bytes(new[:300 * K])   # a cut-off's
    resume = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT       # OpenSSH's reput: no truncation
    async with sshnode.sftp_client("alice", key) as sftp:
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            async with sftp.open("f.bin", resume, encoding=None) as f:    # and its close
                await f.write(new[300 * K:] + b"x" * (300 * K), 300 * K)
        assert (home / "f.bin").read_bytes() == old
        assert list(temps(home).values()) == [300 * K]
        await sftp.remove("other.bin")                     # room again
        async with sftp.open("f.bin", resume, encoding=None) as f:
            await f.write(new[300 * K:], 300 * K)
    assert (home / "f.bin").read_bytes() == new
    assert temps(home) == {}
    assert ledger(home) == scan_home(home)[0] == len(new)


async def test_a_clients_own_temporary_has_one_writer_at_a_time(
        sshnode: NodeUnderTest) -> None:
    """A client resuming x.filepart while its dead session's handle still writes it would
    have both count the file's growth: the second writer is refused until the first closes."""
    home, key = sshnode.keyed_user("alice", quota_bytes=1 << 30)
    async with sshnode.sftp_client("alice", key) as first, \
            sshnode.sftp_client("alice", key) as second:
        f = await first.open("x.filepart", "wb")
        await f.write(b"a" * 100_000)
        with pytest.raises(asyncssh.SFTPFailure, match="another handle"):
            await second.open("x.filepart", "ab")
        assert list(tree(home)) == ["x.filepart"]       # the refusal left it as it was
        await f.close()
        async with second.open("x.filepart", "ab") as g:
            await g.write(b"b" * 50_000)
    assert (home / "x.filepart").read_bytes() == b"a" * 100_000 + b"b" * 50_000
    assert ledger(home) == scan_home(home)[0] == 150_000
