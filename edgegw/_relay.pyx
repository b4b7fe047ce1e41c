# cython: language_level=3
"""Thin binding of the C relay engine (csrc/). Use edgegw.relay, not this module directly.

Every C call runs without the GIL; C reports failures as -errno and they become OSError here,
in _check() and nowhere else.
"""
import errno as _errno
import os

from libc.stdlib cimport free, malloc

from edgegw._relay cimport *

# The coalescing pause's default and bound, for edgegw.relay.base to be checked against.
COALESCE_DEFAULT_US = RELAY_COALESCE_DEFAULT_US
COALESCE_MAX_US = RELAY_COALESCE_MAX_US
POOL_MAX = RELAY_POOL_MAX
IDLE_TIMEOUT_MAX = RELAY_IDLE_TIMEOUT_MAX

BACKENDS = tuple(name for name in ("splice", "select") if relay_backend_available(name.encode()))


cdef object _check(int rc, str doing):
    """The one errno -> OSError mapping: OSError(errno, ...) picks the subclass
    (FileExistsError for EEXIST, ...)."""
    if rc >= 0:
        return rc
    cdef int err = -rc
    return _raise(err, f"{os.strerror(err)} ({doing})")


cdef object _raise(int err, str message):
    raise OSError(err, message)


cdef class Engine:
    """Relay threads owned by this object; see csrc/relay.h for the semantics."""

    def __cinit__(self, str backend="splice", *, int threads=1, size_t pipe_size=1 << 20,
                  double idle_timeout=0.0, double fin_timeout=0.0, size_t pool_max=64,
                  size_t buffer_size=64 * 1024, unsigned coalesce_us=RELAY_COALESCE_DEFAULT_US,
                  bint sched_batch=True):
        cdef relay_config cfg
        cdef relay_engine *e = NULL
        cdef int rc
        cdef bytes name = backend.encode()
        cdef const char *cname = name
        self._e = NULL
        self._closed = True
        relay_config_default(&cfg)
        cfg.threads = threads
        cfg.pipe_size = pipe_size
        cfg.idle_timeout = idle_timeout
        cfg.fin_timeout = fin_timeout
        cfg.pool_max = pool_max
        cfg.buffer_size = buffer_size
        cfg.coalesce_us = coalesce_us
        cfg.sched_batch = sched_batch
        with nogil:
            rc = relay_engine_create(cname, &cfg, &e)
        if rc == -_errno.ENOSYS:
            _raise(-rc, f"relay backend {backend!r} is not available on this system")
        if rc == -_errno.EINVAL:
            _raise(-rc, f"bad relay settings: backend={backend!r} threads={threads} "
                        f"idle_timeout={idle_timeout} fin_timeout={fin_timeout} "
                        f"pool_max={pool_max} "
                        f"buffer_size={buffer_size} coalesce_us={coalesce_us}")
        _check(rc, f"starting the {backend} relay engine")
        self._e = e
        self._closed = False
        self.backend = backend

    def __dealloc__(self):
        cdef relay_engine *e = self._e
        self._e = NULL
        if e != NULL:
            with nogil:
                relay_engine_destroy(e)

    @property
    def notify_fd(self) -> int:
        """Readable while finished-session reports wait; -1 once closed."""
        if self._e == NULL:
            return -1
        return relay_engine_notify_fd(self._e)

    def add(self, unsigned long long session_id, int fd_a, int fd_b) -> None:
        """Relay fd_a <-> fd_b. On success the engine owns both fds; on error the caller does."""
        cdef int rc
        if self._e == NULL:
            _raise(_errno.ESHUTDOWN, "the relay engine is closed")
        with nogil:
            rc = relay_engine_add(self._e, session_id, fd_a, fd_b)
        if rc == -_errno.EEXIST:
            _raise(-rc, f"relay session {session_id} already exists; ids must be unique")
        if rc == -_errno.ESHUTDOWN:
            _raise(-rc, "the relay engine is closed")
        _check(rc, f"adding relay session {session_id} (fds {fd_a}, {fd_b})")

    def kill(self, unsigned long long session_id) -> bool:
        cdef int rc
        if self._e == NULL:
            return False
        with nogil:
            rc = relay_engine_kill(self._e, session_id)
        if rc == -_errno.ENOENT or rc == -_errno.ESHUTDOWN:
            return False
        _check(rc, f"killing relay session {session_id}")
        return True

    def drain(self, int max_reports=1024) -> list:
        """Finished sessions as (id, a_to_b, b_to_a, duration, reason, error) tuples."""
        cdef relay_report *buf
        cdef size_t n, i
        if self._e == NULL or max_reports <= 0:
            return []
        buf = <relay_report *>malloc(<size_t>max_reports * sizeof(relay_report))
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                n = relay_engine_drain(self._e, buf, <size_t>max_reports)
            out = []
            for i in range(n):
                err = buf[i].error
                out.append((buf[i].session_id, buf[i].bytes_a_to_b, buf[i].bytes_b_to_a,
                            buf[i].duration, relay_reason_name(buf[i].reason).decode(),
                            os.strerror(err) if err else ""))
            return out
        finally:
            free(buf)

    def stats(self) -> dict:
        cdef relay_stats st
        if self._e == NULL:
            return {"active_sessions": 0, "total_sessions": 0, "bytes_total": 0,
                    "pipes_in_use": 0, "pipes_pooled": 0, "buffers_in_use": 0,
                    "buffers_pooled": 0}
        with nogil:
            relay_engine_stats(self._e, &st)
        return {"active_sessions": st.active_sessions, "total_sessions": st.total_sessions,
                "bytes_total": st.bytes_total, "pipes_in_use": st.pipes_in_use,
                "pipes_pooled": st.pipes_pooled, "buffers_in_use": st.buffers_in_use,
                "buffers_pooled": st.buffers_pooled}

    def close(self) -> None:
        """Stop the threads; running sessions are reported as SHUTDOWN (drain() still works).
        Closes every descriptor, the notify fd included: stop watching it first."""
        if self._e == NULL or self._closed:
            return
        self._closed = True
        with nogil:
            relay_engine_close(self._e)

    @property
    def closed(self) -> bool:
        return self._closed
