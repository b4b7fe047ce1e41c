"""The whole path with real processes: OpenSSH sftp -> edgegw serve -> edgegw internal serve."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import (
    SSH_OPTS, GatewayProc, Proc, add_user, edgegw_cmd, free_port, init_home, make_key,
    sftp_batch, start_gateway, start_node,
)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, f"sftp failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _roundtrip(port: int, user: str, key: Path, tmp: Path, data: bytes) -> None:
    """One SFTP session puts `data` as a file and gets it back; the copy must be identical."""
    (tmp / "x.bin").write_bytes(data)
    _ok(sftp_batch(port, user, key, "put x.bin\nget x.bin y.bin\n", cwd=tmp))
    assert (tmp / "y.bin").read_bytes() == data


def test_sftp_roundtrip_through_gateway(tmp_path: Path, node_home: Path, gateway: GatewayProc,
                                        node: Proc, alice: tuple[str, Path]) -> None:
    user, key = alice
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"empty.bin": 0, "one.bin": 1, "mib.bin": 1 << 20, "big.bin": 64 << 20}
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    puts = "\n".join(f"put {name}" for name in sizes)
    _ok(sftp_batch(gateway.external, user, key, f"mkdir in\ncd in\n{puts}\nls -l\n", cwd=src))
    stored = node_home / "files" / user / "in"
    for name in sizes:
        assert _sha(stored / name) == _sha(src / name)

    back = tmp_path / "back"
    back.mkdir()
    gets = "\n".join(f"get in/{name}" for name in sizes)
    res = _ok(sftp_batch(gateway.external, user, key, f"{gets}\nls in\n", cwd=back))
    for name in sizes:
        assert _sha(back / name) == _sha(src / name), name
    assert "big.bin" in res.stdout

    _ok(sftp_batch(gateway.external, user, key,
                   "rename in/one.bin in/renamed.bin\nrm in/empty.bin\nmkdir in/sub\nrmdir in/sub\n"))
    assert (stored / "renamed.bin").exists()
    assert not (stored / "one.bin").exists() and not (stored / "empty.bin").exists()
    assert not (stored / "sub").exists()


def test_node_logs_real_client_ip(gateway: GatewayProc, node: Proc,
                                  alice: tuple[str, Path]) -> None:
    user, key = alice
    _ok(sftp_batch(gateway.external, user, key, "ls\n", bind="127.0.0.2"))
    node.wait_log(r"127\.0\.0\.2:\d+")
    gateway.wait_log(r"client 127\.0\.0\.2:\d+ paired with node")
    assert "127.0.0.1" not in [line.split()[-1] for line in node.text().splitlines()
                               if "session" in line and "auth" in line]


def _read_until(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_one_banner_then_binary_packets_through_the_gateway(gateway: GatewayProc,
                                                            node: Proc) -> None:
    """The node writes its SSH version line together with its answer to the gateway (pooled
    Data connections); the client must see that line once, then the key exchange."""
    node.wait_log(r"attached to gateway")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gateway.external), timeout=10) as s:
            line = b""
            while not line.endswith(b"\r\n"):
                line += _read_until(s, 1)
            assert re.fullmatch(rb"SSH-2\.0-[!-~]+\r\n", line), line
            s.sendall(b"SSH-2.0-edgegw_test\r\n")
            head = _read_until(s, 6)   # packet length, padding length, message type
            assert not head.startswith(b"SSH-"), head
            assert head[5] == 20, head   # SSH_MSG_KEXINIT


def test_untrusted_node_certificate_is_refused(tmp_path: Path, procs: list[Proc]) -> None:
    trusted = init_home(tmp_path / "trusted")
    stranger = init_home(tmp_path / "stranger")
    gw = start_gateway(tmp_path, trusted / "gateway-trust.pem")
    procs.append(gw)
    node = start_node(tmp_path, stranger, [gw], wait=False)
    procs.append(node)
    gw.wait_log(r"refused: TLS verification failed")
    assert gw.count("attached from") == 0
    node.wait_log(r"WARNING .* the gateway closed the connection during the TLS handshake "
                  r"\(\w+; the gateway's log says why")


def test_wrong_data_proof_pairs_nothing(gateway: GatewayProc, node: Proc) -> None:
    from edgegw.pnc import dataauth
    with socket.create_connection(("127.0.0.1", gateway.data), timeout=5) as s:
        challenge = s.recv(dataauth.CHALLENGE_LEN, socket.MSG_WAITALL)
        nonce = dataauth.parse_challenge(challenge)
        s.sendall(dataauth.session_proof(b"\x01" * 32, 0x1234, nonce))
        assert s.recv(1) == b""  # closed by the gateway
    gateway.wait_log(r"no live offer 0000000000001234")
    with socket.create_connection(("127.0.0.1", gateway.data), timeout=5) as s:
        s.recv(dataauth.CHALLENGE_LEN, socket.MSG_WAITALL)
        s.sendall(b"garbage" * 10)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass  # closed with our surplus bytes unread: the kernel answers with a reset
    gateway.wait_log(r"bad proof")
    assert gateway.count("paired with node") == 0


def _gateway_and_node(tmp_path: Path, node_home: Path, procs: list[Proc], pool: str,
                      *gateway_args: str) -> tuple[GatewayProc, Proc]:
    """A gateway with a 0.5 s offer timeout and a node with a pool of `pool`, filled."""
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--offer-timeout", "0.5",
                       *gateway_args)
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw], "--pool-size", pool)
    procs.append(node)
    if pool != "0":
        gw.wait_log(r"pooled data connection \d+ ready \(2 idle\)", timeout=10)
    return gw, node


@pytest.mark.parametrize("pool,what", [("2", "assignment"), ("0", "offer")])
def test_unanswered_offer_closes_client(tmp_path: Path, node_home: Path, procs: list[Proc],
                                        alice: tuple[str, Path], pool: str, what: str) -> None:
    """A stopped node answers neither a pooled assignment nor a PNC offer."""
    gw, node = _gateway_and_node(tmp_path, node_home, procs, pool, "--grace-period", "1",
                                 "--heartbeat-timeout", "30")
    node.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", gw.external), timeout=10) as s:
            assert s.recv(100) == b""  # clean close, no bytes
        assert time.monotonic() - t0 < 8
        gw.wait_log(rf"did not answer {what}")
    finally:
        node.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("pool,what", [("2", "assignment"), ("0", "offer")])
def test_a_busy_last_node_is_waited_for(tmp_path: Path, node_home: Path, procs: list[Proc],
                                        alice: tuple[str, Path], pool: str, what: str) -> None:
    """A node frozen for longer than the answer timeouts (a burst of SSH handshakes on few
    CPUs starves it the same way) but back before the heartbeat drops it answers late. As the
    client's only node it is waited for, since it answers no Ping either: giving up on it
    dropped its whole pool, and with several such nodes clients went round them all until
    their grace period ran out (3 of 200 concurrent uploads failed)."""
    user, key = alice
    gw, node = _gateway_and_node(tmp_path, node_home, procs, pool, "--heartbeat-timeout", "5")
    node.send_signal(signal.SIGSTOP)
    try:
        run = subprocess.Popen(["sftp", "-b", "-", "-P", str(gw.external), "-i", str(key),
                                *SSH_OPTS, f"{user}@127.0.0.1"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)                  # past the offer and pooled-answer timeouts (0.5 s)
    finally:
        node.send_signal(signal.SIGCONT)
    out, err = run.communicate("pwd\n", timeout=30)
    assert run.returncode == 0, err
    assert "Remote working directory: /" in out
    assert f"did not answer {what}" not in gw.text()
    assert "went silent" not in gw.text()
    assert gw.count("paired with node") + gw.count(r"assigned as") >= 1


@pytest.mark.parametrize("pool,gateway_says", [("2", "refused by node"),
                                              ("0", "rejected by node")])
def test_node_refuses_a_client_no_user_may_come_from(tmp_path: Path, node_home: Path,
                                                     procs: list[Proc], pool: str,
                                                     gateway_says: str) -> None:
    """The node's admission check runs on the real client address on both hand-off paths."""
    key = make_key(tmp_path / "k")
    add_user(node_home, "only3", key, "--allow-ip", "127.0.0.3/32")
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw], "--pool-size", pool)
    procs.append(node)
    if pool != "0":
        gw.wait_log(r"pooled data connection \d+ ready \(2 idle\)", timeout=10)
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", gw.external))
        assert s.recv(100) == b""                       # closed before any SSH byte
    gw.wait_log(rf"client 127\.0\.0\.2:\d+: {gateway_says}")
    node.wait_log(r"client 127\.0\.0\.2:\d+ rejected: no user may connect from this address")
    _ok(sftp_batch(gw.external, "only3", key, "ls\n", bind="127.0.0.3"))


