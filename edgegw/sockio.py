"""Small socket helpers for code that keeps raw sockets (to hand their fds to the relay)."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
import struct
from dataclasses import dataclass

from edgegw.netaddr import HostPort


def listen_socket(addr: HostPort, backlog: int = 1024, *, reuse_port: bool = False,
                  congestion: str = "") -> socket.socket:
    """A non-blocking listening socket; OSError names the address that could not be bound.
    `reuse_port` lets several worker processes share the port (the kernel spreads clients);
    `congestion` is the TCP congestion control its connections start with (see
    set_congestion: "" keeps the kernel's default)."""
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:   # a host name that does not resolve
        raise _listen_error(addr, exc) from None
    family = infos[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_congestion(sock, congestion)
        sock.bind(infos[0][4])
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(addr, exc) from None
    return sock


def _listen_error(addr: HostPort, exc: OSError) -> OSError:
    """One line for the operator (no '[Errno 98]' in front), the errno kept for code."""
    err = OSError(f"cannot listen on {addr}: {exc.strerror or exc}")
    err.errno = exc.errno
    return err


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def listening(port: int) -> bool:
    """True when something listens on the TCP port (checked in /proc/net/tcp{,6}, so that
    waiting for a relay does not open a session through it to the service behind)."""
    hexport = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and (cols[1] + " ").endswith(hexport):
                        return True
        except OSError:
            continue
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, for a server that a child process will bind later.

    Chosen outside the kernel's ephemeral range: a port the kernel handed out for ``bind(0)``
    can be taken by any outgoing connection before the child binds it. Ports already returned
    by this process are not repeated."""
    low, high = _ephemeral_range()
    spans = [(a, b) for a, b in ((20000, low - 1), (high + 1, 65535)) if a <= b]
    for _ in range(500 if spans else 0):
        a, b = random.choice(spans)
        port = random.randint(a, b)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no room outside the ephemeral range: take the kernel's pick
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def connect_tcp(addr: HostPort, timeout: float, congestion: str = "") -> socket.socket:
    """A connected, non-blocking TCP socket with Nagle off (both sides exchange small
    messages and wait for answers); closed again if the connect fails or is cancelled.
    `congestion`: its TCP congestion control, chosen before the handshake (set_congestion)."""
    loop = asyncio.get_running_loop()
    try:  # an address needs no resolver thread (Data connections are dialed per session)
        family = socket.AF_INET6 if ipaddress.ip_address(addr.host).version == 6 \
            else socket.AF_INET
        sockaddr: tuple = (addr.host, addr.port)
    except ValueError:
        infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        set_congestion(sock, congestion)
        await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
    except BaseException:
        sock.close()
        raise
    set_nodelay(sock)
    return sock


async def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes, never more (bytes after them belong to whoever gets the socket)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def set_sndbuf(sock: socket.socket, size: int) -> None:
    """A fixed send buffer of `size` bytes (the kernel doubles it for its bookkeeping); 0
    leaves the kernel's autotuning on. A fixed buffer also bounds what is in flight, so a
    connection moves at most about size / RTT."""
    if size > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


_CC_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"
_CC_DEFAULT = "/proc/sys/net/ipv4/tcp_congestion_control"

CC_AUTO = "auto"       # the Data hop's default: DATA_HOP_CC where this process may set it
CC_KERNEL = "kernel"   # the kernel's default, said explicitly ("" means the same)
# The Data hop joins edgegw's own two ends over a short internal path, where an unpaced
# algorithm does what bbr does for less CPU: without the fq qdisc bbr paces each burst with a
# per-socket timer, and a relay's bursts are large (bench/README.md, "Congestion control").
DATA_HOP_CC = "cubic"


def check_congestion(name: str) -> None:
    """ValueError unless this process may give a TCP socket congestion control `name`
    (the kernel has it, and it is allowed for processes without CAP_NET_ADMIN or this one has
    it). "", "kernel" (the kernel's default) and "auto" (see resolve_congestion) always pass."""
    if name in ("", CC_KERNEL, CC_AUTO):
        return
    if not hasattr(socket, "TCP_CONGESTION"):
        raise ValueError(f"congestion control {name!r}: this system cannot choose one per socket")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            try:
                with open(_CC_AVAILABLE) as f:
                    have = f.read().strip()
            except OSError:
                have = "unknown"
            why = {errno.ENOENT: "the kernel does not have it",
                   errno.EPERM: "not in net.ipv4.tcp_allowed_congestion_control"}.get(
                       exc.errno or 0, exc.strerror)
            raise ValueError(f"congestion control {name!r} cannot be used: {why} "
                             f"(available here: {have})") from None


def kernel_congestion() -> str:
    """The kernel's default TCP congestion control ("unknown" where it cannot be read)."""
    try:
        with open(_CC_DEFAULT) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def resolve_congestion(name: str) -> tuple[str, str]:
    """What a --congestion-* value sets on sockets ("" = nothing: the kernel's default) and
    how to say so in the startup log. "auto" is DATA_HOP_CC unless the kernel's default is
    already that, or this process may not set it (without CAP_NET_ADMIN only the algorithms
    in net.ipv4.tcp_allowed_congestion_control are allowed); then the kernel's default."""
    if name in ("", CC_KERNEL):
        return "", f"the kernel's default, {kernel_congestion()}"
    if name != CC_AUTO:
        return name, name
    default = kernel_congestion()
    if default == DATA_HOP_CC:
        return "", f"{default} (auto: the kernel's default)"
    try:
        check_congestion(DATA_HOP_CC)
    except ValueError as exc:
        return "", f"the kernel's default, {default} (auto: {exc})"
    return DATA_HOP_CC, f"{DATA_HOP_CC} (auto; the kernel's default is {default})"


def set_congestion(sock: socket.socket, name: str) -> None:
    """TCP congestion control `name` for a socket not yet connected, or a listening one whose
    connections inherit it ("" keeps the kernel's default). OSError if the kernel refuses it,
    which check_congestion has ruled out at startup unless the module was unloaded since.

    Not for switching an established connection away from bbr: bbr leaves it paced by the
    TCP stack's own timer whatever comes after it (an accepted socket switched to cubic still
    armed about 900 pacing timers per 2 s stream on loopback; one that started with cubic,
    none). Switching to bbr works: bbr asks for pacing when it starts (ClientCongestion)."""
    if name:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())


# A client whose handshake took less than this is near: this host, its LAN or its datacenter.
# Over such a path bbr moves no more than cubic, and without the fq qdisc it paces each of the
# relay's bursts with a timer of its own (bench/README.md, "Congestion control").
NEAR_RTT_US = 1000
_TCPI_RTT = 68   # struct tcp_info: 8 one-byte fields, then tcpi_rto ... tcpi_rtt (the 16th u32)
_TCPI_UPTO_RTT = _TCPI_RTT + 4   # the part of it read


def round_trip_us(sock: socket.socket) -> int:
    """The connection's smoothed round trip as the kernel measured it so far (for one just
    accepted: its handshake's), in microseconds; 0 where there is none (a connection made
    from a SYN cookie, or a system without TCP_INFO)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UPTO_RTT)
    except (OSError, AttributeError):
        return 0
    if len(info) < _TCPI_UPTO_RTT:
        return 0
    return int(struct.unpack_from("I", info, _TCPI_RTT)[0])


@dataclass(frozen=True)
class ClientCongestion:
    """The TCP congestion control of client connections (resolve_client_congestion):
    `listener` is set on the listening socket, so every connection starts with it; `far`,
    where set, replaces it on a connection whose handshake took NEAR_RTT_US or more (or was
    not measured), before anything is sent on it."""

    listener: str
    far: str
    said: str

    def settle(self, sock: socket.socket) -> str:
        """Choose for a connection just accepted; returns the algorithm it now runs ("" for
        the kernel's default, as given)."""
        if not self.far:
            return self.listener
        if 0 < round_trip_us(sock) < NEAR_RTT_US:
            return self.listener
        try:
            set_congestion(sock, self.far)
        except OSError:   # the kernel's own default is always allowed; unloaded since?
            return self.listener
        return self.far


def resolve_client_congestion(name: str) -> ClientCongestion:
    """--congestion-client: as resolve_congestion, except that "auto" is per connection: the
    Data hop's choice (cubic) for near clients and the kernel's default for the rest, where
    the two differ and this process may set both."""
    listener, said = resolve_congestion(name)
    far = kernel_congestion()
    if name != CC_AUTO or not listener or far == "unknown":
        return ClientCongestion(listener, "", said)
    return ClientCongestion(listener, far, f"{listener} for those whose handshake took "
                            f"under {NEAR_RTT_US / 1000:g} ms, {far} (the kernel's default) "
                            "for the rest (auto)")


KEEPALIVE_IDLE = 60       # seconds idle before the first probe: under common firewall timeouts
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4       # a dead peer is noticed ~2 minutes after it went quiet


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a connection that may sit idle for long (pooled Data connections): the
    probes keep stateful firewalls between gateway and node from dropping it silently, and a
    peer that vanished turns into a socket error instead of a hang."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass
