"""rename() that never replaces: Linux's renameat2(RENAME_NOREPLACE), through libc.

SFTP's plain RENAME must fail when the target exists. A check before os.rename() leaves a
window in which another session's upload can land on the target and be destroyed unseen;
RENAME_NOREPLACE makes the check and the rename one step. Where the call or the flag is not
supported (an old kernel, some network file systems), the check-then-rename remains.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

RENAME_NOREPLACE = 1


def _renameat2() -> "ctypes._NamedFuncPointer | None":
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_call = _renameat2()


def rename_noreplace(old: bytes, new: bytes, *, src_dir_fd: int, dst_dir_fd: int) -> None:
    """Rename `old` to `new` (names in the two directories); FileExistsError if `new` exists,
    checked atomically where the system allows it."""
    if _call is not None:
        if _call(src_dir_fd, old, dst_dir_fd, new, RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    try:
        os.stat(new, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, "the target exists")
