"""`edgegw demo`: a gateway and a node on loopback with a demo user, as two real processes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from edgegw.cliparams import IntRange
from edgegw.sockio import free_port, listening

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"


def _edgegw(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgegw", *args]


def _create(home: Path, key: Path) -> None:
    """A node home with the demo user, who logs in with `key` (made here) or the password."""
    subprocess.run(_edgegw("internal", "init", "--home", str(home), "--node-id", "demo-node"),
                   check=True, stdout=subprocess.DEVNULL)
    if not key.exists():
        import asyncssh   # after internal (demo() imports it), which quiets its import warnings
        k = asyncssh.generate_private_key("ssh-ed25519", comment="edgegw demo")
        k.write_private_key(str(key))
        k.write_public_key(str(key) + ".pub")
        os.chmod(key, 0o600)
    subprocess.run(_edgegw("internal", "user", "add", DEMO_USER, "--home", str(home),
                           "--key", f"{key}.pub", "--password-stdin"),
                   input=DEMO_PASSWORD.encode(), check=True, stdout=subprocess.DEVNULL)


def _wait_listening(gateway: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    if not os.path.exists("/proc/net/tcp"):   # where listening() cannot tell: give it a second
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while not listening(port):
        if gateway.poll() is not None:
            raise click.ClickException("the gateway exited; see its log above")
        if time.monotonic() > deadline:
            raise click.ClickException(f"the gateway is not listening on {port} after "
                                       f"{timeout:.0f}s")
        time.sleep(0.05)


@click.command()
@click.option("--port", default=2222, show_default=True, type=IntRange(0, 65535),
              help="External SFTP port of the gateway (0: any free port).")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where to put the node home and the demo key, kept for the next run (default: a "
                   "temporary directory, removed on exit).")
def demo(port: int, workdir: str | None) -> None:
    """Run a gateway and an internal node on loopback with a demo user; Ctrl-C stops both."""
    from internal.home import CONFIG_NAME   # the demo runs the node's code too

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgegw-demo-"))
    home = tmp / "node-home"
    port = port or free_port()
    pnc, data = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    try:
        key = tmp / "demo_key"
        if not (home / CONFIG_NAME).exists():
            _create(home, key)
        elif key.exists():
            click.echo(f"reusing the node home {home} and its demo user")
        else:
            raise click.ClickException(f"{home} is a node home but {key} is gone: remove "
                                       f"{tmp} or pick another --dir")
        procs.append(subprocess.Popen(_edgegw(
            "serve", "--external", f"127.0.0.1:{port}", "--pnc", f"127.0.0.1:{pnc}",
            "--data", f"127.0.0.1:{data}", "--trust", str(home / "gateway-trust.pem"),
            "--gateway-id", "demo-gateway"), cwd="/"))
        _wait_listening(procs[0], pnc)   # the node's first dial then finds the gateway up
        procs.append(subprocess.Popen(_edgegw(
            "internal", "serve", "--home", str(home), "--gateway", f"127.0.0.1:{pnc}")))
        time.sleep(1.0)
        click.echo("")
        click.echo(f"edgegw demo running: gateway on 127.0.0.1:{port}, node home {home}")
        click.echo("Try (key):      sftp -i {k} -o StrictHostKeyChecking=no "
                   "-o UserKnownHostsFile=/dev/null -P {p} {u}@127.0.0.1".format(
                       k=key, p=port, u=DEMO_USER))
        click.echo(f"or (password '{DEMO_PASSWORD}'): sftp -o StrictHostKeyChecking=no "
                   f"-o UserKnownHostsFile=/dev/null -P {port} {DEMO_USER}@127.0.0.1")
        click.echo(f"Audit trail:    edgegw internal audit --home {home}")
        click.echo("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        raise click.ClickException("a demo process exited; see its log above")
    except KeyboardInterrupt:
        click.echo("\nstopping")
    except subprocess.CalledProcessError as exc:
        what = " ".join(str(a) for a in exc.cmd[2:])   # after "python -m"
        raise click.ClickException(f"demo setup failed: {what} exited with status "
                                   f"{exc.returncode} (its error is above)") from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan them
        for p in reversed(procs):   # the node first: the gateway then sees it detach
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
