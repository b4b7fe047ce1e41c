"""One suite, both backends: every test here runs on SQLite and on PostgreSQL."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from internal.store import (ALL_PERMS, AlreadyExists, AuditEvent, NotFound, Perm, StoreError,
                            User, open_store)
from internal.store import migrations


def _user(name: str = "alice", **kw) -> User:
    return User(name=name, home=f"/srv/{name}", **kw)


def _run_threads(work, n: int) -> None:
    """work(0) .. work(n - 1), each in its own thread, all at once; returns when all ended."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_user_roundtrip(store):
    u = _user(password_hash="$argon2id$x", keys=["ssh-ed25519 AAAA a@b"],
              permissions=frozenset({Perm.LIST, Perm.DOWNLOAD}), allow_cidrs=["10.0.0.0/8"],
              deny_cidrs=["10.1.0.0/16"], disabled=True, expires_at=2e9, quota_bytes=10 << 30,
              quota_files=1000, max_sessions=3)
    store.add_user(u)
    got = store.get_user("alice")
    assert got is not None and got.created_at > 0 and got.updated_at >= got.created_at
    for f in ("name", "home", "password_hash", "keys", "permissions", "allow_cidrs",
              "deny_cidrs", "disabled", "expires_at", "quota_bytes", "quota_files",
              "max_sessions"):
        assert getattr(got, f) == getattr(u, f), f
    assert store.get_user("bob") is None


def test_user_add_duplicate_update_remove(store):
    store.add_user(_user())
    with pytest.raises(AlreadyExists):
        store.add_user(_user())
    created = store.get_user("alice").created_at
    store.update_user(_user(disabled=True, permissions=frozenset()))
    got = store.get_user("alice")
    assert got.disabled and got.permissions == frozenset() and got.created_at == created
    with pytest.raises(NotFound):
        store.update_user(_user("nobody"))
    store.add_user(_user("bob"))
    assert [u.name for u in store.list_users()] == ["alice", "bob"]
    store.remove_user("alice")
    with pytest.raises(NotFound):
        store.remove_user("alice")
    assert [u.name for u in store.list_users()] == ["bob"]
    assert store.get_user("bob").permissions == ALL_PERMS


def test_bans_levels_and_expiry(store):
    now = time.time()
    b1 = store.add_ban("192.0.2.1", now + 60, "auth failures")
    assert b1.level == 1 and store.ban_level("192.0.2.1") == 1
    b2 = store.add_ban("192.0.2.1", now + 120, "again")
    assert b2.level == 2
    store.add_ban("198.51.100.0/24", now - 1, "expired")
    active = store.active_bans()
    assert [(b.ip, b.level, b.reason) for b in active] == [("192.0.2.1", 2, "again")]
    assert active[0].until == pytest.approx(now + 120)
    assert len(store.active_bans(now=now - 10)) == 2
    assert store.remove_ban("192.0.2.1") is True
    assert store.remove_ban("192.0.2.1") is False
    assert store.active_bans() == []
    assert store.ban_level("192.0.2.1") == 2   # history outlives the ban
    assert store.ban_level("203.0.113.9") == 0
    assert store.ban_level("192.0.2.1", since=now + 3600) == 0   # ... unless it is too old
    b3 = store.add_ban("192.0.2.1", now + 60, "much later", history_since=now + 3600,
                       at=now + 7200)
    assert b3.level == 1 and b3.created_at == now + 7200
    assert store.ban_level("192.0.2.1", since=now + 3600) == 1


def test_auth_failures(store):
    for ts in (100.0, 200.0, 300.0):
        store.record_auth_failure("192.0.2.1", ts)
    store.record_auth_failure("192.0.2.2", 300.0)
    assert store.count_auth_failures("192.0.2.1", 150.0) == 2
    assert store.count_auth_failures("192.0.2.1", 0.0) == 3
    assert store.clear_auth_failures(before=150.0) == 1
    assert store.clear_auth_failures(ip="192.0.2.1") == 2
    assert store.count_auth_failures("192.0.2.1", 0.0) == 0
    assert store.count_auth_failures("192.0.2.2", 0.0) == 1


