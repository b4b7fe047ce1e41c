"""`edgegw internal init` and friends: a home that does not depend on the cwd, a failed init
that leaves nothing behind (so the retry works), directory errors as one line."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Callable

import pytest

import internal.home
from internal.home import HomeError, NodeHome
from internal.store import open_store
from internal.store.sql import _redact
from tests.procs import edgegw_cmd

UNWRITABLE = "/sys/edgegw-test"   # mkdir fails there even for root (sysfs)


def _run(*args: str, cwd: Path | None = None,
         input: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEGW_HOME"}
    return subprocess.run(edgegw_cmd(*args), capture_output=True, text=True, timeout=60,
                          input=input, cwd=cwd, env=env)


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_relative_sqlite_url_is_stored_absolute(tmp_path: Path) -> None:
    a, b, home = tmp_path / "a", tmp_path / "b", tmp_path / "home"
    a.mkdir()
    b.mkdir()
    res = _run("internal", "init", "--home", str(home), "--db", "sqlite:///rel.db", cwd=a)
    assert res.returncode == 0, res.stderr
    assert json.loads((home / "node.json").read_text())["db"] == f"sqlite:///{a}/rel.db"
    res = _run("internal", "user", "add", "bob", "--home", str(home), cwd=b)
    assert res.returncode == 0, res.stderr
    res = _run("internal", "user", "list", "--home", str(home), cwd=a)
    assert res.returncode == 0 and "bob" in res.stdout, res
    assert (a / "rel.db").exists() and not (b / "rel.db").exists()


def test_relative_paths_in_node_json_are_the_homes(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    home = NodeHome.init(tmp_path / "home").path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = json.loads((home / "node.json").read_text())
    for db, files, want_db, want_files in (   # the last one is used below
            (f"sqlite:///{tmp_path}/abs.db", str(tmp_path / "f"), f"sqlite:///{tmp_path}/abs.db",
             tmp_path / "f"),
            ("postgresql://u@h/db", "files", "postgresql://u@h/db", home / "files"),
            ("sqlite:///sub/../x.db", "userfiles", f"sqlite:///{home}/sub/../x.db",
             home / "userfiles"),
            ("sqlite:///rel.db", "a/b", f"sqlite:///{home}/rel.db", home / "a/b")):
        (home / "node.json").write_text(json.dumps({**cfg, "db": db, "files_root": files}))
        loaded = NodeHome.load(home)
        assert (loaded.db_url, loaded.files_root) == (want_db, want_files)
    res = _run("internal", "user", "add", "bob", "--home", str(home), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert (home / "a/b/bob").is_dir() and (home / "rel.db").exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("args,message", [
    (["--db", "postgresql://nobody@127.0.0.1:1/db?password=secret&connect_timeout=5"],
     "cannot open postgres store postgresql://nobody@127.0.0.1:1/db?password=***&"),
    (["--db", "mysql://root:secret@x/db"], "unknown store URL scheme 'mysql'"),
    (["--db", "sqlite:///:memory:"], "in-memory SQLite cannot be shared"),
    (["--db", "sqlite:///{tmp}/missing/x.db"],
     "cannot open sqlite:///{tmp}/missing/x.db: directory {tmp}/missing does not exist"),
    (["--ca", "{tmp}"], "cannot load the CA in {tmp}"),
    (["--files-root", f"{UNWRITABLE}/files"], f"cannot create directory {UNWRITABLE}/files"),
])
def test_failed_init_leaves_nothing_and_the_retry_works(tmp_path: Path, args: list[str],
                                                        message: str, existing: bool) -> None:
    home = tmp_path / "parent" / "home"
    if existing:   # a directory the operator made: it and what it held stay, mode and all
        home.mkdir(parents=True)
        (home / "notes.txt").write_text("mine\n")
        os.chmod(home, 0o751)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = _run("internal", "init", "--home", str(home), *args)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"Error: {message.replace('{tmp}', str(tmp_path))}" in res.stderr, res.stderr
    assert "secret" not in res.stderr + res.stdout
    if existing:
        assert _tree(home) == ["notes.txt"]
        assert stat.S_IMODE(home.stat().st_mode) == 0o751
    else:
        assert not (tmp_path / "parent").exists()
    assert _tree(tmp_path) == (["parent", "parent/home", "parent/home/notes.txt"]
                               if existing else [])
    res = _run("internal", "init", "--home", str(home))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (home / "ssh").iterdir()) == [
        "host_ecdsa_key", "host_ecdsa_key.pub", "host_ed25519_key", "host_ed25519_key.pub"]


def test_init_failing_after_the_keys_removes_them(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rolled back, not only checked early: and a store file that was there stays."""
    home, db = tmp_path / "home", tmp_path / "shared.db"
    db.write_bytes(b"")
    home.mkdir()

    def fail(*args: object, **kwargs: object) -> None:
        assert any((home / "ssh").iterdir())   # the keys are written by now
        raise HomeError("no certificate today")

    monkeypatch.setattr(internal.home, "make_node_certificate", fail)
    with pytest.raises(HomeError, match="no certificate today"):
        NodeHome.init(home, db_url=f"sqlite:///{db}", check_store=_open)
    assert _tree(tmp_path) == ["home", "shared.db"]
    with pytest.raises(HomeError, match="no certificate today"):   # the store in the home
        NodeHome.init(home, check_store=_open)
    assert _tree(tmp_path) == ["home", "shared.db"]


