"""`edgegw internal user add|set|show|list|remove`: who may log in, from where, to do what."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import asyncssh
import click

from internal.cli.admin import admin_change, home_store, record_admin, require_utf8
from internal.cli.common import home_option, load_home
from internal.cli.parse import (CIDR, EXPIRY, OPTIONAL_COUNT, OPTIONAL_SESSIONS,
                                OPTIONAL_SIZE, format_time)
from internal.home import HomeError, NodeHome, resolve_path
from internal.passwords import hash_password
from internal.store import ALL_PERMS, AlreadyExists, NotFound, Perm, User

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")
PRESETS: dict[str, frozenset[Perm]] = {
    "all": ALL_PERMS,
    "readonly": frozenset({Perm.LIST, Perm.DOWNLOAD}),
    "writeonly": frozenset({Perm.UPLOAD, Perm.OVERWRITE, Perm.MKDIR}),
}
KEEP: Any = object()   # "option not given" for `set`, where None means "clear"
_PERM_HELP = ("Comma-separated permissions (repeatable): " + ", ".join(p.value for p in Perm)
              + ". Replaces the current set.")


# ---- option groups shared by add and set ------------------------------------------------------

def _options(specs: list[tuple[tuple[str, ...], dict[str, Any]]]) -> Callable[[Any], Any]:
    def deco(f: Any) -> Any:
        for decls, kw in reversed(specs):
            f = click.option(*decls, **kw)(f)
        return f
    return deco


def _common_options(keep: Any) -> Callable[[Any], Any]:
    """Options that mean the same in `add` and `set`; in `set`, leaving one out keeps the value."""
    return _options([
        (("--password-stdin",), dict(is_flag=True, help="Read the password from stdin (one "
                                     "line; prompts twice on a terminal). Stored as argon2id.")),
        (("--home-dir", "user_root"), dict(type=click.Path(file_okay=False), default=None,
                               help="The user's root directory (created with mode 0750). "
                                    "Default: files/NAME in the node home.")),
        (("--perm", "perms"), dict(multiple=True, metavar="PERM[,PERM...]", help=_PERM_HELP)),
        (("--perm-preset",), dict(type=click.Choice(sorted(PRESETS)), default=None,
                                  help="all; readonly = list,download; "
                                       "writeonly = upload,overwrite,mkdir (a drop box).")),
        (("--expires", "expires_at"), dict(
            type=EXPIRY, default=keep, metavar="DATE|ISO|DURATION|never",
            help="Refuse logins from this time on: a date or ISO time (UTC unless an offset is "
                 "given), e.g. 2026-01-31 or 2026-01-31T18:00+01:00; a DURATION from now, "
                 "e.g. 12h, 30d, 1w; or never. A time already past is refused.")),
        (("--quota-bytes",), dict(type=OPTIONAL_SIZE, default=keep, metavar="SIZE|none",
                                  help="Storage quota, binary units: 500M, 10G, 1T.")),
        (("--quota-files",), dict(type=OPTIONAL_COUNT, default=keep, metavar="N|none",
                                  help="Maximum number of files.")),
        (("--max-sessions",), dict(type=OPTIONAL_SESSIONS, default=keep, metavar="N|none",
                                   help="Maximum concurrent sessions, counted across every "
                                        "node and worker sharing the store.")),
    ])


@click.group(name="user")
def user() -> None:
    """Manage SFTP users: keys, password, permissions, address rules, quotas."""


@user.command()
@click.argument("name")
@home_option
@click.option("--key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help="OpenSSH public key file (one key per line, authorized_keys style). "
                   "Repeatable.")
@_common_options(keep=None)
@click.option("--allow-ip", "allow", multiple=True, type=CIDR, metavar="CIDR",
              help="Only these addresses/networks may log in (repeatable; none = any).")
@click.option("--deny-ip", "deny", multiple=True, type=CIDR, metavar="CIDR",
              help="These addresses/networks may never log in; deny wins over allow.")
@click.option("--disabled", is_flag=True, help="Create the user with logins refused.")
def add(name: str, home_dir: str, key_files: tuple[str, ...], password_stdin: bool,
        **opts: Any) -> None:
    """Create user NAME. Give at least a key (--key) or a password (--password-stdin)."""
    home = load_home(home_dir)
    _check_name(name)
    keys = _dedupe([k for f in key_files for k in load_key_file(f)])
    password_hash = _read_password() if password_stdin else None
    perms = _perms(opts.pop("perms"), opts.pop("perm_preset"))
    if perms is None:   # not `or`: an empty set must never widen to every permission
        perms = ALL_PERMS
    user_root = opts.pop("user_root")
    with _undo_mkdirs() as made, admin_change(home) as store:
        if store.get_user(name) is not None:
            raise click.ClickException(f"user {name!r} already exists; change it with "
                                       f"`edgegw internal user set {name}`")
        root = _root_path(home, name, user_root)
        u = User(name=name, home=str(root), password_hash=password_hash, keys=keys,
                 permissions=perms, allow_cidrs=_dedupe(opts.pop("allow")),
                 deny_cidrs=_dedupe(opts.pop("deny")), disabled=opts.pop("disabled"), **opts)
        try:
            store.add_user(u)
        except AlreadyExists:
            raise click.ClickException(f"user {name!r} already exists; change it with "
                                       f"`edgegw internal user set {name}`") from None
        # The row first, the directory after: an add of the same name on another node sharing
        # the store waits on this row and fails before it makes (and then removes, undoing)
        # the directory this user may already be using.
        _create_root(root, made)
        record_admin(store, home, "user.add", username=name, detail=_describe(u))
    click.echo(f"added user {name} (home {root})")
    if not keys and password_hash is None:
        click.echo(f"warning: {name} has no key and no password and cannot log in yet; "
                   f"add one with `edgegw internal user set {name}`", err=True)


@user.command(name="set")
@click.argument("name")
@home_option
@click.option("--add-key", "--key", "add_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Add the keys in this public key file. Repeatable.")
@click.option("--remove-key", "remove_keys", multiple=True, metavar="FINGERPRINT|COMMENT|FILE",
              help="Remove a key by SHA256 fingerprint, comment, or the keys in a file.")
@click.option("--clear-keys", is_flag=True, help="Remove every key.")
@click.option("--clear-password", is_flag=True, help="Remove the password (keys only).")
@_common_options(keep=KEEP)
@click.option("--add-allow-ip", "--allow-ip", "add_allow", multiple=True, type=CIDR,
              metavar="CIDR", help="Add an allowed address/network.")
@click.option("--remove-allow-ip", "remove_allow", multiple=True, type=CIDR, metavar="CIDR",
              help="Remove an allowed address/network.")
@click.option("--clear-allow-ip", is_flag=True, help="Allow any address again.")
@click.option("--add-deny-ip", "--deny-ip", "add_deny", multiple=True, type=CIDR,
              metavar="CIDR", help="Add a denied address/network.")
@click.option("--remove-deny-ip", "remove_deny", multiple=True, type=CIDR, metavar="CIDR",
              help="Remove a denied address/network.")
@click.option("--clear-deny-ip", is_flag=True, help="Drop every deny rule.")
@click.option("--enable/--disable", "enabled", default=None, help="Allow or refuse logins.")
def set_(name: str, home_dir: str, **o: Any) -> None:
    """Change user NAME; options left out keep their value."""
    home = load_home(home_dir)
    if o["password_stdin"] and o["clear_password"]:
        raise click.UsageError("--password-stdin and --clear-password contradict each other")
    new_password = _read_password() if o["password_stdin"] else None
    add_keys = [k for f in o["add_keys"] for k in load_key_file(f)]
    with _undo_mkdirs() as made, admin_change(home) as store:
        old = _get(store, name)
        u = dataclasses.replace(old, keys=list(old.keys), allow_cidrs=list(old.allow_cidrs),
                                deny_cidrs=list(old.deny_cidrs))
        if o["clear_keys"]:
            u.keys = []
        u.keys = _dedupe(_remove_keys(u.keys, o["remove_keys"]) + add_keys)
        if o["clear_password"]:
            u.password_hash = None
        elif new_password is not None:
            u.password_hash = new_password
        u.allow_cidrs = _edit_list(u.allow_cidrs, o["add_allow"], o["remove_allow"],
                                   o["clear_allow_ip"], "--remove-allow-ip")
        u.deny_cidrs = _edit_list(u.deny_cidrs, o["add_deny"], o["remove_deny"],
                                  o["clear_deny_ip"], "--remove-deny-ip")
        perms = _perms(o["perms"], o["perm_preset"])
        if perms is not None:
            u.permissions = perms
        if o["enabled"] is not None:
            u.disabled = not o["enabled"]
        for f in ("expires_at", "quota_bytes", "quota_files", "max_sessions"):
            if o[f] is not KEEP:
                setattr(u, f, o[f])
        if o["user_root"] is not None:
            u.home = str(_make_root(home, name, o["user_root"], made))
        changes = _diff(old, u)
        if not changes:
            click.echo(f"{name}: nothing to change")
            return
        store.update_user(u)
        record_admin(store, home, "user.set", username=name, detail={"changed": changes})
    click.echo(f"updated {name}: {', '.join(sorted(changes))}")


@user.command()
@click.argument("name")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(name: str, home_dir: str, as_json: bool) -> None:
    """Show user NAME (never the password hash)."""
    with home_store(load_home(home_dir)) as store:
        u = _get(store, name)
    view = _view(u)
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    for k, v in view.items():
        if isinstance(v, list):
            v = "\n  ".join([""] + [str(x) for x in v]) if v else "-"
        click.echo(f"{k + ':':15} {v}")


@user.command(name="list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_(home_dir: str, as_json: bool) -> None:
    """List users."""
    with home_store(load_home(home_dir)) as store:
        users = store.list_users()
    if as_json:
        click.echo(json.dumps([_view(u) for u in users], indent=2))
        return
    click.echo(f"{'NAME':20} {'STATE':9} {'KEYS':>4} {'PASSWD':6} {'EXPIRES':20} PERMISSIONS")
    for u in users:
        v = _view(u)
        click.echo(f"{u.name:20} {v['state']:9} {len(u.keys):>4} "
                   f"{'yes' if v['password'] else 'no':6} {v['expires']:20} "
                   f"{','.join(v['permissions'])}")


@user.command()
@click.argument("name")
@home_option
def remove(name: str, home_dir: str) -> None:
    """Delete user NAME. Files in the user's home directory are kept."""
    home = load_home(home_dir)
    with admin_change(home) as store:
        try:
            store.remove_user(name)
        except NotFound:
            raise click.ClickException(f"no user {name!r}") from None
        record_admin(store, home, "user.remove", username=name)
    click.echo(f"removed user {name} (files kept)")


