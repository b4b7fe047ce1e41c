"""Races with other sessions: a directory swapped for a symlink out of the home between the
check and the use, and entries that vanish while a directory is listed.

Both are made deterministic in-process: the swap (or the removal) happens exactly inside the
window, by wrapping the step that opens it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from internal.sftp.paths import Jail
from tests.sshutil import NodeUnderTest

OUTSIDE_MTIME = 1_000_000_000     # marks what lies outside the home: no file inside has it


class Swapper:
    """`x` is a directory in the home, `lnk` a symlink to a directory outside. `swap()` trades
    their names the way a second session would (x -> xdir, lnk -> x); `restore()` undoes it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.armed = False
        self.swaps = 0

    def swap(self) -> None:
        if self.armed:
            self.armed = False
            os.rename(self.home / "x", self.home / "xdir")
            os.rename(self.home / "lnk", self.home / "x")
            self.swaps += 1

    def restore(self) -> None:
        if (self.home / "xdir").exists():
            os.rename(self.home / "x", self.home / "lnk")
            os.rename(self.home / "xdir", self.home / "x")


@pytest.fixture
def swapper(sshnode: NodeUnderTest, tmp_path: Path) -> Iterator[tuple[Swapper, Path]]:
    home, key = sshnode.keyed_user("alice")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text("top secret outside the home\n")
    (home / "mine.txt").write_text("mine")
    os.symlink(home / "mine.txt", outside / "link")     # readlink would answer "/mine.txt"
    for p in (outside / "secret.txt", outside / "sub", outside):
        os.utime(p, (OUTSIDE_MTIME, OUTSIDE_MTIME))
    (home / "x" / "sub").mkdir(parents=True)
    (home / "x" / "secret.txt").write_text("inside")
    os.symlink("other.txt", home / "x" / "link")
    os.symlink(outside, home / "lnk")
    s = Swapper(home)
    yield s, key
    s.restore()


@pytest.mark.parametrize("op,path", [("stat", "x/secret.txt"), ("lstat", "x/secret.txt"),
                                     ("statvfs", "x/secret.txt"), ("readlink", "x/link")])
async def test_stat_family_acts_on_what_was_checked(sshnode: NodeUnderTest,
                                                    swapper: tuple[Swapper, Path],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    op: str, path: str) -> None:
    """The swap comes right after the path was resolved and found inside the home. Looking
    the path up again would follow `x` out of it."""
    s, key = swapper
    real_resolve = Jail.resolve

    def resolve(self: Jail, path: bytes, *, follow: bool = True) -> bytes:
        real = real_resolve(self, path, follow=follow)
        if path.startswith(b"x/"):
            s.swap()
        return real

    monkeypatch.setattr(Jail, "resolve", resolve)
    async with sshnode.sftp_client("alice", key) as sftp:
        call = getattr(sftp, op)
        s.armed = True
        # readlink's verified parent is opened O_DIRECTORY|O_NOFOLLOW: the symlink there is
        # "not a directory", as good a refusal as any
        with pytest.raises((asyncssh.SFTPPermissionDenied, asyncssh.SFTPNoSuchFile)):
            answer = await call(path)
            pytest.fail(f"{op} answered through the swapped directory: {answer}")
        assert s.swaps == 1
        s.restore()
        # unswapped, the same call answers about the home's own file
        answer = await call(path)
    expected = {"stat": lambda a: a.size == len("inside"),
                "lstat": lambda a: a.size == len("inside"),
                "statvfs": lambda a: a.bsize > 0,
                "readlink": lambda a: a == "/x/other.txt"}
    assert expected[op](answer), answer


async def test_listing_dotdot_is_the_real_parent(sshnode: NodeUnderTest,
                                                 swapper: tuple[Swapper, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap comes right after `x/sub` was opened (and verified): `..` must describe the
    directory that really holds it, not whatever the name `x` leads to now."""
    s, key = swapper
    real_open_dir = Jail.open_dir

    def open_dir(self: Jail, real: bytes) -> int:
        fd = real_open_dir(self, real)
        s.swap()
        return fd

    monkeypatch.setattr(Jail, "open_dir", open_dir)
    async with sshnode.sftp_client("alice", key) as sftp:
        s.armed = True
        names = {n.filename: n for n in await sftp.readdir("x/sub")}
        assert s.swaps == 1
    assert set(names) == {".", ".."}
    assert names[".."].attrs.mtime != OUTSIDE_MTIME, "`..` described a directory outside"
    assert names[".."].attrs.mtime == int(os.stat(s.home / "xdir").st_mtime)


async def test_listing_skips_entries_that_vanish(sshnode: NodeUnderTest,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another session (or a pick-up job on the node) removes files while a directory is
    listed: the names were read, their status is gone. The listing shows the rest."""
    home, key = sshnode.keyed_user("alice")
    many = home / "many"
    many.mkdir()
    for i in range(20):
        (many / f"f{i:02d}").write_text("x")
    gone = {f"f{i:02d}" for i in range(0, 20, 2)}
    real_scandir = os.scandir
    armed = [True]

    class Vanishing:
        """The entries as read, then half of the files removed before they are looked at."""

        def __init__(self, fd: int) -> None:
            with real_scandir(fd) as it:
                self.entries = list(it)
            for name in gone:
                os.unlink(many / name)

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            return iter(self.entries)

        def __enter__(self) -> "Vanishing":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir(path: Any = ".") -> Any:
        if isinstance(path, int) and armed[0]:     # the server lists by descriptor
            armed[0] = False
            return Vanishing(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    async with sshnode.sftp_client("alice", key) as sftp:
        names = await sftp.listdir("many")
    assert not armed[0], "the listing did not go through os.scandir(fd)"
    assert sorted(names) == sorted({".", ".."} | {f"f{i:02d}" for i in range(1, 20, 2)})


async def test_a_plain_rename_never_replaces_a_file_that_appears_late(
        sshnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """SFTP's RENAME must not replace its target. Another session's upload can land on the
    target between the node's check and the rename: the rename itself refuses to replace
    (here the check is made to see nothing, as it would just before such an upload)."""
    import internal.sftp.server as server
    home, key = sshnode.keyed_user("alice")
    (home / "a.txt").write_text("a")
    (home / "b.txt").write_text("uploaded meanwhile")
    monkeypatch.setattr(server, "lstat_at", lambda name, dir_fd: None)
    async with sshnode.sftp_client("alice", key) as sftp:
        with pytest.raises(asyncssh.SFTPFailure):
            await sftp.rename("a.txt", "b.txt")
        await sftp.rename("a.txt", "c.txt")
    assert (home / "b.txt").read_text() == "uploaded meanwhile"
    assert (home / "c.txt").read_text() == "a"