def test_node_reconnects_after_gateway_restart(tmp_path: Path, node_home: Path,
                                               procs: list[Proc], alice: tuple[str, Path]) -> None:
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", name="gw1")
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw])
    procs.append(node)
    _ok(sftp_batch(gw.external, user, key, "ls\n"))
    gw.stop()
    gw2 = start_gateway(tmp_path, node_home / "gateway-trust.pem", name="gw1",
                        ports=(gw.external, gw.pnc, gw.data))
    procs.append(gw2)
    gw2.wait_log(r"node \S+ attached", timeout=15)
    _ok(sftp_batch(gw2.external, user, key, "ls\n"))


def test_a_second_node_with_an_attached_id_waits_its_turn(tmp_path: Path, node_home: Path,
                                                          procs: list[Proc],
                                                          alice: tuple[str, Path]) -> None:
    """Two processes on one home carry one node id: the second is refused while the first is
    attached (sessions, leases and metrics are kept per id), and attaches once it is gone."""
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    first = start_node(tmp_path, node_home, [gw], name="first")
    procs.append(first)
    second = start_node(tmp_path, node_home, [gw], name="second", wait=False)
    procs.append(second)
    gw.wait_log(r"pnc peer \S+ refused: node id \S+ is already attached from")
    second.wait_log(r"said goodbye: node id \S+ is already attached to gateway gateway")
    assert gw.count(r"node \S+ attached from") == 1
    _ok(sftp_batch(gw.external, user, key, "ls\n"))
    first.stop(signal.SIGKILL)
    gone = gw.wait_log(r"node \S+ detached")
    gw.wait_log(r"node \S+ attached from", start=gone.end())
    _ok(sftp_batch(gw.external, user, key, "ls\n"))