# ---- helpers ------------------------------------------------------------------------------

def load_key_file(path: str) -> list[str]:
    """The public keys in `path`, normalised; a clear error for anything else."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise click.ClickException(f"cannot read key file {path}: {reason}") from None
    if "PRIVATE KEY" in text:
        raise click.ClickException(f"{path} is a private key; give the public key "
                                   f"(usually {path}.pub)")
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = asyncssh.import_public_key(line)
        except Exception as exc:   # asyncssh's decoders raise more than KeyImportError
            raise click.ClickException(f"{path} line {n} is not an OpenSSH public key "
                                       f"({exc}); options such as from=... are not supported, "
                                       "use --allow-ip") from None
        keys.append(key.export_public_key("openssh").decode().strip())
    if not keys:
        raise click.ClickException(f"{path} holds no public key")
    return keys


def _fingerprint(line: str) -> str:
    try:
        return str(asyncssh.import_public_key(line).get_fingerprint())
    except Exception:   # e.g. OverflowError from a stored blob with a negative exponent
        return "(unreadable key)"


def _remove_keys(keys: list[str], selectors: tuple[str, ...]) -> list[str]:
    for sel in selectors:
        targets = {_fingerprint(k) for k in load_key_file(sel)} if os.path.isfile(sel) else None
        keep = [k for k in keys if not _key_matches(k, sel, targets)]
        if len(keep) == len(keys):
            raise click.ClickException(f"no key matches {sel!r}; see `user show` for "
                                       "fingerprints")
        keys = keep
    return keys


def _key_matches(line: str, sel: str, targets: set[str] | None) -> bool:
    fp = _fingerprint(line)
    if targets is not None:
        return fp in targets
    return sel in (fp, _comment(line))


def _comment(line: str) -> str:
    parts = line.split(None, 2)
    return parts[2] if len(parts) > 2 else ""


def _edit_list(cur: list[str], add: tuple[str, ...], remove: tuple[str, ...], clear: bool,
               flag: str) -> list[str]:
    out = [] if clear else list(cur)
    for item in remove:
        if item not in out:
            raise click.ClickException(f"{flag} {item}: not in the list ({', '.join(cur) or '-'})")
        out.remove(item)
    return _dedupe(out + list(add))


def _perms(items: tuple[str, ...], preset: str | None) -> frozenset[Perm] | None:
    if items and preset:
        raise click.UsageError("give --perm or --perm-preset, not both")
    if preset:
        return PRESETS[preset]
    if not items:
        return None
    names = [p.strip().lower() for item in items for p in item.split(",") if p.strip()]
    known = {p.value: p for p in Perm}
    if not names:   # --perm '' or ',': refused, neither "all" (add) nor "none" (set)
        raise click.UsageError("--perm needs at least one permission; choose from "
                               f"{', '.join(known)}")
    bad = [n for n in names if n not in known]
    if bad:
        raise click.BadParameter(f"unknown permission {', '.join(bad)}; choose from "
                                 f"{', '.join(known)}", param_hint="--perm")
    return frozenset(known[n] for n in names)


def _read_password() -> str:
    stdin = sys.stdin
    # bytes that are not UTF-8 fail to decode (strict stdin) or arrive as surrogates
    # (surrogateescape) that argon2 cannot encode: either way, one clear line
    try:
        if stdin.isatty():
            pw = click.prompt("Password", hide_input=True, confirmation_prompt=True)
        else:
            lines = stdin.read().splitlines()
            pw = lines[0] if lines else ""
        pw.encode("utf-8")
    except UnicodeError:
        raise click.ClickException("the password is not valid UTF-8 text") from None
    if not pw:
        raise click.ClickException("no password on stdin (pipe it in, e.g. "
                                   "`printf %s \"$PW\" | edgegw internal user ...`)")
    return hash_password(pw)


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise click.BadParameter(f"{name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                                 "not starting with '.', '@' or '-'", param_hint="NAME")


@contextmanager
def _undo_mkdirs() -> Iterator[list[Path]]:
    """Collects the directories _make_root creates and removes them (while empty) if the
    command then fails, so a refused add or set leaves no stray home directory behind."""
    made: list[Path] = []
    try:
        yield made
    except BaseException:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:     # not empty (someone's files), or never made
                pass
        raise


def _make_root(home: NodeHome, name: str, path: str | None, made: list[Path]) -> Path:
    return _create_root(_root_path(home, name, path), made)


def _root_path(home: NodeHome, name: str, path: str | None) -> Path:
    """The user's root directory, checked, not yet made."""
    try:
        root = resolve_path(path, "a user's root") if path else home.user_home(name)
    except HomeError as exc:
        raise click.ClickException(str(exc)) from None
    _check_root(home, root)
    require_utf8(str(root))   # stored as text: refuse it before the directory exists
    return root


