"""Process limits a relay needs: every relayed session holds two descriptors."""
from __future__ import annotations

import logging

try:
    import resource
except ImportError:          # not on Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger("edgegw.limits")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what an unprivileged process may do);
    returns the soft limit in force afterwards (-1 where there is no such limit)."""
    if resource is None:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