def test_gateway_writes_nothing_and_loads_no_node_code(tmp_path: Path, node_home: Path,
                                                       procs: list[Proc],
                                                       alice: tuple[str, Path]) -> None:
    """The DMZ process writes no file, and never imports the node's code (SSH, password
    hashing, the store): its log lists every module it imported (-X importtime)."""
    user, key = alice
    cwd = tmp_path / "gw-cwd"
    home = tmp_path / "gw-home"
    cwd.mkdir()
    home.mkdir()
    trust = tmp_path / "trust.pem"
    trust.write_bytes((node_home / "gateway-trust.pem").read_bytes())
    env = dict(os.environ, HOME=str(home), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPROFILEIMPORTTIME="1")
    gw = start_gateway(tmp_path, trust, env=env, cwd=str(cwd))
    procs.append(gw)
    node = start_node(tmp_path, node_home, [gw])
    procs.append(node)
    _ok(sftp_batch(gw.external, user, key, "put /etc/hostname h\nget h /dev/null\n"))
    gw.wait_log(r"closed \(eof")
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []
    imported = re.findall(r"^import time: +\d+ \| +\d+ \| +(\S+)$", gw.text(), re.M)
    assert "edgegw.gateway.server" in imported and "edgegw.relay.cengine" in imported
    node_code = [m for m in imported if m.split(".")[0] in ("internal", "asyncssh", "argon2")]
    assert node_code == []


