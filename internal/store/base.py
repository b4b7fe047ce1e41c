"""The node's storage contract: users, bans, audit trail, defender counters.

Two backends implement it: SQLite (embedded default, one node) and PostgreSQL (several nodes
sharing users, bans and the audit trail). Methods are synchronous and thread-safe; async code
calls them through `internal.store.calls.store_call` or the audit writer's queue.
"""
from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Collection, Protocol


class Perm(str, enum.Enum):
    LIST = "list"
    DOWNLOAD = "download"
    UPLOAD = "upload"
    OVERWRITE = "overwrite"
    DELETE = "delete"
    RENAME = "rename"
    MKDIR = "mkdir"
    RMDIR = "rmdir"
    SETSTAT = "setstat"


ALL_PERMS: frozenset[Perm] = frozenset(Perm)


@dataclass(slots=True)
class User:
    name: str
    home: str                                  # absolute directory: the user's root
    password_hash: str | None = None           # argon2id (PHC string); None = no password login
    keys: list[str] = field(default_factory=list)   # OpenSSH public key lines
    permissions: frozenset[Perm] = ALL_PERMS
    allow_cidrs: list[str] = field(default_factory=list)  # empty = any address
    deny_cidrs: list[str] = field(default_factory=list)
    disabled: bool = False
    expires_at: float | None = None            # unix time; None = never
    quota_bytes: int | None = None             # None = unlimited
    quota_files: int | None = None
    max_sessions: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class BanEntry:
    ip: str                                    # address or CIDR
    until: float                               # unix time
    reason: str
    created_at: float
    level: int = 1                             # how many times this address was banned


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One line of the audit trail. `kind` names the event; `detail` carries the rest."""

    kind: str        # session.connect, auth, file.open, file.close, file.rename, file.remove,
                     # dir.mkdir, dir.rmdir, file.setstat, sftp.refused (what the user's rules
                     # or the home's bounds did not allow), session.disconnect, session.closed
                     # (gateway's report), user.add, user.set, user.remove, ban.add, ban.remove
    ts: float = 0.0                    # unix time; 0 = now
    node_id: str = ""
    session_id: str = ""               # 16 hex digits of the PNC session id, "" for admin events
    username: str = ""
    client_ip: str = ""
    client_port: int = 0
    gateway: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    id: int = 0                        # assigned by the store


class StoreError(Exception):
    """A store operation failed; the message says what and what to do."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Store(Protocol):
    url: str

    # users
    def add_user(self, user: User) -> None: ...          # AlreadyExists
    def update_user(self, user: User) -> None: ...       # NotFound
    def remove_user(self, name: str) -> None: ...        # NotFound
    def get_user(self, name: str) -> User | None: ...
    def list_users(self) -> list[User]: ...
    def get_users(self, names: Collection[str]) -> list[User]: ...  # those that exist, any order

    # bans
    def add_ban(self, ip: str, until: float, reason: str, *, history_since: float = 0.0,
                at: float | None = None) -> BanEntry: ...  # level restarts if last ban older
    def remove_ban(self, ip: str) -> bool: ...
    def active_bans(self, now: float | None = None) -> list[BanEntry]: ...
    def ban_level(self, ip: str, since: float = 0.0) -> int: ...  # past bans (last one >= since)

    # session caps (leases shared by every node on the store)
    def claim_session(self, session_id: str, username: str, node_id: str, limit: int, *,
                      until: float, now: float | None = None) -> bool: ...
    def renew_sessions(self, session_ids: list[str], until: float) -> None: ...
    def release_session(self, session_id: str) -> None: ...

    # defender
    def record_auth_failure(self, ip: str, ts: float) -> None: ...
    def count_auth_failures(self, ip: str, since: float) -> int: ...
    def clear_auth_failures(self, ip: str | None = None,
                            before: float | None = None) -> int: ...  # forget (after a ban/prune)

    # audit (append-only)
    def append_audit(self, events: list[AuditEvent]) -> None: ...
    def query_audit(self, *, username: str | None = None, ip: str | None = None,
                    since: float | None = None, session_id: str | None = None,
                    kind: str | None = None, limit: int = 1000) -> list[AuditEvent]: ...
    # `ip`: an address (events stored with that text) or a network such as 10.0.0.0/8
    # (events whose address lies in it, IPv4-mapped as IPv4; bans of networks inside it)

    def atomic(self) -> AbstractContextManager[None]: ...  # calls inside: one transaction

    def close(self) -> None: ...
