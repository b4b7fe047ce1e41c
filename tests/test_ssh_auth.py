"""Authentication: keys and passwords, address rules on the REAL client address, disabled and
expired users, session caps, brute-force bans, offers (`admit`) and the audit trail."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from edgegw.logthrottle import LogThrottle
from internal.session import SessionContext
from internal.ssh import transport
from internal.store.base import StoreError
from internal.store.calls import STORE_THREADS
from tests.sshutil import NodeUnderTest, start_node, stop_node


def client(n: NodeUnderTest, user: str, **kw: Any) -> Any:
    kw.setdefault("known_hosts", None)
    if "password" in kw:
        kw.setdefault("client_keys", None)
    return asyncssh.connect("127.0.0.1", n.port, username=user, **kw)


async def test_key_and_password_login(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    _, key = sshnode.add_user("alice", password="correct horse")
    async with client(sshnode, "alice", password="correct horse") as conn:
        async with conn.start_sftp_client() as sftp:
            assert await sftp.listdir(".") == [".", ".."]
    with pytest.raises(asyncssh.PermissionDenied):
        async with client(sshnode, "alice", password="wrong"):
            pass
    async with client(sshnode, "alice", client_keys=[str(key)]):
        pass
    other = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        async with client(sshnode, "alice", client_keys=[other]):
            pass
    await sshnode.wait_idle()
    results = [(e.detail["method"], e.detail["result"]) for e in sshnode.events("auth")]
    assert ("password", "ok") in results and ("password", "failed") in results
    assert ("publickey", "ok") in results and ("publickey", "failed") in results


async def test_address_rules_use_the_client_address(sshnode: NodeUnderTest) -> None:
    _, key = sshnode.add_user("alice", allow_cidrs=["127.0.0.2/32"])
    _, bkey = sshnode.add_user("bob", deny_cidrs=["127.0.0.3"])
    assert key is not None and bkey is not None
    await sshnode.service.refresh()
    assert (await sshnode.sftp("alice", key, "ls\n", bind="127.0.0.2")).returncode == 0
    assert (await sshnode.sftp("bob", bkey, "ls\n", bind="127.0.0.2")).returncode == 0
    # nobody may log in from .3: refused when the connection arrives, before any SSH
    assert (await sshnode.sftp("alice", key, "ls\n", bind="127.0.0.3")).returncode != 0
    await sshnode.wait_idle()
    assert not sshnode.events(client_ip="127.0.0.3")
    # once someone may, .3 gets to authentication, where the per-user rules refuse it
    sshnode.add_user("carol")
    await sshnode.service.refresh()
    assert (await sshnode.sftp("alice", key, "ls\n", bind="127.0.0.3")).returncode != 0
    assert (await sshnode.sftp("bob", bkey, "ls\n", bind="127.0.0.3")).returncode != 0
    await sshnode.wait_idle()
    refused = sshnode.events("auth", username="alice", client_ip="127.0.0.3")
    assert refused and refused[0].detail["reason"] == "address not allowed for this user"
    assert sshnode.events("session.connect", client_ip="127.0.0.2")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair: the node's end plays the Data connection from a gateway."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client_end = socket.create_connection(server.getsockname())
        node_end, _ = server.accept()
    return node_end, client_end


async def test_relayed_session_uses_offer_address(sshnode: NodeUnderTest) -> None:
    """On a Data connection the socket's peer is the gateway; the offer's address counts."""
    _, key = sshnode.add_user("alice", allow_cidrs=["203.0.113.0/24"])
    assert key is not None
    for ip, ok in (("203.0.113.9", True), ("198.51.100.1", False)):
        node_end, client_end = tcp_pair()
        ctx = SessionContext("00112233445566" + ("77" if ok else "88"), ip, 40000, "gw-1")
        served = asyncio.create_task(sshnode.service.serve_socket(node_end, ctx))
        try:
            async with asyncssh.connect(sock=client_end, username="alice", known_hosts=None,
                                        client_keys=[str(key)]) as conn:
                async with conn.start_sftp_client() as sftp:
                    await sftp.listdir(".")
            assert ok
        except asyncssh.PermissionDenied:
            assert not ok
        result = await asyncio.wait_for(served, 10)
        assert result.username == ("alice" if ok else None)
        events = sshnode.events(session_id=ctx.session_id)
        assert {e.client_ip for e in events} == {ip}
        assert {e.gateway for e in events} == {"gw-1"}
        assert events[-1].kind == "session.disconnect"


async def test_disabled_and_expired_users_are_refused_at_once(sshnode: NodeUnderTest) -> None:
    _, key = sshnode.add_user("alice")
    assert key is not None
    assert (await sshnode.sftp("alice", key, "ls\n")).returncode == 0
    sshnode.update_user("alice", disabled=True)            # no restart, no cache to wait for
    assert (await sshnode.sftp("alice", key, "ls\n")).returncode != 0
    sshnode.update_user("alice", disabled=False, expires_at=time.time() - 1)
    assert (await sshnode.sftp("alice", key, "ls\n")).returncode != 0
    sshnode.update_user("alice", expires_at=time.time() + 3600)
    assert (await sshnode.sftp("alice", key, "ls\n")).returncode == 0
    await sshnode.wait_idle()
    reasons = [e.detail.get("reason") for e in sshnode.events("auth", username="alice")]
    assert "user disabled" in reasons and "user expired" in reasons


async def test_max_sessions(sshnode: NodeUnderTest) -> None:
    """Over the cap with the right key: told so once authenticated, and never counted as a
    failed login (a partner's parallel or retried transfers must not get its address
    banned)."""
    _, key = sshnode.add_user("alice", max_sessions=1)
    assert key is not None
    async with client(sshnode, "alice", client_keys=[str(key)]):
        for _ in range(sshnode.defender.threshold + 2):
            with pytest.raises((asyncssh.DisconnectError, asyncssh.ConnectionLost,
                                asyncssh.ChannelOpenError)) as info:
                async with client(sshnode, "alice", client_keys=[str(key)]) as extra:
                    async with extra.start_sftp_client() as sftp:
                        await sftp.listdir(".")
            assert not isinstance(info.value, asyncssh.PermissionDenied)
    await sshnode.wait_idle()
    async with client(sshnode, "alice", client_keys=[str(key)]):
        pass
    assert sshnode.store.active_bans() == []
    assert sshnode.store.count_auth_failures("127.0.0.1", 0) == 0
    refused = [e for e in sshnode.events("auth", username="alice")
               if e.detail.get("method") == "session-cap"]
    assert refused and all(e.detail["reason"] == "too many sessions (limit 1)" for e in refused)
    ends = [e.detail["reason"] for e in sshnode.events("session.disconnect", username="alice")]
    assert ends.count("too many sessions") == sshnode.defender.threshold + 2, ends


async def test_max_sessions_counts_every_worker(sshnode: NodeUnderTest, tmp_path: Path) -> None:
    """Two services on one home and store (two workers, or two nodes sharing PostgreSQL):
    the cap holds across them, and a session's end frees its place."""
    _, key = sshnode.add_user("alice", max_sessions=1)
    keys = [str(key)]
    await sshnode.service.refresh()
    other = await start_node(tmp_path)
    await other.service.refresh()
    try:
        async with client(sshnode, "alice", client_keys=keys) as first:
            async with first.start_sftp_client() as sftp:
                await sftp.listdir(".")
            # where the client notices depends on timing: the handshake, the channel, SFTP
            with pytest.raises((asyncssh.DisconnectError, asyncssh.ChannelOpenError,
                                asyncssh.ConnectionLost, asyncssh.SFTPError)):
                async with client(other, "alice", client_keys=keys) as second:
                    async with second.start_sftp_client() as sftp2:
                        await sftp2.listdir(".")
        await sshnode.wait_idle()
        await other.wait_idle()
        for _ in range(100):      # the lease is dropped in the background
            if not other.store.claim_session("probe", "alice", "t", 1, until=time.time() + 1):
                await asyncio.sleep(0.05)
                continue
            other.store.release_session("probe")
            break
        async with client(other, "alice", client_keys=keys) as third:
            async with third.start_sftp_client() as sftp3:
                await sftp3.listdir(".")
        other.audit.flush()
    finally:
        await stop_node(other)
    refused = [e for e in sshnode.events("auth", username="alice")    # one shared trail
               if e.detail.get("method") == "session-cap"]
    assert len(refused) == 1 and refused[0].detail["reason"] == "too many sessions (limit 1)"


