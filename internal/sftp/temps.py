"""Upload temporaries: whether a live upload holds one (in this process or another, on this
node or another sharing the files root), creating and locking them, and removing those a
crash left (the node's sweep, and rmdir of a directory that lists as empty)."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from internal.sftp import cutoffs
from internal.sftp.paths import TEMP_PREFIX, TEMP_SUFFIX, is_temp_name

log = logging.getLogger(__name__)

# Each upload holds an flock() on its temporary while it runs, so a sweep (or an exclusive
# open) in any process tells a crashed session's leftover from a live upload, however long the
# client pauses. Temporaries this process writes are also listed here, by directory and name:
# where flock() is emulated with POSIX locks (NFS) a lock does not conflict within a process.
_live: set[tuple[int, int, bytes]] = set()
# A temporary not locked yet may be one that was created a moment ago (it is locked right
# after): one as fresh as this counts as live.
_LOCK_GRACE = 10.0


def _live_key(dir_fd: int, name: bytes) -> tuple[int, int, bytes]:
    st = os.fstat(dir_fd)
    return st.st_dev, st.st_ino, name


def temp_in_use(name: bytes, dir_fd: int, *, grace: bool = True) -> bool:
    """Whether a live upload, in this process or another, is writing temporary `name`
    (`grace=False`: only one that holds its lock; a crash's leftover touched a moment ago is
    not live). Kept data of a cut-off overwrite is never in use."""
    if cutoffs.is_kept(name):
        return False
    if _live_key(dir_fd, name) in _live:
        return True
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        if grace and time.time() - os.fstat(fd).st_mtime < _LOCK_GRACE:
            return True
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def exclusive_temp_name(name: bytes) -> bytes:
    """The one temporary an exclusive upload of `name` may use (in the same directory), so a
    second exclusive open of the name fails at once, in any process or node, as it would if
    the file existed, though the file appears under its name only when complete."""
    digest = hashlib.blake2b(name, digest_size=8).hexdigest().encode()
    return TEMP_PREFIX + b"x" + digest + TEMP_SUFFIX


def forget(dir_fd: int, name: bytes) -> None:
    """This process no longer writes temporary `name` (renamed, kept or removed)."""
    _live.discard(_live_key(dir_fd, name))


def create_temp(temp: bytes, dir_fd: int) -> int:
    """Create and lock an upload's temporary. An exclusive upload's (fixed name) may be left by
    a crashed session: if nothing holds it, it is replaced; if a live upload does, the name
    is being uploaded and the open fails as for an existing file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        if temp_in_use(temp, dir_fd):
            raise FileExistsError(errno.EEXIST, "the file is being uploaded") from None
        unlink_quietly(temp, dir_fd)
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):   # no locks here: grace only
            os.close(fd)
            unlink_quietly(temp, dir_fd)
            raise
    _live.add(_live_key(dir_fd, temp))
    return fd


def unlink_quietly(name: bytes, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove upload temporary %r: %s", name, exc)


def clear_leftovers(dir_fd: int) -> tuple[bool, int, int]:
    """For rmdir of a directory that lists as empty over SFTP yet is not empty on disk: if it
    holds nothing but upload temporaries, remove those no live upload holds. Returns whether
    it held only temporaries, how many of them are live (an upload into it runs), and the
    bytes of cut-off overwrites removed (the quota counts those)."""
    live = freed = 0
    for name in map(os.fsencode, os.listdir(dir_fd)):   # listdir(fd) gives str names
        if not is_temp_name(name):
            return False, 0, freed
        if temp_in_use(name, dir_fd):
            live += 1
            continue
        if cutoffs.is_cutoff(name):
            try:
                freed += os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
        unlink_quietly(name, dir_fd)
    return True, live, freed


def sweep_temps(root: str | bytes, older_than: float = 0.0,
                expired: Callable[[bytes, int], None] | None = None) -> int:
    """Remove upload temporaries left under `root` by a crash: untouched for `older_than`
    seconds and held by no live upload; and cut-off data kept longer than cutoffs.KEEP, each
    reported to `expired(directory, size)` (the quota counts it). Returns how many went."""
    removed = 0
    now = time.time()
    limit = now - older_than
    for dirpath, _dirs, files in os.walk(os.fsencode(root)):
        for name in files:
            if not (name.startswith(TEMP_PREFIX) and is_temp_name(name)):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if cutoffs.is_kept(name):
                    if st.st_mtime <= now - cutoffs.KEEP:
                        os.unlink(path)
                        removed += 1
                        if expired is not None:
                            expired(dirpath, st.st_size)
                elif st.st_mtime <= limit and not _held(dirpath, name):
                    if cutoffs.is_cutoff(name):     # a crashed overwrite: kept for a resume
                        with _opened(dirpath) as dir_fd:
                            cutoffs.adopt(name, dir_fd)
                    else:
                        os.unlink(path)
                        removed += 1
            except OSError as exc:
                log.warning("cannot sweep upload temporary %r: %s", path, exc)
    return removed


@contextmanager
def _opened(dirpath: bytes) -> Iterator[int]:
    dir_fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def _held(dirpath: bytes, name: bytes) -> bool:
    with _opened(dirpath) as dir_fd:
        return temp_in_use(name, dir_fd)
