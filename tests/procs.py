"""Real processes for end-to-end tests: edgegw gateways and nodes, OpenSSH clients."""
from __future__ import annotations

import os
import re
from signal import SIGINT, SIGKILL
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgegw.sockio import free_port

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]


@dataclass
class Proc:
    """A child process whose stderr goes to a log file we can wait on."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> "Proc":
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        self._log_f = open(self.log, "ab")
        self.popen = subprocess.Popen(self.args, stdout=self._log_f, stderr=subprocess.STDOUT,
                                      env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def text(self) -> str:
        """What this run of the process logged (a restarted process may share the file)."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before "
                                     f"logging {pattern!r}:\n{self.text()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not log {pattern!r} in {timeout}s:\n"
                             f"{self.text()[-4000:]}")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.text()))

    def send_signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = SIGINT, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, SIGKILL)
                self.popen.wait()
        self._log_f.close()
        return self.popen.returncode


def edgegw_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgegw", *args]


@dataclass
class GatewayProc(Proc):
    external: int = 0
    pnc: int = 0
    data: int = 0


def start_gateway(tmp: Path, trust: Path, *extra: str, name: str = "gateway",
                  env: dict[str, str] | None = None, cwd: str | None = None,
                  ports: tuple[int, int, int] | None = None) -> GatewayProc:
    ext, pnc, data = ports or (free_port(), free_port(), free_port())
    args = edgegw_cmd("serve", "--external", f"127.0.0.1:{ext}", "--pnc", f"127.0.0.1:{pnc}",
                      "--data", f"127.0.0.1:{data}", "--trust", str(trust),
                      "--gateway-id", name, "--log-level", "debug", *extra)
    gw = GatewayProc(name, args, tmp / f"{name}.log", env=env, cwd=cwd, external=ext, pnc=pnc,
                     data=data)
    gw.start()
    gw.wait_log(r"listening: external=")
    return gw


def start_node(tmp: Path, home: Path, gateways: list[GatewayProc], *extra: str,
               name: str = "node", wait: bool = True,
               env: dict[str, str] | None = None) -> Proc:
    if "--workers" not in extra:
        extra = ("--workers", "1", *extra)   # one process: the node id is the home's
    args = edgegw_cmd("internal", "serve", "--home", str(home), "--log-level", "debug", *extra)
    for gw in gateways:
        args += ["--gateway", f"127.0.0.1:{gw.pnc}"]
    node = Proc(name, args, tmp / f"{name}.log", env=env).start()
    if wait:
        for gw in gateways:
            node.wait_log(rf"attached to gateway {re.escape(gw.name)} ")
    return node


def sftp_batch(port: int, user: str, key: Path, commands: str, *, bind: str | None = None,
               cwd: Path | None = None, timeout: float = 120.0,
               extra: list[str] | None = None, host: str = "127.0.0.1",
               on: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH `sftp -b -` with the given commands against host:port, through the
    command prefix `on` if given (another network namespace); returns the completed process."""
    args = [*on, "sftp", "-b", "-", "-P", str(port), "-i", str(key), *SSH_OPTS, *(extra or [])]
    if bind:
        args += ["-o", f"BindAddress={bind}"]
    args.append(f"{user}@{host}")
    return subprocess.run(args, input=commands, capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def make_key(path: Path) -> Path:
    """An ed25519 key pair for a test user; returns the private key path."""
    import asyncssh
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    os.chmod(path, 0o600)
    return path


def add_user(home: Path, name: str, key: Path | None = None, *extra: str,
             password: str | None = None) -> None:
    args = edgegw_cmd("internal", "user", "add", name, "--home", str(home), *extra)
    if key is not None:
        args += ["--key", f"{key}.pub"]
    if password is not None:
        args.append("--password-stdin")
    subprocess.run(args, input=password or "", text=True, check=True, capture_output=True)


def init_home(home: Path, *extra: str) -> Path:
    subprocess.run(edgegw_cmd("internal", "init", "--home", str(home), *extra), check=True,
                   capture_output=True)
    return home
