# C declarations of the relay engine (csrc/relay.h); behaviour lives in _relay.pyx.
from libc.stdint cimport uint64_t


cdef extern from "relay.h" nogil:
    ctypedef struct relay_engine:
        pass

    enum:
        RELAY_COALESCE_DEFAULT_US
        RELAY_COALESCE_MAX_US
        RELAY_POOL_MAX
        RELAY_IDLE_TIMEOUT_MAX

    ctypedef struct relay_config:
        int threads
        size_t pipe_size
        size_t pool_max
        size_t buffer_size
        double idle_timeout
        double fin_timeout
        unsigned coalesce_us
        int sched_batch

    ctypedef struct relay_report:
        uint64_t session_id
        uint64_t bytes_a_to_b
        uint64_t bytes_b_to_a
        double duration
        int reason
        int error

    ctypedef struct relay_stats:
        uint64_t active_sessions
        uint64_t total_sessions
        uint64_t bytes_total
        uint64_t pipes_in_use
        uint64_t pipes_pooled
        uint64_t buffers_in_use
        uint64_t buffers_pooled

    void relay_config_default(relay_config *cfg)
    int relay_backend_available(const char *backend)
    const char *relay_reason_name(int reason)
    int relay_engine_create(const char *backend, const relay_config *cfg, relay_engine **out)
    int relay_engine_notify_fd(const relay_engine *e)
    int relay_engine_add(relay_engine *e, uint64_t session_id, int fd_a, int fd_b)
    int relay_engine_kill(relay_engine *e, uint64_t session_id)
    size_t relay_engine_drain(relay_engine *e, relay_report *out, size_t max)
    void relay_engine_stats(relay_engine *e, relay_stats *out)
    void relay_engine_close(relay_engine *e)
    void relay_engine_destroy(relay_engine *e)


cdef class Engine:
    cdef relay_engine *_e
    cdef readonly str backend
    cdef bint _closed
