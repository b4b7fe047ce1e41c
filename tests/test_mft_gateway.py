"""The node's managed-file-transfer rules, every one exercised through the gateway with real
clients: IP rules on the real client address, path escapes, atomic uploads, quotas,
permissions, other SSH implementations, and the defender's bans enforced at the gateway."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.procs import (
    SSH_OPTS, GatewayProc, Proc, add_user, edgegw_cmd, make_key, sftp_batch,
)


def _audit(home: Path, *args: str) -> list[dict]:
    res = subprocess.run(edgegw_cmd("internal", "audit", "--home", str(home), "--json",
                                    "--limit", "10000", *args),
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def test_allow_ip_uses_real_client_address(node_home: Path, gateway: GatewayProc, node: Proc,
                                           tmp_path: Path) -> None:
    key = make_key(tmp_path / "k3")
    add_user(node_home, "only3", key, "--allow-ip", "127.0.0.3/32")
    denied = sftp_batch(gateway.external, "only3", key, "ls\n", bind="127.0.0.2")
    assert denied.returncode != 0
    allowed = sftp_batch(gateway.external, "only3", key, "ls\n", bind="127.0.0.3")
    assert allowed.returncode == 0, allowed.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        auths = [e for e in _audit(node_home, "--user", "only3", "--kind", "auth")]
        ips = {(e["ip"], e["detail"].get("result") == "ok") for e in auths}
        if {("127.0.0.2", False), ("127.0.0.3", True)} <= ips:
            break
        time.sleep(0.2)
    assert ("127.0.0.2", False) in ips and ("127.0.0.3", True) in ips, auths


def test_escapes_stay_inside_home(node_home: Path, gateway: GatewayProc, node: Proc,
                                  alice: tuple[str, Path], tmp_path: Path) -> None:
    user, key = alice
    home = node_home / "files" / user
    os.symlink("/etc", home / "planted")
    cwd = tmp_path / "esc"
    cwd.mkdir()
    for cmd in ["get ../../etc/passwd p1", "get /etc/passwd p2", "get planted/passwd p3",
                "put /etc/hostname ../../escaped", "put /etc/hostname /tmp/escaped-abs"]:
        sftp_batch(gateway.external, user, key, cmd + "\n", cwd=cwd)
    res = sftp_batch(gateway.external, user, key,
                     "-symlink /etc made\n-get made/passwd p4\n-put /etc/hostname made/x\n",
                     cwd=cwd)
    assert res.returncode == 0, res.stderr   # '-' prefix: failures allowed, session goes on
    for name in ["p1", "p2", "p3", "p4"]:
        got = cwd / name
        assert not got.exists() or b"root:" not in got.read_bytes(), name
    assert not (node_home / "escaped").exists() and not Path("/tmp/escaped-abs").exists()
    assert not Path("/etc/x").exists()


def test_upload_killed_midway_leaves_no_file(node_home: Path, gateway: GatewayProc,
                                             node: Proc, alice: tuple[str, Path],
                                             tmp_path: Path) -> None:
    user, key = alice
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(32 << 20))
    args = ["sftp", "-b", "-", "-l", "20000", "-P", str(gateway.external), "-i", str(key),
            *SSH_OPTS, f"{user}@127.0.0.1"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    proc.stdin.write(f"put {src} final.bin\n")
    proc.stdin.close()
    home = node_home / "files" / user
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(home.iterdir()):
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    node.wait_log(r"session \S+ .*(disconnect|closed|lost)", timeout=20)
    time.sleep(0.5)
    assert not (home / "final.bin").exists()
    assert list(home.iterdir()) == [], list(home.iterdir())  # the temporary was removed too


async def test_quota_enforced_during_upload(node_home: Path, gateway: GatewayProc, node: Proc,
                                            tmp_path: Path) -> None:
    key = make_key(tmp_path / "kq")
    add_user(node_home, "quota", key, "--quota-bytes", "1M")
    (tmp_path / "small.bin").write_bytes(os.urandom(300 << 10))
    (tmp_path / "large.bin").write_bytes(os.urandom(2 << 20))
    ok = sftp_batch(gateway.external, "quota", key, "put small.bin\n", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    over = sftp_batch(gateway.external, "quota", key, "put large.bin\n", cwd=tmp_path)
    assert over.returncode != 0          # OpenSSH's sftp shows only the status name, "Failure"
    # clients that show the server's message get a readable one
    async with asyncssh.connect("127.0.0.1", gateway.external, username="quota",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            with pytest.raises(asyncssh.SFTPError, match="(?i)quota"):
                async with sftp.open("big2.bin", "wb") as f:
                    await f.write(os.urandom(2 << 20))
    home = node_home / "files" / "quota"
    used = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
    assert used <= 1 << 20 and not (home / "large.bin").exists()


def test_download_only_user(node_home: Path, gateway: GatewayProc, node: Proc,
                            tmp_path: Path) -> None:
    key = make_key(tmp_path / "kr")
    add_user(node_home, "reader", key, "--perm-preset", "readonly")
    home = node_home / "files" / "reader"
    (home / "report.csv").write_text("a,b\n")
    cwd = tmp_path / "r"
    cwd.mkdir()
    assert sftp_batch(gateway.external, "reader", key, "get report.csv\nls\n",
                      cwd=cwd).returncode == 0
    assert (cwd / "report.csv").read_text() == "a,b\n"
    for cmd in ["put /etc/hostname up.txt", "rm report.csv", "rename report.csv x.csv",
                "mkdir d"]:
        res = sftp_batch(gateway.external, "reader", key, cmd + "\n", cwd=cwd)
        assert res.returncode != 0, cmd
        assert "permission denied" in res.stderr.lower(), (cmd, res.stderr)
    assert sorted(p.name for p in home.iterdir()) == ["report.csv"]


def test_scp_client(gateway: GatewayProc, node: Proc, alice: tuple[str, Path],
                    tmp_path: Path) -> None:
    user, key = alice
    src = tmp_path / "s.bin"
    src.write_bytes(os.urandom(1 << 20))
    base = ["scp", "-P", str(gateway.external), "-i", str(key), *SSH_OPTS]
    subprocess.run([*base, str(src), f"{user}@127.0.0.1:s.bin"], check=True, timeout=60)
    subprocess.run([*base, f"{user}@127.0.0.1:s.bin", str(tmp_path / "back.bin")], check=True,
                   timeout=60)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    listing = sftp_batch(gateway.external, user, key, "ls\n")
    assert "s.bin" in listing.stdout


async def test_asyncssh_client(gateway: GatewayProc, node: Proc, alice: tuple[str, Path],
                               tmp_path: Path) -> None:
    user, key = alice
    data = os.urandom(1 << 20)
    async with asyncssh.connect("127.0.0.1", gateway.external, username=user,
                                client_keys=[str(key)], known_hosts=None,
                                local_addr=("127.0.0.5", 0)) as conn:
        async with conn.start_sftp_client() as sftp:
            async with sftp.open("a.bin", "wb") as f:
                await f.write(data)
            async with sftp.open("a.bin", "rb") as f:
                assert await f.read() == data
            assert "a.bin" in await sftp.listdir(".")
    node.wait_log(r"127\.0\.0\.5")


def test_paramiko_client(gateway: GatewayProc, node: Proc, alice: tuple[str, Path]) -> None:
    user, key = alice
    sock = socket.create_connection(("127.0.0.1", gateway.external), timeout=20,
                                    source_address=("127.0.0.6", 0))
    transport = paramiko.Transport(sock)
    try:
        transport.connect(username=user, pkey=paramiko.Ed25519Key.from_private_key_file(str(key)))
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        data = os.urandom(256 << 10)
        with sftp.open("p.bin", "wb") as f:
            f.write(data)
        with sftp.open("p.bin", "rb") as f:
            assert f.read() == data
        assert "p.bin" in sftp.listdir(".")
        sftp.close()
    finally:
        transport.close()


async def test_brute_force_banned_at_gateway(node_home: Path, gateway: GatewayProc,
                                             node: Proc, tmp_path: Path) -> None:
    subprocess.run(edgegw_cmd("internal", "user", "add", "pw", "--home", str(node_home),
                              "--password-stdin"), input="right-password", text=True, check=True,
                   capture_output=True)
    for _ in range(6):
        try:
            async with asyncssh.connect("127.0.0.1", gateway.external, username="pw",
                                        password="wrong", known_hosts=None, client_keys=None,
                                        preferred_auth="password",
                                        local_addr=("127.0.0.4", 0)):
                pytest.fail("a wrong password logged in")
        except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError, OSError):
            pass
    gateway.wait_log(r"ban 127\.0\.0\.4", timeout=15)
    offer_line = r"client 127\.0\.0\.4:\d+ (offered|assigned) by"
    offers_before = node.count(offer_line)
    assert offers_before >= 5              # the failed logins were offered to the node
    with socket.socket() as s:
        s.bind(("127.0.0.4", 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", gateway.external))
        assert s.recv(100) == b""                   # dropped at accept, nothing relayed
    gateway.wait_log(r"client 127\.0\.0\.4:\d+ dropped: address is banned")
    time.sleep(0.5)
    assert node.count(offer_line) == offers_before  # the node heard of no new offer
    async with asyncssh.connect("127.0.0.1", gateway.external, username="pw",
                                password="right-password", known_hosts=None, client_keys=None,
                                preferred_auth="password", local_addr=("127.0.0.5", 0)) as conn:
        assert conn is not None
    bans = subprocess.run(edgegw_cmd("internal", "ban", "list", "--home", str(node_home)),
                          capture_output=True, text=True, check=True)
    assert "127.0.0.4" in bans.stdout


async def test_openssh_extensions_work_inside_the_rules(gateway: GatewayProc, node: Proc,
                                                        alice: tuple[str, Path]) -> None:
    """posix-rename, statvfs, fsync, hardlink and limits, as OpenSSH clients use them."""
    user, key = alice
    async with asyncssh.connect("127.0.0.1", gateway.external, username=user,
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            assert sftp.limits.max_write_len >= 32768
            async with sftp.open("x.txt", "wb") as f:
                await f.write(b"hello")
                await f.fsync()
            await sftp.posix_rename("x.txt", "y.txt")
            await sftp.link("y.txt", "z.txt")
            assert (await sftp.stat("z.txt")).size == 5
            vfs = await sftp.statvfs(".")
            assert vfs.bsize > 0 and vfs.blocks > 0
            with pytest.raises(asyncssh.SFTPError):
                await sftp.link("/etc/passwd", "stolen")   # a hard link to outside: refused
            assert sorted(await sftp.listdir(".")) == [".", "..", "y.txt", "z.txt"] or \
                sorted(await sftp.listdir(".")) == ["y.txt", "z.txt"]


async def test_disk_full_is_reported_and_leaves_no_file(node_home: Path, gateway: GatewayProc,
                                                        node: Proc, tmp_path: Path) -> None:
    small = tmp_path / "small-fs"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        key = make_key(tmp_path / "kd")
        add_user(node_home, "full", key, "--home-dir", str(small / "full"))
        async with asyncssh.connect("127.0.0.1", gateway.external, username="full",
                                    client_keys=[str(key)], known_hosts=None) as conn:
            async with conn.start_sftp_client() as sftp:
                with pytest.raises(asyncssh.SFTPError, match="(?i)space"):
                    async with sftp.open("huge.bin", "wb") as f:
                        await f.write(os.urandom(4 << 20))
        assert os.listdir(small / "full") == []   # neither the file nor its temporary
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_gateway_reports_every_session_to_the_audit_trail(
        node_home: Path, gateway: GatewayProc, node: Proc, alice: tuple[str, Path],
        tmp_path: Path) -> None:
    """The gateway's own view of each session (bytes relayed, how it ended) reaches the node's
    audit trail, joined to the node's records by session id, even when several sessions end
    within one report batch."""
    user, key = alice
    (tmp_path / "up.bin").write_bytes(os.urandom(100_000))
    for _ in range(3):
        res = sftp_batch(gateway.external, user, key, "put up.bin\n", bind="127.0.0.7",
                         cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 10
    while True:
        ours = {e["session"] for e in _audit(node_home, "--ip", "127.0.0.7",
                                               "--kind", "session.connect")}
        closed = {e["session"]: e for e in _audit(node_home, "--kind", "session.closed")
                  if e["session"] in ours}
        if len(ours) == 3 and set(closed) == ours or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(ours) == 3 and set(closed) == ours, (ours, closed)
    for event in closed.values():
        assert event["detail"]["bytes_up"] > 100_000 and event["detail"]["bytes_down"] > 0


async def test_a_partner_cannot_tunnel_through_the_gateway(node_home: Path, gateway: GatewayProc,
                                                            node: Proc, alice: tuple[str, Path]
                                                            ) -> None:
    """What the DMZ is for: a partner's valid key reaches SFTP through the gateway and no host
    of the trusted network. Forwards and commands are refused by the node, logged with the
    partner's real address and audited."""
    user, key = alice
    inside = socket.create_server(("127.0.0.1", 0))   # a service on the trusted network
    inside.setblocking(False)
    port = inside.getsockname()[1]
    with inside:
        async with asyncssh.connect("127.0.0.1", gateway.external, username=user,
                                    client_keys=[str(key)], known_hosts=None,
                                    local_addr=("127.0.0.6", 0)) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("0.0.0.0", 0, "127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("cat /etc/passwd")
            async with conn.start_sftp_client() as sftp:      # what the key is for
                assert await sftp.listdir(".") is not None
        with pytest.raises(BlockingIOError):
            inside.accept()                                   # nothing reached it
    node.wait_log(rf"refused: user={user} client=127\.0\.0\.6 request=direct-tcpip "
                  rf"target=127\.0\.0\.1:{port}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        refused = _audit(node_home, "--kind", "ssh.refused")
        if len(refused) == 3:
            break
        time.sleep(0.1)
    assert sorted(e["detail"]["request"] for e in refused) == ["direct-tcpip", "exec",
                                                               "tcpip-forward"]
    assert {e["ip"] for e in refused} == {"127.0.0.6"}
