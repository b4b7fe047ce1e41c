"""Socket helpers over real loopback sockets: the congestion control a listener or a dialer
was given is the one its connections start with (chosen before the handshake, not switched
after it), and a refused choice leaves no socket behind."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edgegw.netaddr import HostPort
from edgegw.sockio import connect_tcp, listen_socket


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
