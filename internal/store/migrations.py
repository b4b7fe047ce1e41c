"""Schema versions, applied in order when a store opens.

One list serves both backends: table definitions are written once with `{type}` slots that each
dialect fills in; only what the dialects really disagree on (triggers) is spelled out per backend.
A backend applies the pending versions inside one transaction that it first makes exclusive
(SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so nodes starting together don't race.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL",
               "bool": "INTEGER", "bigint": "INTEGER"},
    "postgres": {"serial": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION",
                 "bool": "BOOLEAN", "bigint": "BIGINT"},
}

VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version "
                 "(version INTEGER PRIMARY KEY, applied_at {real} NOT NULL)")

APPEND_ONLY_MESSAGE = "audit trail is append-only"


@dataclass(frozen=True)
class Migration:
    version: int
    shared: tuple[str, ...]
    per_dialect: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def statements(self, dialect: str) -> list[str]:
        types = TYPES[dialect]
        return [s.format(**types) for s in self.shared] + list(self.per_dialect.get(dialect, ()))


_V1_TABLES = (
    """CREATE TABLE users (
        name TEXT PRIMARY KEY,
        home TEXT NOT NULL,
        password_hash TEXT,
        keys TEXT NOT NULL,
        permissions TEXT NOT NULL,
        allow_cidrs TEXT NOT NULL,
        deny_cidrs TEXT NOT NULL,
        disabled {bool} NOT NULL,
        expires_at {real},
        quota_bytes {bigint},
        quota_files {bigint},
        max_sessions INTEGER,
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL)""",
    """CREATE TABLE bans (
        ip TEXT PRIMARY KEY,
        until_ts {real} NOT NULL,
        reason TEXT NOT NULL,
        created_at {real} NOT NULL,
        level INTEGER NOT NULL)""",
    "CREATE INDEX bans_until ON bans (until_ts)",
    # survives unbans and expiry, so repeat offenders get longer bans
    """CREATE TABLE ban_history (
        ip TEXT PRIMARY KEY,
        level INTEGER NOT NULL,
        last_at {real} NOT NULL)""",
    "CREATE TABLE auth_failures (id {serial}, ip TEXT NOT NULL, ts {real} NOT NULL)",
    "CREATE INDEX auth_failures_ip_ts ON auth_failures (ip, ts)",
    """CREATE TABLE audit (
        id {serial},
        ts {real} NOT NULL,
        node_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        username TEXT NOT NULL,
        client_ip TEXT NOT NULL,
        client_port INTEGER NOT NULL,
        gateway TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL)""",
    "CREATE INDEX audit_ts ON audit (ts)",
    "CREATE INDEX audit_user_ts ON audit (username, ts)",
    "CREATE INDEX audit_ip_ts ON audit (client_ip, ts)",
    "CREATE INDEX audit_session ON audit (session_id)",
    "CREATE INDEX audit_kind_ts ON audit (kind, ts)",
)

_SQLITE_APPEND_ONLY = tuple(
    f"CREATE TRIGGER audit_no_{op.lower()} BEFORE {op} ON audit "
    f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
    for op in ("UPDATE", "DELETE")
)

_PG_APPEND_ONLY = (
    f"""CREATE FUNCTION edgegw_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$""",
    "CREATE TRIGGER audit_no_update_delete BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION edgegw_audit_append_only()",
    "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
    "FOR EACH STATEMENT EXECUTE FUNCTION edgegw_audit_append_only()",
)

# Sessions of users with a session cap, shared by every node and worker on the store. A row is
# a lease: its node renews it while the session lives, so a crashed node's sessions lapse.
_V2_SESSIONS = (
    """CREATE TABLE user_sessions (
        session_id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        node_id TEXT NOT NULL,
        started {real} NOT NULL,
        expires {real} NOT NULL
    )""",
    "CREATE INDEX user_sessions_by_user ON user_sessions (username)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, _V1_TABLES, {"sqlite": _SQLITE_APPEND_ONLY, "postgres": _PG_APPEND_ONLY}),
    Migration(2, _V2_SESSIONS),
)

LATEST = MIGRATIONS[-1].version


def pending(current: int) -> list[Migration]:
    """The migrations a store at schema `current` still needs, oldest first."""
    return [m for m in MIGRATIONS if m.version > current]
