"""Nothing outside the user's home is reachable: `..`, absolute paths, symlinks of any origin."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh
import pytest

from internal.sftp.paths import AccessDenied, Jail
from tests.sshutil import NodeUnderTest, tree

SECRET = "top secret outside the home\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the homes with a file no user may read or replace."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text(SECRET)
    return d


@pytest.fixture
def dl(tmp_path: Path) -> Path:
    """Where the client downloads to: must stay empty when a download is refused."""
    d = tmp_path / "dl"
    d.mkdir()
    return d


async def test_dotdot_and_absolute_paths_stay_home(sshnode: NodeUnderTest, tmp_path: Path,
                                                   outside: Path, dl: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "mine.txt").write_text("mine")
    rel = os.path.relpath(outside / "secret.txt", home)   # ../../outside/secret.txt
    for cmd in (f"get ../../etc/passwd {dl}/a", "get /etc/passwd " + f"{dl}/b",
                f"get {rel} {dl}/c", f"get {outside / 'secret.txt'} {dl}/d",
                f"put {home / 'mine.txt'} {outside / 'secret.txt'}"):
        run = await sshnode.sftp("alice", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
    assert os.listdir(dl) == []
    # climbing above `/` stops at `/`: the upload lands in the home, not beside it
    run = await sshnode.sftp("alice", key, f"put {home / 'mine.txt'} ../../../escaped.txt\n")
    assert run.returncode == 0, run.output
    assert (home / "escaped.txt").read_text() == "mine"
    assert not (tmp_path / "escaped.txt").exists() and not (home.parent / "escaped.txt").exists()
    assert (outside / "secret.txt").read_text() == SECRET
    # `/..` is simply the home's root, which is where `mine.txt` lives
    run = await sshnode.sftp("alice", key, f"cd /../..\nget mine.txt {dl}/m\npwd\n")
    assert run.returncode == 0, run.output
    assert (dl / "m").read_text() == "mine"
    assert "Remote working directory: /" in run.stdout


async def test_planted_symlink_out_of_home_gives_nothing(sshnode: NodeUnderTest, tmp_path: Path,
                                                         outside: Path, dl: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    os.symlink(outside, home / "etc")                     # planted by someone on the node
    os.symlink(outside / "secret.txt", home / "secret.txt")
    os.symlink("../../outside", home / "rel")
    (tmp_path / "payload").write_text("payload")
    for cmd in (f"get etc/secret.txt {dl}/a", f"get secret.txt {dl}/b",
                f"get rel/secret.txt {dl}/c", "cd etc", "cd rel",
                f"put {tmp_path / 'payload'} etc/new.txt",
                f"put {tmp_path / 'payload'} secret.txt", "mkdir etc/sub", "rm etc/secret.txt",
                "chmod 777 secret.txt", "rename etc/secret.txt stolen.txt"):
        run = await sshnode.sftp("alice", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
    assert os.listdir(dl) == []
    run = await sshnode.sftp("alice", key, "-ls -l etc/\n-ls rel/\n-ls etc/*\n")
    assert "secret" not in run.stdout, run.output
    assert tree(outside) == {"secret.txt"}
    assert (outside / "secret.txt").read_text() == SECRET
    assert (outside / "secret.txt").stat().st_mode & 0o777 != 0o777
    # the links themselves are visible and removable: they are names in the home
    run = await sshnode.sftp("alice", key, "ls -l\nrm secret.txt\n")
    assert run.returncode == 0, run.output
    assert not os.path.lexists(home / "secret.txt")
    assert (outside / "secret.txt").read_text() == SECRET


async def test_sftp_created_symlinks(sshnode: NodeUnderTest, tmp_path: Path,
                                     outside: Path, dl: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "data.txt").write_text("inside")
    for cmd in ("ln -s ../../outside out", "ln -s ../.. up", "ln -s ../../../../../../etc e"):
        run = await sshnode.sftp("alice", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
        assert "Permission denied" in run.stderr, run.output
    assert sorted(os.listdir(home)) == ["data.txt"]
    # an absolute target means the home's /etc, which does not exist: no way to the real one
    run = await sshnode.sftp("alice", key, f"ln -s /etc etc\n-get etc/passwd {dl}/p\n"
                                           f"-get etc/hostname {dl}/h\n")
    assert run.returncode == 0, run.output
    assert not os.readlink(home / "etc").startswith("/")
    assert os.listdir(dl) == []
    # a link inside the home works, stored relative
    run = await sshnode.sftp("alice", key, f"mkdir d\nln -s /data.txt d/link\n"
                                           f"get d/link {dl}/via-link\n")
    assert run.returncode == 0, run.output
    assert (dl / "via-link").read_text() == "inside"
    assert os.readlink(home / "d" / "link") == "../data.txt"
    assert tree(outside) == {"secret.txt"}
    # moving the link's directory deeper would make "../data.txt" point elsewhere: still home
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.symlink("../data.txt", "d/rel")     # resolves to /data.txt: allowed
            assert await sftp.readlink("d/rel") == "/data.txt"
            await sftp.rename("d", "moved")
            await sftp.mkdir("x")
            await sftp.rename("moved", "x/moved")          # now ../data.txt = /x/data.txt
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp.open("x/moved/rel")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.symlink("../../../outside/secret.txt", "x/abs")
            # relative links that climb out after a move are caught at use time
            await sftp.makedirs("a/b/c/d")
            await sftp.symlink("../../../..", "a/b/c/d/top")   # = the home root: allowed
            await sftp.rename("a/b/c/d", "d")           # now it points 3 levels above the home
            assert os.path.realpath(home / "d" / "top") == str(tmp_path)
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.listdir("d/top")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.open("d/top/outside/secret.txt")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.put(str(home / "data.txt"), "d/top/outside/new.txt")
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.readlink("d/top")
    assert tree(outside) == {"secret.txt"}


async def test_upload_temporaries_are_invisible(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    name = ".edgegw-upload-00000000deadbeef.tmp"
    (home / name).write_text("someone's partial upload")
    (tmp_path / "x").write_text("x")
    run = await sshnode.sftp("alice", key, "ls -la\n")
    assert run.returncode == 0 and name not in run.stdout, run.output
    for cmd in (f"get {name} {tmp_path}/y", f"rm {name}", f"put {tmp_path / 'x'} {name}"):
        run = await sshnode.sftp("alice", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
    assert (home / name).read_text() == "someone's partial upload"


def test_jail_mapping(tmp_path: Path) -> None:
    jail = Jail(tmp_path)
    root = os.fsencode(tmp_path)
    assert jail.virtual(b"../../etc/passwd") == b"/etc/passwd"
    assert jail.local(b"/../x") == root + b"/x"
    assert jail.resolve(b"") == root
    assert jail.client_path(root + b"/a/b") == b"/a/b"
    with pytest.raises(AccessDenied):
        jail.client_path(b"/etc")
    with pytest.raises(ValueError):
        jail.virtual(b"a\0b")


async def test_a_trailing_slash_names_a_directory(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    """Normalising the path must not drop what its trailing `/` says: `rm file/` removes
    nothing (rm(1) and OpenSSH's server refuse it too), while directories work either way."""
    home, key = sshnode.keyed_user("alice")
    (home / "file.txt").write_text("keep me")
    (home / "dir").mkdir()
    os.symlink("dir", home / "dirlink")
    for cmd in ("rm file.txt/", "rm file.txt/.", "rename file.txt/ moved.txt",
                "chmod 600 file.txt/", "rmdir dirlink/", "cd file.txt/"):
        run = await sshnode.sftp("alice", key, cmd + "\n")
        assert run.returncode != 0, (cmd, run.output)
    assert (home / "file.txt").read_text() == "keep me" and os.path.islink(home / "dirlink")
    assert (home / "file.txt").stat().st_mode & 0o777 != 0o600
    async with sshnode.sftp_client("alice", key) as sftp:
        # SFTP v3 has no codes of its own for these: the reason carries them
        with pytest.raises(asyncssh.SFTPError, match="not a directory"):
            await sftp.stat("file.txt/")
        with pytest.raises(asyncssh.SFTPError, match="not a regular file"):
            await sftp.open("new.txt/", "w")     # no file "new.txt" either
        assert await sftp.realpath("dir/.") == "/dir"
        assert stat.S_ISDIR((await sftp.stat("dirlink/")).permissions or 0)
    run = await sshnode.sftp("alice", key, "mkdir new/\ncd dir/\nls\ncd /\nrmdir dir/\n")
    assert run.returncode == 0, run.output
    assert tree(home) == {"file.txt", "dirlink", "new"}


async def test_a_root_that_holds_the_node_home_is_refused_at_login(sshnode: NodeUnderTest,
                                                                   dl: Path,
                                                                   caplog) -> None:  # type: ignore[no-untyped-def]
    """A user whose root holds the node home (set before the CLI refused that, or by another
    node's CLI on a shared store) gets no SFTP channel: the node's keys stay out of reach."""
    _, key = sshnode.keyed_user("alice")
    sshnode.update_user("alice", home=str(sshnode.home.path))
    run = await sshnode.sftp("alice", key, f"get pnc/node.key {dl}/k\n")
    assert run.returncode != 0 and os.listdir(dl) == [], run.output
    assert "holds the node home" in caplog.text and "SFTP refused" in caplog.text
    # the client is told, on the channel's stderr; its connection was not dropped as a fault
    assert "this account's files are misconfigured on the server" in run.output, run.output
    sshnode.update_user("alice", home=str(sshnode.home.user_home("alice")))
    run = await sshnode.sftp("alice", key, "pwd\n")
    assert run.returncode == 0, run.output
