"""How an SFTP operation fails: the status and message a client sees for each exception, which
failures are refusals (logged and audited), and the bounds on offsets and sizes."""
from __future__ import annotations

import errno
import functools
import inspect
import logging
from typing import Any, Callable, TypeVar

import asyncssh
from asyncssh import SFTPError

from internal.sftp.cutoffs import CutOffTooShort
from internal.sftp.paths import AccessDenied
from internal.sftp.quota import QuotaExceeded

log = logging.getLogger("edgegw.node.sftp")

F = TypeVar("F", bound=Callable[..., Any])

# off_t is signed 64-bit: offsets and sizes beyond this name no byte of any file.
MAX_OFFSET = (1 << 63) - 1


class TooManyHandles(Exception):
    """The session holds all the handles it may (server.MAX_HANDLES); the message is meant
    for the client."""


_ERRNO: dict[int, tuple[type[SFTPError], str]] = {
    errno.ENOENT: (asyncssh.SFTPNoSuchFile, "no such file or directory"),
    errno.EACCES: (asyncssh.SFTPPermissionDenied, "permission denied"),
    errno.EPERM: (asyncssh.SFTPPermissionDenied, "permission denied"),
    errno.EBADF: (asyncssh.SFTPPermissionDenied, "permission denied: the handle was not "
                                                 "opened for that"),
    errno.ELOOP: (asyncssh.SFTPPermissionDenied, "permission denied: refusing to follow a "
                                                 "symbolic link here"),
    errno.EEXIST: (asyncssh.SFTPFileAlreadyExists, "the file already exists"),
    errno.ENOSPC: (asyncssh.SFTPNoSpaceOnFilesystem, "no space left on the server's disk; "
                                                     "nothing was stored, try again later"),
    errno.EDQUOT: (asyncssh.SFTPQuotaExceeded, "quota exceeded: the server's disk quota is "
                                               "used up"),
    errno.ENOTEMPTY: (asyncssh.SFTPDirNotEmpty, "the directory is not empty"),
    errno.ENOTDIR: (asyncssh.SFTPNotADirectory, "not a directory"),
    errno.EISDIR: (asyncssh.SFTPFileIsADirectory, "not a regular file"),
    errno.ENAMETOOLONG: (asyncssh.SFTPInvalidFilename, "the file name is too long"),
    errno.EINVAL: (asyncssh.SFTPInvalidParameter, "invalid argument"),
    errno.EXDEV: (asyncssh.SFTPFailure, "cannot move between file systems"),
    errno.EBUSY: (asyncssh.SFTPFailure, "the file is being written through another handle; "
                                        "try again once that one is closed"),
}


def sftp_error(exc: BaseException) -> SFTPError:
    """The one place where anything that went wrong becomes an SFTP status and message.

    (Version 3 clients such as OpenSSH see codes above FX_OP_UNSUPPORTED as FX_FAILURE, with the
    message intact.)
    """
    if isinstance(exc, SFTPError):
        return exc
    if isinstance(exc, QuotaExceeded):
        return asyncssh.SFTPQuotaExceeded(str(exc))
    if isinstance(exc, AccessDenied):
        return asyncssh.SFTPPermissionDenied(exc.strerror)
    if isinstance(exc, (TooManyHandles, CutOffTooShort)):
        return asyncssh.SFTPFailure(str(exc))
    if isinstance(exc, OverflowError):
        # a client's 64-bit offset, size or time that the system call cannot take
        return asyncssh.SFTPInvalidParameter("invalid argument: a number is out of range")
    if isinstance(exc, OSError):
        cls, reason = _ERRNO.get(exc.errno or 0, (asyncssh.SFTPFailure, ""))
        return cls(reason or f"failed: {exc.strerror or exc}")
    if isinstance(exc, (ValueError, UnicodeError)):
        return asyncssh.SFTPInvalidFilename(f"invalid file name: {exc}")
    log.error("unexpected error in an SFTP operation", exc_info=exc)
    return asyncssh.SFTPFailure("internal error on the server; it has been logged")


# What the user may not do, as opposed to what went wrong: these are logged and audited.
REFUSALS = (AccessDenied, TooManyHandles, ValueError)


def sftp_op(fn: F) -> F:
    """Route every exception of an operation (a method of a server with a `_failed(op, args,
    exc)` that returns the SFTP error) through that method."""
    op = fn.__name__.lstrip("_")
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(self: Any, *args: Any) -> Any:
            try:
                return await fn(self, *args)
            except Exception as exc:
                raise self._failed(op, args, exc) from None
        return run_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def run(self: Any, *args: Any) -> Any:
        try:
            return fn(self, *args)
        except Exception as exc:
            raise self._failed(op, args, exc) from None
    return run  # type: ignore[return-value]


def check_range(offset: int, length: int) -> None:
    """Refuse a client's offset and length that run past any possible file."""
    if offset + length > MAX_OFFSET:
        raise asyncssh.SFTPInvalidParameter("invalid argument: offset or size beyond the "
                                            "largest possible file")


def printable(text: str) -> str:
    """A client's name fit for one log line: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
