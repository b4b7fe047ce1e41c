"""Click parameter callbacks shared by the gateway's and the node's commands."""
from __future__ import annotations

import click

from edgegw.netaddr import Network, parse_networks
from edgegw.sockio import check_congestion


def congestion(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A --congestion-* option: a TCP congestion control this process may set ("" = the
    kernel's default), refused at startup with the option's name rather than per connection."""
    try:
        check_congestion(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def networks(ctx: click.Context, param: click.Parameter,
             value: tuple[str, ...]) -> tuple[Network, ...]:
    """A repeatable CIDR option (--proxy-protocol-from, --metrics-allow), parsed."""
    try:
        return parse_networks(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
