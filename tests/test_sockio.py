"""Socket helpers over real loopback sockets: the congestion control a listener or a dialer
was given is the one its connections start with (chosen before the handshake, not switched
after it), a refused choice leaves no socket behind, and "auto" is cubic only for a process
that may set it; client connections' "auto" is decided per connection by its handshake's
round trip."""
from __future__ import annotations

import json
import os
import pwd
import socket
from pathlib import Path

import pytest

from edgegw.netaddr import HostPort
from edgegw.sockio import (
    CC_AUTO, CC_KERNEL, NEAR_RTT_US, ClientCongestion, connect_tcp, listen_socket,
    resolve_client_congestion, resolve_congestion, round_trip_us,
)


def _other_congestion_control() -> str:
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    return "reno" if default != "reno" else "cubic"


def _cc(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_listener_and_dialer_connections_start_with_the_chosen_algorithm() -> None:
    cc = _other_congestion_control()
    with listen_socket(HostPort("127.0.0.1", 0), congestion=cc) as lsock:
        port = lsock.getsockname()[1]
        dialed = await connect_tcp(HostPort("127.0.0.1", port), 5.0, cc)
        lsock.setblocking(True)
        accepted, _ = lsock.accept()
        with dialed, accepted:
            assert _cc(lsock) == cc
            assert _cc(accepted) == cc   # inherited: never set on the accepted socket
            assert _cc(dialed) == cc
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    with listen_socket(HostPort("127.0.0.1", 0)) as lsock:   # none chosen: the kernel's
        assert _cc(lsock) == default


async def test_an_unknown_algorithm_is_refused_without_leaking_the_socket() -> None:
    before = _fds()
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
        listen_socket(HostPort("127.0.0.1", 0), congestion="no-such-cc")
    with listen_socket(HostPort("127.0.0.1", 0)) as lsock:
        with pytest.raises(OSError):
            await connect_tcp(HostPort("127.0.0.1", lsock.getsockname()[1]), 5.0, "no-such-cc")
    assert _fds() == before


def _kernel_cc() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def test_a_named_algorithm_is_set_and_kernel_sets_none() -> None:
    assert resolve_congestion("reno") == ("reno", "reno")
    for name in ("", CC_KERNEL):
        assert resolve_congestion(name) == ("", f"the kernel's default, {_kernel_cc()}")


def _allowed() -> list[str]:
    return Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()


def _available() -> list[str]:
    return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, who may set any algorithm")
def test_auto_is_cubic_for_a_process_that_may_set_it() -> None:
    if _kernel_cc() == "cubic":
        assert resolve_congestion(CC_AUTO) == ("", "cubic (auto: the kernel's default)")
        return
    if "cubic" not in _available():
        pytest.skip("this kernel has no cubic")
    cc, said = resolve_congestion(CC_AUTO)
    assert cc == "cubic" and said == f"cubic (auto; the kernel's default is {_kernel_cc()})"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_auto_keeps_the_kernels_default_where_cubic_is_not_allowed() -> None:
    """A process without CAP_NET_ADMIN may only set the allowed algorithms: "auto" then keeps
    the kernel's default and says why, rather than failing at startup."""
    if "cubic" in _allowed() or _kernel_cc() == "cubic":
        pytest.skip("cubic is allowed here for every process")
    nobody = pwd.getpwnam("nobody")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child drops root (and with it CAP_NET_ADMIN), answers and exits
        try:
            os.close(rfd)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(wfd, json.dumps(resolve_congestion(CC_AUTO)).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        answer = r.read()
    os.waitpid(pid, 0)
    cc, said = json.loads(answer)
    assert cc == ""
    assert said.startswith(f"the kernel's default, {_kernel_cc()} (auto: congestion control "
                           "'cubic' cannot be used: not in net.ipv4.tcp_allowed_congestion_control")


def test_client_auto_is_decided_per_connection_and_other_values_are_fixed() -> None:
    named = resolve_client_congestion("reno")
    assert (named.listener, named.far) == ("reno", "")
    kernel = resolve_client_congestion(CC_KERNEL)
    assert (kernel.listener, kernel.far) == ("", "")
    auto = resolve_client_congestion(CC_AUTO)
    near, _ = resolve_congestion(CC_AUTO)
    if near:   # cubic may be set and is not the default: far clients get the default back
        assert (auto.listener, auto.far) == (near, _kernel_cc())
        assert auto.said == (f"{near} for those whose handshake took under 1 ms, "
                             f"{_kernel_cc()} (the kernel's default) for the rest (auto)")
    else:
        assert (auto.listener, auto.far) == ("", "")


async def test_a_client_on_this_host_is_near_and_keeps_its_listeners_algorithm() -> None:
    """Its handshake's round trip is measured, and under the bound: settle() leaves it as it
    started; a far choice is made only for the others (tests/test_tcp_options.py)."""
    near, far = _other_congestion_control(), _kernel_cc()
    with listen_socket(HostPort("127.0.0.1", 0), congestion=near) as lsock:
        dialed = await connect_tcp(HostPort("127.0.0.1", lsock.getsockname()[1]), 5.0)
        lsock.setblocking(True)
        accepted, _ = lsock.accept()
        with dialed, accepted:
            assert 0 < round_trip_us(accepted) < NEAR_RTT_US
            assert ClientCongestion(near, far, "").settle(accepted) == near
            assert _cc(accepted) == near
            assert ClientCongestion(near, "", "").settle(accepted) == near
