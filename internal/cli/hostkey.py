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
from internal.home import HomeError, NodeHome, write_host_key

ALGORITHMS = ("ssh-ed25519", "ecdsa-sha2-nistp256")   # no RSA: nothing to gain, SHA-1 risk


def _load(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except Exception as exc:   # a damaged key raises more than KeyImportError (ValueError...)
        raise click.ClickException(f"cannot read host key {path}: {exc}") from None


def _bits(key: asyncssh.SSHKey) -> int:
    size = getattr(key.pyca_key, "key_size", None)
    return int(size) if size else 256     # Ed25519 keys have no key_size: they are 256 bits


def describe(path: Path, key: asyncssh.SSHKey) -> str:
    """One line per key: algorithm, size and SHA256 fingerprint as `ssh-keygen -lf` shows it."""
    return f"{key.get_algorithm()} {_bits(key)} {key.get_fingerprint('sha256')} {path.name}"


def _keys(home: NodeHome) -> list[tuple[Path, asyncssh.SSHKey]]:
    return [(p, _load(p)) for p in home.host_key_paths()]


@click.group(name="hostkey")
def hostkey() -> None:
    """List, add (rotate) and remove the node's SSH host keys."""


@hostkey.command(name="list")
@home_option
def list_keys(home_dir: str) -> None:
    """Show each host key's algorithm and SHA256 fingerprint, newest first."""
    keys = _keys(load_home(home_dir))
    if not keys:
        raise click.ClickException("no host keys; add one with: edgegw internal hostkey rotate")
    for path, key in keys:
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
    except HomeError as exc:   # e.g. ssh/ removed: the path and reason, no traceback
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {describe(path, _load(path))}")
    click.echo("restart the node to offer it; remove the old key once clients have it")


@hostkey.command()
@home_option
@click.argument("fingerprint")
def remove(home_dir: str, fingerprint: str) -> None:
    """Remove the host key with FINGERPRINT (SHA256:...); the last key is never removed."""
    home = load_home(home_dir)
    keys = _keys(home)
    wanted = fingerprint if fingerprint.startswith("SHA256:") else f"SHA256:{fingerprint}"
    matches = [p for p, k in keys if k.get_fingerprint("sha256") == wanted]
    if not matches:
        raise click.ClickException(f"no host key has fingerprint {wanted}; see: "
                                   f"edgegw internal hostkey list --home {home.path}")
    if len(keys) <= 1:
        raise click.ClickException("refusing to remove the only host key: the node could not "
                                   "serve SSH; rotate in a new key first")
    for path in matches:
        path.unlink()
        path.with_name(path.name + ".pub").unlink(missing_ok=True)
        click.echo(f"removed {path.name} ({wanted}); restart the node to stop offering it")