def test_audit_append_and_query(store):
    base = time.time() - 100
    store.append_audit([
        AuditEvent("auth", ts=base, node_id="n1", session_id="a" * 16, username="alice",
                   client_ip="192.0.2.1", client_port=5000, gateway="gw1",
                   detail={"method": "publickey", "ok": True}),
        AuditEvent("file.open", ts=base + 1, username="alice", client_ip="192.0.2.1",
                   session_id="a" * 16, detail={"path": "/x"}),
        AuditEvent("file.close", ts=base + 2, username="bob", client_ip="192.0.2.2"),
        AuditEvent("user.add", username="carol", detail={"when": object()}),  # ts=0 → now
    ])
    store.append_audit([])
    every = store.query_audit()
    assert [e.kind for e in every] == ["auth", "file.open", "file.close", "user.add"]
    assert every[0].detail == {"method": "publickey", "ok": True} and every[0].id > 0
    assert every[0].client_port == 5000 and every[0].gateway == "gw1"
    assert every[3].ts >= base + 100 - 5
    assert [e.kind for e in store.query_audit(username="alice")] == ["auth", "file.open"]
    assert [e.kind for e in store.query_audit(ip="192.0.2.2")] == ["file.close"]
    assert [e.kind for e in store.query_audit(kind="file.*")] == ["file.open", "file.close"]
    assert [e.kind for e in store.query_audit(kind="auth")] == ["auth"]
    assert [e.kind for e in store.query_audit(session_id="a" * 16, since=base + 0.5)] == \
        ["file.open"]
    assert [e.kind for e in store.query_audit(limit=2)] == ["file.close", "user.add"]


def test_audit_query_by_network(store, monkeypatch):
    """--ip 10.0.0.0/8 matched only events stored with that very text (a ban of the network),
    none from the addresses inside it. A network selects every event whose address lies in it,
    IPv4-mapped as IPv4 and zones dropped (internal.ipmatch), and bans of networks inside it;
    an address still selects its own events only."""
    from internal.store import sql
    base = time.time() - 100
    ips = ["10.1.2.3", "::ffff:10.200.0.1", "192.0.2.1", "10.0.0.0/8", "10.9.0.0/16",
           "0.0.0.0/0", "2001:db8::5", "2001:db8::/48", "fe80::1%eth0", "2001:db9::1", "",
           "not-an-address", "11.0.0.1"]
    store.append_audit([AuditEvent(f"e{i}", ts=base + i, client_ip=ip)
                        for i, ip in enumerate(ips)])
    kinds = lambda **kw: [e.client_ip for e in store.query_audit(**kw)]  # noqa: E731
    assert kinds(ip="10.0.0.0/8") == ["10.1.2.3", "::ffff:10.200.0.1", "10.0.0.0/8",
                                      "10.9.0.0/16"]
    assert kinds(ip="::ffff:10.0.0.0/104") == kinds(ip="10.0.0.0/8")
    assert kinds(ip="2001:db8::/32") == ["2001:db8::5", "2001:db8::/48"]
    assert kinds(ip="fe80::/10") == ["fe80::1%eth0"]
    assert kinds(ip="0.0.0.0/0") == ["10.1.2.3", "::ffff:10.200.0.1", "192.0.2.1", "10.0.0.0/8",
                                     "10.9.0.0/16", "0.0.0.0/0", "11.0.0.1"]
    assert kinds(ip="10.0.0.0/8", limit=2) == ["10.0.0.0/8", "10.9.0.0/16"]
    assert kinds(ip="10.0.0.0/8", since=base + 1.5) == ["10.0.0.0/8", "10.9.0.0/16"]
    assert kinds(ip="10.1.2.3") == ["10.1.2.3"] and kinds(ip="10.0.0.0/8", kind="e0") == [
        "10.1.2.3"]
    # the trail is read a page at a time, newest first; pages of 3 over events sharing one
    # time, so the page boundary falls between equal timestamps (ties broken by id)
    monkeypatch.setattr(sql, "_AUDIT_PAGE", 3)
    same = time.time()
    store.append_audit([AuditEvent("page", ts=same, client_ip=f"10.5.0.{i}", detail={"i": i})
                        if i % 3 else AuditEvent("page", ts=same, client_ip="192.0.2.9")
                        for i in range(20)])
    got = [e.detail["i"] for e in store.query_audit(ip="10.5.0.0/16", kind="page", limit=9)]
    assert got == [i for i in range(20) if i % 3][-9:]
    assert len(store.query_audit(ip="10.0.0.0/8", limit=1000)) == 4 + 13


