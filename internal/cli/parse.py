"""Command-line values: sizes, durations, times and address rules, as click parameter types.

Each type turns bad input into a usage error that names the option and shows an example,
so the operator sees exit code 2 and one clear line instead of a traceback.
"""
from __future__ import annotations

import datetime as dt
import re
import time
from fractions import Fraction
from typing import Any, Callable

import click

from edgegw.cliparams import ascii_digits
from internal.ipmatch import canonical_cidr

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "p": 1 << 50}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NONE_WORDS = ("none", "unlimited", "never")
# The store keeps sizes and counts in 64-bit integer columns, max_sessions in a 32-bit one
# (PostgreSQL INTEGER); a larger value would fail in the driver, after the transaction began.
MAX_INT64 = (1 << 63) - 1
MAX_INT32 = (1 << 31) - 1
MAX_DURATION = 36500 * 86400        # 100 years: longer bans or look-backs mean nothing here
# What datetime can show: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
MIN_TIME = dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc).timestamp()
MAX_TIME = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()


class OutOfRange(ValueError):
    """A well-formed value beyond what the node can store or show."""


def _too_long(digits: str) -> bool:
    """More digits than any bound here has; int() of thousands of digits even raises."""
    return len(digits.lstrip("0")) > 25


def _shown(text: str) -> str:
    """The value for an error message, cut short when someone pasted a screenful."""
    return repr(text) if len(text) <= 40 else repr(text[:30]) + f"... ({len(text)} characters)"


def parse_size(text: str) -> int:
    """`10G`, `512M`, `1.5T`, `4096`: binary units (1K = 1024 bytes)."""
    ascii_digits(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m or (m.group(2) == "" and text.strip().lower().endswith("ib")):
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512M, 10G)")
    too_large = OutOfRange(f"{_shown(text)} is too large (at most {MAX_INT64} bytes, "
                           "just under 8192P)")
    if _too_long(m.group(1).split(".")[0]):
        raise too_large
    # exact arithmetic: a float turns 400 digits into inf, and int(inf) raises
    size = int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size > MAX_INT64:
        raise too_large
    return size


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `1d`, `1h30m`: seconds."""
    ascii_digits(text)
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)", text.strip().lower())
    rebuilt = "".join(n + u for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text.strip().lower()) or \
            any(u == "" for _, u in parts[:-1]):
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 10m, 2h, 1d, 1h30m)")
    seconds = sum(float(n) * _DURATION_UNITS[u or "s"] for n, u in parts)
    if seconds > MAX_DURATION:
        raise OutOfRange(f"{_shown(text)} is too long (at most 36500d, 100 years)")
    return seconds


def parse_positive_duration(text: str) -> float:
    """A duration that must be more than zero, such as how long a ban lasts."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not more than zero (examples: 90s, 10m, 2h)")
    return seconds


def _refuse_compact_date(raw: str) -> None:
    """A bare number that is also an ISO date (20250630: Python reads YYYYMMDD) must not be
    taken silently as that many seconds (234 days): the operator meant the date."""
    if not (raw.isascii() and raw.isdigit()):
        return
    try:
        day = dt.date.fromisoformat(raw)
    except ValueError:
        return
    raise ValueError(f"{raw!r} is ambiguous: write the date as {day.isoformat()}, or seconds "
                     f"with a unit ({raw}s)")


def parse_time(text: str, *, now: float | None = None) -> float:
    """An ISO time or date (UTC unless it says otherwise), or `10m`/`2h`/`1d` meaning that long ago."""
    now = time.time() if now is None else now
    raw = text.strip()
    ascii_digits(raw)
    _refuse_compact_date(raw)
    try:
        return now - parse_duration(raw)
    except OutOfRange:
        raise
    except ValueError:
        pass
    return _parse_iso(text, "or 10m / 2h / 1d ago")


def parse_expiry(text: str, *, now: float | None = None) -> float:
    """When an account expires: an ISO time or date as parse_time, but `30d`/`12h` means that
    long FROM now; a time already past is refused (the account would be dead on arrival)."""
    now = time.time() if now is None else now
    raw = text.strip()
    ascii_digits(raw)
    _refuse_compact_date(raw)
    try:
        seconds: float | None = parse_duration(raw)
    except OutOfRange:
        raise
    except ValueError:
        seconds = None
    if seconds is not None:
        if seconds <= 0:
            raise ValueError(f"{text!r} is not more than zero (examples: 12h, 30d, 1w)")
        return now + seconds
    ts = _parse_iso(text, "or 30d / 12h from now")
    if ts <= now:
        raise ValueError(f"{text!r} is in the past (now is {format_time(now)}); give a later "
                         "time, or a duration from now such as 30d")
    return ts


def _parse_iso(text: str, hint: str) -> float:
    """An ISO time or date, UTC unless it says otherwise, as a timestamp datetime can show."""
    raw = text.strip()
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time (examples: 2025-06-30, 2025-06-30T14:00, "
                         f"2025-06-30T14:00+02:00, {hint})") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    ts = when.timestamp()
    # an offset can carry 0001-01-01 or 9999-12-31 past what format_time can show in UTC
    if not MIN_TIME <= ts <= MAX_TIME:
        raise OutOfRange(f"{text!r} is out of range: in UTC it must fall between "
                         "0001-01-01 and 9999-12-31T23:59:59")
    return ts


def format_time(ts: float | None) -> str:
    if ts is None:
        return "never"
    try:  # isoformat, not strftime: %Y leaves year 1 unpadded
        when = dt.datetime.fromtimestamp(ts, dt.timezone.utc).replace(tzinfo=None)
        return when.isoformat(timespec="seconds") + "Z"
    except (OverflowError, ValueError, OSError):  # stored by an older version or by hand
        return f"@{ts:.0f}"


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


def _counter(most: int) -> Callable[[str], int]:
    """Whole numbers from 0 to `most`."""
    def count(text: str) -> int:
        ascii_digits(text)
        if not (text.strip().isascii() and text.strip().isdigit()):
            raise ValueError(f"{text!r} is not a whole number >= 0")
        if _too_long(text.strip()) or int(text) > most:
            raise OutOfRange(f"{_shown(text)} is too large (at most {most})")
        return int(text)
    return count


SIZE = _Type("SIZE", parse_size)
OPTIONAL_SIZE = _Type("SIZE|none", parse_size, optional=True)
OPTIONAL_COUNT = _Type("N|none", _counter(MAX_INT64), optional=True)
OPTIONAL_SESSIONS = _Type("N|none", _counter(MAX_INT32), optional=True)
DURATION = _Type("DURATION", parse_duration)
POSITIVE_DURATION = _Type("DURATION", parse_positive_duration)
TIME = _Type("TIME", parse_time)
EXPIRY = _Type("DATE|ISO|DURATION|never", parse_expiry, optional=True)
CIDR = _Type("CIDR", canonical_cidr)
