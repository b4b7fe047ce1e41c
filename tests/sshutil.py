"""Helpers for the SSH/SFTP tests: an in-process node service on a free port, users, and real
OpenSSH clients run as subprocesses against it.

The `sshnode` fixture is registered for every test module by `pytest_plugins` in conftest.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from internal.audit import AuditLog
from internal.defender import Defender
from internal.home import NodeHome
from internal.sftp.paths import QUOTA_LEDGER
from internal.passwords import hash_password
from internal.ssh import ciphers, libcrypto
from internal.ssh.service import Listener, SSHService
from internal.store import Store, User, open_store
from internal.store.base import AuditEvent
from tests.procs import SSH_OPTS, make_key


def set_chacha_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What FastChaCha runs on for the rest of a test: "compiled" (internal.ssh._aead) or
    "cffi" (internal.ssh.libcrypto) on the system's libcrypto, or "cryptography"."""
    if name == "cryptography":
        monkeypatch.setattr(ciphers, "load_chachapoly", lambda *keys: None)
    elif name == "cffi":
        monkeypatch.setattr(libcrypto, "_aead", None)
        if libcrypto._library() is None:
            pytest.skip(f"system libcrypto not usable here: {libcrypto._load_error}")
    elif libcrypto._aead is None:
        pytest.fail("internal.ssh._aead was not built (scripts/setup.sh builds it)")


def count_cipher_use(cls: type, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every instance of the fast cipher `cls` (FastGCM, FastChaCha) that the node makes for
    the rest of a test (one per direction per key exchange), each counting the packets it
    sealed (`sealed`) and opened (`opened`)."""
    made: list[Any] = []
    real_wrap, real_seal, real_open = cls.wrap.__func__, cls.seal, cls.decrypt_packet

    def wrap(kind: type, enc: Any) -> Any:
        fast = real_wrap(kind, enc)
        if type(fast) is cls:
            fast.sealed = fast.opened = 0
            made.append(fast)
        return fast

    def seal(self: Any, *args: Any) -> Any:
        self.sealed += 1
        return real_seal(self, *args)

    def decrypt_packet(self: Any, *args: Any) -> Any:
        out = real_open(self, *args)
        self.opened += out is not None
        return out

    monkeypatch.setattr(cls, "wrap", classmethod(wrap))
    monkeypatch.setattr(cls, "seal", seal)
    monkeypatch.setattr(cls, "decrypt_packet", decrypt_packet)
    return made


@dataclasses.dataclass
class SftpRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclasses.dataclass
class NodeUnderTest:
    """A node home, its store and an SSHService listening on 127.0.0.1 (or `host`)."""

    tmp: Path
    home: NodeHome
    store: Store
    audit: AuditLog
    defender: Defender
    service: SSHService
    listener: Listener

    @property
    def port(self) -> int:
        return self.listener.port

    def add_user(self, name: str, *, password: str | None = None, key: bool = True,
                 **fields: Any) -> tuple[User, Path | None]:
        """Create a user (home under the node's files root) and, by default, a key for it."""
        key_path = make_key(self.tmp / f"{name}_key") if key else None
        keys = [Path(f"{key_path}.pub").read_text().strip()] if key_path else []
        home = self.home.user_home(name)
        home.mkdir(parents=True, exist_ok=True)
        user = User(name=name, home=str(home), keys=keys,
                    password_hash=hash_password(password) if password else None, **fields)
        self.store.add_user(user)
        return user, key_path

    def keyed_user(self, name: str = "alice", **fields: Any) -> tuple[Path, Path]:
        """A user that logs in with a key: (its home, its private key)."""
        user, key = self.add_user(name, **fields)
        assert key is not None
        return Path(user.home), key

    def update_user(self, name: str, **fields: Any) -> None:
        user = self.store.get_user(name)
        assert user is not None
        self.store.update_user(dataclasses.replace(user, **fields))

    def events(self, kind: str | None = None, **match: Any) -> list[AuditEvent]:
        self.audit.flush()
        found = self.store.query_audit(kind=kind, limit=10_000)
        return [e for e in found if all(getattr(e, k) == v for k, v in match.items())]

    async def sftp(self, user: str, key: Path, commands: str, *, bind: str | None = None,
                   cwd: Path | None = None, timeout: float = 60.0) -> SftpRun:
        """OpenSSH `sftp -b -` with `commands` on stdin, from `bind` if given."""
        proc = await self.start_sftp(user, key, commands, bind=bind, cwd=cwd)
        out, err = await asyncio.wait_for(proc.communicate(commands.encode()), timeout)
        assert proc.returncode is not None
        return SftpRun(proc.returncode, out.decode(errors="replace"),
                       err.decode(errors="replace"))

    async def start_sftp(self, user: str, key: Path, commands: str | None = None, *,
                         bind: str | None = None, cwd: Path | None = None,
                         options: Sequence[str] = ()) -> asyncio.subprocess.Process:
        args = ["sftp", "-b", "-", "-P", str(self.port), "-i", str(key),
                "-o", "IdentitiesOnly=yes", *SSH_OPTS, *options]
        if bind:
            args += ["-o", f"BindAddress={bind}"]
        args.append(f"{user}@127.0.0.1")
        return await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=cwd)

    @asynccontextmanager
    async def sftp_client(self, user: str, key: Path) -> AsyncIterator[asyncssh.SFTPClient]:
        """asyncssh's SFTP client logged in as `user`: for requests OpenSSH's sftp cannot send."""
        async with asyncssh.connect("127.0.0.1", self.port, username=user,
                                    client_keys=[str(key)], known_hosts=None) as conn:
            async with conn.start_sftp_client() as sftp:
                yield sftp

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no session is running (the server side of a client that just exited)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.service.active and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert self.service.active == 0, "sessions still running"


async def start_node(tmp: Path, *, host: str = "127.0.0.1", **service_kw: Any
                     ) -> NodeUnderTest:
    existing = (tmp / "home" / "node.json").exists()
    home = NodeHome.load(tmp / "home") if existing else NodeHome.init(tmp / "home")
    store = await asyncio.to_thread(open_store, home.db_url)
    audit = AuditLog(store, home.node_id)
    defender = Defender(store)
    service_kw.setdefault("durable_uploads", False)   # tests do not need fsync
    service = SSHService(home, store, audit, defender, **service_kw)
    listener = await service.listen(host, 0)
    return NodeUnderTest(tmp, home, store, audit, defender, service, listener)


async def stop_node(n: NodeUnderTest) -> None:
    await n.service.close()
    n.audit.close()
    n.store.close()


@pytest.fixture
async def sshnode(tmp_path: Path) -> AsyncIterator[NodeUnderTest]:
    n = await start_node(tmp_path)
    try:
        yield n
    finally:
        await stop_node(n)


def tree(root: Path) -> set[str]:
    """Every name under `root` (relative), for "nothing else was created" checks; the quota
    ledger of a user with a quota is the node's own (internal.sftp.quota)."""
    return {os.path.relpath(os.path.join(d, f), root)
            for d, dirs, files in os.walk(root) for f in [*dirs, *files]
            if f != QUOTA_LEDGER.decode()}