def test_audit_is_append_only(store):
    store.append_audit([AuditEvent("auth", username="alice")])
    conn = store._acquire()   # go around the API, as an intruder with SQL access would
    try:
        for stmt in ("UPDATE audit SET username = 'mallory'", "DELETE FROM audit"):
            with pytest.raises(Exception, match="append-only"):
                _raw(store, conn, stmt)
    finally:
        store._release(conn, True)
    assert [e.username for e in store.query_audit()] == ["alice"]


def _raw(store, conn, stmt):
    try:
        conn.execute("BEGIN")
        conn.execute(stmt)
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise


def test_reopen_is_idempotent_and_refuses_newer_schema(store_url):
    for _ in range(2):
        open_store(store_url).close()
    s = open_store(store_url)
    try:
        with s._tx() as cur:
            s._exec(cur, "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (migrations.LATEST + 1, 0.0))
    finally:
        s.close()
    with pytest.raises(StoreError, match="newer than this edgegw"):
        open_store(store_url)


def _open_and_write(url: str, n: int) -> None:
    s = open_store(url)
    try:
        for i in range(n):
            s.append_audit([AuditEvent("proc", detail={"i": i})])
    finally:
        s.close()


def test_concurrent_processes_open_and_write(store_url):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_and_write, args=(store_url, 20)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = open_store(store_url)
    try:
        assert len(s.query_audit(kind="proc")) == 60
    finally:
        s.close()


def test_threads_share_one_store(store):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                store.add_user(_user(f"u{t}-{i}"))
                store.get_user(f"u{t}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    _run_threads(work, 6)
    assert not errors
    assert len(store.list_users()) == 60


def test_atomic_all_or_nothing(store):
    with store.atomic():
        store.add_user(_user("bob"))
        assert store.get_user("bob") is not None          # reads see the block's writes
        store.append_audit([AuditEvent(kind="user.add", node_id="n", username="bob")])
    assert store.get_user("bob") is not None and len(store.query_audit(kind="user.add")) == 1
    with pytest.raises(RuntimeError, match="audit down"):
        with store.atomic():
            store.add_user(_user("carol"))
            store.append_audit([AuditEvent(kind="user.add", node_id="n", username="carol")])
            with store.atomic():                          # nested: joins the outer one
                store.remove_user("bob")
            raise RuntimeError("audit down")
    assert store.get_user("carol") is None and store.get_user("bob") is not None
    assert [e.username for e in store.query_audit(kind="user.add")] == ["bob"]
    with pytest.raises(AlreadyExists):                    # errors inside keep their type
        with store.atomic():
            store.add_user(_user("bob"))
    store.add_user(_user("dave"))                         # the store is healthy afterwards


def test_atomic_is_per_thread(store):
    """Another thread's calls during a block are not part of it (and are not blocked on
    PostgreSQL; SQLite serialises writers, so only a read is tried there)."""
    seen: list[object] = []
    with pytest.raises(RuntimeError):
        with store.atomic():
            store.add_user(_user("erin"))
            t = threading.Thread(target=lambda: seen.append(store.get_user("erin")))
            t.start()
            t.join(10)
            raise RuntimeError("roll back")
    assert seen == [None] and store.get_user("erin") is None


def test_session_leases_cap_renew_and_lapse(store):
    store.add_user(_user("alice"))
    now = 1000.0
    assert store.claim_session("s1", "alice", "n1", 2, until=now + 60, now=now)
    assert store.claim_session("s2", "alice", "n2", 2, until=now + 60, now=now)
    assert not store.claim_session("s3", "alice", "n1", 2, until=now + 60, now=now)
    assert store.claim_session("b1", "bob", "n1", 1, until=now + 60, now=now)  # per user
    store.release_session("s1")
    assert store.claim_session("s3", "alice", "n1", 2, until=now + 60, now=now)
    store.renew_sessions(["s2"], now + 600)          # s2's node is alive, s3's died
    assert store.claim_session("s4", "alice", "n1", 2, until=now + 200, now=now + 100)
    assert not store.claim_session("s5", "alice", "n1", 2, until=now + 200, now=now + 100)


def test_a_removed_users_leases_go_with_it(store):
    """A user removed and added again under the same name starts without the old account's
    leases (they held its --max-sessions for up to a lease's life)."""
    store.add_user(_user("alice"))
    now = time.time()
    assert store.claim_session("s1", "alice", "n1", 1, until=now + 60, now=now)
    store.remove_user("alice")
    store.add_user(_user("alice"))
    assert store.claim_session("s2", "alice", "n1", 1, until=now + 60, now=now)


def test_session_leases_concurrent_claims_respect_the_cap(store_url):
    """Nodes claiming at once (threads with their own connections) never exceed the cap."""
    stores = [open_store(store_url) for _ in range(6)]
    try:
        stores[0].add_user(_user("alice"))
        got: list[bool] = []
        lock = threading.Lock()

        def claim(i: int) -> None:
            for j in range(5):
                ok = stores[i].claim_session(f"s{i}-{j}", "alice", f"n{i}", 3,
                                             until=time.time() + 60)
                with lock:
                    got.append(ok)

        _run_threads(claim, 6)
        assert got.count(True) == 3 and len(got) == 30
    finally:
        for s in stores:
            s.close()


def test_closed_store_raises(store_url):
    s = open_store(store_url)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_users()


@pytest.mark.parametrize("url, msg", [
    ("mysql://x/y", "unknown store URL"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite:///nonexistent-dir/x/y.db", "does not exist"),
])
def test_bad_urls(url, msg):
    with pytest.raises(StoreError, match=msg):
        open_store(url)


def test_unreachable_postgres_is_a_store_error():
    with pytest.raises(StoreError, match="cannot open postgres store") as info:
        open_store("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in str(info.value)


def test_sqlite_file_is_private(sqlite_url):
    open_store(sqlite_url).close()
    import os
    from internal.store.sqlite import sqlite_path
    assert os.stat(sqlite_path(sqlite_url)).st_mode & 0o077 == 0


@pytest.mark.postgres
def test_postgres_connections_the_server_ended_are_not_used(pg_url):
    """A database restart, a pooler's restart or pg_terminate_backend ends the pooled idle
    connections: the next calls open new ones instead of failing once per dead connection."""
    import psycopg
    store = open_store(pg_url)
    try:
        store.add_user(_user())
        _run_threads(lambda i: store.get_user("alice"), 4)     # several connections pooled
        db = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM "
                                  "pg_stat_activity WHERE datname = %s AND "
                                  "pid <> pg_backend_pid()", (db,)).fetchone()[0]
        assert ended >= 1
        time.sleep(0.2)                     # the server's farewell reaches the sockets
        for _ in range(6):
            assert store.get_user("alice").name == "alice"
        store.add_user(_user("bob"))
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_lock_waits_are_bounded(pg_url, monkeypatch):
    """A table another session holds locked (VACUUM FULL, ALTER TABLE) fails a statement
    after LOCK_TIMEOUT_MS instead of holding the caller's thread for as long as the lock."""
    import psycopg
    from internal.store import postgres
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_MS", 300)
    store = open_store(pg_url)
    try:
        with psycopg.connect(pg_url) as holder:
            holder.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(StoreError, match="lock timeout"):
                store.get_user("alice")
            assert time.monotonic() - started < 5
        assert store.get_user("alice") is None       # the lock is gone: answered again
    finally:
        store.close()


def test_opening_a_current_store_takes_no_write_lock(sqlite_url):
    """Admin commands open the store: while another process holds its write lock (a long
    write, or an `sqlite3` shell in a transaction), reading users must not wait for it."""
    import sqlite3
    from internal.store.sqlite import sqlite_path
    open_store(sqlite_url).close()                     # created and migrated
    holder = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        store = open_store(sqlite_url)
        try:
            assert store.list_users() == []
        finally:
            store.close()
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
