"""The Store contract in SQL, written once for both backends.

Queries use `?` placeholders; a backend with another paramstyle gets them translated once.
Backends only say how to connect, how to open a write transaction and which errors mean what.
Connections come from a small pool, so the store is safe to share between threads.
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Collection, Iterator
from urllib.parse import unquote

from internal.ipmatch import Network, parse_cidr, parse_ip
from internal.store import migrations
from internal.store.base import (ALL_PERMS, AlreadyExists, AuditEvent, BanEntry, NotFound, Perm,
                                 StoreError, User)

_USER_COLS = ("name, home, password_hash, keys, permissions, allow_cidrs, deny_cidrs, disabled, "
              "expires_at, quota_bytes, quota_files, max_sessions, created_at, updated_at")
_BAN_COLS = "ip, until_ts, reason, created_at, level"
_IN_CHUNK = 500
_AUDIT_COLS = ("ts, node_id, session_id, username, client_ip, client_port, gateway, kind, "
               "detail, id")
_AUDIT_PAGE = 2000                  # rows read at a time when a network is matched in Python
_SEEN_ADDRESSES = 65536             # verdicts kept per network query (a trail repeats addresses)


class SQLStore:
    """Shared implementation; subclasses fill in the hooks at the bottom."""

    dialect: ClassVar[str]
    paramstyle: ClassVar[str] = "?"
    row_lock: ClassVar[str] = ""        # appended to a SELECT to lock the rows it reads

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = url
        self._pool_size = pool_size
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._sql_cache: dict[str, str] = {}
        self._joined = threading.local()   # .cur: the cursor of this thread's atomic() block
        self._migrate()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Every call this thread makes on the store inside the block is one transaction: all
        of them take effect, or (when the block raises) none. Nested blocks join the outer."""
        if getattr(self._joined, "cur", None) is not None:
            yield
            return
        with self._tx() as cur:
            self._joined.cur = cur
            try:
                yield
            finally:
                self._joined.cur = None

    # ---- users -------------------------------------------------------------------------------

    def add_user(self, user: User) -> None:
        now = time.time()
        row = _user_row(user, created=user.created_at or now, updated=now)
        try:
            with self._tx() as cur:
                self._exec(cur, f"INSERT INTO users ({_USER_COLS}) VALUES ({_marks(14)})", row)
        except StoreError as exc:
            if isinstance(exc.__cause__, self._integrity_errors()):
                raise AlreadyExists(f"user {user.name!r} already exists") from None
            raise

    def update_user(self, user: User) -> None:
        row = _user_row(user, created=0.0, updated=time.time())
        sets = ", ".join(f"{c.strip()} = ?" for c in _USER_COLS.split(",")[1:]
                         if c.strip() != "created_at")
        params = row[1:12] + row[13:] + (user.name,)
        with self._tx() as cur:
            self._exec(cur, f"UPDATE users SET {sets} WHERE name = ?", params)
            if cur.rowcount == 0:
                raise NotFound(f"no user {user.name!r}")

    def remove_user(self, name: str) -> None:
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM users WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"no user {name!r}")
            # its session leases go with it: an account added again under the name starts
            # with none (its sessions are ended by the nodes' re-check within seconds)
            self._exec(cur, "DELETE FROM user_sessions WHERE username = ?", (name,))

    def get_user(self, name: str) -> User | None:
        rows = self._read(f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,))
        return _row_user(rows[0]) if rows else None

    def list_users(self) -> list[User]:
        return [_row_user(r) for r in self._read(f"SELECT {_USER_COLS} FROM users ORDER BY name")]

    def get_users(self, names: Collection[str]) -> list[User]:
        """The named users that exist, in one query per _IN_CHUNK names (SQLite builds before
        3.32 take at most 999 parameters)."""
        wanted = sorted(set(names))
        users: list[User] = []
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = tuple(wanted[i:i + _IN_CHUNK])
            rows = self._read(f"SELECT {_USER_COLS} FROM users WHERE name IN "
                              f"({_marks(len(chunk))})", chunk)
            users.extend(_row_user(r) for r in rows)
        return users

    # ---- bans --------------------------------------------------------------------------------

    def add_ban(self, ip: str, until: float, reason: str, *, history_since: float = 0.0,
                at: float | None = None) -> BanEntry:
        """Ban (or re-ban) `ip` at time `at` (default: now); each ban raises its level, kept
        after the ban ends, unless the address's last ban is older than `history_since` (then
        the level starts over)."""
        now = time.time() if at is None else at
        with self._tx() as cur:
            self._exec(cur, "INSERT INTO ban_history (ip, level, last_at) VALUES (?, 1, ?) "
                            "ON CONFLICT (ip) DO UPDATE SET level = CASE WHEN "
                            "ban_history.last_at >= ? THEN ban_history.level + 1 ELSE 1 END, "
                            "last_at = excluded.last_at RETURNING level", (ip, now, history_since))
            level = int(cur.fetchone()[0])
            self._exec(cur, f"INSERT INTO bans ({_BAN_COLS}) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (ip) DO UPDATE SET until_ts = excluded.until_ts, "
                            "reason = excluded.reason, created_at = excluded.created_at, "
                            "level = excluded.level", (ip, until, reason, now, level))
        return BanEntry(ip=ip, until=until, reason=reason, created_at=now, level=level)

    def remove_ban(self, ip: str) -> bool:
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM bans WHERE ip = ?", (ip,))
            return bool(cur.rowcount)

    def active_bans(self, now: float | None = None) -> list[BanEntry]:
        now = time.time() if now is None else now
        rows = self._read(f"SELECT {_BAN_COLS} FROM bans WHERE until_ts > ? ORDER BY ip", (now,))
        return [BanEntry(ip=r[0], until=float(r[1]), reason=r[2], created_at=float(r[3]),
                         level=int(r[4])) for r in rows]

    def ban_level(self, ip: str, since: float = 0.0) -> int:
        rows = self._read("SELECT level FROM ban_history WHERE ip = ? AND last_at >= ?",
                          (ip, since))
        return int(rows[0][0]) if rows else 0

    # ---- session caps ------------------------------------------------------------------------

    def claim_session(self, session_id: str, username: str, node_id: str, limit: int, *,
                      until: float, now: float | None = None) -> bool:
        """Count one session of `username` against `limit` across every node on the store;
        False (nothing stored) when `limit` leases are live already."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            # one claim per user at a time (PostgreSQL row lock; SQLite writers are serial)
            self._exec(cur, f"SELECT name FROM users WHERE name = ?{self.row_lock}", (username,))
            self._exec(cur, "DELETE FROM user_sessions WHERE username = ? AND expires < ?",
                       (username, now))
            self._exec(cur, "SELECT COUNT(*) FROM user_sessions WHERE username = ?", (username,))
            if int(cur.fetchone()[0]) >= limit:
                return False
            self._exec(cur, "INSERT INTO user_sessions (session_id, username, node_id, started, "
                            "expires) VALUES (?, ?, ?, ?, ?)",
                       (session_id, username, node_id, now, until))
        return True

    def renew_sessions(self, session_ids: list[str], until: float) -> None:
        if session_ids:
            with self._tx() as cur:
                for sid in session_ids:
                    self._exec(cur, "UPDATE user_sessions SET expires = ? WHERE session_id = ?",
                               (until, sid))

    def release_session(self, session_id: str) -> None:
        with self._tx() as cur:
            self._exec(cur, "DELETE FROM user_sessions WHERE session_id = ?", (session_id,))

    # ---- defender ----------------------------------------------------------------------------

    def record_auth_failure(self, ip: str, ts: float) -> None:
        with self._tx() as cur:
            self._exec(cur, "INSERT INTO auth_failures (ip, ts) VALUES (?, ?)", (ip, ts))

    def count_auth_failures(self, ip: str, since: float) -> int:
        rows = self._read("SELECT COUNT(*) FROM auth_failures WHERE ip = ? AND ts >= ?",
                          (ip, since))
        return int(rows[0][0])

    def clear_auth_failures(self, ip: str | None = None, before: float | None = None) -> int:
        """Forget failures of one address (after a ban) and/or older than `before` (pruning)."""
        where, params = _where({"ip = ?": ip, "ts < ?": before})
        with self._tx() as cur:
            self._exec(cur, f"DELETE FROM auth_failures{where}", params)
            return max(cur.rowcount, 0)

    # ---- audit -------------------------------------------------------------------------------

    def append_audit(self, events: list[AuditEvent]) -> None:
        if not events:
            return
        now = time.time()
        rows = [(e.ts or now, e.node_id, e.session_id, e.username, e.client_ip, int(e.client_port),
                 e.gateway, e.kind, json.dumps(e.detail, sort_keys=True, default=str))
                for e in events]
        with self._tx() as cur:
            cur.executemany(self._sql(f"INSERT INTO audit ({_AUDIT_COLS[:-4]}) VALUES "
                                      f"({_marks(9)})"), rows)

    def query_audit(self, *, username: str | None = None, ip: str | None = None,
                    since: float | None = None, session_id: str | None = None,
                    kind: str | None = None, limit: int = 1000) -> list[AuditEvent]:
        """The newest `limit` matching events, oldest first. `kind` "file.*" matches a family.
        `ip` is an address (the events stored with that text) or a network, `10.0.0.0/8`:
        the events whose client address lies in it (IPv4-mapped IPv6 as IPv4, see
        internal.ipmatch), bans of networks inside it included."""
        network = parse_cidr(ip) if ip is not None and "/" in ip else None
        conds: dict[str, Any] = {"username = ?": username, "ts >= ?": since,
                                 "session_id = ?": session_id}
        if network is None:
            conds["client_ip = ?"] = ip
        else:   # events with an address; which lie in the network is tested in Python
            conds["client_ip <> ?"] = ""
        if kind and kind.endswith("*"):
            prefix = kind[:-1]
            conds[f"substr(kind, 1, {len(prefix)}) = ?"] = prefix
        else:
            conds["kind = ?"] = kind
        where, params = _where(conds)
        limit = max(int(limit), 0)
        query = f"SELECT {_AUDIT_COLS} FROM audit{where}"
        if network is None:
            rows = self._read(f"{query} ORDER BY ts DESC, id DESC LIMIT ?", (*params, limit))
        else:
            rows = self._newest_in_network(query, params, network, limit)
        return [AuditEvent(ts=float(r[0]), node_id=r[1], session_id=r[2], username=r[3],
                           client_ip=r[4], client_port=int(r[5]), gateway=r[6], kind=r[7],
                           detail=_loads(r[8]), id=int(r[9])) for r in reversed(rows)]

    def _newest_in_network(self, query: str, params: tuple[Any, ...], network: Network,
                           limit: int) -> list[tuple[Any, ...]]:
        """The newest `limit` rows of `query` (which has a WHERE) whose client_ip lies in
        `network`, newest first: read a page at a time, newest first, each page starting
        after the last row of the one before (keyset), so a large trail is never held whole
        and no cursor stays open between pages."""
        inside = _lies_in(network)
        found: list[tuple[Any, ...]] = []
        after: tuple[Any, ...] | None = None
        while len(found) < limit:
            keyset, more = ("", ()) if after is None else \
                (" AND (ts < ? OR (ts = ? AND id < ?))", (after[0], after[0], after[9]))
            page = self._read(f"{query}{keyset} ORDER BY ts DESC, id DESC LIMIT ?",
                              (*params, *more, _AUDIT_PAGE))
            found.extend(r for r in page if inside(r[4]))
            if len(page) < _AUDIT_PAGE:
                break
            after = page[-1]
        return found[:limit]

    # ---- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            _quiet_close(conn)

    def _schema_current(self) -> bool:
        """Whether the schema is this edgegw's already: checked with a plain read, so opening a
        store (every admin command does) does not wait for a write lock another process holds
        (SQLite's BEGIN IMMEDIATE, PostgreSQL's schema lock) unless there is a migration to do."""
        try:
            rows = self._read("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        except StoreError:
            return False        # no version table yet: a new store
        return int(rows[0][0]) == migrations.LATEST

    def _migrate(self) -> None:
        if self._schema_current():
            return
        with self._tx(schema=True) as cur:
            self._exec(cur, migrations.VERSION_TABLE.format(**migrations.TYPES[self.dialect]))
            self._exec(cur, "SELECT COALESCE(MAX(version), 0) FROM schema_version")
            current = int(cur.fetchone()[0])
            if current > migrations.LATEST:
                raise StoreError(f"{_redact(self.url)} has schema v{current}, newer than this "
                                 f"edgegw (v{migrations.LATEST}); upgrade edgegw")
            for m in migrations.pending(current):
                for stmt in m.statements(self.dialect):
                    cur.execute(stmt)
                self._exec(cur, "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                           (m.version, time.time()))

    def _sql(self, query: str) -> str:
        if self.paramstyle == "?":
            return query
        out = self._sql_cache.get(query)
        if out is None:
            out = self._sql_cache[query] = query.replace("?", self.paramstyle)
        return out

    def _exec(self, cur: Any, query: str, params: tuple[Any, ...] = ()) -> None:
        if params:
            cur.execute(self._sql(query), params)
        else:                       # no parameters: no placeholder parsing either
            cur.execute(query)

    def _read(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._tx(write=False) as cur:
            self._exec(cur, query, params)
            return list(cur.fetchall())

    @contextmanager
    def _tx(self, *, write: bool = True, schema: bool = False) -> Iterator[Any]:
        """A cursor inside a transaction (writes) or autocommit (reads); DB errors → StoreError.
        Inside atomic() it is that block's cursor, committed or rolled back with the block."""
        joined = getattr(self._joined, "cur", None)
        if joined is not None:
            try:
                yield joined
            except self._db_errors() as exc:
                raise self._store_error(exc) from exc
            return
        conn = self._acquire()
        healthy = True
        began = False
        try:
            if write:
                self._begin(conn, schema=schema)
                began = True
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()
            if began:
                conn.execute("COMMIT")
        except BaseException as exc:
            if began:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    healthy = False
            if isinstance(exc, self._db_errors()):
                healthy = healthy and self._healthy(conn)
                raise self._store_error(exc) from exc
            raise
        finally:
            self._release(conn, healthy)

    def _store_error(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.dialect} store {_redact(self.url)}: {str(exc).strip()}")

    def _acquire(self) -> Any:
        while True:
            with self._lock:
                if self._closed:
                    raise StoreError("the store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if self._usable(conn):
                return conn
            _quiet_close(conn)     # closed by the server while idle: the next one, or a new one
        try:
            return self._connect()
        except self._db_errors() as exc:
            raise StoreError(f"cannot open {self.dialect} store {_redact(self.url)}: "
                             f"{str(exc).strip()}") from exc

    def _release(self, conn: Any, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        _quiet_close(conn)

    # ---- backend hooks -----------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _usable(self, conn: Any) -> bool:
        """Whether an idle pooled connection is still worth a query (cheap: no round trip)."""
        return True

    def _begin(self, conn: Any, *, schema: bool) -> None:
        """Open a write transaction; `schema` also serialises schema changes across processes."""
        raise NotImplementedError

    def _db_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _healthy(self, conn: Any) -> bool:
        return True


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _where(conds: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    used = {c: v for c, v in conds.items() if v is not None}
    return (" WHERE " + " AND ".join(used) if used else ""), tuple(used.values())


def _lies_in(network: Network) -> Callable[[str], bool]:
    """Whether a stored client_ip lies in `network`: an address (zone dropped, IPv4-mapped
    as IPv4, as internal.ipmatch compares them) or a ban's network inside it; any other text
    never does. Verdicts are remembered, as most events come from a few addresses."""
    seen: dict[str, bool] = {}

    def inside(text: str) -> bool:
        verdict = seen.get(text)
        if verdict is None:
            try:
                if "/" in text:
                    stored = parse_cidr(text)
                    verdict = (stored.version == network.version
                               and stored.subnet_of(network))  # type: ignore[arg-type]
                else:
                    verdict = parse_ip(text) in network
            except ValueError:
                verdict = False
            if len(seen) >= _SEEN_ADDRESSES:
                seen.clear()
            seen[text] = verdict
        return verdict
    return inside


def _user_row(u: User, *, created: float, updated: float) -> tuple[Any, ...]:
    perms = sorted(p.value for p in u.permissions)
    return (u.name, u.home, u.password_hash, json.dumps(list(u.keys)), json.dumps(perms),
            json.dumps(list(u.allow_cidrs)), json.dumps(list(u.deny_cidrs)), bool(u.disabled),
            u.expires_at, u.quota_bytes, u.quota_files, u.max_sessions, created, updated)


def _row_user(r: tuple[Any, ...]) -> User:
    known = {p.value for p in ALL_PERMS}
    return User(name=r[0], home=r[1], password_hash=r[2], keys=_loads(r[3], []),
                permissions=frozenset(Perm(p) for p in _loads(r[4], []) if p in known),
                allow_cidrs=_loads(r[5], []), deny_cidrs=_loads(r[6], []), disabled=bool(r[7]),
                expires_at=None if r[8] is None else float(r[8]),
                quota_bytes=r[9], quota_files=r[10], max_sessions=r[11],
                created_at=float(r[12]), updated_at=float(r[13]))


def _loads(text: str, default: Any = None) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {} if default is None else default


def _redact(url: str) -> str:
    """The URL without a password, for error messages and logs: `user:PASS@` and query
    parameters such as ?password= and ?sslpassword= (libpq takes them percent-encoded)."""
    # libpq has no fragment: a '#' is part of the value
    url = re.sub(r"([?&])([^=&]*)=([^&]*)",
                 lambda m: f"{m[1]}{m[2]}=***" if unquote(m[2]).lower().endswith("password")
                 else m[0], url)
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def _quiet_close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        pass
