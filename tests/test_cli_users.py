"""The admin CLI: users, bans and the audit trail, through the real command line."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgegw.cli import main
from internal.cli.parse import MIN_TIME
from internal.home import NodeHome
from internal.passwords import verify_password
from internal.store import Perm, StoreError, open_store


@pytest.fixture
def home(tmp_path: Path) -> Path:
    NodeHome.init(tmp_path / "home")
    return tmp_path / "home"


@pytest.fixture
def pubkey(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop",
                    "-f", str(key)], check=True)
    return key


def cli(home: Path, *args: str, input: str | None = None, code: int = 0):
    result = CliRunner().invoke(main, ["internal", *args, "--home", str(home)], input=input)
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def edgegw(home: Path, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgegw", "internal", *args, "--home", str(home)],
                          input=input, text=True, capture_output=True, timeout=60)


def _user(home: Path, name: str):
    s = open_store(NodeHome.load(home).db_url)
    try:
        return s.get_user(name), s.query_audit(username=name)
    finally:
        s.close()


def test_subprocess_add_with_key_and_password_stdin(home, pubkey):
    r = edgegw(home, "user", "add", "alice", "--key", f"{pubkey}.pub", "--password-stdin",
               "--perm-preset", "readonly", "--allow-ip", "10.0.0.0/8", "--deny-ip",
               "10.9.0.0/16", "--expires", "2030-01-31", "--quota-bytes", "10G",
               "--quota-files", "1000", "--max-sessions", "4", input="s3cret pass\n")
    assert r.returncode == 0, r.stderr
    u, events = _user(home, "alice")
    assert verify_password(u.password_hash, "s3cret pass")
    assert u.permissions == {Perm.LIST, Perm.DOWNLOAD} and len(u.keys) == 1
    assert u.allow_cidrs == ["10.0.0.0/8"] and u.deny_cidrs == ["10.9.0.0/16"]
    assert u.quota_bytes == 10 << 30 and u.quota_files == 1000 and u.max_sessions == 4
    assert u.expires_at == dt.datetime(2030, 1, 31, tzinfo=dt.timezone.utc).timestamp()
    root = Path(u.home)
    assert root == NodeHome.load(home).user_home("alice") and root.stat().st_mode & 0o777 == 0o750
    assert [e.kind for e in events] == ["user.add"]
    assert u.password_hash not in json.dumps(events[0].detail)
    assert events[0].detail["password"] is True


def test_subprocess_errors_are_clean(home, pubkey):
    for args, code, words in [
        (("user", "add", "bob", "--key", str(pubkey)), 1, "private key"),
        (("user", "add", "bob", "--key", "/nonexistent.pub"), 1, "cannot read key file"),
        (("user", "add", "bob", "--allow-ip", "10.0.0.300/8"), 2, "not an IP address or CIDR"),
        (("user", "add", "bob", "--quota-bytes", "ten gigs"), 2, "not a size"),
        (("user", "add", "bob", "--perm", "list,teleport"), 2, "unknown permission teleport"),
        (("user", "add", "../etc"), 2, "use 1-64 letters"),
        (("user", "show", "nobody"), 1, "no user 'nobody'"),
    ]:
        r = edgegw(home, *args)
        assert r.returncode == code, (args, r.stderr)
        assert words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert _user(home, "bob")[0] is None
    assert not NodeHome.load(home).user_home("bob").exists()


def test_bad_key_line_and_empty_password(home, tmp_path, pubkey):
    bad = tmp_path / "bad.pub"
    bad.write_text(f"{Path(f'{pubkey}.pub').read_text()}ssh-ed25519 AAAAnope x\n")
    assert "line 2 is not an OpenSSH public key" in cli(home, "user", "add", "bob", "--key",
                                                        str(bad), code=1).output
    assert "no password on stdin" in cli(home, "user", "add", "bob", "--password-stdin",
                                         input="", code=1).output
    # an ssh-rsa blob with a negative exponent: asyncssh raises OverflowError, not its own
    import base64

    from asyncssh.packet import MPInt, String
    overflow = tmp_path / "overflow.pub"
    overflow.write_text("ssh-rsa " + base64.b64encode(String(b"ssh-rsa") + MPInt(-3) +
                                                      MPInt(12345)).decode() + "\n")
    assert "line 1 is not an OpenSSH public key" in cli(home, "user", "add", "bob", "--key",
                                                        str(overflow), code=1).output
    empty = tmp_path / "empty.pub"
    empty.write_text("# nothing here\n")
    assert "holds no public key" in cli(home, "user", "add", "bob", "--key", str(empty),
                                        code=1).output


def test_duplicate_user(home):
    cli(home, "user", "add", "alice")
    assert "already exists" in cli(home, "user", "add", "alice", code=1).output


def test_no_change_without_its_audit_event(home, monkeypatch):
    """An admin change whose audit event cannot be stored is not made at all."""
    from internal.store.sql import SQLStore

    cli(home, "user", "add", "alice")
    cli(home, "ban", "add", "192.0.2.9")

    def audit_down(self, events):
        raise StoreError("audit table unavailable")

    monkeypatch.setattr(SQLStore, "append_audit", audit_down)
    for args in (["user", "add", "bob"], ["user", "set", "alice", "--disable"],
                 ["user", "remove", "alice"], ["ban", "add", "192.0.2.10"],
                 ["ban", "remove", "192.0.2.9"]):
        assert "audit table unavailable" in cli(home, *args, code=1).output
    monkeypatch.undo()
    s = open_store(NodeHome.load(home).db_url)
    try:
        assert [u.name for u in s.list_users()] == ["alice"] and not s.get_user("alice").disabled
        assert [b.ip for b in s.active_bans()] == ["192.0.2.9"]
    finally:
        s.close()


_HUGE = "1" + "0" * 400


@pytest.mark.parametrize("option,value,message", [
    ("--quota-bytes", "100000P", "too large (at most 9223372036854775807 bytes"),
    ("--quota-bytes", _HUGE, "(401 characters) is too large"),
    ("--quota-files", str(1 << 63), "too large (at most 9223372036854775807)"),
    ("--quota-files", "9" * 5000, "(5000 characters) is too large"),
    ("--max-sessions", str(1 << 63), "too large (at most 2147483647)"),   # INTEGER in PostgreSQL
    ("--expires", "9999-12-31T23:59:59-12:00", "out of range"),
    ("--expires", "0001-01-01T00:00+01:00", "out of range"),
    ("--expires", "99999999999999w", "too long (at most 36500d"),
])
def test_values_beyond_the_store_are_bad_parameters(home, option, value, message):
    """Refused by click (exit 2) before the store is touched, not a traceback from the driver
    or from printing the time afterwards."""
    cli(home, "user", "add", "bob")
    for args in (["user", "add", "carol", option, value], ["user", "set", "bob", option, value]):
        out = cli(home, *args, code=2).output
        assert f"Invalid value for '{option}'" in out and message in out, (args, out)
    bob, events = _user(home, "bob")
    assert _user(home, "carol")[0] is None
    assert (bob.quota_bytes, bob.quota_files, bob.max_sessions, bob.expires_at) == (None,) * 4
    assert [e.kind for e in events] == ["user.add"]


def test_largest_values_are_stored_and_shown(home):
    cli(home, "user", "add", "bob", "--quota-bytes", str((1 << 63) - 1), "--quota-files",
        str((1 << 63) - 1), "--max-sessions", str((1 << 31) - 1), "--expires",
        "9999-12-31T23:59:59Z")
    bob = _user(home, "bob")[0]
    assert (bob.quota_bytes, bob.quota_files, bob.max_sessions) == ((1 << 63) - 1,) * 2 + (
        (1 << 31) - 1,)
    assert "9999-12-31T23:59:59Z" in cli(home, "user", "list").output
    s = open_store(NodeHome.load(home).db_url)    # --expires refuses the past: store it directly
    try:
        s.update_user(dataclasses.replace(bob, expires_at=MIN_TIME))
    finally:
        s.close()
    assert "0001-01-01T00:00:00Z" in cli(home, "user", "show", "bob").output


@pytest.mark.parametrize("option,value", [
    ("--quota-bytes", "\u0661\u0662"),             # Arabic-Indic 12: was stored as 12
    ("--quota-bytes", "\uff11\uff10G"),            # fullwidth 10G
    ("--quota-bytes", "1.\u0665M"),
    ("--quota-files", "\u0661\u0662"),
    ("--quota-files", "\u00b2"),                    # superscript two: isdigit(), int() raises
    ("--max-sessions", "\uff13"),
    ("--expires", "\u0663\u0660d"),
    ("--expires", "\u0662\u0660\u0663\u0660-01-01"),
])
def test_numbers_take_ascii_digits_only(home, option, value):
    """int(), float() and a regex's \\d take any script's digits: --quota-bytes ١٢ was
    stored as 12. Such values are refused by name, as parse_hostport refuses a port '２２'."""
    cli(home, "user", "add", "bob")
    for args in (["user", "add", "carol", option, value], ["user", "set", "bob", option, value]):
        out = cli(home, *args, code=2).output
        assert f"Invalid value for '{option}'" in out and "digits other than 0-9" in out, out
    bob, events = _user(home, "bob")
    assert _user(home, "carol")[0] is None and [e.kind for e in events] == ["user.add"]
    assert (bob.quota_bytes, bob.quota_files, bob.max_sessions, bob.expires_at) == (None,) * 4


# serve's --weight 0 is refused after the value under test: never a node started by a test
_SERVE = ("serve", "--listen", "127.0.0.1:0")


@pytest.mark.parametrize("args", [
    ("ban", "add", "192.0.2.7", "--duration", "\u0661h"),
    ("audit", "--since", "\u0661\u0660m"),
    ("audit", "--since", "2025-06-\u0663\u0660"),
    ("audit", "--limit", "\u0661\u0660"),
    ("drain", "--timeout", "\uff13"),
    (*_SERVE, "--capacity", "\u0661\u0662", "--weight", "0"),
    (*_SERVE, "--drain-timeout", "\u0661\u0662", "--weight", "0"),
    (*_SERVE, "--workers", "\uff12", "--weight", "0"),
])
def test_other_numbers_take_ascii_digits_only(home, args):
    option = next(a for a in args if a.startswith("--") and a != "--listen")
    out = cli(home, *args, code=2).output
    assert f"Invalid value for '{option}'" in out and "digits other than 0-9" in out, out
    assert cli(home, "ban", "list", "--json").output == ""


@pytest.mark.parametrize("duration,message", [
    ("0", "'0' is not more than zero"),
    ("0s", "'0s' is not more than zero"),
    ("99999999999999w", "too long (at most 36500d, 100 years)"),
    (_HUGE + "s", "(402 characters) is too long"),
])
def test_ban_duration_out_of_range(home, duration, message):
    out = cli(home, "ban", "add", "192.0.2.7", "--duration", duration, code=2).output
    assert "Invalid value for '--duration'" in out and message in out, out
    assert cli(home, "ban", "list", "--json").output == ""
    assert "too long" in cli(home, "audit", "--since", "99999999999999w", code=2).output
    cli(home, "ban", "add", "192.0.2.7", "--duration", "36500d")   # the longest there is


def test_set_changes_and_audits(home, pubkey, tmp_path):
    cli(home, "user", "add", "alice", "--key", f"{pubkey}.pub", "--allow-ip", "10.0.0.0/8")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-C", "ci", "-f", str(other)],
                   check=True)
    cli(home, "user", "set", "alice", "--add-key", f"{other}.pub", "--remove-key",
        "alice@laptop", "--password-stdin", "--add-allow-ip", "192.0.2.0/24",
        "--remove-allow-ip", "10.0.0.0/8", "--deny-ip", "192.0.2.66", "--disable",
        "--perm", "list,upload", "--perm", "mkdir", "--quota-bytes", "1.5G",
        "--expires", "2031-01-01T12:00+02:00", input="pw\n")
    u, events = _user(home, "alice")
    assert len(u.keys) == 1 and u.keys[0].startswith("ecdsa-sha2-nistp256 ")
    assert u.allow_cidrs == ["192.0.2.0/24"] and u.deny_cidrs == ["192.0.2.66"]
    assert u.disabled and u.permissions == {Perm.LIST, Perm.UPLOAD, Perm.MKDIR}
    assert u.quota_bytes == 3 << 29
    assert u.expires_at == dt.datetime(2031, 1, 1, 10, tzinfo=dt.timezone.utc).timestamp()
    assert verify_password(u.password_hash, "pw")
    changed = events[-1].detail["changed"]
    assert events[-1].kind == "user.set" and changed["password"] == "changed"
    assert set(changed) == {"keys", "allow_ip", "deny_ip", "disabled", "permissions",
                            "quota_bytes", "expires", "password"}
    assert "argon2" not in json.dumps([e.detail for e in events])
    cli(home, "user", "set", "alice", "--enable", "--clear-password", "--clear-keys",
        "--clear-allow-ip", "--quota-bytes", "none", "--expires", "never", "--perm-preset", "all")
    u, events = _user(home, "alice")
    assert not u.disabled and u.password_hash is None and u.keys == [] and u.allow_cidrs == []
    assert u.quota_bytes is None and u.expires_at is None and len(u.permissions) == len(Perm)
    assert events[-1].detail["changed"]["password"] == "removed"
    assert "nothing to change" in cli(home, "user", "set", "alice").output
    assert "no key matches" in cli(home, "user", "set", "alice", "--remove-key", "SHA256:x",
                                   code=1).output
    assert "not in the list" in cli(home, "user", "set", "alice", "--remove-deny-ip", "1.2.3.4",
                                    code=1).output
    assert "contradict" in cli(home, "user", "set", "alice", "--password-stdin",
                               "--clear-password", input="x\n", code=2).output
    assert "not both" in cli(home, "user", "set", "alice", "--perm", "list", "--perm-preset",
                             "all", code=2).output


def test_a_user_root_may_not_expose_the_node_home(home, tmp_path):
    """The node home holds its keys and store, the files root every user's files: neither may
    end up inside a user's root, nor a user's root in the node home outside the files root."""
    for root, message in [(home, "holds the node home"), (tmp_path, "holds the node home"),
                          (home / "pnc", "inside the node home"),
                          (home / "files", "holds the files root")]:
        res = cli(home, "user", "add", "mallory", "--password-stdin", "--home-dir", str(root),
                  input="pw\npw\n", code=1)
        assert message in res.output, res.output
        res = cli(home, "user", "add", "alice", "--password-stdin", input="pw\npw\n")
        res = cli(home, "user", "set", "alice", "--home-dir", str(root), code=1)
        assert message in res.output, res.output
        cli(home, "user", "remove", "alice")
    cli(home, "user", "add", "mallory", "--password-stdin", "--home-dir",
        str(tmp_path / "elsewhere"), input="pw\npw\n")
    cli(home, "user", "add", "bob", "--password-stdin", "--home-dir",
        str(home / "files" / "shared" / "bob"), input="pw\npw\n")


def test_show_list_remove(home, pubkey, tmp_path):
    cli(home, "user", "add", "alice", "--key", f"{pubkey}.pub", "--password-stdin",
        input="pw\n")
    cli(home, "user", "add", "bob", "--home-dir", str(tmp_path / "bob-root"), "--disabled")
    shown = json.loads(cli(home, "user", "show", "alice", "--json").output)
    assert shown["name"] == "alice" and shown["password"] is True
    assert shown["keys"][0].startswith("SHA256:") and shown["keys"][0].endswith("alice@laptop")
    assert "password_hash" not in json.dumps(shown) and "argon2" not in json.dumps(shown)
    text = cli(home, "user", "show", "alice").output
    assert "alice@laptop" in text and "argon2" not in text
    listed = json.loads(cli(home, "user", "list", "--json").output)
    assert [(u["name"], u["state"]) for u in listed] == [("alice", "enabled"), ("bob", "disabled")]
    table = cli(home, "user", "list").output.splitlines()
    assert table[0].startswith("NAME") and table[2].startswith("bob")
    assert (tmp_path / "bob-root").is_dir()
    cli(home, "user", "remove", "bob")
    assert "no user 'bob'" in cli(home, "user", "remove", "bob", code=1).output
    assert (tmp_path / "bob-root").is_dir()               # files are kept
    assert [e.kind for e in _user(home, "bob")[1]] == ["user.add", "user.remove"]


def test_help_documents_every_flag():
    from internal.cli import audit, bans, users
    commands = [*users.user.commands.values(), *bans.ban.commands.values(), audit.audit]
    for cmd in commands:
        assert cmd.help, cmd.name
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{cmd.name} {p.opts}"
    out = CliRunner().invoke(main, ["internal", "user", "set", "--help"]).output
    for flag in ("--add-key", "--remove-key", "--clear-keys", "--clear-password",
                 "--add-allow-ip", "--remove-allow-ip", "--add-deny-ip", "--enable / --disable",
                 "--expires", "--quota-bytes", "--quota-files", "--max-sessions", "--home-dir"):
        assert flag in out, flag


def test_bans_and_audit_cli(home):
    cli(home, "ban", "add", "192.0.2.7", "--duration", "2h", "--reason", "scanner")
    cli(home, "ban", "add", "198.51.100.9/24")
    bans = [json.loads(line) for line in cli(home, "ban", "list", "--json").output.splitlines()]
    assert [(b["ip"], b["reason"]) for b in bans] == [
        ("192.0.2.7", "scanner"), ("198.51.100.0/24", "banned by an administrator")]
    assert "scanner" in cli(home, "ban", "list").output
    cli(home, "ban", "remove", "192.0.2.7")
    assert "is not banned" in cli(home, "ban", "remove", "192.0.2.7", code=1).output
    assert "not an IP address" in cli(home, "ban", "add", "nope", code=2).output
    assert "not a duration" in cli(home, "ban", "add", "192.0.2.8", "--duration", "soon",
                                   code=2).output
    cli(home, "user", "add", "carol")
    lines = cli(home, "audit", "--json", "--kind", "ban.*", "--since", "10m").output.splitlines()
    kinds = [(json.loads(x)["kind"], json.loads(x)["ip"]) for x in lines]
    assert kinds == [("ban.add", "192.0.2.7"), ("ban.add", "198.51.100.0/24"),
                     ("ban.remove", "192.0.2.7")]
    assert len(cli(home, "audit", "--json", "--ip", "192.0.2.7").output.splitlines()) == 2
    # a network selects the events of every address in it (and bans of networks inside it)
    lines = cli(home, "audit", "--json", "--ip", "192.0.0.0/8").output.splitlines()
    assert [(json.loads(x)["kind"], json.loads(x)["ip"]) for x in lines] == [
        ("ban.add", "192.0.2.7"), ("ban.remove", "192.0.2.7")]
    assert len(cli(home, "audit", "--json", "--ip", "198.51.0.0/16").output.splitlines()) == 1
    assert len(cli(home, "audit", "--json", "--user", "carol", "--since",
                   "2000-01-01").output.splitlines()) == 1
    assert cli(home, "audit", "--json", "--since", "2999-01-01").output == ""
    table = cli(home, "audit", "--limit", "2").output.splitlines()
    assert table[0].startswith("TIME") and len(table) == 3 and "user.add" in table[2]
    assert "not a time" in cli(home, "audit", "--since", "last tuesday", code=2).output


def test_cli_on_postgres_home(tmp_path, pg_url, pubkey):
    NodeHome.init(tmp_path / "pg-home", db_url=pg_url)
    home = tmp_path / "pg-home"
    r = edgegw(home, "user", "add", "alice", "--key", f"{pubkey}.pub")
    assert r.returncode == 0, r.stderr
    assert json.loads(cli(home, "user", "list", "--json").output)[0]["name"] == "alice"
    assert [e.kind for e in _user(home, "alice")[1]] == ["user.add"]


def test_concurrent_add_of_one_user_keeps_the_winners_home(tmp_path, pg_url, monkeypatch):
    """Two nodes sharing a PostgreSQL store and a files root add the same user at once. The
    one whose insert loses must not remove the home directory the winner's user now has
    (it made the directory first, the winner found it there and kept it)."""
    from internal.store.sql import SQLStore
    files = tmp_path / "files"
    a = NodeHome.init(tmp_path / "a", db_url=pg_url, files_root=str(files)).path
    b = NodeHome.init(tmp_path / "b", db_url=pg_url, files_root=str(files)).path
    add_user, other = SQLStore.add_user, []

    def add_user_after_the_other_node(store, user):
        if not other:   # the other node's `user add` runs between this one's check and insert
            other.append(edgegw(b, "user", "add", "alice"))
        return add_user(store, user)
    monkeypatch.setattr(SQLStore, "add_user", add_user_after_the_other_node)
    out = cli(a, "user", "add", "alice", code=1).output
    assert "already exists" in out, out
    assert other[0].returncode == 0, other[0].stderr
    alice, events = _user(a, "alice")
    assert alice.home == str(files / "alice") and (files / "alice").is_dir()
    assert [(e.kind, e.node_id) for e in events] == [("user.add", NodeHome.load(b).node_id)]


def test_unreachable_store_is_a_clean_error(tmp_path):
    NodeHome.init(tmp_path / "h", db_url="postgresql://postgres@127.0.0.1:1/x?connect_timeout=2")
    r = cli(tmp_path / "h", "user", "list", code=1)
    assert "cannot open the store" in r.output


def test_missing_home_is_a_clean_error(tmp_path):
    assert "not an edgegw node home" in cli(tmp_path / "nothing", "user", "list", code=1).output
    assert os.path.exists(tmp_path) and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("perm", ["", ",", " , "])
def test_an_empty_perm_list_is_a_usage_error(home, perm):
    """Not "every permission" (add read `or ALL_PERMS`) nor "none at all" (set)."""
    out = cli(home, "user", "add", "bob", "--perm", perm, code=2).output
    assert "--perm needs at least one permission" in out, out
    assert _user(home, "bob")[0] is None
    cli(home, "user", "add", "alice", "--perm", "list,download")
    out = cli(home, "user", "set", "alice", "--perm", perm, code=2).output
    assert "--perm needs at least one permission" in out, out
    alice, events = _user(home, "alice")
    assert alice.permissions == {Perm.LIST, Perm.DOWNLOAD}
    assert [e.kind for e in events] == ["user.add"]
    cli(home, "user", "set", "alice", "--perm", f"upload{perm}")    # a stray comma is fine
    assert _user(home, "alice")[0].permissions == {Perm.UPLOAD}


def test_expires_duration_means_from_now(home):
    """`audit --since 30d` looks 30 days back; `--expires 30d` is 30 days ahead."""
    before = dt.datetime.now(dt.timezone.utc).timestamp()
    cli(home, "user", "add", "bob", "--expires", "30d")
    after = dt.datetime.now(dt.timezone.utc).timestamp()
    bob = _user(home, "bob")[0]
    assert before + 30 * 86400 <= bob.expires_at <= after + 30 * 86400
    cli(home, "user", "set", "bob", "--expires", "1h30m")
    bob = _user(home, "bob")[0]
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    assert before + 5400 <= bob.expires_at <= now + 5400
    out = CliRunner().invoke(main, ["internal", "user", "add", "--help"]).output
    assert "DATE|ISO|DURATION|never" in out and "DURATION from now" in out, out


@pytest.mark.parametrize("value,message", [
    ("2020-01-01", "'2020-01-01' is in the past"),
    ("2026-01-31T18:00+01:00", "is in the past"),
    ("0001-01-01", "is in the past"),
    ("0s", "'0s' is not more than zero"),
])
def test_expires_in_the_past_is_refused(home, value, message):
    cli(home, "user", "add", "bob", "--expires", "2999-01-01")
    for args in (["user", "add", "carol", "--expires", value],
                 ["user", "set", "bob", "--expires", value]):
        out = cli(home, *args, code=2).output
        assert "Invalid value for '--expires'" in out and message in out, (args, out)
    assert _user(home, "carol")[0] is None
    bob, events = _user(home, "bob")
    assert bob.expires_at == dt.datetime(2999, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert [e.kind for e in events] == ["user.add"]


def test_a_compact_iso_date_is_not_taken_for_seconds(home):
    """Python reads 20300101 as the date 2030-01-01; a bare number is also seconds. Taken as
    seconds, --expires 20300101 expired the account in 235 days and --since 20250630 looked
    back 234 days: the ambiguity is refused instead, seconds without a unit still work."""
    cli(home, "user", "add", "bob", "--expires", "2999-01-01")
    for args in (["user", "set", "bob", "--expires", "20300101"],
                 ["user", "add", "carol", "--expires", "20300101"],
                 ["audit", "--since", "20250630"]):
        out = cli(home, *args, code=2).output
        assert "is ambiguous" in out and ("2030-01-01" in out or "2025-06-30" in out), (args, out)
    bob, events = _user(home, "bob")
    assert bob.expires_at == dt.datetime(2999, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert [e.kind for e in events] == ["user.add"] and _user(home, "carol")[0] is None
    cli(home, "user", "set", "bob", "--expires", "3600")     # no date: seconds from now
    cli(home, "audit", "--since", "20250630s")


def _raw(home: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The real command line; str arguments holding surrogates go out as the bytes argv had."""
    return subprocess.run([sys.executable, "-m", "edgegw", "internal", *args, "--home",
                           str(home)], input=stdin, capture_output=True, timeout=60)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_arguments_that_are_not_utf8_are_clean_errors(request, tmp_path, backend):
    """Non-UTF-8 bytes in argv (decoded as surrogates) or on stdin: one line, no traceback,
    nothing stored and no directory left behind."""
    home = tmp_path / "home"
    NodeHome.init(home, db_url=request.getfixturevalue("pg_url") if backend == "postgres"
                  else None)
    cli(home, "user", "add", "alice")
    stray = tmp_path / "x"
    for args, stdin in [
        (("user", "show", "\udcff"), b""),
        (("user", "set", "al\udcffice", "--disable"), b""),
        (("audit", "--user", "\udcff"), b""),
        (("audit", "--kind", "user.\udcff"), b""),
        (("ban", "add", "192.0.2.1", "--reason", "\udcff"), b""),
        (("user", "add", "carol", "--home-dir", str(stray / "\udcff")), b""),
        (("user", "set", "alice", "--home-dir", str(stray / "a" / "b\udcff")), b""),
        (("user", "add", "dave", "--password-stdin"), b"pass\xffword\n"),
        (("user", "set", "alice", "--password-stdin"), b"\xff\n"),
    ]:
        r = _raw(home, *args, stdin=stdin)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode == 1, (args, err)
        assert "is not valid UTF-8" in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
    assert "'/" in _raw(home, "user", "add", "carol", "--home-dir",
                        str(stray / "\udcff")).stderr.decode()             # names the path
    assert b"\\xff" in _raw(home, "user", "show", "\udcff").stderr          # as it was typed
    assert not stray.exists()
    alice, events = _user(home, "alice")
    assert alice.password_hash is None and not alice.disabled
    assert [e.kind for e in events] == ["user.add"]
    assert _user(home, "carol")[0] is None and _user(home, "dave")[0] is None
    assert cli(home, "ban", "list", "--json").output == ""


