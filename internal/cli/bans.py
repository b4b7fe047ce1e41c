"""`edgegw internal ban list|add|remove`: addresses refused before any SSH byte is read."""
from __future__ import annotations

import json
import time

import click

from internal.cli.admin import admin_change, home_store, record_admin
from internal.cli.common import home_option, load_home
from internal.cli.parse import CIDR, POSITIVE_DURATION, format_duration, format_time
from internal.defender import Defender


@click.group(name="ban")
def ban() -> None:
    """Ban addresses by hand, list bans (including the defender's), lift them."""


@ban.command(name="list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def list_(home_dir: str, as_json: bool) -> None:
    """Active bans, from every node sharing this store."""
    with home_store(load_home(home_dir)) as store:
        bans = store.active_bans()
    now = time.time()
    if as_json:
        for b in bans:
            click.echo(json.dumps({"ip": b.ip, "until": b.until, "until_iso": format_time(b.until),
                                   "reason": b.reason, "level": b.level,
                                   "created": b.created_at}))
        return
    click.echo(f"{'ADDRESS':40} {'UNTIL':20} {'LEFT':>8} {'LEVEL':>5} REASON")
    for b in bans:
        click.echo(f"{b.ip:40} {format_time(b.until):20} {format_duration(b.until - now):>8} "
                   f"{b.level:>5} {b.reason}")


@ban.command()
@click.argument("ip_or_cidr", type=CIDR)
@home_option
@click.option("--duration", type=POSITIVE_DURATION, default="1h", show_default=True,
              help="How long: 90s, 10m, 2h, 7d, 1h30m.")
@click.option("--reason", default="banned by an administrator", show_default=True,
              help="Shown in `ban list` and the audit trail.")
def add(ip_or_cidr: str, home_dir: str, duration: float, reason: str) -> None:
    """Ban an address or network (e.g. 192.0.2.7 or 198.51.100.0/24)."""
    home = load_home(home_dir)
    with admin_change(home) as store:
        entry = Defender(store).add_ban(ip_or_cidr, duration, reason)
        record_admin(store, home, "ban.add", client_ip=entry.ip,
                     detail={"until": format_time(entry.until), "reason": reason,
                             "level": entry.level})
    click.echo(f"banned {entry.ip} until {format_time(entry.until)}")


@ban.command()
@click.argument("ip_or_cidr", type=CIDR)
@home_option
def remove(ip_or_cidr: str, home_dir: str) -> None:
    """Lift the ban on an address or network, written as it was banned."""
    home = load_home(home_dir)
    with admin_change(home) as store:
        if not Defender(store).remove_ban(ip_or_cidr):
            raise click.ClickException(f"{ip_or_cidr} is not banned; see `edgegw internal ban "
                                       "list`")
        record_admin(store, home, "ban.remove", client_ip=ip_or_cidr)
    click.echo(f"unbanned {ip_or_cidr}")
