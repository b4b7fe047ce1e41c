"""The node's store: open one by URL; everything else speaks the contract in `base`."""
from __future__ import annotations

from internal.store.base import (ALL_PERMS, AlreadyExists, AuditEvent, BanEntry, NotFound, Perm,
                                 Store, StoreError, User)

__all__ = ["ALL_PERMS", "AlreadyExists", "AuditEvent", "BanEntry", "NotFound", "Perm", "Store",
           "StoreError", "User", "open_store"]


def open_store(url: str) -> Store:
    """Open (and migrate) the store at `url`: sqlite:///PATH or postgresql://..."""
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        from internal.store.sqlite import SQLiteStore
        return SQLiteStore(url)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        try:
            from internal.store.postgres import PostgresStore
        except ImportError:
            raise StoreError("PostgreSQL support needs psycopg: pip install 'edgegw[postgres]'") \
                from None
        return PostgresStore(url)
    raise StoreError(f"unknown store URL {url.split('@')[-1]!r}: use sqlite:///PATH or "
                     "postgresql://USER@HOST/DB")