def test_a_failed_add_or_set_leaves_no_home_directory(home, tmp_path, monkeypatch):
    """The directory is made before the store change commits; if that fails, it goes."""
    from internal.store.sql import SQLStore

    cli(home, "user", "add", "alice", "--home-dir", str(tmp_path / "alice"))
    (tmp_path / "kept").mkdir()

    def audit_down(self, events):
        raise StoreError("audit table unavailable")

    monkeypatch.setattr(SQLStore, "append_audit", audit_down)
    cli(home, "user", "add", "bob", "--home-dir", str(tmp_path / "new" / "bob"), code=1)
    cli(home, "user", "add", "carol", code=1)
    cli(home, "user", "set", "alice", "--home-dir", str(tmp_path / "other"), code=1)
    cli(home, "user", "set", "alice", "--home-dir", str(tmp_path / "kept"), code=1)
    assert not (tmp_path / "new").exists() and not (tmp_path / "other").exists()
    assert not NodeHome.load(home).user_home("carol").exists()
    assert (tmp_path / "kept").is_dir() and (tmp_path / "alice").is_dir()   # not ours to remove
    assert _user(home, "alice")[0].home == str(tmp_path / "alice")


def test_admin_commands_load_no_server_code(home):
    """`user`, `ban` and `audit` run in a process that never imports the node's SSH server,
    its runtime or the gateway (each command's module is imported when it runs)."""
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edgegw.cli import main\n"
        f"home = {str(home)!r}\n"
        "for args in (['user', 'list'], ['ban', 'list'], ['audit', '--limit', '1']):\n"
        "    r = CliRunner().invoke(main, ['internal', *args, '--home', home])\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "print(' '.join(sorted(sys.modules)))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    loaded = res.stdout.split()
    assert "internal.cli.users" in loaded and "internal.cli.bans" in loaded
    server = [m for m in loaded if m.startswith(("internal.ssh", "internal.sftp",
                                                  "internal.runtime", "internal.node",
                                                  "edgegw.gateway", "uvloop"))]
    assert server == []