def _open(url: str) -> None:
    open_store(url).close()


def _no_ssh_dir(tmp_path: Path) -> list[str]:
    home = NodeHome.init(tmp_path / "home").path
    for key in (home / "ssh").iterdir():
        key.unlink()
    (home / "ssh").rmdir()
    return ["hostkey", "rotate", "--home", str(home)]


@pytest.mark.parametrize("command,message", [
    (lambda tmp: ["init", "--home", UNWRITABLE], f"cannot create directory {UNWRITABLE}: "),
    (lambda tmp: ["init", "--home", f"{UNWRITABLE}/h"],
     f"cannot create directory {UNWRITABLE}/h: {UNWRITABLE}: "),
    (lambda tmp: ["init", "--home", str(tmp / "h"), "--files-root", UNWRITABLE],
     f"cannot create directory {UNWRITABLE}: "),
    (lambda tmp: ["ca", "create", "--dir", UNWRITABLE], f"cannot create directory {UNWRITABLE}"),
    (_no_ssh_dir, "cannot write host key {tmp}/home/ssh/host_ed25519_key: No such file"),
])
def test_directory_errors_are_one_line(tmp_path: Path, command: Callable[[Path], list[str]],
                                       message: str) -> None:
    res = _run("internal", *command(tmp_path))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"Error: {message.replace('{tmp}', str(tmp_path))}"), res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "h").exists()


def test_ca_create_then_init_with_it(tmp_path: Path) -> None:
    res = _run("internal", "ca", "create", "--dir", str(tmp_path / "ca" / "sub"))
    assert res.returncode == 0, res.stderr
    res = _run("internal", "init", "--home", str(tmp_path / "h"), "--ca",
               str(tmp_path / "ca" / "sub"))
    assert res.returncode == 0, res.stderr
    assert ((tmp_path / "h" / "gateway-trust.pem").read_bytes()
            == (tmp_path / "ca" / "sub" / "ca.crt").read_bytes())


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db?password=secret&connect_timeout=2",
     "postgresql://u@h/db?password=***&connect_timeout=2"),
    ("postgresql://u@h/db?sslmode=require&sslpassword=secret",
     "postgresql://u@h/db?sslmode=require&sslpassword=***"),
    ("postgresql://u@h/db?pass%77ord=se#cret", "postgresql://u@h/db?pass%77ord=***"),
    ("postgresql://u@h/db?password=se@cret", "postgresql://u@h/db?password=***"),
    ("postgresql://u@h/db?application_name=x", "postgresql://u@h/db?application_name=x"),
])
def test_redact_hides_passwords_in_query_parameters(url: str, shown: str) -> None:
    assert _redact(url) == shown


def test_init_on_postgres_prints_no_password(tmp_path: Path, pg_url: str) -> None:
    res = _run("internal", "init", "--home", str(tmp_path / "h"), "--db",
               f"{pg_url}?password=secret")   # trust auth: any password is taken
    assert res.returncode == 0, res.stderr
    assert f"store {pg_url}?password=***)" in res.stdout and "secret" not in res.stdout
    cfg = tmp_path / "h" / "node.json"
    assert json.loads(cfg.read_text())["db"].endswith("=secret")
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600   # readable by the node's user only


def test_paths_pathlib_cannot_resolve_are_one_line(tmp_path: Path) -> None:
    """An unknown ~user or a symlink loop makes pathlib raise RuntimeError (Python 3.11): each
    path option, and node.json's files_root, must give one Error: line instead."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    nobody = "~edgegw-no-such-user/x"
    home = tmp_path / "home"
    assert _run("internal", "init", "--home", str(home)).returncode == 0
    cases = [
        (["init", "--home", nobody], "cannot use ~edgegw-no-such-user/x as the node home"),
        (["init", "--home", str(loop / "h")], "Symlink loop"),
        (["init", "--home", str(tmp_path / "h"), "--files-root", nobody],
         "as the files root"),
        (["init", "--home", str(tmp_path / "h"), "--db", f"sqlite:///{loop}/x.db"],
         "Symlink loop"),
        (["init", "--home", str(tmp_path / "h"), "--db", f"sqlite:///{nobody}.db"],
         "cannot open sqlite:///~edgegw-no-such-user/x.db"),
        (["user", "list", "--home", nobody], "as the node home"),
        (["user", "add", "bob", "--home", str(home), "--home-dir", str(loop / "bob")],
         "as a user's root"),
    ]
    for args, message in cases:
        res = _run("internal", *args)
        assert res.returncode == 1 and "Traceback" not in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("Error: ") and message in res.stderr, (args, res.stderr)
    assert not (tmp_path / "h").exists()
    cfg = json.loads((home / "node.json").read_text())
    (home / "node.json").write_text(json.dumps({**cfg, "files_root": nobody}))
    with pytest.raises(HomeError, match="field 'files_root'"):
        NodeHome.load(home)
