"""`edgegw internal hostkey`: fingerprints match ssh-keygen, rotation keeps old keys, the last
key cannot be removed, and the service serves the newest key."""
from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest
from click.testing import CliRunner

from internal.cli.hostkey import hostkey
from internal.home import HomeError, NodeHome
from tests.sshutil import start_node, stop_node


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(hostkey, list(args))
    return result.exit_code, result.output


def _fingerprints(home: Path) -> list[str]:
    code, out = _cli("list", "--home", str(home))
    assert code == 0, out
    return [line.split()[2] for line in out.splitlines()]


def test_list_rotate_remove(tmp_path: Path) -> None:
    home = NodeHome.init(tmp_path / "home")
    code, out = _cli("list", "--home", str(home.path))
    assert code == 0, out
    for pub in sorted(home.ssh_dir.glob("*.pub")):
        keygen = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True,
                                text=True, check=True).stdout.split()
        bits, fingerprint = keygen[0], keygen[1]
        line = next(x for x in out.splitlines() if fingerprint in x)
        assert line.split()[1] == bits
    assert {line.split()[0] for line in out.splitlines()} == {"ssh-ed25519",
                                                              "ecdsa-sha2-nistp256"}
    before = _fingerprints(home.path)
    code, out = _cli("rotate", "--home", str(home.path))
    assert code == 0, out
    after = _fingerprints(home.path)
    assert len(after) == 3 and set(before) < set(after)
    new = (set(after) - set(before)).pop()
    assert after[0] == new                                     # newest first
    for fp in before:
        code, out = _cli("remove", "--home", str(home.path), fp)
        assert code == 0, out
    assert _fingerprints(home.path) == [new]
    code, out = _cli("remove", "--home", str(home.path), new)
    assert code != 0 and "only host key" in out
    code, out = _cli("remove", "--home", str(home.path), "SHA256:nope")
    assert code != 0 and "no host key has fingerprint" in out
    assert _fingerprints(home.path) == [new]


async def test_service_offers_rotated_key(tmp_path: Path) -> None:
    home = NodeHome.init(tmp_path / "home")
    code, out = _cli("rotate", "--home", str(home.path))
    assert code == 0, out
    newest = out.split()[3]
    n = await start_node(tmp_path)                             # loads the existing home
    try:
        _, key = n.add_user("alice")
        async with asyncssh.connect("127.0.0.1", n.port, username="alice", known_hosts=None,
                                    client_keys=[str(key)],
                                    server_host_key_algs=["ssh-ed25519"]) as conn:
            host_key = conn.get_server_host_key()
            assert host_key is not None
            assert host_key.get_fingerprint("sha256") == newest
    finally:
        await stop_node(n)


def test_a_damaged_key_is_listed_and_removable(tmp_path: Path) -> None:
    """One damaged (or dangling) file in ssh/ made `list` and `remove` fail before reading the
    rest: the operator could remove no key through the CLI, the damaged one included. Now
    `list` shows it as unreadable, `remove FILE` removes it, fingerprints remove the others,
    and `serve` (home.host_keys) still refuses to start while it is there."""
    home = NodeHome.init(tmp_path / "home")
    good = _cli("list", "--home", str(home.path))[1].splitlines()
    damaged = home.ssh_dir / "host_zz_key"
    damaged.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nbroken\n"
                       "-----END OPENSSH PRIVATE KEY-----\n")
    (home.ssh_dir / "host_zz_key.pub").write_text("ssh-ed25519 AAAA broken\n")
    dangling = home.ssh_dir / "host_gone_key"
    dangling.symlink_to(tmp_path / "nonexistent")
    code, out = _cli("list", "--home", str(home.path))
    assert code == 0, out
    lines = out.splitlines()
    assert "unreadable - - host_zz_key (" in out and "unreadable - - host_gone_key (" in out
    assert sorted(x for x in lines if x.startswith("ssh-") or x.startswith("ecdsa-")) == \
        sorted(good)
    with pytest.raises(HomeError, match="cannot read host key .*; remove it with: edgegw "
                                        "internal hostkey remove"):
        home.host_keys()
    # another key by fingerprint, as before, with a damaged one present
    fingerprint = good[-1].split()[2]
    code, out = _cli("remove", "--home", str(home.path), fingerprint)
    assert code == 0 and f"removed {good[-1].split()[3]} ({fingerprint})" in out, out
    # the last readable key stays, damaged ones or not
    last = good[0].split()
    code, out = _cli("remove", "--home", str(home.path), last[2])
    assert code != 0 and "only host key" in out, out
    code, out = _cli("remove", "--home", str(home.path), last[3])
    assert code != 0 and "only host key" in out, out
    # the damaged ones by file name (as list shows it, or the path serve's error names)
    code, out = _cli("remove", "--home", str(home.path), "host_zz_key")
    assert code == 0 and "removed host_zz_key (unreadable)" in out, out
    assert not damaged.exists() and not (home.ssh_dir / "host_zz_key.pub").exists()
    code, out = _cli("remove", "--home", str(home.path), str(dangling))
    assert code == 0 and "removed host_gone_key (unreadable)" in out, out
    assert not dangling.is_symlink() and (tmp_path / "home").is_dir()
    code, out = _cli("list", "--home", str(home.path))
    assert code == 0 and out.splitlines() == [" ".join(last)], out
    assert len(home.host_keys()) == 1
    code, out = _cli("remove", "--home", str(home.path), "host_nothere_key")
    assert code != 0 and "no host key has fingerprint" in out, out
