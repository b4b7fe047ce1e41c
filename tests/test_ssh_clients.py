"""Real clients against the node: asyncssh (with post-quantum KEX), paramiko, OpenSSH scp;
outdated algorithms are refused, and so is everything but SFTP."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import asyncssh
import paramiko
import pytest

from internal.ssh.algorithms import KEX_ALGS
from internal.ssh.auth import MAX_REFUSED_REQUESTS
from tests.procs import SSH_OPTS, free_port
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


async def test_everything_but_sftp_is_refused_logged_and_audited(
        sshnode: NodeUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    """A partner's key opens SFTP and nothing else: no shell, no command (nor legacy scp), no
    other subsystem, no port forward into the trusted network or back out of it. Each refusal
    is one log line and one `ssh.refused` audit event naming what was asked."""
    caplog.set_level(logging.INFO, logger="edgegw.node.auth")
    _, key = sshnode.add_user("alice")
    base = ["ssh", "-p", str(sshnode.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
            *SSH_OPTS]
    target = socket.create_server(("127.0.0.1", 0))     # what a forward would reach
    target.setblocking(False)
    tport = target.getsockname()[1]
    with target:
        for argv in (["-n", "alice@127.0.0.1", "id"], ["-n", "-T", "alice@127.0.0.1"],
                     ["-n", "-s", "alice@127.0.0.1", "foo"],
                     ["-n", "alice@127.0.0.1", "scp -t /tmp"],     # legacy scp
                     ["-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9",
                      "alice@127.0.0.1"]):
            rc, out = await _run(*base, *argv)
            assert rc != 0, (argv, out)
        lport = free_port()
        fwd = await asyncio.create_subprocess_exec(
            *base, "-N", "-L", f"127.0.0.1:{lport}:127.0.0.1:{tport}", "alice@127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            reader = None
            for _ in range(200):        # until ssh listens on the local end
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", lport)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            assert reader is not None, "ssh -L never listened"
            writer.write(b"hello")
            try:
                got = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                got = b""
            assert got == b""                               # closed, nothing relayed
            writer.close()
        finally:
            fwd.kill()
            await fwd.wait()
        with pytest.raises(BlockingIOError):
            target.accept()                                 # nothing reached the target
    await sshnode.wait_idle()
    asked = {(e.detail["request"], e.detail["target"]) for e in sshnode.events("ssh.refused")}
    assert asked == {("exec", "id"), ("shell", ""), ("subsystem", "foo"),
                     ("exec", "scp -t /tmp"), ("tcpip-forward", "localhost:0"),
                     ("direct-tcpip", f"127.0.0.1:{tport}")}, asked
    lines = [r.getMessage() for r in caplog.records if r.name == "edgegw.node.auth"
             and r.getMessage().startswith("refused:")]
    assert len(lines) == 6 and all("user=alice client=127.0.0.1" in m for m in lines), lines


async def test_a_connection_that_keeps_asking_for_more_is_ended(sshnode: NodeUnderTest) -> None:
    """Unix socket forwards are refused as TCP ones are; a client that goes on asking after
    MAX_REFUSED_REQUESTS refusals is disconnected rather than writing audit events at will.
    Control characters in what it asks are escaped in the log and the audit trail."""
    _, key = sshnode.add_user("alice")
    async with asyncssh.connect("127.0.0.1", sshnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection("/run/postgresql/.s.PGSQL.5432")
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path("/tmp/edgegw-test.sock", "/tmp/x.sock")
        for _ in range(MAX_REFUSED_REQUESTS - 2):
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("rm -rf /\x1b[2J", check=False)
        await asyncio.wait_for(conn.wait_closed(), 5)
    await sshnode.wait_idle()
    asked = [(e.detail["request"], e.detail["target"]) for e in sshnode.events("ssh.refused")]
    assert sorted(set(asked)) == [("direct-streamlocal", "/run/postgresql/.s.PGSQL.5432"),
                                  ("exec", "rm -rf /\\x1b[2J"),
                                  ("streamlocal-forward", "/tmp/edgegw-test.sock")], asked
    assert len(asked) == MAX_REFUSED_REQUESTS
    [end] = sshnode.events("session.disconnect")
    assert end.detail["reason"] == "too many refused requests"


async def test_a_packet_with_no_payload_ends_only_that_connection(
        sshnode: NodeUnderTest) -> None:
    """A packet whose payload is empty (asyncssh reads its type byte unchecked) closes that
    connection as malformed input: no error logged as the node's fault (the autouse
    `unhandled_errors` check), the session recorded, and the node serves on."""
    _, key = sshnode.add_user("alice")
    reader, writer = await asyncio.open_connection("127.0.0.1", sshnode.port)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-edgegw")
    # packet_length 12 = padding length byte + 11 bytes of padding, no payload
    writer.write(b"SSH-2.0-probe\r\n" + (12).to_bytes(4, "big") + bytes([11]) + bytes(11))
    await asyncio.wait_for(reader.read(), 5)        # up to its KEXINIT, then closed
    writer.close()
    await sshnode.wait_idle()
    [end] = sshnode.events("session.disconnect")
    assert "Incomplete packet" in end.detail["reason"], end
    async with sshnode.sftp_client("alice", key) as sftp:
        assert await sftp.getcwd() == "/"
