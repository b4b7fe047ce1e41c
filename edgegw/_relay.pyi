"""Typed stub of the C relay engine binding (edgegw/_relay.pyx)."""
from typing import Final

BACKENDS: Final[tuple[str, ...]]
COALESCE_DEFAULT_US: Final[int]
COALESCE_MAX_US: Final[int]
POOL_MAX: Final[int]
IDLE_TIMEOUT_MAX: Final[float]

ReportTuple = tuple[int, int, int, float, str, str]

class Engine:
    backend: Final[str]
    def __init__(
        self,
        backend: str = "splice",
        *,
        threads: int = 1,
        pipe_size: int = 1 << 20,
        idle_timeout: float = 0.0,
        fin_timeout: float = 0.0,
        pool_max: int = 64,
        buffer_size: int = 64 * 1024,
        coalesce_us: int = 0,
        sched_batch: bool = True,
    ) -> None: ...
    @property
    def notify_fd(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def add(self, session_id: int, fd_a: int, fd_b: int) -> None: ...
    def kill(self, session_id: int) -> bool: ...
    def drain(self, max_reports: int = 1024) -> list[ReportTuple]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
