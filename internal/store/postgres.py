"""PostgreSQL backend: users, bans and the audit trail shared by several nodes.

Connections run in autocommit mode; a write opens its own transaction. Schema changes take an
advisory lock first, so nodes started together apply each migration exactly once. A connection
that broke (server restart, network) is dropped from the pool and the next call reconnects.
"""
from __future__ import annotations

import select
from typing import Any

import psycopg

from internal.store.sql import SQLStore

CONNECT_TIMEOUT_S = 10
# A statement waits this long for a lock (another session's VACUUM FULL, ALTER TABLE, a held
# row) before it fails: logins and audit writes then fail and retry instead of piling up in
# the node's threads, which its SFTP file work shares.
LOCK_TIMEOUT_MS = 5000
SCHEMA_LOCK_KEY = 0x6564676577  # "edgew": one advisory lock id for every edgegw schema change


class PostgresStore(SQLStore):
    dialect = "postgres"
    paramstyle = "%s"
    row_lock = " FOR UPDATE"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self._conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        super().__init__(url, pool_size=pool_size)

    def _connect(self) -> Any:
        conn = psycopg.connect(self._conninfo, autocommit=True,
                               connect_timeout=CONNECT_TIMEOUT_S, application_name="edgegw")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        return conn

    def _usable(self, conn: Any) -> bool:
        # An idle connection has nothing to read, unless the server ended it meanwhile (a
        # restart, pg_terminate_backend, a pooler's restart): then its farewell or EOF waits.
        if conn.closed or conn.broken:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError, psycopg.Error):
            return False
        return not readable

    def _begin(self, conn: Any, *, schema: bool) -> None:
        conn.execute("BEGIN")
        if schema:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))

    def _db_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.errors.IntegrityError,)

    def _healthy(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken)
