"""The node skips naming and sizing received packets for a debug line asyncssh would drop, and
still logs them when asyncssh's packet-level debug (level 3) is on."""
from __future__ import annotations

import logging

import pytest
from asyncssh.logging import logger as asyncssh_logger
from asyncssh.packet import SSHPacketLogger

from internal.ssh import transport


assert transport  # importing it installs the check


class _Handler(SSHPacketLogger):
    _handler_names = {94: "MSG_CHANNEL_DATA"}

    def __init__(self, level: int) -> None:
        self._logger = asyncssh_logger.get_child("test")
        self._logger._debug_level = level

    @property
    def logger(self):  # type: ignore[no-untyped-def]
        return self._logger


@pytest.mark.parametrize("level,logged", [(1, False), (2, False), (3, True)])
def test_received_packets_logged_only_at_packet_debug_level(level: int, logged: bool,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    named: list[int] = []
    original = SSHPacketLogger._log_packet
    monkeypatch.setattr(SSHPacketLogger, "_log_packet",
                        lambda self, *a: (named.append(a[1]), original(self, *a)))
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    _Handler(level).log_received_packet(94, 7, b"\x5e" + bytes(100))
    assert named == ([94] if logged else [])
    assert ("Received MSG_CHANNEL_DATA (94), 101 bytes" in caplog.text) is logged
