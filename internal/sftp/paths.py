"""Confinement: every SFTP path is mapped into the user's home and checked there, every time.

Clients name paths as if the home were `/`. A client path is normalised lexically first (so `..`
and absolute paths cannot climb above `/`), then resolved on disk with realpath semantics, and
the result must still lie inside the home. Normalising drops a trailing `/`, which POSIX reads
as "this must be a directory"; that meaning is kept by a check of its own (`remove file/` is
refused, as `rm file/` is). Resolution happens on each operation, not once, so
a symlink that points outside (planted on disk, or one made to escape later by moving the
directory it lives in) never gives access. Between the check and the system call a concurrent
rename could still swap a directory for a symlink, so descriptors are opened with O_NOFOLLOW and
re-checked through /proc afterwards; operations on names go through a verified directory
descriptor (`*at` calls), which leaves no window at all. Calls that only look (stat, lstat,
statvfs) act on an O_PATH descriptor opened and verified the same way, never on the path string
again; readlink and a listing's `..` go through a verified directory descriptor.
"""
from __future__ import annotations

import errno
import os
import posixpath
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager

TEMP_PREFIX = b".edgegw-upload-"
TEMP_SUFFIX = b".tmp"
_PROC_FD = b"/proc/self/fd/"
_HAVE_PROC = os.path.isdir("/proc/self/fd")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_PATH needs no read permission and opens FIFOs and devices without side effects; Linux-only,
# like the /proc check, so elsewhere fall back to a non-blocking read-only open.
PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK)


class AccessDenied(PermissionError):
    """The path or operation is off limits; the message says why (sent to the client)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


def is_temp_name(name: bytes) -> bool:
    """Upload temporaries are the node's business: hidden from listings, untouchable by name."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


# The quota figures shared by the processes serving a user's root (internal.sftp.quota).
QUOTA_LEDGER = b".edgegw-quota"


def is_node_name(name: bytes) -> bool:
    """Names in a user's root that are the node's, not the user's: never listed, opened,
    counted or changed through SFTP."""
    return is_temp_name(name) or name == QUOTA_LEDGER


