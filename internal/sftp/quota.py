"""Per-user storage quotas, enforced while data arrives rather than after the fact.

A user's figures (bytes and files stored) live in a small ledger file in the user's root,
shared by every process that serves that root: the workers of a node, and the nodes of a
shared files root. It is read and changed under a lock, so parallel uploads through different
processes cannot each use the whole remaining quota. The root is scanned when the first
process takes the ledger (no other holds it: after a restart or a crash, the figures may be
stale); from then on every write, truncate, remove and rename adjusts the figures
arithmetically, so a large upload costs no disk walk per block. An upload takes its growth
from the ledger CHUNK bytes at a time and gives back what it did not use when it ends.

Where the file system has no locks (ENOLCK), each process keeps its own figures, as it would
with one worker.

A quota given to a user whose sessions run is scanned while they go on: what they change
meanwhile is counted (QuotaBook.unmetered), and the root scanned again before they take
their shares if anything changed (QuotaBook.share).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from internal.sftp import cutoffs
from internal.sftp.paths import QUOTA_LEDGER, is_node_name
from internal.store.base import User

# Growth an upload takes from the shared figures at once (fewer locked updates per GB); what
# it does not use goes back when it ends, so another process is refused at most that much
# early, and only while the upload runs.
CHUNK = 8 << 20
_FIGURES = struct.Struct(">QQ")          # bytes, files, at the start of the ledger
_MUTEX, _PRESENT = 0, 1                  # lock bytes: changing the figures; holding them
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", None)
RESCANS = 3     # scans of a root that its sessions keep changing, before giving up

log = logging.getLogger(__name__)


class QuotaExceeded(Exception):
    """A write would take the user over a limit; the message is meant for the client."""


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _lock(fd: int, kind: int, byte: int, *, wait: bool = True) -> None:
    """A lock on one byte of the ledger, owned by this descriptor (an open file description
    lock: a process's other descriptors of the file neither share nor drop it)."""
    if _OFD_SETLK is None or _OFD_SETLKW is None:   # not Linux: per-process POSIX locks
        flags = {fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_RDLCK: fcntl.LOCK_SH,
                 fcntl.F_UNLCK: fcntl.LOCK_UN}[kind]
        fcntl.lockf(fd, flags | (0 if wait else fcntl.LOCK_NB), 1, byte)
        return
    fcntl.fcntl(fd, _OFD_SETLKW if wait else _OFD_SETLK,
                struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, byte, 1, 0))


