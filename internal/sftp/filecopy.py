"""Copies between open files, in the kernel where it can (copy_file_range: no bytes through
user space, a reflink where the file system shares blocks), by pread/pwrite where it cannot:
a whole file for a rewrite's starting copy, keeping its holes, and a range for a client's
copy-data request."""
from __future__ import annotations

import errno
import os
from typing import Iterator

_CHUNK = 1 << 24
# copy_file_range cannot do it here (across file systems, an old kernel, a file system or a
# descriptor it does not serve): copy through user space instead.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """SFTP has no short writes: a write either stored every byte or failed. pwrite() may
    store part (a disk filling up) and fail only on the next call, so loop until done."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "write stored nothing")
        done += n
    return done


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of `fd` that hold data: its holes (a sparse file) are skipped,
    so copying a file of 8 GiB with nothing written reads and writes nothing."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:       # no data after pos: the rest is a hole
                return
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            yield pos, size                    # no SEEK_DATA here: treat it all as data
            return
        if start >= size:
            return
        yield start, end
        pos = end


def copy_file(src: int, dst: int, size: int | None = None) -> None:
    """Make `dst` a copy of the file `src` (or of its first `size` bytes), range by range of
    data, so the copy keeps the source's holes."""
    if size is None:
        size = os.fstat(src).st_size
    ranges = list(_data_ranges(src, size))
    try:
        for start, end in ranges:
            pos = start
            while pos < end and (n := os.copy_file_range(src, dst, min(_CHUNK, end - pos),
                                                         pos, pos)):
                pos += n
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
        os.ftruncate(dst, 0)
        for start, end in ranges:
            pos = start
            while pos < end and (chunk := os.pread(src, min(1 << 20, end - pos), pos)):
                pos += pwrite_all(dst, chunk, pos)
    os.ftruncate(dst, size)


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> int:
    """Copy up to `length` bytes from `src` at `src_offset` to `dst` at `dst_offset` (to its
    end if `dst` is O_APPEND), stopping early at the end of `src`. Returns the bytes copied."""
    done = 0
    try:
        while done < length and (n := os.copy_file_range(
                src, dst, min(_CHUNK, length - done), src_offset + done, dst_offset + done)):
            done += n
        return done
    except OSError as exc:
        if exc.errno not in _NO_KERNEL_COPY:
            raise
    while done < length and (chunk := os.pread(src, min(1 << 20, length - done),
                                               src_offset + done)):
        done += pwrite_all(dst, chunk, dst_offset + done)
    return done
