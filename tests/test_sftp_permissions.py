"""Per-user permissions: each SFTP operation needs its permission, and says so when refused."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncssh
import pytest

from internal.store.base import Perm
from tests.sshutil import NodeUnderTest


async def test_download_only_user(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("reader", permissions=frozenset({Perm.LIST, Perm.DOWNLOAD}))
    (home / "report.csv").write_text("a,b\n")
    (home / "dir").mkdir()
    (tmp_path / "up.txt").write_text("x")
    run = await sshnode.sftp("reader", key, f"ls\nget report.csv {tmp_path / 'r.csv'}\n")
    assert run.returncode == 0, run.output
    assert (tmp_path / "r.csv").read_text() == "a,b\n"
    for cmd in (f"put {tmp_path / 'up.txt'} new.txt", f"put {tmp_path / 'up.txt'} report.csv",
                "rm report.csv", "rename report.csv other.csv", "mkdir sub", "rmdir dir",
                "chmod 600 report.csv", "ln -s report.csv link"):
        run = await sshnode.sftp("reader", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
        assert "Permission denied" in run.stderr, (cmd, run.output)
    assert sorted(p.name for p in home.iterdir()) == ["dir", "report.csv"]
    assert (home / "report.csv").read_text() == "a,b\n"
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="reader",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPPermissionDenied) as err:
                await sftp.remove("report.csv")
    assert "may not delete files" in str(err.value.reason)


async def test_upload_without_overwrite(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("drop", permissions=frozenset({Perm.UPLOAD, Perm.LIST}))
    (tmp_path / "a.txt").write_text("first")
    run = await sshnode.sftp("drop", key, f"put {tmp_path / 'a.txt'} a.txt\nls\n")
    assert run.returncode == 0, run.output
    (tmp_path / "a.txt").write_text("second")
    run = await sshnode.sftp("drop", key, f"put {tmp_path / 'a.txt'} a.txt\n")
    assert run.returncode != 0
    assert (home / "a.txt").read_text() == "first"
    run = await sshnode.sftp("drop", key, f"get a.txt {tmp_path / 'b.txt'}\n")
    assert run.returncode != 0 and not (tmp_path / "b.txt").exists()


async def test_full_permissions_round_trip(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    (tmp_path / "f.txt").write_text("data")
    run = await sshnode.sftp("alice", key, f"mkdir d\nput {tmp_path / 'f.txt'} d/f.txt\n"
                                           "chmod 600 d/f.txt\nrename d/f.txt d/g.txt\n"
                                           "ln d/g.txt d/h.txt\ndf -h\n"
                                           "rm d/g.txt\nrm d/h.txt\nrmdir d\n")
    assert run.returncode == 0, run.output
    assert list(home.iterdir()) == []
    await sshnode.wait_idle()
    kinds = [e.kind for e in sshnode.events(username="alice")]
    for kind in ("dir.mkdir", "file.open", "file.close", "file.setstat", "file.rename",
                 "file.link", "file.remove", "dir.rmdir", "session.disconnect"):
        assert kind in kinds, kind


async def test_a_new_size_is_an_overwrite(sshnode: NodeUnderTest) -> None:
    """Setting a file's size rewrites it (a size of 0 wipes it): SETSTAT alone does not allow
    it, as opening the file with TRUNC is not allowed without OVERWRITE either."""
    home, key = sshnode.keyed_user("attrs", permissions=frozenset(
        {Perm.LIST, Perm.DOWNLOAD, Perm.SETSTAT}))
    (home / "keep.txt").write_text("precious")
    async with sshnode.sftp_client("attrs", key) as sftp:
        with pytest.raises(asyncssh.SFTPPermissionDenied, match="may not overwrite"):
            await sftp.truncate("keep.txt", 0)
        await sftp.chmod("keep.txt", 0o600)          # other attributes: SETSTAT is enough
    assert (home / "keep.txt").read_text() == "precious"
    assert (home / "keep.txt").stat().st_mode & 0o777 == 0o600


async def test_renaming_over_an_empty_directory_removes_it(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("mover", permissions=frozenset(
        {Perm.LIST, Perm.RENAME, Perm.OVERWRITE, Perm.MKDIR}))
    (home / "new").mkdir()
    (home / "old").mkdir()
    async with sshnode.sftp_client("mover", key) as sftp:
        with pytest.raises(asyncssh.SFTPPermissionDenied, match="may not remove directories"):
            await sftp.posix_rename("new", "old")
    assert (home / "new").is_dir() and (home / "old").is_dir()


_MODE_BACK_SCRIPT = """
import os, sys
from asyncssh import SFTPAttrs
from internal.sftp.paths import PATH_FLAGS, Jail
from internal.sftp.uploads import apply_attrs
os.setgid(65534)
os.setuid(65534)                     # no CAP_DAC_OVERRIDE now, as a node run without root
jail = Jail(sys.argv[1])
for name in (b"f", b"d"):
    fd = jail.open(jail.resolve(name), PATH_FLAGS)
    try:
        apply_attrs(fd, SFTPAttrs(permissions=0o750, mtime=1_000_000_000), lambda size: None)
    finally:
        os.close(fd)
    st = os.stat(os.path.join(jail.root, name))
    print(name.decode(), oct(st.st_mode & 0o777), st.st_mtime)
"""


def test_a_mode_000_can_be_changed_back_without_root() -> None:
    """chmod needs no access to the content: a user who set mode 000 on a file or directory
    gets it back where the node runs as an ordinary account (here, nobody)."""
    with tempfile.TemporaryDirectory() as top:      # pytest's own tmp is root's only
        os.chmod(top, 0o755)
        _mode_back(Path(top) / "home")


def _mode_back(home: Path) -> None:
    home.mkdir()
    (home / "f").write_text("x")
    (home / "d").mkdir()
    for p in (home, home / "f", home / "d"):
        os.chown(p, 65534, 65534)
    (home / "f").chmod(0)
    (home / "d").chmod(0)
    out = subprocess.run([sys.executable, "-c", _MODE_BACK_SCRIPT, str(home)],
                         capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["f 0o750 1000000000.0", "d 0o750 1000000000.0"]