class Ledger:
    """One user's figures in their root, shared through the file system. Each process holding
    it keeps a shared lock on one byte; the first to take it finds no other and rescans."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.rescanned = False

    @classmethod
    def join(cls, root: str | bytes) -> "Ledger | None":
        """Open and hold the ledger of `root`, rescanned if no other process holds it; None
        where the file system has no locks. Blocking: run it in a thread."""
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(QUOTA_LEDGER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        ledger = cls(fd)
        try:
            with ledger.locked():
                ledger.rescanned = ledger._scan_if_alone(root)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        return ledger

    def rescan_alone(self, root: str | bytes) -> bool:
        """Scan `root` into the figures again, unless another process holds them (what its
        uploads took would be lost): then False. Blocking."""
        with self.locked():
            return self._scan_if_alone(root)

    def _scan_if_alone(self, root: str | bytes) -> bool:
        """With the mutex held: scan `root` into the figures if no other process holds them
        (alone, they may be stale; held elsewhere, they are live), then hold them."""
        try:
            _lock(self.fd, fcntl.F_WRLCK, _PRESENT, wait=False)
        except BlockingIOError:
            _lock(self.fd, fcntl.F_RDLCK, _PRESENT)   # a no-op where held already
            return False
        try:
            self.write(*scan_home(root))
        finally:
            _lock(self.fd, fcntl.F_RDLCK, _PRESENT)
        return True

    @contextmanager
    def locked(self) -> Iterator[None]:
        _lock(self.fd, fcntl.F_WRLCK, _MUTEX)
        try:
            yield
        finally:
            _lock(self.fd, fcntl.F_UNLCK, _MUTEX)

    def read(self) -> tuple[int, int]:
        data = os.pread(self.fd, _FIGURES.size, 0)
        return _FIGURES.unpack(data) if len(data) == _FIGURES.size else (0, 0)

    def write(self, used_bytes: int, used_files: int) -> None:
        os.pwrite(self.fd, _FIGURES.pack(max(used_bytes, 0), max(used_files, 0)), 0)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)      # and with it this process's hold


class Usage:
    """What one user stores, and the limits that apply to it: in the shared ledger, or (where
    there is none) in this process alone."""

    def __init__(self, username: str, ledger: Ledger | None, used_bytes: int, used_files: int,
                 limit_bytes: int | None, limit_files: int | None) -> None:
        self.username = username
        self.limit_bytes = limit_bytes
        self.limit_files = limit_files
        self._ledger = ledger
        self._local = (used_bytes, used_files)    # the figures without a ledger
        self._reserved = 0                        # taken from the figures, not used yet
        self._lock = threading.Lock()   # SFTP work may run in worker threads
        self.scanned_at = 0     # QuotaBook's count of unmetered changes when last scanned

    @contextmanager
    def _figures(self) -> Iterator[list[int]]:
        """The figures, to read and change in place, under the ledger's lock."""
        if self._ledger is None:
            figures = list(self._local)
            yield figures
            self._local = (figures[0], figures[1])
            return
        with self._ledger.locked():
            figures = list(self._ledger.read())
            before = list(figures)
            yield figures
            if figures != before:
                self._ledger.write(figures[0], figures[1])

    def charge(self, nbytes: int = 0, nfiles: int = 0, *, ahead: bool = False) -> None:
        """Take `nbytes`/`nfiles` from the quota, or raise QuotaExceeded and take nothing.
        `ahead`: a stream of charges (an upload's writes) takes CHUNK at a time."""
        with self._lock:
            if nfiles <= 0 and 0 < nbytes <= self._reserved:
                self._reserved -= nbytes
                return
            need = max(nbytes - self._reserved, 0)
            with self._figures() as figures:
                used, files = figures
                if need and self.limit_bytes is not None and used + need > self.limit_bytes:
                    raise QuotaExceeded(
                        f"quota exceeded: {self.username} may store {_human(self.limit_bytes)} "
                        f"and already uses {_human(used)}; delete files or ask for a larger "
                        "quota")
                if nfiles > 0 and self.limit_files is not None \
                        and files + nfiles > self.limit_files:
                    raise QuotaExceeded(
                        f"quota exceeded: {self.username} may store {self.limit_files} files "
                        f"and already has {files}; delete files or ask for a larger quota")
                take = need
                if need and ahead:
                    room = CHUNK if self.limit_bytes is None else self.limit_bytes - used
                    take = max(need, min(CHUNK, room))
                figures[0] = used + take
                figures[1] = files + max(nfiles, 0)
            if nbytes > 0:
                self._reserved += take - nbytes

    def adjust(self, nbytes: int = 0, nfiles: int = 0) -> None:
        """Record a change that already happened (a removal, a commit); never refuses."""
        with self._lock, self._figures() as figures:
            figures[0] = max(0, figures[0] + nbytes)
            figures[1] = max(0, figures[1] + nfiles)

    def settle(self) -> None:
        """Give back what was taken ahead and not used (an upload ended)."""
        with self._lock:
            if self._reserved:
                with self._figures() as figures:
                    figures[0] = max(0, figures[0] - self._reserved)
                self._reserved = 0

    def used(self) -> tuple[int, int]:
        """Bytes and files, as the figures say now."""
        with self._lock, self._figures() as figures:
            return figures[0], figures[1]

    def rescan(self, root: str | bytes) -> bool:
        """The figures from a new scan of `root`; False (and unchanged) if shares of them are
        held elsewhere. For a root no channel here charges yet. Blocking."""
        with self._lock:
            if self._reserved:
                return False
            if self._ledger is None:
                self._local = scan_home(root)
                return True
            return self._ledger.rescan_alone(root)

    def move(self, ledger: Ledger | None, used_bytes: int, used_files: int) -> None:
        """The user's root moved: the figures are the new root's from now on."""
        self.settle()
        with self._lock:
            old, self._ledger = self._ledger, ledger
            self._local = (used_bytes, used_files)
        if old is not None:
            old.close()

    def close(self) -> None:
        self.settle()
        if self._ledger is not None:
            self._ledger.close()


def scan_home(root: str | bytes) -> tuple[int, int]:
    """Bytes and regular files under `root`, not following symlinks, temporaries excluded
    but for the bytes of cut-off overwrites (internal.sftp.cutoffs)."""
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
                elif stat.S_ISREG(st.st_mode):
                    name = os.fsencode(entry.name)
                    if not is_node_name(name):
                        total += st.st_size
                        files += 1
                    elif cutoffs.is_cutoff(name):     # data kept for a resume counts too
                        total += st.st_size
    return total, files


