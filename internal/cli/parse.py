"""Command-line values: sizes, durations, times and address rules, as click parameter types.

Each type turns bad input into a usage error that names the option and shows an example,
so the operator sees exit code 2 and one clear line instead of a traceback.
"""
from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import click

from internal.ipmatch import canonical_cidr

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "p": 1 << 50}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NONE_WORDS = ("none", "unlimited", "never")


def parse_size(text: str) -> int:
    """`10G`, `512M`, `1.5T`, `4096`: binary units (1K = 1024 bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m or (m.group(2) == "" and text.strip().lower().endswith("ib")):
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512M, 10G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `1d`, `1h30m`: seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text.strip().lower())
    rebuilt = "".join(n + u for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text.strip().lower()) or \
            any(u == "" for _, u in parts[:-1]):
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 10m, 2h, 1d, 1h30m)")
    return sum(float(n) * _DURATION_UNITS[u or "s"] for n, u in parts)


def parse_time(text: str, *, now: float | None = None) -> float:
    """An ISO time or date (UTC unless it says otherwise), or `10m`/`2h`/`1d` meaning that long ago."""
    now = time.time() if now is None else now
    raw = text.strip()
    try:
        return now - parse_duration(raw)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time (examples: 2025-06-30, 2025-06-30T14:00, "
                         "2025-06-30T14:00+02:00, or 10m / 2h / 1d ago)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def format_time(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{_rest(seconds % size, size)}"
    return f"{seconds}s"


def _rest(rem: int, size: int) -> str:
    smaller = {86400: ("h", 3600), 3600: ("m", 60), 60: ("s", 1)}[size]
    return f"{rem // smaller[1]}{smaller[0]}" if rem >= smaller[1] else ""


class _Type(click.ParamType):
    """Adapts a `parse_*` function; `optional` also accepts none/unlimited/never → None."""

    def __init__(self, name: str, fn: Any, optional: bool = False) -> None:
        self.name, self._fn, self._optional = name, fn, optional

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if self._optional and value.strip().lower() in _NONE_WORDS:
            return None
        try:
            return self._fn(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a whole number >= 0")
    return int(text)


SIZE = _Type("SIZE", parse_size)
OPTIONAL_SIZE = _Type("SIZE|none", parse_size, optional=True)
OPTIONAL_COUNT = _Type("N|none", _count, optional=True)
DURATION = _Type("DURATION", parse_duration)
TIME = _Type("TIME", parse_time)
OPTIONAL_TIME = _Type("TIME|never", parse_time, optional=True)
CIDR = _Type("CIDR", canonical_cidr)
