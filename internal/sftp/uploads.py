"""Open files: plain downloads, and uploads that appear under their name only when complete.

An upload writes to a hidden temporary in the target directory and is renamed over the final
name only when the client closes the handle. A client that vanishes mid-transfer leaves the old
file (or nothing) under the final name; its temporary is removed when the session ends, and any
left by a crash are swept by the node (at startup, then every 15 minutes): those no live upload
holds a lock on, once a minute old. A write into an existing file without truncation (resume,
append, random access) starts from a copy of the file, so readers never see a half-rewritten
file either; an overwrite that is cut off keeps what it had stored for a resume
(internal.sftp.cutoffs). I/O is positional (`pread`/`pwrite`): one system call per SFTP request.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from asyncssh import SFTPAttrs, SFTPInvalidParameter

from internal.sftp import cutoffs, temps
from internal.sftp.filecopy import copy_file, copy_range, pwrite_all
from internal.sftp.paths import AccessDenied, Jail, lstat_at, new_temp_name
from internal.sftp.quota import QuotaExceeded, Usage

log = logging.getLogger(__name__)


class OpenFile:
    """A file opened for reading; counts bytes for the audit trail, not per-block events."""

    writable = False
    readable = True

    def __init__(self, fd: int, client_path: bytes) -> None:
        self.fd = fd
        self.client_path = client_path
        self.bytes_read = 0
        self.bytes_written = 0

    @classmethod
    def open_read(cls, jail: Jail, real: bytes, client_path: bytes) -> "OpenFile":
        """Open a regular file for download (O_NONBLOCK so a planted FIFO cannot hang us)."""
        fd = jail.open(real, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file")
        return cls(fd, client_path)

    def fileno(self) -> int:
        return self.fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Used by the sparse-ranges extension (SEEK_DATA / SEEK_HOLE)."""
        return os.lseek(self.fd, offset, whence)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        self.bytes_read += len(data)
        return data

    def write(self, offset: int, data: bytes) -> int:
        raise PermissionError(errno.EBADF, "the file was opened for reading only")

    def truncate(self, size: int) -> None:
        raise PermissionError(errno.EBADF, "the file was opened for reading only")

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


# Names that are clients' own temporaries by default (Upload.start_in_place): WinSCP's.
PARTIAL_SUFFIXES = (b".filepart",)

