"""`edgegw internal audit`: who moved which file, when, from where."""
from __future__ import annotations

import json

import click

from internal.cli.admin import home_store
from internal.cli.common import home_option, load_home
from edgegw.cliparams import IntRange
from internal.cli.parse import TIME, format_time
from internal.ipmatch import canonical_cidr, parse_ip
from internal.store import AuditEvent


@click.command(name="audit")
@home_option
@click.option("--user", "username", default=None, help="Only this user's events.")
@click.option("--ip", default=None, metavar="IP|CIDR",
              help="Only events from this client address, or from any address in this "
                   "network (10.0.0.0/8, 2001:db8::/32; IPv4-mapped IPv6 counts as IPv4), "
                   "bans of the network or of networks inside it included.")
@click.option("--since", type=TIME, default=None, metavar="TIME",
              help="From this time: ISO (2025-06-30, 2025-06-30T14:00Z) or ago (10m, 2h, 1d).")
@click.option("--session", "session_id", default=None, help="Only this session id.")
@click.option("--kind", default=None,
              help="Only this kind (auth, file.close, user.set...); `file.*` for a family.")
@click.option("--limit", type=IntRange(1, 1_000_000), default=100, show_default=True,
              help="At most this many events (the newest).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def audit(home_dir: str, username: str | None, ip: str | None, since: float | None,
          session_id: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """Show the audit trail, oldest first, across every node sharing the store."""
    if ip is not None:
        try:
            # a network (a /32 or /128 is one address): every event whose address lies in it
            ip = str(parse_ip(ip)) if "/" not in ip else canonical_cidr(ip)
        except ValueError:
            raise click.BadParameter(f"{ip!r} is not an IP address or CIDR",
                                     param_hint="--ip") from None
    with home_store(load_home(home_dir)) as store:
        events = store.query_audit(username=username, ip=ip, since=since,
                                   session_id=session_id, kind=kind, limit=limit)
    if as_json:
        for e in events:
            click.echo(json.dumps(_as_dict(e), sort_keys=True, default=str))
        return
    click.echo(f"{'TIME':20} {'KIND':18} {'USER':14} {'CLIENT':22} {'SESSION':16} DETAIL")
    for e in events:
        client = f"{e.client_ip}:{e.client_port}" if e.client_port else e.client_ip
        detail = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in e.detail.items())
        click.echo(f"{format_time(e.ts):20} {e.kind:18} {e.username or '-':14} "
                   f"{client or '-':22} {e.session_id or '-':16} {detail}")


def _as_dict(e: AuditEvent) -> dict[str, object]:
    return {"id": e.id, "ts": e.ts, "time": format_time(e.ts), "kind": e.kind,
            "node": e.node_id, "session": e.session_id, "user": e.username,
            "ip": e.client_ip, "port": e.client_port, "gateway": e.gateway, "detail": e.detail}
