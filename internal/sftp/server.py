"""The SFTP server the node runs for each authenticated user: one `SFTPServer` subclass.

asyncssh decodes the protocol and calls one method per operation; each method here checks the
user's permission, resolves the path inside the home (`paths`), acts through verified
descriptors, records an audit event for operations that change or open something, and lets
`errors.sftp_error` turn any failure into the SFTP status the client sees. A refusal (the
user's permissions, a path out of the home, a bad name, too many handles) is also logged and
audited.
Reads and writes stay synchronous positional I/O: that is the hot path, and a thread hop per
block would cost more than the disk.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import posixpath
import stat
import sys
import weakref
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Any, AsyncIterator, Callable, Iterator, Protocol, cast

import asyncssh
from asyncssh import SFTPAttrs, SFTPError, SFTPName
from asyncssh.constants import FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_READ, FXF_TRUNC, FXF_WRITE

from internal.sftp import cutoffs
from internal.sftp.errors import (REFUSALS, TooManyHandles, check_range, printable,
                                  sftp_error, sftp_op)
from internal.sftp.paths import (DIR_FLAGS, PATH_FLAGS, AccessDenied, Jail, is_node_name,
                                 lstat_at)
from internal.sftp.quota import Usage
from internal.sftp.renameat import rename_noreplace
from internal.sftp.temps import clear_leftovers
from internal.sftp.uploads import OpenFile, Upload, apply_attrs, no_other_writer
from internal.session import SessionContext
from internal.store.base import Perm, User

log = logging.getLogger("edgegw.node.sftp")

# All sessions of a node process share one descriptor table (OpenSSH runs an sftp-server per
# session, we do not), and an upload holds two descriptors. Clients keep a few handles open
# (a handful of parallel transfers at most), so 256 is ample and bounds a session to ~512 fds.
MAX_HANDLES = 256
# What one READ returns at most: OpenSSH's sftp-server value (its 256 KiB message limit less
# room for the header), so a full reply fits any OpenSSH client. Short reads are legal SFTP;
# clients ask again for the rest. Without a cap a client names the buffer size, up to 4 GiB.
MAX_READ = 256 * 1024 - 1024


class SessionSink(Protocol):
    """What the SFTP server reports to its SSH session (`internal.ssh.auth.Session`)."""

    ctx: SessionContext
    bytes_in: int
    bytes_out: int

    def audit(self, kind: str, **detail: Any) -> None: ...


class _Listing:
    """A directory handle: the names read at OPENDIR, handed out by READDIR in batches."""

    def __init__(self, names: list[SFTPName]) -> None:
        self._names = iter(names)

    def __aiter__(self) -> "_Listing":
        return self

    async def __anext__(self) -> SFTPName:
        try:
            return next(self._names)
        except StopIteration:
            raise StopAsyncIteration from None


def _drop_kept(dir_fd: int, name: bytes, st: os.stat_result) -> int:
    """A file that goes from its name takes the data kept for resuming its overwrite with it
    (internal.sftp.cutoffs); returns the bytes freed."""
    if not stat.S_ISREG(st.st_mode) or not st.st_size:
        return 0
    return cutoffs.drop(cutoffs.stem(name, st), dir_fd)


def _closed_by_cleanup(caller: FrameType | None) -> bool:
    """asyncssh closes the handles a client left open from SFTPServerHandler._cleanup when the
    channel ends (client killed, connection lost). Only a close the client asked for may
    commit an upload, so tell the two apart by who is calling."""
    return caller is not None and caller.f_code.co_name == "_cleanup"


class NodeSFTPServer(asyncssh.SFTPServer):
    """One SFTP channel of one authenticated user, confined to the user's home."""

    def __init__(self, chan: asyncssh.SSHServerChannel, session: SessionSink, user: User,
                 usage: Usage | None, *, durable: bool,
                 partial_suffixes: tuple[bytes, ...] = (),
                 on_exit: Callable[[], None] | None = None,
                 unmetered: Callable[[], AbstractContextManager[None]] | None = None) -> None:
        """`partial_suffixes`: names ending so are the clients' own temporaries, written in
        place (Upload.start_in_place). `unmetered`: entered around what may change what a
        scan of the root counts while the channel has no quota share (QuotaBook.unmetered)."""
        super().__init__(chan)
        self._session = session
        self._username = user.name
        self._root = user.home
        self._jail = Jail(user.home)
        self._handles = 0       # open file and directory handles, for MAX_HANDLES
        self._uploads: set[Upload] = set()   # open, for a quota that comes while they run
        self._perms = user.permissions
        self._usage = usage
        self._durable = durable
        self._partial_suffixes = tuple(x for x in partial_suffixes if x)
        self._on_exit = on_exit
        self._unmetered = unmetered

    @property
    def username(self) -> str:
        return self._username

    @property
    def usage(self) -> Usage | None:
        """The user's quota figures this channel charges, None when it has no quota."""
        return self._usage

    def update(self, user: User, usage: Usage | None) -> None:
        """A newer record of the user (an administrator's change): the next operations follow
        its permissions and root (already checked and created by the caller) and `usage`.
        Open handles keep the files they opened."""
        self._perms = user.permissions
        if self._usage is None and usage is not None:
            for upload in self._uploads:
                upload.adopt(usage)
        self._usage = usage
        if user.home != self._root:
            self._root = user.home
            self._jail = Jail(user.home)

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around an operation that may change what a scan of the root counts: stored,
        removed, renamed or resized files (a temporary's growth is counted when it is
        adopted instead)."""
        if self._usage is not None or self._unmetered is None:
            yield
            return
        with self._unmetered():
            yield

    def _need(self, perm: Perm, what: str) -> None:
        if perm not in self._perms:
            raise AccessDenied(f"permission denied: you may not {what} here")

    def _audit(self, kind: str, path: bytes, **detail: Any) -> None:
        self._session.audit(kind, path=os.fsdecode(self._jail.virtual(path)), **detail)

    def _failed(self, op: str, args: tuple[Any, ...], exc: Exception) -> SFTPError:
        """The SFTP error for a failed operation; a refusal also gets one log line and one
        audit event (one per refused request: the client chose to send each)."""
        error = sftp_error(exc)
        if isinstance(exc, REFUSALS):
            path = " -> ".join(self._shown(a) for a in args if isinstance(a, (bytes, OpenFile)))
            log.info("refused: user=%s client=%s op=%s path=%s: %s", self._username,
                     self._session.ctx.client_ip, op, printable(path) or "-", error.reason)
            self._session.audit("sftp.refused", op=op, path=path, reason=error.reason,
                                result="refused")
        return error

    def _shown(self, arg: bytes | OpenFile) -> str:
        """The client's path as the trail shows it: under the virtual `/` when it is valid."""
        if isinstance(arg, OpenFile):
            return os.fsdecode(arg.client_path)
        try:
            return os.fsdecode(self._jail.virtual(arg))
        except ValueError:
            return os.fsdecode(arg)

    def _take_handle(self) -> None:
        if self._handles >= MAX_HANDLES:
            raise TooManyHandles(f"too many open handles: at most {MAX_HANDLES} per session; "
                                 "close some first")
        self._handles += 1

    def _drop_handle(self) -> None:
        self._handles -= 1

    def _charge(self, nbytes: int, nfiles: int = 0) -> None:
        """Growth is checked against the quota (and may be refused); shrinking is recorded."""
        if self._usage is not None:
            if nbytes > 0 or nfiles > 0:
                self._usage.charge(max(nbytes, 0), max(nfiles, 0))
            if nbytes < 0 or nfiles < 0:
                self._usage.adjust(min(nbytes, 0), min(nfiles, 0))

    # -- files ------------------------------------------------------------------------------
    @sftp_op
    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        self._take_handle()     # before any await: pipelined OPENs must not all pass the cap
        try:
            return await self._open(path, pflags, attrs)
        except BaseException:
            self._drop_handle()
            raise

    async def _open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> OpenFile:
        real = self._jail.resolve(path)
        if self._jail.names_directory(path):    # "new/": POSIX open() says EISDIR too
            raise IsADirectoryError(errno.EISDIR, "a path ending in '/' names a directory")
        vpath = self._jail.virtual(path)
        if not pflags & (FXF_WRITE | FXF_APPEND):
            self._need(Perm.DOWNLOAD, "download files")
            handle = OpenFile.open_read(self._jail, real, vpath)
            self._audit("file.open", path, mode="read")
            return handle
        if pflags & FXF_READ:
            self._need(Perm.DOWNLOAD, "download files")
        exists = os.path.lexists(real)
        if exists:
            self._need(Perm.OVERWRITE, "overwrite files")
        else:
            self._need(Perm.UPLOAD, "upload files")
        truncate = bool(pflags & FXF_TRUNC)
        in_place = bool(self._partial_suffixes) and real.endswith(self._partial_suffixes)
        start = functools.partial(
            Upload.start_in_place if in_place else Upload.start, self._jail, real, vpath,
            truncate=truncate,
            append=bool(pflags & FXF_APPEND), create=bool(pflags & FXF_CREAT),
            exclusive=bool(pflags & FXF_EXCL) or Perm.OVERWRITE not in self._perms,
            perms=0o644 if attrs.permissions is None else attrs.permissions, usage=self._usage,
            readable=bool(pflags & FXF_READ))
        # Resuming copies the existing file first: keep that off the event loop.
        copies = exists and not truncate and not in_place
        if exists or in_place:  # may truncate, drop kept data, create a file the scan counts
            with self._changing():
                upload = await asyncio.to_thread(start) if copies else start()
        else:                   # a temporary: counted when adopted
            upload = start()
        self._uploads.add(upload)
        self._audit("file.open", path, mode="write", resume=exists and not truncate,
                    **({"in_place": True} if in_place else {}))
        return upload

    def close(self, file_obj: object) -> Any:
        # A CLOSE the client sent commits, even when it closed the channel right after: its
        # writes were all taken before it (requests are handled in order).
        aborted = _closed_by_cleanup(sys._getframe(1))
        self._drop_handle()     # asyncssh forgets the handle whatever the close's outcome
        handle = cast(OpenFile, file_obj)   # what open() returned
        if aborted:
            return self._close_left(handle)
        return self._close(handle, aborted)

    async def _close_left(self, handle: OpenFile) -> None:
        """A handle the client left open when its channel ended. A failure is logged, not
        raised: asyncssh's cleanup would stop at it, leaving the other handles (descriptors,
        temporaries, quota shares) and the session's end to nobody."""
        try:
            await self._close(handle, True)
        except Exception as exc:
            log.error("user=%s client=%s: closing %s after the session ended failed: %s",
                      self._username, self._session.ctx.client_ip,
                      printable(os.fsdecode(handle.client_path)), exc)

    @sftp_op
    async def _close(self, handle: OpenFile, aborted: bool) -> None:
        result = "ok"
        try:
            if isinstance(handle, Upload):
                with self._changing():
                    await self._finish(handle, aborted)
                if aborted:
                    result = "aborted: the client left without closing the file"
            else:
                handle.close()
        except Exception as exc:
            result = f"failed: {sftp_error(exc).reason}"
            raise
        finally:
            if isinstance(handle, Upload):
                self._uploads.discard(handle)
            self._session.bytes_in += handle.bytes_written
            self._session.bytes_out += handle.bytes_read
            self._session.audit("file.close", path=os.fsdecode(handle.client_path),
                                bytes_read=handle.bytes_read,
                                bytes_written=handle.bytes_written, result=result)

    async def _finish(self, handle: Upload, aborted: bool) -> None:
        if aborted:     # an overwrite keeps what it has for a resume: maybe fsync
            await asyncio.to_thread(handle.abort, keep=True, durable=self._durable)
        elif self._durable:
            await asyncio.to_thread(handle.commit, durable=True)
        else:
            handle.commit(durable=False)

    @sftp_op
    def read(self, file_obj: OpenFile, offset: int, size: int) -> bytes:
        size = min(size, MAX_READ)
        check_range(offset, size)
        return file_obj.read(offset, size)

    @sftp_op
    def write(self, file_obj: OpenFile, offset: int, data: bytes) -> int:
        check_range(offset, len(data))     # refused before the upload is touched
        if isinstance(file_obj, Upload) and file_obj.in_place:
            with self._changing():
                return file_obj.write(offset, data)
        return file_obj.write(offset, data)

    @sftp_op
    async def copy_data(self, src: OpenFile, src_offset: int, length: int, dst: OpenFile,
                        offset: int) -> int:
        """copy-data (OpenSSH's `cp`), whole and in the kernel. asyncssh's own copy loops over
        read() and write() and takes a short read for the end of the file: with reads capped
        at MAX_READ, every copy would stop at 255 KiB."""
        check_range(src_offset, length)
        check_range(offset, length)
        if not isinstance(dst, Upload):
            raise PermissionError(errno.EBADF, "the target was opened for reading only")
        with self._changing():
            return await asyncio.to_thread(dst.copy_job(src, src_offset, length, offset))

    @sftp_op
    def fstat(self, file_obj: OpenFile) -> os.stat_result:
        return os.fstat(file_obj.fd)

    @sftp_op
    def fsync(self, file_obj: OpenFile) -> None:
        os.fsync(file_obj.fd)

    @sftp_op
    def fstatvfs(self, file_obj: OpenFile) -> os.statvfs_result:
        return os.statvfs(file_obj.fd)

    # -- attributes -------------------------------------------------------------------------
    def _resize_fd(self, fd: int, size: int) -> None:
        st = os.fstat(fd)
        # the quota counts a file once per name (as its rescan does): every hard link of it
        # grows or shrinks with it
        change = (size - st.st_size) * max(st.st_nlink, 1)
        if change > 0:
            self._charge(change)
        try:
            os.ftruncate(fd, size)
        except OSError:
            if change > 0:   # charged for growth that did not happen (EFBIG, ENOSPC...)
                self._charge(-change)
            raise
        if change < 0:
            self._charge(change)

    def _setstat(self, path: bytes, attrs: SFTPAttrs, follow: bool) -> None:
        self._need(Perm.SETSTAT, "change file attributes")
        if attrs.size is not None:
            check_range(attrs.size, 0)
            # a new size rewrites the file's content (truncating it wipes it): an overwrite
            self._need(Perm.OVERWRITE, "overwrite files")
        real = self._jail.resolve(path, follow=follow)
        # mode and times need no access to the content: an O_PATH descriptor (a user may put
        # a file of mode 000 back to 644 when the node runs without root)
        flags = os.O_WRONLY if attrs.size is not None else PATH_FLAGS
        fd = self._jail.open(real, flags)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH opens a link itself; not its mode
                raise OSError(errno.ELOOP, "a symbolic link's own attributes cannot be set")
            if attrs.size is None:
                apply_attrs(fd, attrs, functools.partial(self._resize_fd, fd))
            else:   # not under an upload writing it in place: both would count the change
                with no_other_writer(fd), self._changing():
                    apply_attrs(fd, attrs, functools.partial(self._resize_fd, fd))
        finally:
            os.close(fd)
        self._audit("file.setstat", path, **_attr_detail(attrs))

    @sftp_op
    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._setstat(path, attrs, follow=True)

    @sftp_op
    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._setstat(path, attrs, follow=False)

    @sftp_op
    def fsetstat(self, file_obj: OpenFile, attrs: SFTPAttrs) -> None:
        # An upload's own attributes (e.g. `put -p`) are part of uploading it.
        if not isinstance(file_obj, Upload):
            self._need(Perm.SETSTAT, "change file attributes")
        if attrs.size is not None:
            check_range(attrs.size, 0)
        with self._changing():
            apply_attrs(file_obj.fd, attrs, file_obj.truncate)
        self._session.audit("file.setstat", path=os.fsdecode(file_obj.client_path),
                            **_attr_detail(attrs))

    # stat and statvfs look at a descriptor of what was verified, never at the path again: a
    # directory swapped for a symlink in between would lead them out of the home.
    @sftp_op
    def stat(self, path: bytes) -> os.stat_result:
        with self._jail.looked_up(path) as fd:
            return os.fstat(fd)

    @sftp_op
    def lstat(self, path: bytes) -> os.stat_result:
        with self._jail.looked_up(path, follow=False) as fd:
            return os.fstat(fd)

    @sftp_op
    def statvfs(self, path: bytes) -> os.statvfs_result:
        with self._jail.looked_up(path) as fd:
            return os.fstatvfs(fd)

    @sftp_op
    def realpath(self, path: bytes) -> bytes:
        return self._jail.client_path(self._jail.resolve(path))

    # -- directories ------------------------------------------------------------------------
    def format_user(self, uid: int | None) -> str:
        """A long listing (`ls -l`) names the user as the owner of their files: they are
        theirs, and the node's own account (its name, root or not) is not the client's
        business. It also spares a passwd lookup per entry."""
        return self._username

    def format_group(self, gid: int | None) -> str:
        return self._username

    def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        """OPENDIR: the directory is read whole now, so errors are reported here and its
        descriptor is closed at once; the handle counts against MAX_HANDLES until dropped."""
        try:
            self._take_handle()
            try:
                names = self._list(path)
            except BaseException:
                self._drop_handle()
                raise
        except Exception as exc:
            raise self._failed("opendir", (path,), exc) from None
        listing = _Listing(names)
        # asyncssh tells us nothing when it closes a directory handle; it drops the listing
        weakref.finalize(listing, self._drop_handle)
        return listing

    def _list(self, path: bytes) -> list[SFTPName]:
        self._need(Perm.LIST, "list directories")
        real = self._jail.resolve(path)
        fd = self._jail.open_dir(real)
        try:
            here = os.fstat(fd)
            # `..` through the verified descriptor: its name may be a symlink by now
            up = here if real == self._jail.root else os.stat(b"..", dir_fd=fd,
                                                              follow_symlinks=False)
            names = [SFTPName(b".", attrs=SFTPAttrs.from_local(here)),
                     SFTPName(b"..", attrs=SFTPAttrs.from_local(up))]
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = os.fsencode(entry.name)
                    if is_node_name(name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue    # removed while we listed: the listing just misses it
                    names.append(SFTPName(name, attrs=SFTPAttrs.from_local(st)))
        finally:
            os.close(fd)
        return names

    @sftp_op
    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._need(Perm.MKDIR, "create directories")
        with self._jail.parent(path) as (dfd, name):
            os.mkdir(name, 0o755 if attrs.permissions is None else attrs.permissions & 0o777,
                     dir_fd=dfd)
        self._audit("dir.mkdir", path)

    @sftp_op
    def rmdir(self, path: bytes) -> None:
        self._need(Perm.RMDIR, "remove directories")
        with self._jail.parent(path) as (dfd, name), self._changing():
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self._rmdir_past_temps(dfd, name)
        self._audit("dir.rmdir", path)

    def _rmdir_past_temps(self, dfd: int, name: bytes) -> None:
        """A directory that lists as empty may still hold upload temporaries: a crash's
        leftovers are removed and the rmdir retried; a live upload into it keeps it."""
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)   # one name in a verified directory
        try:
            only_temps, live, freed = clear_leftovers(fd)
        finally:
            os.close(fd)
        if freed:
            self._charge(-freed)
        if not only_temps:
            raise OSError(errno.ENOTEMPTY, "the directory is not empty")
        if live:
            raise asyncssh.SFTPDirNotEmpty("the directory is not empty: an upload into it is "
                                           "in progress")
        os.rmdir(name, dir_fd=dfd)

    @sftp_op
    def remove(self, path: bytes) -> None:
        self._need(Perm.DELETE, "delete files")
        with self._jail.parent(path) as (dfd, name), self._changing():
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            os.unlink(name, dir_fd=dfd)
            kept = _drop_kept(dfd, name, st)
        if stat.S_ISREG(st.st_mode):
            self._charge(-st.st_size - kept, -1)
        self._audit("file.remove", path, size=st.st_size)

    # -- names ------------------------------------------------------------------------------
    def _rename(self, oldpath: bytes, newpath: bytes, *, replace: bool) -> None:
        self._need(Perm.RENAME, "rename files")
        with self._jail.parent(oldpath) as (old_fd, old_name), \
                self._jail.parent(newpath) as (new_fd, new_name), self._changing():
            source = os.stat(old_name, dir_fd=old_fd, follow_symlinks=False)
            target = lstat_at(new_name, new_fd)
            moves = not (target is not None and os.path.samestat(source, target))
            if not moves:
                target = None   # the same file (its own name, or a hard link of it): POSIX
                                # rename() changes nothing and nothing is freed
            elif target is not None:
                if not replace:
                    raise FileExistsError(errno.EEXIST, "the target exists")
                self._need(Perm.OVERWRITE, "overwrite files")
                if stat.S_ISDIR(target.st_mode):   # an empty one: renaming over removes it
                    self._need(Perm.RMDIR, "remove directories")
            if moves and not replace:   # the target may appear after the check above
                rename_noreplace(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            else:
                os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            kept = _drop_kept(old_fd, old_name, source) if moves else 0
            if target is not None:
                kept += _drop_kept(new_fd, new_name, target)
        if kept:
            self._charge(-kept)
        if target is not None and stat.S_ISREG(target.st_mode):
            self._charge(-target.st_size, -1)
        self._audit("file.rename", oldpath, to=os.fsdecode(self._jail.virtual(newpath)),
                    replaced=target is not None)

    @sftp_op
    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=False)

    @sftp_op
    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._rename(oldpath, newpath, replace=True)

    @sftp_op
    def readlink(self, path: bytes) -> bytes:
        self._need(Perm.LIST, "list directories")
        if self._jail.virtual(path) == b"/":
            raise OSError(errno.EINVAL, "the home directory is not a link")
        with self._jail.parent(path) as (dfd, name):
            target = os.readlink(name, dir_fd=dfd)
            where = self._jail.locate(dfd)
        if not where:   # no /proc: the checked path is the best we know
            where = posixpath.dirname(self._jail.resolve(path, follow=False))
        dest = os.path.realpath(posixpath.join(where, target))
        return self._jail.client_path(dest)

    @sftp_op
    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        self._need(Perm.UPLOAD, "create links")
        stored = self._jail.link_target(oldpath, self._jail.resolve(newpath, follow=False))
        with self._jail.parent(newpath) as (dfd, name):
            os.symlink(stored, name, dir_fd=dfd)
        self._audit("file.symlink", newpath, target=os.fsdecode(oldpath))

    @sftp_op
    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._need(Perm.UPLOAD, "create links")
        with self._jail.parent(oldpath) as (old_fd, old_name), \
                self._jail.parent(newpath) as (new_fd, new_name), self._changing():
            st = os.stat(old_name, dir_fd=old_fd, follow_symlinks=False)
            size, count = (st.st_size, 1) if stat.S_ISREG(st.st_mode) else (0, 0)
            self._charge(size, count)
            try:
                os.link(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd,
                        follow_symlinks=False)
            except BaseException:
                self._charge(-size, -count)
                raise
        self._audit("file.link", newpath, target=os.fsdecode(self._jail.virtual(oldpath)))

    def exit(self) -> None:
        # Like OpenSSH's sftp-server, end with exit status 0: scp (SFTP mode) treats a channel
        # closed without one as a failed transfer.
        if not self.channel.is_closing():
            try:
                self.channel.exit(0)
            except OSError:
                pass
        if self._on_exit is not None:
            on_exit, self._on_exit = self._on_exit, None
            on_exit()


def _attr_detail(attrs: SFTPAttrs) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    if attrs.size is not None:
        detail["size"] = attrs.size
    if attrs.permissions is not None:
        detail["mode"] = oct(attrs.permissions & 0o777)
    if attrs.mtime is not None:
        detail["mtime"] = attrs.mtime
    return detail