def test_direct_listen_and_forward_mode(tmp_path: Path, node_home: Path, procs: list[Proc],
                                        alice: tuple[str, Path]) -> None:
    """--listen serves the same users directly; --forward relays to another SSH server."""
    user, key = alice
    listen = free_port()
    direct = start_node(tmp_path, node_home, [], "--listen", f"127.0.0.1:{listen}",
                        name="direct", wait=False)
    procs.append(direct)
    direct.wait_log(r"serving SSH/SFTP directly")
    _ok(sftp_batch(listen, user, key, "ls\n"))

    fwd_home = init_home(tmp_path / "fwd-home")
    gw = start_gateway(tmp_path, fwd_home / "gateway-trust.pem", name="gwf")
    procs.append(gw)
    fwd = start_node(tmp_path, fwd_home, [gw], "--forward", f"127.0.0.1:{listen}", name="fwd")
    procs.append(fwd)
    _ok(sftp_batch(gw.external, user, key, "ls\n", bind="127.0.0.7"))
    fwd.wait_log(r"client 127\.0\.0\.7:\d+ forwarded to 127\.0\.0\.1")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_forward_mode_sends_proxy_header(tmp_path: Path, node_home: Path, procs: list[Proc],
                                         version: str) -> None:
    from edgegw import proxyproto
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.settimeout(20)
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw], "--forward",
                            f"127.0.0.1:{upstream.getsockname()[1]}",
                            "--forward-proxy-protocol", version))
    with socket.socket() as client:
        client.bind(("127.0.0.9", 0))
        client.connect(("127.0.0.1", gw.external))
        client.sendall(b"hello")
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(10)
            if version == "v1":
                line = b""
                while not line.endswith(b"\r\n"):
                    line += conn.recv(1)
                info = proxyproto.parse_v1(line)
            else:
                header = conn.recv(16, socket.MSG_WAITALL)
                info = proxyproto.parse_v2(header, conn.recv(
                    proxyproto.v2_body_length(header), socket.MSG_WAITALL))
            assert info.src == ("127.0.0.9", client.getsockname()[1])
            assert conn.recv(5, socket.MSG_WAITALL) == b"hello"
            conn.sendall(b"world")
            assert client.recv(5, socket.MSG_WAITALL) == b"world"
    upstream.close()


def test_a_ban_ends_running_forwarded_sessions(tmp_path: Path, node_home: Path,
                                               procs: list[Proc]) -> None:
    """--forward knows no users, so a ban is all there is to revoke by: the banned address's
    running session is cut within the recheck interval, another address's goes on."""
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.settimeout(20)
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    fwd = start_node(tmp_path, node_home, [gw], "--forward",
                     f"127.0.0.1:{upstream.getsockname()[1]}", "--recheck-interval", "0.2")
    procs.append(fwd)
    clients, ends = [], []
    try:
        for ip in ("127.0.0.21", "127.0.0.22"):
            c = socket.create_connection(("127.0.0.1", gw.external), 10, (ip, 0))
            clients.append(c)
            c.sendall(ip.encode())
            conn, _ = upstream.accept()
            ends.append(conn)
            conn.settimeout(10)
            assert conn.recv(16) == ip.encode()
        subprocess.run(edgegw_cmd("internal", "ban", "add", "127.0.0.21", "--home",
                                  str(node_home)), check=True, capture_output=True)
        fwd.wait_log(r"client 127\.0\.0\.21:\d+: ending it: address banned", timeout=15)
        clients[0].settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert clients[0].recv(16) == b""
        ends[1].sendall(b"still here")
        clients[1].settimeout(10)
        assert clients[1].recv(16) == b"still here"
        fwd.wait_log(r"client 127\.0\.0\.21:\d+ done \(revoked: address banned\)")
    finally:
        for s in (*clients, *ends, upstream):
            s.close()


