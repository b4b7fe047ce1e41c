"""Administrators' changes reach running sessions (internal.ssh.revocation): a user disabled,
removed, expired, or no longer allowed from the session's real client address, or an address
banned, ends those sessions within a few seconds; a change of permissions applies to the next
SFTP operations of a session that stays connected. Changes are made with the real CLI, against
the home of a real node (in-process SSHService, or node processes behind a gateway)."""
from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pytest

from internal.home import NodeHome
from internal.sftp import quota
from internal.store import Store, User
from internal.store.base import StoreError
from tests.procs import (SSH_OPTS, GatewayProc, Proc, add_user, edgegw_cmd, init_home,
                         make_key, start_gateway, start_node as start_node_proc)
from tests.sshutil import NodeUnderTest, start_node, stop_node, tree

INTERVAL = 0.2      # --recheck-interval in these tests
ENDED_WITHIN = 5.0  # how long a revoked session may take to end, generously


@pytest.fixture
async def rnode(tmp_path: Path) -> AsyncIterator[NodeUnderTest]:
    n = await start_node(tmp_path, recheck_interval=INTERVAL)
    try:
        yield n
    finally:
        await stop_node(n)


async def cli(home: Path, *args: str, stdin: str | None = None) -> str:
    """`edgegw internal ARGS --home HOME` in a subprocess, as an administrator runs it."""
    res = await asyncio.to_thread(
        subprocess.run, edgegw_cmd("internal", *args, "--home", str(home)),
        capture_output=True, text=True, timeout=60, input=stdin)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@asynccontextmanager
async def session(n: NodeUnderTest, user: str, key: Path, bind: str = "127.0.0.1"
                  ) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]]:
    """A logged-in asyncssh SFTP session from `bind`."""
    async with asyncssh.connect("127.0.0.1", n.port, username=user, client_keys=[str(key)],
                                known_hosts=None, local_addr=(bind, 0)) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.listdir(".")      # logged in and served
            yield conn, sftp


async def ended(conn: asyncssh.SSHClientConnection, within: float = ENDED_WITHIN) -> float:
    """Seconds until the server closed `conn`; fails the test if it stays open `within`."""
    start = time.monotonic()
    try:
        await asyncio.wait_for(conn.wait_closed(), within)
    except asyncio.TimeoutError:
        pytest.fail(f"the session was still running {within}s after the change")
    return time.monotonic() - start


