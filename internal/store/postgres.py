"""PostgreSQL backend: users, bans and the audit trail shared by several nodes.

Connections run in autocommit mode; a write opens its own transaction. Schema changes take an
advisory lock first, so nodes started together apply each migration exactly once. A connection
that broke (server restart, network) is dropped from the pool and the next call reconnects.
"""
from __future__ import annotations

from typing import Any

import psycopg

from internal.store.sql import SQLStore

CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK_KEY = 0x6564676577  # "edgew": one advisory lock id for every edgegw schema change


class PostgresStore(SQLStore):
    dialect = "postgres"
    paramstyle = "%s"
    row_lock = " FOR UPDATE"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self._conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        super().__init__(url, pool_size=pool_size)

    def _connect(self) -> Any:
        return psycopg.connect(self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="edgegw")

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
