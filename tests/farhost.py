"""A far host for tests: a network namespace reached through two TUN devices, with a thread of
this process carrying every packet between them after a delay, so that its connections to
this host have a real round trip of 2 x delay (this kernel may have no netem qdisc).

    with FarHost(delay=0.003) as far:     # root only; far.address reaches this host
        subprocess.run(far.exec("sftp", ..., f"user@{far.here}"))
"""
from __future__ import annotations

import fcntl
import heapq
import itertools
import os
import select
import struct
import subprocess
import threading
import time
from types import TracebackType

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class FarHost:
    """`here` (this namespace's end) and `address` (the far one) on a /30 of their own; the
    namespace is removed, the devices closed and the thread stopped on exit."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        tag = os.getpid() % 100000
        self.netns = f"egw-far-{tag}"
        self._names = (f"egwh{tag}", f"egwf{tag}")
        net = 16 + tag % 200   # 10.213.N.0/30: distinct for test runs side by side
        self.here, self.address = f"10.213.{net}.1", f"10.213.{net}.2"
        self._fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._carry, name="farhost", daemon=True)

    def __enter__(self) -> "FarHost":
        # one left by a run of the same pid that was killed before its exit ran
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        try:
            self._fds = [_open_tun(name) for name in self._names]
            _ip("netns", "add", self.netns)
            _ip("link", "set", self._names[1], "netns", self.netns)
            _ip("addr", "add", f"{self.here}/30", "dev", self._names[0])
            _ip("link", "set", self._names[0], "up")
            for args in (("addr", "add", f"{self.address}/30", "dev", self._names[1]),
                         ("link", "set", self._names[1], "up"), ("link", "set", "lo", "up")):
                _ip("-n", self.netns, *args)
        except BaseException:
            self._teardown()
            raise
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._teardown()

    def exec(self, *argv: str) -> list[str]:
        """A command line that runs `argv` on the far host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def _teardown(self) -> None:
        for fd in self._fds:
            os.close(fd)   # the devices go with their last descriptor
        self._fds = []
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    def _carry(self) -> None:
        """Each packet read from one device is written to the other `delay` seconds later."""
        here, far = self._fds
        other = {here: far, far: here}
        due: list[tuple[float, int, int, bytes]] = []
        seq = itertools.count()
        while not self._stop.is_set():
            wait = 0.05 if not due else max(0.0, due[0][0] - time.monotonic())
            ready, _, _ = select.select([here, far], [], [], min(wait, 0.05))
            now = time.monotonic()
            for fd in ready:
                heapq.heappush(due, (now + self.delay, next(seq), other[fd], os.read(fd, 65536)))
            while due and due[0][0] <= now:
                _, _, fd, packet = heapq.heappop(due)
                try:
                    os.write(fd, packet)
                except OSError:   # a device going down at exit
                    pass
