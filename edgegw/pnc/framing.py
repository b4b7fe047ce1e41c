"""PNC framing: a 4-byte big-endian body length, a 1-byte type, then the body.

The length is checked the moment its four bytes arrive, and the type (with its own, tighter
limit) the moment its byte arrives, so a hostile peer can never make us buffer more than one
legitimate frame: the receive buffer stays under `HEADER_LEN + MAX_BODY` between calls.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping

from edgegw.pnc.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">IB")
HEADER_LEN = HEADER.size     # 5
MAX_BODY = 64 * 1024         # hard cap on any frame body, whatever its type

_LENGTH = struct.Struct(">I")


def encode_frame(frame_type: int, body: bytes) -> bytes:
    """Header plus body; LocalProtocolError if our own body is over the cap."""
    if len(body) > MAX_BODY:
        raise LocalProtocolError(
            f"frame body of {len(body)} bytes exceeds the PNC cap of {MAX_BODY} bytes")
    return HEADER.pack(len(body), frame_type) + body


class FrameReader:
    """Splits a byte stream into (type, body) frames; rejects bad headers as early as possible.

    `limits` maps each known frame type to its largest valid body, so an unknown type or an
    oversize body is refused on the header alone, before any of the body is buffered.
    """

    __slots__ = ("_buf", "_limits")

    def __init__(self, limits: Mapping[int, int]) -> None:
        self._buf = bytearray()
        self._limits = dict(limits)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Complete frames in `data` (plus what was buffered before); keeps the partial tail."""
        buf = self._buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        end = len(buf)
        pos = 0
        limits = self._limits
        try:
            while end - pos >= 4:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > MAX_BODY:
                    raise RemoteProtocolError(
                        f"peer announced a {length}-byte frame; the PNC cap is {MAX_BODY} bytes "
                        "(is the peer speaking the PNC at all?)")
                if end - pos < HEADER_LEN:
                    break
                frame_type = buf[pos + 4]
                limit = limits.get(frame_type)
                if limit is None:
                    raise RemoteProtocolError(f"unknown PNC frame type 0x{frame_type:02x}")
                if length > limit:
                    raise RemoteProtocolError(
                        f"frame type 0x{frame_type:02x} announced {length} bytes; "
                        f"at most {limit} are valid")
                stop = pos + HEADER_LEN + length
                if stop > end:
                    break
                frames.append((frame_type, bytes(buf[pos + HEADER_LEN:stop])))
                pos = stop
        finally:
            # Drop what was consumed, even when raising: the caller treats the stream as dead.
            if pos:
                del buf[:pos]
        return frames


__all__ = ["FrameReader", "HEADER", "HEADER_LEN", "MAX_BODY", "encode_frame"]