async def test_failed_logins_get_the_address_banned(sshnode: NodeUnderTest) -> None:
    sshnode.add_user("alice", password="right")
    for _ in range(sshnode.defender.threshold - 1):
        with pytest.raises(asyncssh.PermissionDenied):
            async with client(sshnode, "alice", password="wrong"):
                pass
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        async with client(sshnode, "alice", password="wrong"):
            pass
    assert sshnode.defender.banned("127.0.0.1") is not None
    await sshnode.service.refresh()
    assert sshnode.service.admit("127.0.0.1") == "banned"
    await sshnode.wait_idle()
    assert any(e.detail.get("result") == "banned" for e in sshnode.events("auth"))


async def test_admit(sshnode: NodeUnderTest) -> None:
    service = sshnode.service
    await service.refresh()
    assert service.admit("192.0.2.1") == "no user may connect from this address"
    sshnode.add_user("alice", allow_cidrs=["192.0.2.0/24"])
    await service.refresh()
    assert service.admit("192.0.2.1") is None
    assert service.admit("198.51.100.7") == "no user may connect from this address"
    sshnode.defender.add_ban("192.0.2.66", 60, "test")
    await service.refresh()
    assert service.admit("192.0.2.66") == "banned"
    service.capacity = 1
    service._active = 1     # as if one session were running
    try:
        assert service.admit("192.0.2.1") == "capacity"
    finally:
        service._active = 0


