"""OpenSSH sftp's everyday options that send requests of their own: preserving times and modes
(-p), fsync before close (-f), whole trees (-r), resuming a download (reget)."""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from tests.sshutil import NodeUnderTest, tree

MiB = 1 << 20
Y2001 = 978_307_200     # 2001-01-01 UTC


async def test_put_and_get_preserve_times_and_modes(sshnode: NodeUnderTest,
                                                     tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "report.csv"
    src.write_bytes(os.urandom(MiB))
    src.chmod(0o640)
    os.utime(src, (Y2001, Y2001))
    (home / "report.csv").write_bytes(b"an older report")        # -p over an existing file too
    run = await sshnode.sftp("alice", key, f"put -p {src} report.csv\n"
                                           f"put -p {src} new.csv\n"
                                           f"get -p new.csv {tmp_path / 'back.csv'}\n")
    assert run.returncode == 0, run.output
    for name in ("report.csv", "new.csv"):
        st = (home / name).stat()
        assert (st.st_mtime, stat.S_IMODE(st.st_mode)) == (Y2001, 0o640), name
        assert (home / name).read_bytes() == src.read_bytes()
    back = (tmp_path / "back.csv").stat()
    assert (back.st_mtime, stat.S_IMODE(back.st_mode)) == (Y2001, 0o640)


async def test_put_with_fsync(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * MiB))
    run = await sshnode.sftp("alice", key, f"put -f {src} f.bin\n")
    assert run.returncode == 0, run.output
    assert (home / "f.bin").read_bytes() == src.read_bytes()


async def test_put_and_get_whole_trees(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / "empty").mkdir()
    files = {"top.txt": b"top", "a/one.bin": os.urandom(300_000),
             "a/b/two.bin": os.urandom(MiB + 1)}
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    back = tmp_path / "back"
    back.mkdir()
    run = await sshnode.sftp("alice", key, f"put -r {out} batch\nget -r batch {back}\n")
    assert run.returncode == 0, run.output
    assert tree(home / "batch") == tree(out) == tree(back / "batch")
    for rel, data in files.items():
        assert (home / "batch" / rel).read_bytes() == data
        assert (back / "batch" / rel).read_bytes() == data


async def test_reget_resumes_a_download(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    home, key = sshnode.keyed_user("alice")
    data = os.urandom(3 * MiB + 5)
    (home / "big.bin").write_bytes(data)
    part = tmp_path / "big.bin"
    part.write_bytes(data[:MiB + 7])                   # what a cut-off download left
    run = await sshnode.sftp("alice", key, f"reget big.bin {part}\n")
    assert run.returncode == 0, run.output
    assert part.read_bytes() == data
    closes = sshnode.events("file.close", username="alice")
    assert closes[-1].detail["bytes_read"] == len(data) - (MiB + 7)   # only the rest was sent


async def test_a_long_listing_names_the_user_as_owner(sshnode: NodeUnderTest) -> None:
    home, key = sshnode.keyed_user("alice")
    (home / "a.txt").write_text("x")
    run = await sshnode.sftp("alice", key, "ls -l\n")
    assert run.returncode == 0, run.output
    (line,) = [x for x in run.stdout.splitlines() if x.endswith(" a.txt")]
    assert line.split()[2:4] == ["alice", "alice"], line
    assert pwd.getpwuid(os.getuid()).pw_name not in run.stdout.replace("alice", "")
