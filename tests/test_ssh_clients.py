"""Real clients against the node: asyncssh (with post-quantum KEX), paramiko, OpenSSH scp;
outdated algorithms are refused."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncssh
import paramiko

from internal.ssh.algorithms import KEX_ALGS
from tests.procs import SSH_OPTS
from tests.sshutil import NodeUnderTest


async def test_asyncssh_client_flow_with_mlkem(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    user, key = sshnode.add_user("alice")
    data = os.urandom(1 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    assert KEX_ALGS[0] == "mlkem768x25519-sha256"          # offered first
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None,
                                kex_algs=["mlkem768x25519-sha256"]) as conn:
        assert conn.get_extra_info("server_version").startswith("SSH-2.0-edgegw")
        async with conn.start_sftp_client() as sftp:
            await sftp.mkdir("in")
            await sftp.put(str(tmp_path / "up.bin"), "in/up.bin")
            assert await sftp.listdir("in") == [".", "..", "up.bin"]
            await sftp.get("in/up.bin", str(tmp_path / "down.bin"))
            assert (await sftp.stat("in/up.bin")).size == len(data)
            assert (await sftp.statvfs("/")).bsize > 0
    assert (tmp_path / "down.bin").read_bytes() == data
    assert (Path(user.home) / "in" / "up.bin").read_bytes() == data


def _paramiko_flow(port: int, key: Path, tmp: Path) -> list[str]:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port, username="alice", key_filename=str(key),
                   allow_agent=False, look_for_keys=False, timeout=20)
    try:
        sftp = client.open_sftp()
        sftp.put(str(tmp / "p.txt"), "p.txt")
        sftp.get("p.txt", str(tmp / "p-back.txt"))
        sftp.posix_rename("p.txt", "q.txt")
        return sorted(sftp.listdir("."))
    finally:
        client.close()


async def test_paramiko_client_flow(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    _, key = sshnode.add_user("alice")
    assert key is not None
    (tmp_path / "p.txt").write_text("from paramiko\n")
    names = await asyncio.to_thread(_paramiko_flow, sshnode.port, key, tmp_path)
    assert names == ["q.txt"]
    assert (tmp_path / "p-back.txt").read_text() == "from paramiko\n"


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_openssh_scp_round_trip(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    user, key = sshnode.add_user("alice")
    (tmp_path / "s.txt").write_text("via scp\n")
    base = ["scp", "-P", str(sshnode.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            *SSH_OPTS]
    rc, out = await _run(*base, str(tmp_path / "s.txt"), "alice@127.0.0.1:s.txt")
    assert rc == 0, out
    rc, out = await _run(*base, "alice@127.0.0.1:/s.txt", str(tmp_path / "back.txt"))
    assert rc == 0, out
    assert (tmp_path / "back.txt").read_text() == "via scp\n"
    rc, out = await _run(*base, "alice@127.0.0.1:../../etc/passwd", str(tmp_path / "pw"))
    assert rc != 0 and not (tmp_path / "pw").exists()
    assert sorted(os.listdir(user.home)) == ["s.txt"]


async def test_outdated_algorithms_are_refused(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    _, key = sshnode.add_user("alice")
    assert key is not None
    for option in ("KexAlgorithms=diffie-hellman-group14-sha1", "Ciphers=aes128-cbc",
                   "Ciphers=aes128-ctr -o MACs=hmac-sha1", "HostKeyAlgorithms=ssh-dss"):
        rc, out = await _run("ssh", "-v", "-n", "-p", str(sshnode.port), "-i", str(key),
                             *SSH_OPTS, *f"-o {option}".split(), "-o", "IdentitiesOnly=yes",
                             "alice@127.0.0.1",
                             "-s", "sftp")
        assert rc != 0, (option, out)
        assert "no matching" in out.lower() or "unable to negotiate" in out.lower(), out
    # a client offering CBC first still gets a modern cipher, and KEX is curve25519 for
    # OpenSSH 9.2 (it predates mlkem768x25519; newer clients get that)
    rc, out = await _run("ssh", "-v", "-n", "-p", str(sshnode.port), "-i", str(key), *SSH_OPTS,
                         "-o", "IdentitiesOnly=yes", "-o", "Ciphers=aes128-cbc,aes128-ctr",
                         "alice@127.0.0.1", "-s", "sftp")
    assert "kex: algorithm: curve25519-sha256" in out, out
    assert "kex: server->client cipher: aes128-ctr" in out, out


async def test_an_sftp_channel_closed_before_its_init_ends_alone(sshnode: NodeUnderTest,
                                                                 tmp_path: Path) -> None:
    """A client may close an SFTP channel before sending its init (`ssh -n -s sftp`, or a
    client giving up on one channel of several): that channel ends with status 0 and the
    connection, with its other channels, goes on; the session ends as soon as the client
    leaves (it waited 5 s for an SFTP exit that never came, and the connection was dropped)."""
    _, key = sshnode.add_user("alice")
    rc, out = await _run("ssh", "-n", "-p", str(sshnode.port), "-i", str(key), *SSH_OPTS,
                         "-o", "IdentitiesOnly=yes", "alice@127.0.0.1", "-s", "sftp")
    assert rc == 0, out
    assert "closed by remote host" not in out, out
    await sshnode.wait_idle(timeout=2.0)
    data = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(data)
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp")
            chan.close()                               # a second channel, given up at once
            await asyncio.wait_for(chan.wait_closed(), 5)
            await sftp.put(str(tmp_path / "up.bin"), "up.bin")   # the first one goes on
            await sftp.get("up.bin", str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data
    await sshnode.wait_idle(timeout=2.0)
    ends = sshnode.events("session.disconnect")
    assert [e.detail["reason"] for e in ends] == ["closed", "closed"], ends