async def test_a_store_that_cannot_answer_is_not_the_clients_failure(
        sshnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled connection the database closed fails once: the login is asked again and goes
    through. A store that stays down refuses logins, but never counts them towards a ban."""
    _, key = sshnode.add_user("alice")
    keys = [str(key)]
    real_get_user = sshnode.store.get_user
    failures = {"left": 1}

    def flaky(name: str) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise StoreError("postgres store: terminating connection due to administrator "
                             "command")
        return real_get_user(name)

    monkeypatch.setattr(sshnode.store, "get_user", flaky)
    async with client(sshnode, "alice", client_keys=keys):
        pass
    failures["left"] = 10 ** 6
    for _ in range(sshnode.defender.threshold + 2):
        with pytest.raises(asyncssh.PermissionDenied):
            async with client(sshnode, "alice", client_keys=keys):
                pass
    failures["left"] = 0
    assert sshnode.store.count_auth_failures("127.0.0.1", 0) == 0
    assert sshnode.store.active_bans() == []
    async with client(sshnode, "alice", client_keys=keys):
        pass
    await sshnode.wait_idle()
    reasons = [e.detail.get("reason") for e in sshnode.events("auth", username="alice")]
    assert reasons.count("store unavailable") == sshnode.defender.threshold + 2


async def test_a_stalled_store_holds_up_logins_not_file_work(
        sshnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logins waiting on a store that does not answer wait on the store's own threads, so
    the SFTP work that runs on threads (here a resumed upload's copy) goes on meanwhile; once
    the store answers, the logins go through."""
    home, key = sshnode.add_user("alice")
    assert key is not None
    (Path(home.home) / "part.bin").write_bytes(b"a" * 1000)
    real_get_user = sshnode.store.get_user
    answer = threading.Event()
    waiting = {"n": 0}

    def stalled(name: str) -> Any:
        waiting["n"] += 1
        answer.wait(60)
        return real_get_user(name)

    async with client(sshnode, "alice", client_keys=[str(key)]) as conn:
        async with conn.start_sftp_client() as sftp:
            monkeypatch.setattr(sshnode.store, "get_user", stalled)
            # as many stalled logins as asyncio's default executor has threads (cpus + 4),
            # at most as many as the store's (more would queue for them)
            stuck = min((os.cpu_count() or 1) + 4, STORE_THREADS)
            logins = [asyncio.create_task(sshnode.sftp("alice", key, "pwd\n"))
                      for _ in range(stuck + 2)]
            try:
                for _ in range(300):
                    if waiting["n"] >= stuck:
                        break
                    await asyncio.sleep(0.05)
                assert waiting["n"] >= stuck
                f = await asyncio.wait_for(sftp.open("part.bin", "ab"), 10)
                await f.write(b"b" * 1000)
                await asyncio.wait_for(f.close(), 10)
            finally:
                answer.set()
            runs = await asyncio.gather(*logins)
    assert (Path(home.home) / "part.bin").read_bytes() == b"a" * 1000 + b"b" * 1000
    assert [r.returncode for r in runs] == [0] * len(runs), [r.output for r in runs]
    await sshnode.wait_idle()


async def test_a_key_blob_asyncssh_cannot_decode_ends_only_that_connection(
        sshnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch,
        unhandled_errors: list[logging.LogRecord]) -> None:
    """An ssh-rsa key blob with a negative exponent makes asyncssh's key decoder raise
    OverflowError (not KeyImportError) before the node's policy is asked: asyncssh ends the
    connection and hands that error to the handshake. serve_socket reports it in the result
    like any other client failure; it does not raise into the node's session task."""
    _, key = sshnode.add_user("alice")
    assert key is not None
    from asyncssh.packet import MPInt, String

    class BadKey:
        algorithm = b"ssh-rsa"
        public_data = String(b"ssh-rsa") + MPInt(-3) + MPInt(12345)

    offered: list[bool] = []

    async def one_bad_key(self: Any) -> Any:   # client side only: the node is a server
        if offered:
            return None
        offered.append(True)
        return BadKey()

    monkeypatch.setattr(asyncssh.SSHClientConnection, "public_key_auth_requested", one_bad_key)
    # its line is throttled per exception type: whatever an earlier test in this process did
    monkeypatch.setattr(transport, "_unhandled", LogThrottle(transport.log))
    node_end, client_end = tcp_pair()
    ctx = SessionContext("00112233445566aa", "203.0.113.7", 40000, "gw-1")
    served = asyncio.create_task(sshnode.service.serve_socket(node_end, ctx))
    with pytest.raises((asyncssh.Error, OSError)):
        async with asyncssh.connect(sock=client_end, username="alice", known_hosts=None,
                                    preferred_auth="publickey"):
            pass
    assert offered
    result = await asyncio.wait_for(served, 10)
    assert result.username is None and result.reason
    monkeypatch.undo()
    assert sshnode.service.active == 0
    async with client(sshnode, "alice", client_keys=[str(key)]):   # the node serves on
        pass
    events = sshnode.events(session_id=ctx.session_id)
    assert events and events[-1].kind == "session.disconnect"
    # asyncssh's fault, set off by the client: said at ERROR (asyncssh says it at debug only)
    assert [r.getMessage() for r in unhandled_errors] == [
        f"session {ctx.session_id} client 203.0.113.7 ended on an unhandled OverflowError: "
        "can't convert negative int to unsigned"]
    unhandled_errors.clear()


async def test_a_stored_key_that_breaks_the_decoder_is_skipped(sshnode: NodeUnderTest) -> None:
    """A user's key line that asyncssh cannot decode is logged and skipped, whatever the
    decoder raises: an ssh-rsa blob with a negative exponent raises OverflowError, which
    broke every login of that user (password or another key) and each re-check of its
    running sessions."""
    import base64

    from asyncssh.packet import MPInt, String
    bad = "ssh-rsa " + base64.b64encode(String(b"ssh-rsa") + MPInt(-3) +
                                        MPInt(12345)).decode()
    user, key = sshnode.add_user("alice", password="correct horse")
    assert key is not None
    sshnode.update_user("alice", keys=[bad, *user.keys])
    async with client(sshnode, "alice", password="correct horse"):
        pass
    async with client(sshnode, "alice", client_keys=[str(key)]) as conn:
        async with conn.start_sftp_client() as sftp:
            sshnode.update_user("alice", keys=[*user.keys, bad])   # still has its key
            await sshnode.service._revoker.check()
            assert await sftp.listdir(".") == [".", ".."]


async def test_one_connection_has_a_bounded_number_of_tries(sshnode: NodeUnderTest) -> None:
    """As OpenSSH's MaxAuthTries: a connection offering key after key is ended after
    MAX_AUTH_TRIES failures, so it cannot write audit events without end (keys count once
    towards a ban). A client whose right key comes within the limit still logs in."""
    from internal.ssh.auth import MAX_AUTH_TRIES
    _, key = sshnode.add_user("alice")
    assert key is not None
    wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(MAX_AUTH_TRIES + 5)]
    with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
        async with client(sshnode, "alice", client_keys=wrong):
            pass
    await sshnode.wait_idle()
    failed = sshnode.events("auth", username="alice")
    assert [e.detail["result"] for e in failed] == ["failed"] * MAX_AUTH_TRIES
    assert sshnode.events("session.disconnect", username="alice")[-1].detail["reason"] == \
        "too many authentication failures"
    async with client(sshnode, "alice",
                      client_keys=[*wrong[:MAX_AUTH_TRIES - 1], asyncssh.read_private_key(key)]):
        pass
