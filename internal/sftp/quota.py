"""Per-user storage quotas, enforced while data arrives rather than after the fact.

The home is scanned once, when the first session of a user with a quota starts on this node;
from then on every write, truncate, remove and rename adjusts the figures arithmetically, so a
large upload costs no disk walk per block. Sessions of the same user share one `Usage`, so two
parallel uploads cannot each use the whole remaining quota.
"""
from __future__ import annotations

import asyncio
import os
import stat
import threading

from internal.sftp.paths import is_temp_name
from internal.store.base import User


class QuotaExceeded(Exception):
    """A write would take the user over a limit; the message is meant for the client."""


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Usage:
    """What one user stores on this node, and the limits that apply to it."""

    def __init__(self, username: str, used_bytes: int, used_files: int,
                 limit_bytes: int | None, limit_files: int | None) -> None:
        self.username = username
        self.bytes = used_bytes
        self.files = used_files
        self.limit_bytes = limit_bytes
        self.limit_files = limit_files
        self._lock = threading.Lock()   # SFTP work may run in worker threads

    def charge(self, nbytes: int = 0, nfiles: int = 0) -> None:
        """Take `nbytes`/`nfiles` from the quota, or raise QuotaExceeded and take nothing."""
        with self._lock:
            if nbytes > 0 and self.limit_bytes is not None \
                    and self.bytes + nbytes > self.limit_bytes:
                raise QuotaExceeded(
                    f"quota exceeded: {self.username} may store {_human(self.limit_bytes)} and "
                    f"already uses {_human(self.bytes)}; delete files or ask for a larger quota")
            if nfiles > 0 and self.limit_files is not None \
                    and self.files + nfiles > self.limit_files:
                raise QuotaExceeded(
                    f"quota exceeded: {self.username} may store {self.limit_files} files and "
                    f"already has {self.files}; delete files or ask for a larger quota")
            self.bytes += nbytes
            self.files += nfiles

    def reset(self, used_bytes: int, used_files: int) -> None:
        """Figures from a new scan (the user's root moved)."""
        with self._lock:
            self.bytes = used_bytes
            self.files = used_files

    def adjust(self, nbytes: int = 0, nfiles: int = 0) -> None:
        """Record a change that already happened (a removal, a commit); never refuses."""
        with self._lock:
            self.bytes = max(0, self.bytes + nbytes)
            self.files = max(0, self.files + nfiles)


def scan_home(root: str | bytes) -> tuple[int, int]:
    """Bytes and regular files under `root`, not following symlinks, temporaries excluded."""
    total = files = 0
    stack = [os.fsencode(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode) and not is_temp_name(entry.name):
                    total += st.st_size
                    files += 1
    return total, files


class QuotaBook:
    """The node's live `Usage` per user with a quota; dropped when the user's last session ends
    so that changes made outside SFTP are picked up by the next scan."""

    def __init__(self) -> None:
        self._usage: dict[str, tuple[Usage, int]] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, user: User) -> Usage | None:
        """The shared usage for `user`, with limits taken from this (freshest) record."""
        if user.quota_bytes is None and user.quota_files is None:
            return None
        async with self._lock:
            held = self._usage.get(user.name)
            if held is None:
                used, files = await asyncio.to_thread(scan_home, user.home)
                usage = Usage(user.name, used, files, user.quota_bytes, user.quota_files)
                self._usage[user.name] = (usage, 1)
                return usage
            usage, refs = held
            usage.limit_bytes, usage.limit_files = user.quota_bytes, user.quota_files
            self._usage[user.name] = (usage, refs + 1)
            return usage

    async def update(self, user: User, *, rescan: bool = False) -> None:
        """A newer record of a user with sessions here: its limits apply from now on and, with
        `rescan` (the user's root moved), the figures are those of the new root."""
        async with self._lock:
            held = self._usage.get(user.name)
            if held is None:
                return
            usage = held[0]
            usage.limit_bytes, usage.limit_files = user.quota_bytes, user.quota_files
            if rescan:
                usage.reset(*await asyncio.to_thread(scan_home, user.home))

    def release(self, username: str) -> None:
        held = self._usage.get(username)
        if held is None:
            return
        usage, refs = held
        if refs <= 1:
            del self._usage[username]
        else:
            self._usage[username] = (usage, refs - 1)