def give_back(root: str | bytes, nbytes: int) -> None:
    """`nbytes` the node removed from `root` outside any session (cut-off data that expired):
    taken off the root's ledger if it has one, so processes holding it see them gone now
    rather than at their next rescan. Blocking."""
    if not os.path.exists(os.path.join(os.fsencode(root), QUOTA_LEDGER)):
        return          # a user without a quota
    ledger = Ledger.join(root)
    if ledger is None:
        return
    try:
        if not ledger.rescanned:        # a fresh scan has them gone already
            with ledger.locked():
                used, files = ledger.read()
                ledger.write(used - nbytes, files)
    finally:
        ledger.close()


async def _open_figures(user: User) -> tuple[Ledger | None, int, int]:
    """The shared ledger of the user's root, or (no locks there) a scan of this process's."""
    ledger = await asyncio.to_thread(Ledger.join, user.home)
    if ledger is not None:
        return ledger, 0, 0
    used, files = await asyncio.to_thread(scan_home, user.home)
    return None, used, files


class QuotaBook:
    """This process's `Usage` per user with a quota; dropped (the ledger let go) when the
    user's last session here ends, so that changes made outside SFTP are picked up by the
    scan of whichever process takes the ledger first next."""

    def __init__(self) -> None:
        self._usage: dict[str, tuple[Usage, int]] = {}
        self._lock = asyncio.Lock()
        # per user: changes done and under way by channels without a share (unmetered)
        self._unmetered: dict[str, list[int]] = {}

    @contextmanager
    def unmetered(self, username: str) -> Iterator[None]:
        """Around an operation of a channel without a share (its user had no quota) that may
        change what a scan of the root counts: a quota's figures scanned meanwhile may miss it
        (share). On the event loop's thread."""
        count = self._unmetered.setdefault(username, [0, 0])
        count[1] += 1
        try:
            yield
        finally:
            count[1] -= 1
            count[0] += 1
            if not count[1] and username not in self._usage and not self._lock.locked():
                del self._unmetered[username]   # no figures to check against: start again

    def _changes(self, username: str) -> tuple[int, int]:
        done, under_way = self._unmetered.get(username, (0, 0))
        return done, under_way

    async def share(self, user: User, count: int, metered_here: Callable[[], bool]) -> Usage:
        """`count` shares of `user`'s figures for channels that ran without one (the user was
        given a quota): what they changed since the figures were scanned, or are changing,
        may be missing from them or counted twice. The root is then scanned again, unless a
        channel here (`metered_here`) or another process holds a share, whose charges that
        would lose: a warning then. The caller hands out the shares with no await after
        this, so that they change nothing meanwhile."""
        async with self._lock:
            usage = await self._take(user, count)
            for _ in range(RESCANS):
                done, under_way = self._changes(user.name)
                if not under_way and done == usage.scanned_at:
                    return usage
                if metered_here() or not await self._rescan(usage, user):
                    break
                usage.scanned_at = done
            log.warning("user %s: files changed while a new quota's figures were made; they may "
                        "be off by those changes until the root is scanned again (when no "
                        "session of the user runs)", user.name)
            usage.scanned_at = self._changes(user.name)[0]
            return usage

    @staticmethod
    async def _rescan(usage: Usage, user: User) -> bool:
        try:
            return await asyncio.to_thread(usage.rescan, user.home)
        except OSError as exc:      # the ledger cannot be written: its figures stand
            log.error("user %s: cannot rescan the root for the quota: %s", user.name, exc)
            return False

    async def acquire(self, user: User) -> Usage | None:
        """The shared usage for `user`, with limits taken from this (freshest) record."""
        if user.quota_bytes is None and user.quota_files is None:
            return None
        async with self._lock:
            return await self._take(user, 1)

    async def _take(self, user: User, count: int) -> Usage:
        held = self._usage.get(user.name)
        if held is None:
            scanned_at = self._changes(user.name)[0]
            ledger, used, files = await _open_figures(user)
            usage = Usage(user.name, ledger, used, files, user.quota_bytes, user.quota_files)
            usage.scanned_at = scanned_at
            self._usage[user.name] = (usage, count)
            return usage
        usage, refs = held
        usage.limit_bytes, usage.limit_files = user.quota_bytes, user.quota_files
        self._usage[user.name] = (usage, refs + count)
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
                usage.move(*await _open_figures(user))

    def release(self, username: str) -> None:
        held = self._usage.get(username)
        if held is None:
            return
        usage, refs = held
        if refs <= 1:
            del self._usage[username]
            usage.close()
        else:
            self._usage[username] = (usage, refs - 1)
