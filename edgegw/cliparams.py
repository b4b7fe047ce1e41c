"""Click parameter callbacks shared by the gateway's and the node's commands."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from edgegw.metrics_http import MetricsEndpoint, tls_context
from edgegw.netaddr import HostPort, Network, parse_hostport, parse_networks
from edgegw.relay.base import MAX_IDLE_TIMEOUT
from edgegw.sockio import check_congestion

F = TypeVar("F", bound=Callable[..., Any])

# The longest duration an option takes: the relay engine's idle-timeout bound, about 31 years.
MAX_SECONDS = MAX_IDLE_TIMEOUT


def ascii_digits(text: str) -> None:
    """Numbers take the digits 0-9 only: int(), float() and a regex's \\d also take
    Arabic-Indic (١٢), fullwidth (１２) and other scripts' digits, which would be taken as 12
    unseen. ValueError otherwise."""
    if not text.isascii() and any(c.isdigit() for c in text):
        shown = repr(text) if len(text) <= 40 else repr(text[:30]) + "..."
        raise ValueError(f"{shown} has digits other than 0-9: write numbers with ASCII digits")


class AsciiDigits(click.ParamType):
    """Mixed into a click number type (IntRange, FloatRange): refuses digits other than 0-9,
    which its int()/float() would take."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                ascii_digits(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


class IntRange(AsciiDigits, click.IntRange):
    """click.IntRange, digits 0-9 only."""


class Seconds(AsciiDigits, click.FloatRange):
    """A duration option: a finite number of seconds from `min` to MAX_SECONDS. A plain
    FloatRange lets 'nan' through (no comparison fails), which timers then take as 'never'."""

    name = "seconds"

    def __init__(self, min: float = 0.0) -> None:
        super().__init__(min, MAX_SECONDS)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def congestion(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A --congestion-* option: a TCP congestion control this process may set, "kernel" (its
    default) or "auto" (edgegw.sockio.resolve_congestion), refused at startup with the
    option's name rather than per connection."""
    try:
        check_congestion(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def hostport(ctx: click.Context, param: click.Parameter,
             value: str | tuple[str, ...] | None) -> HostPort | list[HostPort] | None:
    """A HOST:PORT option, parsed: one address, a list for a repeatable option, or None for
    an optional one left out."""
    if value is None:
        return None
    try:
        if isinstance(value, tuple):
            return [parse_hostport(v) for v in value]
        return parse_hostport(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def networks(ctx: click.Context, param: click.Parameter,
             value: tuple[str, ...]) -> tuple[Network, ...]:
    """A repeatable CIDR option (--proxy-protocol-from, --metrics-allow), parsed."""
    try:
        return parse_networks(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def metrics_options(what: str) -> Callable[[F], F]:
    """--metrics, --metrics-allow, --metrics-cert, --metrics-key and --metrics-client-ca on a
    command, which gets them as one `metrics` argument: a MetricsEndpoint, or None when
    --metrics is left out. `what` lists what the metrics count, for --metrics' help."""
    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, metrics: HostPort | None, metrics_allow: tuple[Network, ...],
                    metrics_cert: Path | None, metrics_key: Path | None,
                    metrics_client_ca: Path | None, **kwargs: Any) -> Any:
            endpoint = _endpoint(metrics, metrics_allow, metrics_cert, metrics_key,
                                 metrics_client_ca)
            return f(*args, metrics=endpoint, **kwargs)

        options = [
            click.option("--metrics", default=None, metavar="HOST:PORT", callback=hostport,
                         help=f"Serve Prometheus metrics at http://HOST:PORT/metrics ({what}). "
                              "Bind it to a management address; narrow it with --metrics-allow, "
                              "authenticate scrapers with --metrics-client-ca. Default: not "
                              "served."),
            click.option("--metrics-allow", multiple=True, metavar="CIDR", callback=networks,
                         help="Answer scrapes from these addresses only (repeatable); "
                              "others' connections are closed at accept. Default: any that "
                              "can connect."),
            click.option("--metrics-cert", default=None, metavar="PEM",
                         type=click.Path(dir_okay=False, path_type=Path),
                         help="Serve the metrics over HTTPS (https://HOST:PORT/metrics) "
                              "with this certificate (chain)."),
            click.option("--metrics-key", default=None, metavar="PEM",
                         type=click.Path(dir_okay=False, path_type=Path),
                         help="The private key of --metrics-cert, if it is not in that file."),
            click.option("--metrics-client-ca", default=None, metavar="PEM",
                         type=click.Path(dir_okay=False, path_type=Path),
                         help="With --metrics-cert: answer only scrapers that present a "
                              "certificate issued by this CA (Prometheus' tls_config "
                              "cert_file/key_file)."),
        ]
        for option in reversed(options):
            command = option(command)
        return command  # type: ignore[return-value]
    return decorate


def _endpoint(addr: HostPort | None, allow: tuple[Network, ...], cert: Path | None,
              key: Path | None, client_ca: Path | None) -> MetricsEndpoint | None:
    if addr is None:
        for given, name in ((allow, "--metrics-allow"), (cert, "--metrics-cert"),
                            (key, "--metrics-key"), (client_ca, "--metrics-client-ca")):
            if given:
                raise click.UsageError(f"{name} needs --metrics")
        return None
    for given, name in ((key, "--metrics-key"), (client_ca, "--metrics-client-ca")):
        if given is not None and cert is None:
            raise click.UsageError(f"{name} needs --metrics-cert")
    try:
        tls = tls_context(cert, key, client_ca) if cert is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--metrics-cert'") from None
    return MetricsEndpoint(addr, allow, tls)