def _create_root(root: Path, made: list[Path]) -> Path:
    try:
        if not root.is_dir():
            made.extend(d for d in (*reversed(root.parents), root) if not d.exists())
            root.mkdir(parents=True)
            os.chmod(root, 0o750)
    except OSError as exc:
        raise click.ClickException(f"cannot create home directory {root}: "
                                   f"{exc.strerror}") from None
    return root


def _check_root(home: NodeHome, root: Path) -> None:
    problem = home.unsafe_user_root(root)
    if problem is not None:
        raise click.ClickException(problem)


def _get(store: Any, name: str) -> User:
    u = store.get_user(name)
    if u is None:
        raise click.ClickException(f"no user {name!r}; see `edgegw internal user list`")
    return u


def _dedupe(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _describe(u: User) -> dict[str, Any]:
    """A user as the audit trail and `show` see it: fingerprints, never the hash."""
    return {"home": u.home, "password": u.password_hash is not None,
            "keys": [_fingerprint(k) for k in u.keys],
            "permissions": sorted(p.value for p in u.permissions),
            "allow_ip": u.allow_cidrs, "deny_ip": u.deny_cidrs, "disabled": u.disabled,
            "expires": format_time(u.expires_at), "quota_bytes": u.quota_bytes,
            "quota_files": u.quota_files, "max_sessions": u.max_sessions}


def _diff(old: User, new: User) -> dict[str, Any]:
    before, after = _describe(old), _describe(new)
    changes = {k: v for k, v in after.items() if before[k] != v}
    if old.password_hash != new.password_hash:
        changes["password"] = "changed" if new.password_hash else "removed"
    return changes


def _view(u: User) -> dict[str, Any]:
    d = _describe(u)
    keys = [f"{_fingerprint(k)} {_comment(k)}".strip() for k in u.keys]
    return {"name": u.name, "state": "disabled" if u.disabled else "enabled", **d,
            "keys": keys, "created": format_time(u.created_at),
            "updated": format_time(u.updated_at)}