def test_forwarded_session_running_at_shutdown_is_audited(tmp_path: Path, node_home: Path,
                                                           procs: list[Proc]) -> None:
    """A forwarded session still running when the node stops gets its session.disconnect:
    the relay's shutdown reports reached sessions the node then cancelled, which recorded
    nothing, and the trail showed a session that never ended."""
    from internal.home import NodeHome
    from internal.store import open_store

    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.settimeout(20)
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem")
    procs.append(gw)
    fwd = start_node(tmp_path, node_home, [gw], "--forward",
                     f"127.0.0.1:{upstream.getsockname()[1]}")
    procs.append(fwd)
    client = socket.create_connection(("127.0.0.1", gw.external), 10, ("127.0.0.23", 0))
    try:
        client.sendall(b"hello")
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(5, socket.MSG_WAITALL) == b"hello"
            fwd.wait_log(r"client 127\.0\.0\.23:\d+ forwarded to")
            assert fwd.stop(signal.SIGINT) == 0
            assert conn.recv(16) == b""       # the node let go of the upstream end
    finally:
        client.close()
        upstream.close()
    store = open_store(NodeHome.load(node_home).db_url)
    try:
        events = store.query_audit(ip="127.0.0.23")
    finally:
        store.close()
    assert [e.kind for e in events] == ["session.connect", "session.disconnect"], events
    assert events[1].detail["reason"] == "shutdown" and events[1].detail["bytes_in"] == 5


@pytest.mark.parametrize("backend", ["select", "python"])
def test_other_relay_backends_end_to_end(tmp_path: Path, node_home: Path, procs: list[Proc],
                                         alice: tuple[str, Path], backend: str) -> None:
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--relay-backend", backend,
                       name=f"gw-{backend}")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw]))
    _roundtrip(gw.external, user, key, tmp_path, os.urandom(3 << 20))
    gw.wait_log(rf"relay={backend}")


def test_relay_processes_end_to_end(tmp_path: Path, node_home: Path, procs: list[Proc],
                                    alice: tuple[str, Path]) -> None:
    """--relay-procs: sessions relayed by child processes; none outlive the gateway."""
    user, key = alice
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--relay-procs", "2",
                       name="gw-procs")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw]))
    data = os.urandom(3 << 20)
    for _ in range(2):   # two sessions: one per relay process
        _roundtrip(gw.external, user, key, tmp_path, data)
    closed = gw.wait_log(r"session \w+: client \S+ closed \(eof\) up=(\d+) down=(\d+)")
    assert int(closed.group(1)) > len(data) and int(closed.group(2)) > len(data)
    pids = [int(p) for p in re.findall(r"relay process \d started \(pid (\d+)\)", gw.text())]
    assert len(pids) == 2
    assert gw.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _fd_count(pid: int) -> int:
    """Descriptors other than pipes: the relay keeps up to 64 emptied splice pipes per thread
    for reuse (bounded, and counted by the relay's own tests), whose number depends on how many
    sessions moved more than a small read's worth at once."""
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for fd in fds if not _readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:   # closed since listed
        return "pipe:"


def test_garbage_on_every_port_is_closed_and_leaks_nothing(gateway: GatewayProc, node: Proc,
                                                           alice: tuple[str, Path]) -> None:
    user, key = alice
    _ok(sftp_batch(gateway.external, user, key, "ls\n"))  # warm: pools and links are up
    time.sleep(0.5)
    before = _fd_count(gateway.pid)
    junk = [os.urandom(n) for n in (1, 7, 300, 70000)] + [b"GET / HTTP/1.0\r\n\r\n",
                                                         b"\x16\x03\x01\x02\x00" + b"\x00" * 50]
    for port in (gateway.pnc, gateway.data, gateway.external):
        for payload in junk:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                try:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
                except OSError:   # reset, broken pipe, or ENOTCONN: the gateway hung up first
                    pass
        # and connections that say nothing and just go away
        for _ in range(5):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    gateway.wait_log(r"pnc peer .*(TLS|handshake)")
    gateway.wait_log(r"data connection from .*(bad proof|peer closed|closed)")
    _ok(sftp_batch(gateway.external, user, key, "ls\n"))  # still serving
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _fd_count(gateway.pid) > before:
        time.sleep(0.2)
    assert _fd_count(gateway.pid) <= before
    assert gateway.popen is not None and gateway.popen.poll() is None