def lstat_at(name: bytes, dir_fd: int) -> os.stat_result | None:
    """The name's own status in a directory, or None when nothing has that name."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _require_directory(real: bytes, follow: bool) -> None:
    """ENOTDIR if `real` exists and is not a directory (with `follow=False`, not one itself: a
    link to a directory named with a trailing `/` is refused, as Linux refuses rmdir("link/")).
    A path that does not exist passes: mkdir creates it, and every other call fails on its own."""
    try:
        st = os.stat(real, follow_symlinks=follow)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (the path ends in '/')")


def new_temp_name() -> bytes:
    return TEMP_PREFIX + secrets.token_hex(8).encode() + TEMP_SUFFIX


class Jail:
    """One user's home seen as `/`: maps, resolves and verifies paths inside it."""

    def __init__(self, root: str | bytes | os.PathLike[str]) -> None:
        self.root: bytes = os.path.realpath(os.fsencode(root))
        self._prefix = self.root.rstrip(b"/") + b"/"

    # -- mapping ---------------------------------------------------------------------------
    @staticmethod
    def virtual(path: bytes) -> bytes:
        """The client path as an absolute, normalised path under the virtual `/`."""
        if b"\0" in path:
            raise ValueError("path contains a NUL byte")
        norm = posixpath.normpath(posixpath.join(b"/", path))
        return b"/" + norm.lstrip(b"/")

    @staticmethod
    def names_directory(path: bytes) -> bool:
        """The client path ends in `/` or `/.`, so it may only name a directory (the home's
        own `/` is one anyway)."""
        return path.endswith((b"/", b"/.")) and path.strip(b"/.") != b""

    def local(self, path: bytes) -> bytes:
        """Lexical mapping into the home, before any symlink is looked at."""
        rel = self.virtual(path).lstrip(b"/")
        return posixpath.join(self.root, rel) if rel else self.root

    def inside(self, local: bytes) -> bool:
        return local == self.root or local.startswith(self._prefix)

    def client_path(self, local: bytes) -> bytes:
        """The name the client sees for a resolved local path."""
        if local == self.root:
            return b"/"
        if not local.startswith(self._prefix):
            raise AccessDenied("permission denied: the path leads outside your home directory")
        return b"/" + local[len(self._prefix):]

    def resolve(self, path: bytes, *, follow: bool = True) -> bytes:
        """The real local path for a client path, verified to lie inside the home.

        With `follow=False` the last component is left alone (lstat, remove, rename, readlink
        act on a link itself); only the directory it sits in is resolved.
        """
        local = self.local(path)
        name = posixpath.basename(local)
        if is_node_name(name):
            raise FileNotFoundError(errno.ENOENT, "no such file")
        if follow or local == self.root:
            real = os.path.realpath(local)
        else:
            real = posixpath.join(os.path.realpath(posixpath.dirname(local)), name)
        if not self.inside(real):
            raise AccessDenied("permission denied: the path leads outside your home directory")
        if is_node_name(posixpath.basename(real)):
            # a symlink to the quota ledger or a temporary: the node's files stay the node's
            raise FileNotFoundError(errno.ENOENT, "no such file")
        if self.names_directory(path):
            _require_directory(real, follow)
        return real

    def link_target(self, target: bytes, link_local: bytes) -> bytes:
        """What a new symlink at `link_local` should store for a client-supplied `target`.

        The target is interpreted as the client would (absolute = from the home's `/`), must
        resolve inside the home, and is stored relative so that the home can be moved.
        """
        link_dir = posixpath.dirname(link_local)
        if target.startswith(b"/"):
            dest = self.local(target)
        else:
            dest = posixpath.normpath(posixpath.join(link_dir, target))
        real = os.path.realpath(dest)
        if not self.inside(dest) or not self.inside(real):
            raise AccessDenied("permission denied: a link may only point inside your home "
                               "directory")
        if is_node_name(posixpath.basename(dest)) or is_node_name(posixpath.basename(real)):
            raise AccessDenied("permission denied: a link may not point to the node's own "
                               "files")
        return posixpath.relpath(dest, link_dir)

    # -- descriptors -----------------------------------------------------------------------
    @staticmethod
    def locate(fd: int) -> bytes:
        """Where a descriptor really is now, from /proc; b"" when that cannot be told."""
        try:
            return os.readlink(_PROC_FD + str(fd).encode())
        except OSError:
            return b""

    def verify_fd(self, fd: int) -> None:
        """Close `fd` and refuse if what it opened is not inside the home (a lost race)."""
        if not _HAVE_PROC:
            return
        if not self.inside(self.locate(fd)):
            os.close(fd)
            raise AccessDenied("permission denied: the path changed while it was being "
                               "opened and now leads outside your home directory")

    def open(self, real: bytes, flags: int, mode: int = 0o600) -> int:
        """Open a resolved path without following a last-moment symlink, then verify it."""
        fd = os.open(real, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        self.verify_fd(fd)
        return fd

    def open_path(self, path: bytes, *, follow: bool = True) -> int:
        """A verified O_PATH descriptor of what a client path names, for calls that only look
        (fstat, fstatvfs). With `follow=False` it is the last component itself."""
        fd = self.open(self.resolve(path, follow=follow), PATH_FLAGS)
        if follow and stat.S_ISLNK(os.fstat(fd).st_mode):
            # resolve() saw no link there; one was swapped in since, and O_NOFOLLOW caught it
            os.close(fd)
            raise OSError(errno.ELOOP, "the path changed while it was being looked up")
        return fd

    @contextmanager
    def looked_up(self, path: bytes, *, follow: bool = True) -> Iterator[int]:
        """`open_path` as a context: the descriptor is closed afterwards."""
        fd = self.open_path(path, follow=follow)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_parent(self, real: bytes) -> tuple[int, bytes]:
        """A verified descriptor of `real`'s directory and its last name, for `*at` calls."""
        if real == self.root:
            raise AccessDenied("permission denied: the home directory itself cannot be "
                               "changed this way")
        parent, name = posixpath.split(real)
        return self.open(parent, DIR_FLAGS), name

    @contextmanager
    def parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """For operations on a client path's name itself (the last component not followed):
        a verified directory descriptor and the name, closed afterwards."""
        dir_fd, name = self.open_parent(self.resolve(path, follow=False))
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)

    def open_dir(self, real: bytes) -> int:
        return self.open(real, DIR_FLAGS)
