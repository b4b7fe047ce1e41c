"""`edgegw internal hostkey list|rotate|remove`: the node's SSH host keys.

Rotation adds a key and keeps the old ones, so clients that pinned an old key still connect
while they learn the new one; remove the old key once they have. A running node reads its host
keys at startup: restart (or drain and restart) it after a change.
"""
from __future__ import annotations

from pathlib import Path

import asyncssh
import click

from internal.cli.common import home_option, load_home
from internal.home import HomeError, NodeHome, UnreadableHostKey, read_host_key, write_host_key

ALGORITHMS = ("ssh-ed25519", "ecdsa-sha2-nistp256")   # no RSA: nothing to gain, SHA-1 risk


def _bits(key: asyncssh.SSHKey) -> int:
    size = getattr(key.pyca_key, "key_size", None)
    return int(size) if size else 256     # Ed25519 keys have no key_size: they are 256 bits


def describe(path: Path, key: asyncssh.SSHKey) -> str:
    """One line per key: algorithm, size and SHA256 fingerprint as `ssh-keygen -lf` shows it."""
    return f"{key.get_algorithm()} {_bits(key)} {key.get_fingerprint('sha256')} {path.name}"


def _keys(home: NodeHome) -> list[tuple[Path, asyncssh.SSHKey | UnreadableHostKey]]:
    """Every host key file, newest first, with its key or why it cannot be read (damaged, a
    dangling link): one bad file must not hide the others, nor keep it from being removed."""
    keys: list[tuple[Path, asyncssh.SSHKey | UnreadableHostKey]] = []
    for path in home.host_key_paths():
        try:
            keys.append((path, read_host_key(path)))
        except UnreadableHostKey as exc:
            keys.append((path, exc))
    return keys


@click.group(name="hostkey")
def hostkey() -> None:
    """List, add (rotate) and remove the node's SSH host keys."""


@hostkey.command(name="list")
@home_option
def list_keys(home_dir: str) -> None:
    """Show each host key's algorithm and SHA256 fingerprint, newest first; a key that cannot
    be read shows as `unreadable - - FILE (why)`."""
    home = load_home(home_dir)
    keys = _keys(home)
    if not keys:
        raise click.ClickException("no host keys; add one with: edgegw internal hostkey rotate")
    for path, key in keys:
        if isinstance(key, UnreadableHostKey):
            click.echo(f"unreadable - - {path.name} ({key.reason})")
            click.echo(f"warning: the node does not start while {path.name} cannot be read; "
                       f"remove it with: edgegw internal hostkey remove --home {home.path} "
                       f"{path.name}", err=True)
        else:
            click.echo(describe(path, key))


@hostkey.command()
@home_option
@click.option("--alg", type=click.Choice(ALGORITHMS), default="ssh-ed25519", show_default=True,
              help="Algorithm of the new key.")
def rotate(home_dir: str, alg: str) -> None:
    """Add a new host key; the old ones stay until you remove them."""
    home = load_home(home_dir)
    try:
        path = write_host_key(home.ssh_dir, alg)
        key = read_host_key(path)
    except HomeError as exc:   # e.g. ssh/ removed: the path and reason, no traceback
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {describe(path, key)}")
    click.echo("restart the node to offer it; remove the old key once clients have it")


@hostkey.command()
@home_option
@click.argument("key_id", metavar="FINGERPRINT|FILE")
def remove(home_dir: str, key_id: str) -> None:
    """Remove the host key with this SHA256 fingerprint (SHA256:...) or file name
    (host_ed25519_key, as `list` shows it: the way to remove a key that cannot be read). The
    last readable key is never removed."""
    home = load_home(home_dir)
    keys = _keys(home)
    matches = [(p, k) for p, k in keys if key_id in (p.name, str(p))]
    if not matches:
        wanted = key_id if key_id.startswith("SHA256:") else f"SHA256:{key_id}"
        matches = [(p, k) for p, k in keys if not isinstance(k, UnreadableHostKey)
                   and k.get_fingerprint("sha256") == wanted]
        if not matches:
            raise click.ClickException(f"no host key has fingerprint {wanted} or file name "
                                       f"{key_id!r}; see: edgegw internal hostkey list "
                                       f"--home {home.path}")
    readable = {p for p, k in keys if not isinstance(k, UnreadableHostKey)}
    if readable and readable <= {p for p, _ in matches}:
        raise click.ClickException("refusing to remove the only host key: the node could not "
                                   "serve SSH; rotate in a new key first")
    for path, key in matches:
        path.unlink()
        path.with_name(path.name + ".pub").unlink(missing_ok=True)
        if isinstance(key, UnreadableHostKey):
            click.echo(f"removed {path.name} (unreadable)")
        else:
            click.echo(f"removed {path.name} ({key.get_fingerprint('sha256')}); restart the "
                       "node to stop offering it")