class Upload(OpenFile):
    """A file being written: a temporary that replaces the final name on `commit()`."""

    writable = True

    def __init__(self, fd: int, client_path: bytes, dir_fd: int, temp: bytes, name: bytes, *,
                 append: bool, exclusive: bool, usage: Usage | None, credit: int,
                 new_file: bool, readable: bool = True) -> None:
        super().__init__(fd, client_path)
        self.readable = readable        # opened with READ: a write-only handle reads nothing
        self.dir_fd = dir_fd
        self.temp = temp
        self.name = name
        self.append = append
        self.exclusive = exclusive
        self.usage = usage
        self.credit = credit            # size of the file being replaced: rewriting it is free
        self.size = os.fstat(fd).st_size
        self.high = max(credit, self.size)   # quota is charged for growth beyond this mark
        self.new_file = new_file
        self.failed: Exception | None = None
        self.original: tuple[int, tuple[int, int]] | None = None   # see _hold_original
        # An overwrite of an existing file (internal.sftp.cutoffs): its stem, and how far from
        # the start its temporary holds the new file without a gap, which is what a cut-off
        # keeps for a resume.
        self.stem: bytes | None = None
        self.prefix = 0
        self.in_place = False           # see start_in_place
        self._quota_lock = threading.Lock()   # _grow (maybe in a copy's thread) and adopt

    @classmethod
    def start_in_place(cls, jail: Jail, real: bytes, client_path: bytes, *, truncate: bool,
                       append: bool, exclusive: bool, create: bool, perms: int,
                       usage: Usage | None, readable: bool = True) -> "Upload":
        """Write the file itself, not a temporary: for the client's own temporary names (a
        partial suffix such as WinSCP's `.filepart`), which the client renames when done, so
        that what a cut-off upload stored stays there to be resumed."""
        dir_fd, name = jail.open_parent(real)
        charged_file = False
        try:
            existing = lstat_at(name, dir_fd)
            if existing is None and usage is not None and create:
                usage.charge(nfiles=1)
                charged_file = True
            flags = (os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                     | (os.O_CREAT if create else 0) | (os.O_EXCL if exclusive else 0))
            fd = os.open(name, flags, perms & 0o777, dir_fd=dir_fd)
        except BaseException:
            if charged_file and usage is not None:
                usage.adjust(nfiles=-1)
            os.close(dir_fd)
            raise
        held: tuple[int, tuple[int, int]] | None = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
            # One writer at a time: each handle counts the file's growth from the size it
            # saw, so two (a client resuming while its dead session's handle lingers) would
            # charge the quota twice.
            held = _hold_original(name, dir_fd)
            credit = st.st_size if existing is not None else 0
            if truncate:
                os.ftruncate(fd, 0)
            if append:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        except BaseException:
            if held is not None:
                _let_go(held)
            os.close(fd)
            os.close(dir_fd)
            if charged_file and usage is not None:
                usage.adjust(nfiles=-1)
            raise
        upload = cls(fd, client_path, dir_fd, name, name, append=append, exclusive=exclusive,
                     usage=usage, credit=credit, new_file=existing is None, readable=readable)
        upload.in_place = True
        upload.original = held
        return upload

    @classmethod
    def start(cls, jail: Jail, real: bytes, client_path: bytes, *, truncate: bool,
              append: bool, exclusive: bool, create: bool, perms: int,
              usage: Usage | None, readable: bool = True) -> "Upload":
        """Create the temporary next to `real` (copying the existing file unless truncating).

        `exclusive` refuses an existing file now and at commit (SFTP's EXCL, or a user who may
        upload but not overwrite).
        """
        dir_fd, name = jail.open_parent(real)
        fd = -1
        temp = b""
        charged_file = False
        held: tuple[int, tuple[int, int]] | None = None
        kept: tuple[int, int] | None = None
        try:
            existing = lstat_at(name, dir_fd)
            if existing is None and not create:
                raise FileNotFoundError(errno.ENOENT, "no such file")
            stem: bytes | None = None
            if existing is not None:
                if exclusive:
                    raise FileExistsError(errno.EEXIST, "the file already exists")
                if not stat.S_ISREG(existing.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file")
                if existing.st_size and (truncate or not readable):
                    stem = cutoffs.stem(name, existing)
            elif usage is not None:
                usage.charge(nfiles=1)
                charged_file = True
            if stem is not None and truncate:     # uploaded whole: no resume needs the data
                _drop_kept(stem, dir_fd, usage)
            if existing is not None and not truncate:
                # Written from a copy that replaces the file at commit: a second such writer
                # would silently undo the first one's changes, so it is refused while the
                # first holds the file (an upload that truncates replaces it whole, last one
                # winning, as ever).
                held = _hold_original(name, dir_fd)
                kept = _kept_for_resume(stem, dir_fd, existing.st_size)
                if kept is None:
                    stem = None         # an append to the file as it is: nothing to keep
            temp = (temps.exclusive_temp_name(name) if exclusive else
                    cutoffs.live_name(stem) if stem is not None else new_temp_name())
            fd = temps.create_temp(temp, dir_fd)
            os.fchmod(fd, stat.S_IMODE(existing.st_mode) if existing else perms & 0o777)
            prefix = 0
            if kept is not None and stem is not None and existing is not None:
                copy_file(kept[0], fd, existing.st_size)    # the new file's start, not the old one
                prefix = existing.st_size
                _drop_kept(stem, dir_fd, usage)
            elif held is not None:
                copy_file(held[0], fd)
            if append:   # only now: copy_file_range refuses an O_APPEND destination
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            upload = cls(fd, client_path, dir_fd, temp, name, append=append,
                         exclusive=exclusive, usage=usage,
                         credit=existing.st_size if existing else 0, new_file=existing is None,
                         readable=readable)
            upload.original = held
            upload.stem, upload.prefix = stem, prefix
            return upload
        except BaseException:
            if held is not None:
                _let_go(held)
            if fd >= 0:
                temps.forget(dir_fd, temp)
                os.close(fd)
                temps.unlink_quietly(temp, dir_fd)
            os.close(dir_fd)
            if charged_file and usage is not None:
                usage.adjust(nfiles=-1)
            raise
        finally:
            if kept is not None:
                os.close(kept[0])

    def read(self, offset: int, size: int) -> bytes:
        if not self.readable:   # else the copy of an existing file would be readable
            raise PermissionError(errno.EBADF, "the file was opened for writing only")
        return super().read(offset, size)

    def _grow(self, end: int) -> None:
        if end > self.high:
            if self.in_place and os.fstat(self.fd).st_nlink > 1:
                # The quota counts a file once per name, as its rescan does: growth written
                # in place would grow every hard link of it, and be counted for one name only.
                raise OSError(errno.EMLINK, "the file has other names (hard links): a file "
                                            "written in place may grow under one name only")
            with self._quota_lock:
                if self.usage is not None:
                    try:
                        self.usage.charge(end - self.high, ahead=True)
                    except QuotaExceeded as exc:
                        self.failed = exc
                        raise
                self.high = end

    def adopt(self, usage: Usage) -> None:
        """A quota applied while this upload runs (an administrator's change). The figures
        were scanned without it: a temporary is not counted, a file written in place at its
        size now. So they are charged what the upload holds beyond that, as if it had been
        charged from its start, and its commit or abort then settles them as usual. Never
        refused: the bytes are stored already."""
        with self._quota_lock:
            if self.usage is not None or self.dir_fd < 0:
                return
            if self.in_place:
                usage.adjust(self.high - os.fstat(self.fd).st_size)
            else:
                usage.adjust(self.high - self.credit, int(self.new_file))
            self.usage = usage

    def write(self, offset: int, data: bytes) -> int:
        if self.failed is not None:
            raise self.failed
        if not data:    # stores nothing: neither a charge for `offset` nor a new size
            return 0
        pos = self.size if self.append else offset
        end = pos + len(data)
        self._grow(end)
        try:
            n = pwrite_all(self.fd, data, offset)
        except OSError as exc:
            self.failed = exc
            raise
        self._stored(pos, n)
        return n

    def _stored(self, pos: int, n: int) -> None:
        """`n` bytes were written at `pos`: the size, the gapless prefix and the count follow."""
        end = pos + n
        self.size = max(self.size, end)
        if pos <= self.prefix < end:
            self.prefix = end
        self.bytes_written += n

    def copy_job(self, src: OpenFile, src_offset: int, length: int, offset: int
                 ) -> Callable[[], int]:
        """A client's copy-data request: up to `length` bytes of `src` from `src_offset` (to
        its end if `length` is 0) written at `offset`, in the kernel. Returns the copy, to run
        in a thread; it returns the bytes copied. It works on duplicates of both descriptors
        taken now, so a session that closes the handles meanwhile cannot turn it onto another
        file."""
        if not src.readable:
            raise PermissionError(errno.EBADF, "the source was opened for writing only")
        fds = os.dup(src.fd), os.dup(self.fd)

        def copy() -> int:
            try:
                return self._copy_in(src, fds[0], fds[1], src_offset, length, offset)
            finally:
                os.close(fds[0])
                os.close(fds[1])
        return copy

    def _copy_in(self, src: OpenFile, src_fd: int, dst_fd: int, src_offset: int, length: int,
                 offset: int) -> int:
        if self.failed is not None:
            raise self.failed
        src_size = os.fstat(src_fd).st_size
        length = min(length or src_size, max(src_size - src_offset, 0))
        if not length:      # nothing to copy (at or past the source's end): as a write of nothing
            return 0
        pos = self.size if self.append else offset
        if os.path.samestat(os.fstat(src_fd), os.fstat(dst_fd)) and \
                src_offset < pos + length and pos < src_offset + length:
            raise SFTPInvalidParameter("invalid argument: the source and target overlap")
        self._grow(pos + length)
        try:
            n = copy_range(src_fd, src_offset, dst_fd, offset, length)
        except OSError as exc:
            self.failed = exc
            raise
        self._stored(pos, n)
        src.bytes_read += n
        return n

    def truncate(self, size: int) -> None:
        self._grow(size)
        os.ftruncate(self.fd, size)
        self.size = size
        self.prefix = min(self.prefix, size)

    def commit(self, *, durable: bool) -> None:
        """Put the data under its final name, atomically; on any failure nothing changes."""
        if self.in_place:
            if durable:
                os.fsync(self.fd)
            self._settle_in_place()
            return
        # A failed overwrite keeps what it has for a resume, as a cut-off one does: its data
        # may have started from kept data, and a resume without it would splice the new
        # file's tail onto the old file's head.
        if self.failed is not None:
            self.abort(keep=True, durable=durable)
            raise self.failed
        try:
            if durable:
                os.fsync(self.fd)
            final_size = os.fstat(self.fd).st_size
            replaced = self._replace()
        except BaseException:
            self.abort(keep=True, durable=durable)
            raise
        if durable:     # the new name too: else a power cut may bring back the old file
            try:
                os.fsync(self.dir_fd)
            except OSError as exc:
                log.error("cannot sync the directory of %r after storing it: %s",
                          self.client_path, exc)
        try:
            if self.usage is not None:
                replaced_size = replaced.st_size if replaced is not None else 0
                self.usage.adjust(final_size - replaced_size - (self.high - self.credit),
                                  int(replaced is None) - int(self.new_file))
                self.usage.settle()
        finally:    # a ledger that cannot be written must not cost the descriptors too
            self._release()

    def _replace(self) -> os.stat_result | None:
        d = self.dir_fd
        if self.exclusive:
            os.link(self.temp, self.name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
            os.unlink(self.temp, dir_fd=d)
            return None
        replaced = lstat_at(self.name, d)
        if replaced is not None and stat.S_ISDIR(replaced.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory has taken the file's name")
        os.replace(self.temp, self.name, src_dir_fd=d, dst_dir_fd=d)
        return replaced if replaced is not None and stat.S_ISREG(replaced.st_mode) else None

    def abort(self, *, keep: bool = False, durable: bool = False) -> None:
        """Drop the temporary and give back what it was charged; the final name is untouched.
        `keep` (the client left without closing, or the upload failed): an overwrite keeps the
        new data it holds up to the old file's size, for a resume (internal.sftp.cutoffs)."""
        if self.dir_fd < 0:
            return
        if self.in_place:           # what was written stays, to be resumed
            self._settle_in_place()
            return
        kept = replaced = 0
        if keep and self.stem is not None:
            try:
                replaced = cutoffs.keep(self.fd, self.dir_fd, self.temp, self.stem,
                                        min(self.prefix, self.credit), durable=durable)
                kept = min(self.prefix, self.credit)
            except OSError as exc:
                log.error("cannot keep a cut-off upload of %r for a resume: %s",
                          self.client_path, exc)
                temps.unlink_quietly(self.temp, self.dir_fd)
        else:
            temps.unlink_quietly(self.temp, self.dir_fd)
        try:
            if self.usage is not None:
                self.usage.adjust(kept - replaced - (self.high - self.credit),
                                  -int(self.new_file))
                self.usage.settle()
        finally:
            self._release()

    def _settle_in_place(self) -> None:
        """The quota of a file written in place: it holds what it holds, in place of what it
        held (`credit`); the file itself was counted when it was created."""
        try:
            if self.usage is not None:
                self.usage.adjust(os.fstat(self.fd).st_size - self.high)
                self.usage.settle()
        finally:
            self._release()

    def _release(self) -> None:
        if self.original is not None:
            _let_go(self.original)
            self.original = None
        if self.dir_fd >= 0:
            temps.forget(self.dir_fd, self.temp)
        self.close()
        if self.dir_fd >= 0:
            fd, self.dir_fd = self.dir_fd, -1
            os.close(fd)


# Files this process is rewriting from a copy, by (device, inode): see _hold_original.
_rewriting: set[tuple[int, int]] = set()


def _hold_original(name: bytes, dir_fd: int) -> tuple[int, tuple[int, int]]:
    """Open the file a rewrite starts from and lock it for as long as the rewrite runs: in
    this process by its identity, in others (nodes on shared storage too) with flock(). The
    descriptor reads the copy. EBUSY while another rewrite holds it."""
    return _hold(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd))


@contextmanager
def no_other_writer(fd: int) -> Iterator[None]:
    """Hold the open file `fd` as a rewrite does while the caller changes it outside any
    upload (a SETSTAT of a path's size): EBUSY while an upload writes or rewrites it. A file
    written in place counts its own growth for the quota, so a resize the quota also counted
    would count it twice (or give it back twice)."""
    held = _hold(os.dup(fd))
    try:
        yield
    finally:
        _let_go(held)


def _hold(src: int) -> tuple[int, tuple[int, int]]:
    """_hold_original on a descriptor of the file (closed here if it cannot be held)."""
    st = os.fstat(src)
    key = (st.st_dev, st.st_ino)
    try:
        if key in _rewriting:
            raise OSError(errno.EBUSY, "the file is being written through another handle")
        try:
            fcntl.flock(src, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, "the file is being written through another handle"
                          ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):   # no locks here
                raise
    except BaseException:
        os.close(src)
        raise
    _rewriting.add(key)
    return src, key


def _let_go(held: tuple[int, tuple[int, int]]) -> None:
    _rewriting.discard(held[1])
    os.close(held[0])


def _drop_kept(stem: bytes, dir_fd: int, usage: Usage | None) -> None:
    """Remove an overwrite's kept data, giving its bytes back to the quota."""
    freed = cutoffs.drop(stem, dir_fd)
    if freed and usage is not None:
        usage.adjust(-freed)


def _kept_for_resume(stem: bytes | None, dir_fd: int, size: int) -> tuple[int, int] | None:
    """What a resume of a file (of `size` bytes) whose overwrite was cut off starts from: the
    kept data (descriptor, size), or None if there is none. A crash's leftover temporaries of
    that overwrite become kept data first. Too little kept data is refused."""
    if stem is None:
        return None
    prefix = stem + b"-"
    for name in map(os.fsencode, os.listdir(dir_fd)):
        if name.startswith(prefix) and not temps.temp_in_use(name, dir_fd, grace=False):
            cutoffs.adopt(name, dir_fd)
    kept = cutoffs.open_kept(stem, dir_fd)
    if kept is not None and kept[1] < size:
        os.close(kept[0])
        raise cutoffs.CutOffTooShort(
            f"an upload replacing this file was cut off after {kept[1]} of the {size} bytes "
            "it now holds, which still hold the old content: a resume cannot continue it, "
            "upload the whole file again")
    return kept


def apply_attrs(fd: int, attrs: SFTPAttrs, resize: Callable[[int], None]) -> None:
    """Apply a client's SETSTAT to an open descriptor: size (through `resize`, which accounts
    for quota), mode without setuid/setgid/sticky, times. Ownership changes are refused."""
    if attrs.uid is not None or attrs.gid is not None or attrs.owner or attrs.group:
        raise AccessDenied("permission denied: file ownership cannot be changed")
    if attrs.size is not None:
        resize(attrs.size)
    if attrs.permissions is not None:
        _by_fd(os.fchmod, os.chmod, fd, attrs.permissions & 0o777)
    atime, mtime = _ns(attrs.atime, attrs.atime_ns), _ns(attrs.mtime, attrs.mtime_ns)
    if atime is not None or mtime is not None:
        st = os.fstat(fd)
        times = (st.st_atime_ns if atime is None else atime,
                 st.st_mtime_ns if mtime is None else mtime)
        _by_fd(lambda f, t: os.utime(f, ns=t), lambda p, t: os.utime(p, ns=t), fd, times)


def _by_fd(on_fd: Callable[[int, Any], None], on_path: Callable[[bytes, Any], None],
           fd: int, arg: Any) -> None:
    """fchmod/futimens on `fd`; an O_PATH descriptor (a SETSTAT of mode or times, which
    needs no read access: a file of mode 000 must be able to get its mode back) refuses them
    with EBADF, so the call goes through its /proc name, which is that very file."""
    try:
        on_fd(fd, arg)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        on_path(b"/proc/self/fd/%d" % fd, arg)


def _ns(sec: int | None, ns: int | None) -> int | None:
    return None if sec is None else sec * 1_000_000_000 + (ns or 0)
