"""SQLite backend: the embedded default for a single node (several worker processes welcome).

WAL lets readers run beside the one writer; every write transaction starts with
`BEGIN IMMEDIATE` so two processes never deadlock upgrading a read lock, and the busy timeout
makes them queue instead of failing with "database is locked".
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from internal.store.base import StoreError
from internal.store.sql import SQLStore

BUSY_TIMEOUT_S = 30.0


class SQLiteStore(SQLStore):
    dialect = "sqlite"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.path = sqlite_path(url)
        if not self.path.parent.is_dir():
            raise StoreError(f"cannot open {url}: directory {self.path.parent} does not exist")
        try:   # the file holds password hashes: create it private before SQLite does
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot open {url}: {exc.strerror}") from None
        super().__init__(url, pool_size=pool_size)

    def _connect(self) -> Any:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _begin(self, conn: Any, *, schema: bool) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _db_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.IntegrityError,)


def sqlite_path(url: str) -> Path:
    """`sqlite:////abs/file.db` → /abs/file.db (three slashes, then the path)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"{url!r}: expected sqlite:///PATH, e.g. sqlite:////var/lib/edgegw.db")
    path = url[len(prefix):]
    if path == ":memory:":
        raise StoreError("in-memory SQLite cannot be shared between threads and processes; "
                         "give a file path")
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:   # an unknown ~user, a symlink loop
        raise StoreError(f"cannot open {url}: {exc}") from None
