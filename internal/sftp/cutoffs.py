"""Cut-off overwrites: the new data an upload replacing a file had stored when its client left.

An upload replaces its file only when complete (internal.sftp.uploads), so a client cut off
while overwriting leaves the old file under the name. OpenSSH's `reput` (`put -a`) then reads
that file's size and sends the rest of the new file from there: it would append the new file's
tail to the old file's head. So an overwrite that is cut off keeps the new data it had stored,
up to the old file's size, under a hidden name derived from the file's name and the old file's
identity (inode, size, modification time). A later write into that same unchanged file
without truncation and without reading (a resume) starts from the kept data instead of the old
content, and comes out as the new file. Where less than the old file's size had arrived, no
resume can come out right, and one is refused until the file is uploaded whole.

The names: an overwrite in progress writes `<stem>-<random>.tmp` (so a node killed mid-upload
leaves a temporary that a resume can still recognise), and a cut-off one is kept as
`<stem>.tmp`, one per file name and identity. Kept data counts against the user's quota; an
upload of the whole file drops it, a resume uses it up, and the node's sweep removes it once it
has been untouched for KEEP seconds.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets

from internal.sftp.paths import TEMP_PREFIX, TEMP_SUFFIX, lstat_at

log = logging.getLogger(__name__)

# How long a cut-off overwrite is kept for a resume: long enough for a partner's next
# scheduled attempt.
KEEP = 24 * 3600.0
_MARK = TEMP_PREFIX + b"o"


class CutOffTooShort(Exception):
    """A resume of a file whose overwrite was cut off before the old file's size: the message
    is meant for the client."""


def stem(name: bytes, st: os.stat_result) -> bytes:
    """The name prefix of the temporaries of an upload replacing file `name`, as `st` shows it."""
    # No device number: nodes mounting one shared files root may each see a different one.
    ident = b"%d:%d:%d:" % (st.st_ino, st.st_size, st.st_mtime_ns) + name
    return _MARK + hashlib.blake2b(ident, digest_size=12).hexdigest().encode()


def live_name(stem_: bytes) -> bytes:
    return stem_ + b"-" + secrets.token_hex(8).encode() + TEMP_SUFFIX


def kept_name(stem_: bytes) -> bytes:
    return stem_ + TEMP_SUFFIX


def is_cutoff(name: bytes) -> bool:
    """Any temporary of an overwrite: in progress, left by a crash, or kept after a cut-off."""
    return name.startswith(_MARK) and name.endswith(TEMP_SUFFIX)


def is_kept(name: bytes) -> bool:
    return is_cutoff(name) and b"-" not in name[len(_MARK):]


def stem_of(name: bytes) -> bytes:
    """The stem of an overwrite's temporary (live or kept)."""
    return _MARK + name[len(_MARK):-len(TEMP_SUFFIX)].split(b"-", 1)[0]


def keep(fd: int, dir_fd: int, temp: bytes, stem_: bytes, size: int, *, durable: bool) -> int:
    """Keep the first `size` bytes of an overwrite's temporary `temp` (open as `fd`) for a
    resume. Returns the size of the kept data this replaced (0 if none)."""
    os.ftruncate(fd, size)
    if durable:
        os.fsync(fd)
    kept = kept_name(stem_)
    old = lstat_at(kept, dir_fd)
    os.replace(temp, kept, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if durable:
        try:
            os.fsync(dir_fd)
        except OSError as exc:
            log.warning("cannot sync the directory of a kept upload: %s", exc)
    return old.st_size if old is not None else 0


def open_kept(stem_: bytes, dir_fd: int) -> tuple[int, int] | None:
    """The kept data of an overwrite, as (descriptor, size), or None."""
    try:
        fd = os.open(kept_name(stem_), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_size


def drop(stem_: bytes, dir_fd: int) -> int:
    """Remove the kept data of an overwrite; returns its size (0 if there was none)."""
    kept = kept_name(stem_)
    st = lstat_at(kept, dir_fd)
    if st is None:
        return 0
    try:
        os.unlink(kept, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    return st.st_size


def adopt(leftover: bytes, dir_fd: int) -> None:
    """Make a crashed upload's temporary `leftover` (no live upload holds it) the kept data of
    its file, unless newer kept data is there already (then it goes)."""
    kept = kept_name(stem_of(leftover))
    try:
        mine = os.stat(leftover, dir_fd=dir_fd, follow_symlinks=False)
        theirs = lstat_at(kept, dir_fd)
        if theirs is None or theirs.st_mtime_ns < mine.st_mtime_ns:
            os.replace(leftover, kept, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.unlink(leftover, dir_fd=dir_fd)
    except FileNotFoundError:
        pass            # another process adopted or swept it first