async def still_open(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> None:
    """`conn` was not ended: it outlives a few more checks and still answers."""
    await asyncio.sleep(INTERVAL * 4)
    assert not conn.is_closed()
    await sftp.listdir(".")


def revocations(n: NodeUnderTest, username: str) -> list[str]:
    return [e.detail["reason"] for e in n.events("session.revoked", username=username)]


async def test_disable_ends_running_session(rnode: NodeUnderTest) -> None:
    _, alice_key = rnode.keyed_user("alice")
    _, bob_key = rnode.keyed_user("bob")
    async with session(rnode, "alice", alice_key) as (conn, _), \
            session(rnode, "bob", bob_key) as (bob_conn, bob_sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--disable")
        assert await ended(conn) < ENDED_WITHIN
        await still_open(bob_conn, bob_sftp)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["user disabled"]
    assert revocations(rnode, "bob") == []
    disconnect = rnode.events("session.disconnect", username="alice")
    assert [(e.detail["reason"], e.detail.get("result")) for e in disconnect] == \
        [("revoked: user disabled", "revoked")]
    # and logging in again is refused, as before
    with pytest.raises(asyncssh.PermissionDenied):
        async with session(rnode, "alice", alice_key):
            pass


async def test_removal_ends_running_openssh_session(rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice")
    proc = await rnode.start_sftp("alice", key)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"pwd\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readuntil(b"Remote working directory"), 30)
    assert line
    await cli(rnode.home.path, "user", "remove", "alice")
    try:
        await rnode.wait_idle(ENDED_WITHIN)     # the server ended it
        # sftp notices when it next talks to the server: its next command fails
        out, err = await asyncio.wait_for(proc.communicate(b"ls\n"), ENDED_WITHIN)
        code = proc.returncode
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code != 0, (out, err)
    assert revocations(rnode, "alice") == ["no such user"]


async def test_expiry_that_passes_ends_session(rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice")
    async with session(rnode, "alice", key) as (conn, sftp):
        when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
        await cli(rnode.home.path, "user", "set", "alice", "--expires",
                  when.strftime("%Y-%m-%dT%H:%M:%SZ"))
        await sftp.listdir(".")       # not yet expired: the session runs on
        assert not conn.is_closed()
        await ended(conn, within=3 + ENDED_WITHIN)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["user expired"]


async def test_permission_change_applies_to_the_running_session(rnode: NodeUnderTest) -> None:
    home, key = rnode.keyed_user("alice")
    async with session(rnode, "alice", key) as (conn, sftp):
        async with sftp.open("before.txt", "w") as f:
            await f.write("written while allowed")
        await cli(rnode.home.path, "user", "set", "alice", "--perm-preset", "readonly")
        deadline = time.monotonic() + ENDED_WITHIN
        refused = None
        while refused is None and time.monotonic() < deadline:
            try:
                async with sftp.open("probe.txt", "w") as f:
                    await f.write("x")
            except asyncssh.SFTPPermissionDenied as exc:
                refused = exc
            else:
                await asyncio.sleep(INTERVAL / 2)
        assert refused is not None, "writes still allowed after --perm-preset readonly"
        assert "may not" in str(refused.reason)
        # connected, and what is still allowed still works
        assert not conn.is_closed()
        async with sftp.open("before.txt") as f:
            assert await f.read() == "written while allowed"
        assert "before.txt" in await sftp.listdir(".")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove("before.txt")
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == []
    # give the permission back: the same kind of session may write again
    await cli(rnode.home.path, "user", "set", "alice", "--perm-preset", "all")
    async with session(rnode, "alice", key) as (_, sftp):
        async with sftp.open("after.txt", "w") as f:
            await f.write("y")
    assert (home / "after.txt").read_text() == "y"


async def test_quota_change_applies_to_the_running_session(rnode: NodeUnderTest) -> None:
    home, key = rnode.keyed_user("alice")
    (home / "old.bin").write_bytes(b"\0" * 1000)
    async with session(rnode, "alice", key) as (conn, sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--quota-bytes", "1500")
        deadline = time.monotonic() + ENDED_WITHIN
        refused = None
        while refused is None and time.monotonic() < deadline:
            try:
                async with sftp.open("new.bin", "wb") as f:
                    await f.write(b"\1" * 600)
            except asyncssh.SFTPFailure as exc:
                refused = exc
            else:
                await sftp.remove("new.bin")
                await asyncio.sleep(INTERVAL / 2)
        assert refused is not None, "no quota applied to the running session"
        assert "quota exceeded" in str(refused.reason)
        assert not conn.is_closed()
    assert not (home / "new.bin").exists()


async def test_a_quota_set_while_the_sftp_channel_opens_applies_to_it(
        rnode: NodeUnderTest) -> None:
    """The quota lands while the SFTP channel is being set up (after the session took its
    user record, before the channel is registered): the channel used to be given the newer
    record without a quota share, and stored without a limit for as long as it ran."""
    home, key = rnode.keyed_user("alice")
    (home / "old.bin").write_bytes(b"\0" * 1000)
    book = rnode.service._quotas
    acquire = book.acquire
    revoker = rnode.service._revoker
    landed = False

    async def acquire_while_the_quota_lands(user: User) -> object:
        nonlocal landed
        usage = await acquire(user)
        if not landed:      # the first channel's: the change reaches the session meanwhile
            landed = True
            await cli(rnode.home.path, "user", "set", "alice", "--quota-bytes", "1500")
            deadline = time.monotonic() + ENDED_WITHIN
            while all(s.user is not None and s.user.quota_bytes is None
                      for s in revoker._live):
                assert time.monotonic() < deadline, "the change did not reach the session"
                await asyncio.sleep(INTERVAL / 4)
        return usage

    book.acquire = acquire_while_the_quota_lands      # type: ignore[method-assign]
    async with asyncssh.connect("127.0.0.1", rnode.port, username="alice",
                                client_keys=[str(key)], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            assert landed
            with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
                async with sftp.open("new.bin", "wb") as f:
                    await f.write(b"\1" * 600)
    assert not (home / "new.bin").exists()


@pytest.mark.parametrize("name", ["held.bin", "held.bin.filepart"])   # temporary, in place
async def test_a_quota_set_during_an_upload_counts_what_that_upload_stores(
        rnode: NodeUnderTest, name: str) -> None:
    """An upload open when its user is given a quota: the figures, scanned without its
    temporary, used to miss it; the file then counted nothing and its removal was taken off
    them, so the user could store that much more than the quota, every time."""
    home, key = rnode.keyed_user("alice")
    (home / "old.bin").write_bytes(b"\0" * 1000)
    async with session(rnode, "alice", key) as (conn, sftp):
        held = await sftp.open(name, "wb")
        await held.write(b"\1" * 600)
        await cli(rnode.home.path, "user", "set", "alice", "--quota-bytes", "1500")
        # Until the quota applies to this session. Each probe is an upload left open, which
        # the quota counts whenever it comes, as it counts `held`.
        probes: list[tuple[str, asyncssh.SFTPClientFile]] = []
        deadline = time.monotonic() + ENDED_WITHIN
        while True:
            probe = f"probe-{len(probes)}.bin"
            probes.append((probe, await sftp.open(probe, "wb")))
            try:
                await probes[-1][1].write(b"\2" * 600)
            except asyncssh.SFTPFailure:
                break
            assert time.monotonic() < deadline, "no quota applied to the running session"
            await asyncio.sleep(INTERVAL / 2)
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            await probes.pop()[1].close()   # refused: stores nothing
        for probe, handle in probes:        # each stored, then removed: counted in and out
            await handle.close()
            await sftp.remove(probe)
        await held.close()                  # stored: 1,600 bytes against 1,500
        assert (home / name).stat().st_size == 600
        await sftp.remove(name)             # back to 1,000
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            async with sftp.open("again.bin", "wb") as f:
                await f.write(b"\3" * 600)
        async with sftp.open("fits.bin", "wb") as f:     # and not counted twice either
            await f.write(b"\4" * 400)
    assert (home / "fits.bin").stat().st_size == 400
    assert not (home / "again.bin").exists()
    assert not list(home.glob("probe-*"))


async def test_a_file_stored_while_a_new_quota_is_scanned_is_counted(
        rnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A session stores a file after its root was scanned for its user's new quota, before it
    takes a share of the figures: they missed the file, and its removal was then taken off
    them, so the user could store that much more than the quota. The root is scanned again."""
    home, key = rnode.keyed_user("alice")
    (home / "old.bin").write_bytes(b"\0" * 1000)
    scanned, go_on = threading.Event(), threading.Event()
    real_scan = quota.scan_home

    def held_back_scan(root: str | bytes) -> tuple[int, int]:
        figures = real_scan(root)
        if not scanned.is_set():        # the first scan: made, then held back a while
            scanned.set()
            go_on.wait(ENDED_WITHIN)
        return figures

    monkeypatch.setattr(quota, "scan_home", held_back_scan)
    async with session(rnode, "alice", key) as (conn, sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--quota-bytes", "1500")
        assert await asyncio.to_thread(scanned.wait, ENDED_WITHIN), "no quota scan"
        async with sftp.open("during.bin", "wb") as f:     # after the scan, no share yet
            await f.write(b"\1" * 600)
        opening = asyncio.ensure_future(conn.start_sftp_client())   # a channel opened now
        await asyncio.sleep(INTERVAL)
        go_on.set()
        late = await opening
        probe = await sftp.open("probe.bin", "wb")  # left open: counted whenever
        deadline = time.monotonic() + ENDED_WITHIN
        for offset in itertools.count(0, 100):      # until the quota applies: 1,600 stored,
            # so the first write after it is refused (with the figures scanned before
            # during.bin, the sixth)
            try:
                await probe.write(b"\2" * 100, offset)
            except asyncssh.SFTPFailure:
                break
            assert time.monotonic() < deadline, "no quota applied to the running session"
            await asyncio.sleep(INTERVAL / 2)
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            await probe.close()
        await sftp.remove("during.bin")     # back to 1,000
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            async with sftp.open("again.bin", "wb") as f:
                await f.write(b"\3" * 600)
        with pytest.raises(asyncssh.SFTPFailure, match="quota exceeded"):
            async with late.open("late.bin", "wb") as f:   # has the quota too
                await f.write(b"\5" * 600)
        async with sftp.open("fits.bin", "wb") as f:
            await f.write(b"\4" * 500)
        late.exit()
    assert (home / "fits.bin").stat().st_size == 500
    assert not (home / "again.bin").exists()
    assert "may be off" not in caplog.text


async def test_root_change_applies_to_the_running_session(rnode: NodeUnderTest,
                                                          tmp_path: Path) -> None:
    home, key = rnode.keyed_user("alice")
    (home / "old.txt").write_text("old root")
    new_root = tmp_path / "elsewhere" / "alice"
    async with session(rnode, "alice", key) as (conn, sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--home-dir", str(new_root))
        (new_root / "new.txt").write_text("new root")
        deadline = time.monotonic() + ENDED_WITHIN
        while "new.txt" not in await sftp.listdir("."):
            assert time.monotonic() < deadline, "the session still sees its old root"
            await asyncio.sleep(INTERVAL / 2)
        async with sftp.open("up.txt", "w") as f:
            await f.write("into the new root")
        assert not conn.is_closed()
    assert (new_root / "up.txt").read_text() == "into the new root"
    assert not (home / "up.txt").exists()


async def test_unusable_new_root_ends_the_session(rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice")
    async with session(rnode, "alice", key) as (conn, _):
        # a root holding the node home (set by an older edgegw; today's CLI refuses it)
        rnode.update_user("alice", home=str(rnode.home.path))
        await ended(conn)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["user root misconfigured"]


async def test_address_rule_change_ends_only_sessions_from_that_address(
        rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice", allow_cidrs=["127.0.0.5", "127.0.0.6"])
    _, bob_key = rnode.keyed_user("bob", allow_cidrs=["127.0.0.0/24"])
    async with session(rnode, "alice", key, bind="127.0.0.5") as (gone, _), \
            session(rnode, "alice", key, bind="127.0.0.6") as (kept, kept_sftp), \
            session(rnode, "bob", bob_key, bind="127.0.0.5") as (bob, bob_sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--remove-allow-ip", "127.0.0.5")
        await ended(gone)
        await still_open(kept, kept_sftp)
        await still_open(bob, bob_sftp)
    await rnode.wait_idle()
    revoked = rnode.events("session.revoked", username="alice")
    assert [(e.client_ip, e.detail["reason"]) for e in revoked] == \
        [("127.0.0.5", "address not allowed for this user")]


async def test_ban_ends_sessions_from_the_banned_address(rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice")
    async with session(rnode, "alice", key, bind="127.0.0.7") as (banned, _), \
            session(rnode, "alice", key, bind="127.0.0.8") as (other, other_sftp):
        await cli(rnode.home.path, "ban", "add", "127.0.0.7")
        await ended(banned)
        await still_open(other, other_sftp)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["address banned"]


async def test_upload_cut_by_revocation_leaves_no_file(rnode: NodeUnderTest) -> None:
    home, key = rnode.keyed_user("alice")
    (home / "kept.txt").write_text("old")
    before = tree(home)
    chunk = os.urandom(64 * 1024)
    async with session(rnode, "alice", key) as (conn, sftp):
        f = await sftp.open("big.bin", "wb")
        await f.write(chunk, 0)
        temps = [p for p in tree(home) if p not in before]
        assert len(temps) == 1 and temps[0].startswith(".edgegw-upload-")  # writing, hidden
        await cli(rnode.home.path, "user", "set", "alice", "--disable")
        offset = len(chunk)
        deadline = time.monotonic() + ENDED_WITHIN
        with pytest.raises((asyncssh.Error, OSError)):
            while time.monotonic() < deadline:   # the client keeps uploading until cut off
                await f.write(chunk, offset)
                offset += len(chunk)
                await asyncio.sleep(0.01)
            await f.close()   # not cut off in time: closing would publish the file
        assert conn.is_closed() or await ended(conn) >= 0
    await rnode.wait_idle()
    assert tree(home) == before        # no big.bin, no temporary left behind
    closes = rnode.events("file.close", username="alice")
    assert [e.detail["result"] for e in closes] == \
        ["aborted: the client left without closing the file"]


async def test_store_errors_are_retried_and_do_not_stop_the_checks(
        rnode: NodeUnderTest, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgegw.node.session")
    _, key = rnode.keyed_user("alice")
    real = rnode.store.get_users
    calls = {"failed": 0}

    def broken(names: object) -> object:
        calls["failed"] += 1
        raise StoreError("sqlite store: database is locked (simulated outage)")

    async with session(rnode, "alice", key) as (conn, sftp):
        monkeypatch.setattr(rnode.store, "get_users", broken)
        await cli(rnode.home.path, "user", "set", "alice", "--disable")
        deadline = time.monotonic() + ENDED_WITHIN
        while calls["failed"] < 3:
            assert time.monotonic() < deadline, "the store was not asked again"
            await asyncio.sleep(INTERVAL / 2)
        assert not conn.is_closed()     # an outage keeps sessions; it does not decide
        monkeypatch.setattr(rnode.store, "get_users", real)
        await ended(conn)
    errors = [r for r in caplog.records if "cannot re-check running sessions" in r.message]
    assert len(errors) == 1             # once per outage, not once per interval
    assert any("checked against the store again" in r.message for r in caplog.records)
    assert sum(" revoked: user disabled" in r.message for r in caplog.records) == 1


async def test_no_store_query_without_sessions(rnode: NodeUnderTest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rnode.keyed_user("alice")
    asked: list[list[str]] = []
    real = rnode.store.get_users
    monkeypatch.setattr(rnode.store, "get_users",
                        lambda names: asked.append(sorted(names)) or real(names))
    await asyncio.sleep(INTERVAL * 5)
    assert asked == []
    _, key = rnode.keyed_user("bob")
    async with session(rnode, "bob", key), session(rnode, "bob", key), \
            session(rnode, "alice", rnode.tmp / "alice_key"):
        asked.clear()
        await asyncio.sleep(INTERVAL * 5)
    # one query per interval for every user with sessions, not one per session
    assert 2 <= len(asked) <= 7 and all(a == ["alice", "bob"] for a in asked), asked


def test_get_users_reads_the_named_ones(store: Store) -> None:
    for i in range(620):      # more than one IN (...) chunk
        store.add_user(User(name=f"u{i:03}", home=f"/srv/u{i:03}",
                            disabled=i % 2 == 1))
    assert store.get_users([]) == []
    wanted = [f"u{i:03}" for i in range(0, 620, 3)] + ["nobody", "u000"]
    got = {u.name: u for u in store.get_users(wanted)}
    assert sorted(got) == sorted({f"u{i:03}" for i in range(0, 620, 3)})
    assert got["u003"] == store.get_user("u003") and got["u003"].disabled


async def test_postgres_store(tmp_path: Path, pg_url: str) -> None:
    NodeHome.init(tmp_path / "home", db_url=pg_url)
    n = await start_node(tmp_path, recheck_interval=INTERVAL)
    try:
        _, key = n.keyed_user("alice")
        _, bob_key = n.keyed_user("bob")
        async with session(n, "alice", key) as (conn, sftp), \
                session(n, "bob", bob_key) as (bob, bob_sftp):
            await cli(n.home.path, "user", "set", "bob", "--perm-preset", "readonly")
            await cli(n.home.path, "user", "set", "alice", "--disable")
            await ended(conn)
            await still_open(bob, bob_sftp)
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                async with bob_sftp.open("x.txt", "w"):
                    pass
        await n.wait_idle()
        assert revocations(n, "alice") == ["user disabled"]
    finally:
        await stop_node(n)


def test_recheck_interval_is_bounded(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    for bad in ("0", "-1", "nan", "soon"):
        res = subprocess.run(edgegw_cmd("internal", "serve", "--home", str(home), "--listen",
                                        "127.0.0.1:0", "--recheck-interval", bad),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--recheck-interval" in res.stderr, (bad, res.stderr)
        if bad == "0":
            assert "0.1<=x" in res.stderr, res.stderr
    ok = subprocess.run(edgegw_cmd("internal", "serve", "--recheck-interval", "0.5", "--help"),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--recheck-interval" in ok.stdout, ok.stderr


# -- node processes behind a gateway, several workers, PostgreSQL ------------------------------

class HeldSftp:
    """An OpenSSH `sftp` through the gateway that stays logged in until the server ends it."""

    def __init__(self, gw: GatewayProc, user: str, key: Path, bind: str) -> None:
        args = ["sftp", "-b", "-", "-P", str(gw.external), "-i", str(key), *SSH_OPTS,
                "-o", "IdentitiesOnly=yes", "-o", f"BindAddress={bind}", f"{user}@127.0.0.1"]
        self.bind = bind
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"pwd\n")
        self.proc.stdin.flush()
        self._wait_output(b"Remote working directory", 30)

    def _wait_output(self, what: bytes, timeout: float) -> None:
        assert self.proc.stdout is not None
        seen, deadline = b"", time.monotonic() + timeout
        while what not in seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"sftp from {self.bind}: no {what!r}: {seen!r}")
            seen += chunk

    def _poke(self) -> None:
        """One more command: sftp only notices a closed connection when it next uses it."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"ls\n")     # pwd would not ask the server
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def alive(self) -> bool:
        self._poke()
        time.sleep(0.5)
        return self.proc.poll() is None

    def wait_ended(self, timeout: float = ENDED_WITHIN) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"sftp from {self.bind} still running {timeout}s after the change")
            self._poke()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.postgres
def test_every_worker_and_node_on_a_shared_store(tmp_path: Path, pg_url: str,
                                                 procs: list[Proc]) -> None:
    files = tmp_path / "shared-files"
    homes = [init_home(tmp_path / f"home{i}", "--db", pg_url, "--node-id", f"n{i}",
                       "--files-root", str(files)) for i in range(2)]
    trust = tmp_path / "trust.pem"
    trust.write_bytes(b"".join((h / "gateway-trust.pem").read_bytes() for h in homes))
    key, bob_key = make_key(tmp_path / "alice_key"), make_key(tmp_path / "bob_key")
    add_user(homes[0], "alice", key, "--allow-ip", "127.0.0.21", "--allow-ip", "127.0.0.22")
    add_user(homes[0], "bob", bob_key)
    gw = start_gateway(tmp_path, trust)
    procs.append(gw)
    # node n0 runs two worker processes, node n1 one: three PNC peers on one store
    procs.append(start_node_proc(tmp_path, homes[0], [gw], "--workers", "2",
                                 "--recheck-interval", str(INTERVAL), name="n0", wait=False))
    procs.append(start_node_proc(tmp_path, homes[1], [gw], "--recheck-interval",
                                 str(INTERVAL), name="n1"))
    deadline = time.monotonic() + 30
    while len(set(re.findall(r"node (n0-w\d) attached", gw.text()))) < 2:
        assert time.monotonic() < deadline, gw.text()[-3000:]
        time.sleep(0.1)
    held: list[HeldSftp] = []
    try:
        cut = [HeldSftp(gw, "alice", key, "127.0.0.21") for _ in range(3)]
        held += cut
        kept = HeldSftp(gw, "alice", key, "127.0.0.22")
        bob = HeldSftp(gw, "bob", bob_key, "127.0.0.21")
        held += [kept, bob]
        served = set(re.findall(r"client 127\.0\.0\.2[12]:\d+ paired with node (\S+)",
                                gw.text()))
        assert len(served) == 3, served     # every worker and node holds one of them
        # the rule that let 127.0.0.21 in goes, through the CLI on the other node's home
        out = subprocess.run(edgegw_cmd("internal", "user", "set", "alice", "--home",
                                        str(homes[1]), "--remove-allow-ip", "127.0.0.21"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for h in cut:
            h.wait_ended()
        time.sleep(INTERVAL * 4)
        assert kept.alive() and bob.alive()
        subprocess.run(edgegw_cmd("internal", "user", "set", "alice", "--home", str(homes[0]),
                                  "--disable"), check=True, capture_output=True, timeout=60)
        kept.wait_ended()
        time.sleep(INTERVAL * 4)
        assert bob.alive()
    finally:
        for h in held:
            h.stop()
    logs = "".join(p.text() for p in procs[1:])
    assert logs.count("revoked: address not allowed for this user") >= 3
    assert "revoked: user disabled" in logs


async def test_removing_a_key_ends_the_sessions_it_opened(rnode: NodeUnderTest,
                                                          tmp_path: Path) -> None:
    _, old_key = rnode.keyed_user("alice")
    new_key = make_key(tmp_path / "new_key")
    await cli(rnode.home.path, "user", "set", "alice", "--add-key", f"{new_key}.pub")
    async with session(rnode, "alice", old_key) as (old_conn, _), \
            session(rnode, "alice", new_key) as (new_conn, new_sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--remove-key", f"{old_key}.pub")
        await ended(old_conn)
        await still_open(new_conn, new_sftp)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["its key was removed"]


async def test_changing_the_password_ends_the_sessions_it_opened(rnode: NodeUnderTest) -> None:
    _, key = rnode.keyed_user("alice", password="first secret")
    async with asyncssh.connect("127.0.0.1", rnode.port, username="alice", password="first secret",
                                client_keys=None, known_hosts=None) as by_password, \
            session(rnode, "alice", key) as (by_key, key_sftp):
        await cli(rnode.home.path, "user", "set", "alice", "--password-stdin",
                  stdin="second secret\n")
        await ended(by_password)
        await still_open(by_key, key_sftp)
    await rnode.wait_idle()
    assert revocations(rnode, "alice") == ["the password was changed"]
