"""What the admin commands share: the home's store, and an audit event for every change."""
from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from internal.home import NodeHome
from internal.store import AuditEvent, Store, StoreError, open_store


@contextmanager
def home_store(home: NodeHome) -> Iterator[Store]:
    """The home's store; store errors become one clear line instead of a traceback."""
    try:
        store = open_store(home.db_url)
    except StoreError as exc:
        raise click.ClickException(f"cannot open the store: {exc}") from None
    try:
        yield store
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except UnicodeError as exc:
        # a name, reason or path with bytes that are not UTF-8 (argv is decoded with
        # surrogateescape): the store's driver cannot encode it
        what = exc.object if isinstance(exc, UnicodeEncodeError) else None
        raise click.ClickException(not_utf8(what) if isinstance(what, str) else
                                   f"the store cannot take or give this text: {exc}") from None
    finally:
        store.close()


def shown(text: str) -> str:
    """`text` quoted for an error message, bytes that are not UTF-8 as the \\xNN typed."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:    # a surrogate that no undecodable byte gives: show it escaped
        return ascii(text)
    return f"'{text}'" if len(text) <= 60 else f"'{text[:50]}...' ({len(text)} characters)"


def not_utf8(text: str) -> str:
    return f"{shown(text)} is not valid UTF-8; the store keeps names, reasons and paths as text"


def require_utf8(text: str) -> None:
    """Refuse text the store could not keep, before anything (a directory) is made for it."""
    try:
        text.encode("utf-8")
    except UnicodeError:
        raise click.ClickException(not_utf8(text)) from None


@contextmanager
def admin_change(home: NodeHome) -> Iterator[Store]:
    """The store for a command that changes something: the change and its audit event
    (record_admin) are one transaction, so neither is stored without the other."""
    with home_store(home) as store, store.atomic():
        yield store


def actor() -> str:
    """Who ran the command, for the audit trail (the sudo caller when there is one)."""
    try:
        me = getpass.getuser()
    except Exception:
        me = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (via sudo as {me})" if sudo and sudo != me else me


def record_admin(store: Store, home: NodeHome, kind: str, *, username: str = "",
                 client_ip: str = "", detail: dict[str, Any] | None = None) -> None:
    """Write one admin audit event synchronously: the change is not done until it is logged
    (inside admin_change, in the change's own transaction)."""
    store.append_audit([AuditEvent(kind=kind, node_id=home.node_id, username=username,
                                   client_ip=client_ip,
                                   detail={"actor": actor(), **(detail or {})})])