def test_connections_per_client_address_are_capped(tmp_path: Path, node_home: Path,
                                                   procs: list[Proc],
                                                   alice: tuple[str, Path]) -> None:
    """--max-per-address: a third connection from one address is closed at once while two are
    held (relayed to the node, which sent its banner); another address is not affected, and a
    slot freed by a session's end is taken again."""
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--max-per-address", "2")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw]))

    def connect(source: str) -> socket.socket:   # the node serves alice from anywhere
        return socket.create_connection(("127.0.0.1", gw.external), timeout=10,
                                        source_address=(source, 0))

    held = [connect("127.0.0.1") for _ in range(2)]
    try:
        for s in held:
            assert s.recv(4) == b"SSH-"
        with connect("127.0.0.1") as third:
            assert third.recv(4) == b""
        gw.wait_log(r"client 127\.0\.0\.1:\d+ dropped: 2 connections from that address")
        with connect("127.0.0.2") as other:
            assert other.recv(4) == b"SSH-"
        held.pop().close()
        gw.wait_log(r"session [0-9a-f]+: client 127\.0\.0\.1:\d+ closed")
        held.append(connect("127.0.0.1"))
        assert held[-1].recv(4) == b"SSH-"
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("port", ["data", "pnc"])
def test_a_full_handshake_cap_leaves_connections_in_the_backlog(tmp_path: Path, node_home: Path,
                                                                procs: list[Proc],
                                                                port: str) -> None:
    """With --max-handshakes connections not yet authenticated, the port takes no more until
    one ends: the next one waits in the kernel's backlog and is served then. (Accepted and
    closed at once instead, a node's own Data connections were dropped in a burst of clients.)
    The gateway speaks first on both ports: a challenge on Data, a TLS ClientHello on PNC."""
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--max-handshakes", "3")
    procs.append(gw)
    number = gw.data if port == "data" else gw.pnc
    held = [socket.create_connection(("127.0.0.1", number), timeout=5) for _ in range(3)]
    waiting = socket.create_connection(("127.0.0.1", number), timeout=1)
    try:
        for s in held:
            assert s.recv(1)                     # taken: the gateway spoke first
        gw.wait_log(rf"{port} listener: 3 connections not yet authenticated")
        with pytest.raises(TimeoutError):        # in the backlog, neither served nor closed
            waiting.recv(1)
        held.pop().close()
        waiting.settimeout(10)
        assert waiting.recv(1)
        gw.wait_log(rf"{port} listener: accepting again")
    finally:
        for s in (*held, waiting):
            s.close()
    assert gw.popen is not None and gw.popen.poll() is None


def test_a_client_that_never_closes_after_the_node_did_is_let_go(tmp_path: Path, node_home: Path,
                                                                 procs: list[Proc],
                                                                 alice: tuple[str, Path]) -> None:
    """The node ends a session (here: the client's version line is garbage) and the gateway
    passes the end on; a client that never closes its side is closed after --fin-timeout."""
    gw = start_gateway(tmp_path, node_home / "gateway-trust.pem", "--fin-timeout", "1")
    procs.append(gw)
    procs.append(start_node(tmp_path, node_home, [gw]))
    with socket.create_connection(("127.0.0.1", gw.external), timeout=10) as client:
        assert client.recv(100).startswith(b"SSH-2.0-")
        client.sendall(b"not ssh at all\r\n" * 20)
        while client.recv(4096):                  # until the node's end reaches us
            pass
        started = time.monotonic()
        gw.wait_log(r"session \S+: client \S+ closed \(idle\)", timeout=10)
        assert time.monotonic() - started < 5
