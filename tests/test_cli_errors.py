"""Bad command lines and config get one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from edgegw.netaddr import HostPort, parse_hostport
from edgegw.pnc.events import Closed, NodeHello, Offer
from internal.forward import ForwardService
from internal.gateway_link import GatewayLink
from internal.session import SessionContext
from tests.procs import edgegw_cmd


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edgegw_cmd(*args), capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


def _serve(trust: Path, external: str = "127.0.0.1:0") -> list[str]:
    return ["serve", "--external", external, "--pnc", "127.0.0.1:0", "--data", "127.0.0.1:0",
            "--trust", str(trust)]


def test_gateway_bad_inputs(tmp_path: Path, node_home: Path) -> None:
    trust = node_home / "gateway-trust.pem"
    key_file = node_home / "pnc" / "node.key"
    busy = socket.create_server(("127.0.0.1", 0))
    cases = [
        (_serve(tmp_path / "missing.pem"), "cannot read trust file"),
        (_serve(Path("/etc/hostname")), "holds no PEM certificate"),
        (_serve(key_file), "contains a private key"),
        (_serve(trust, external="nohostport"), "expected HOST:PORT"),
        (_serve(trust, external="127.0.0.1:99999"), "out of range"),
        (_serve(trust, external="a..b:22"), "'a..b' is not a valid host name"),
        (_serve(trust, external=f"127.0.0.1:{busy.getsockname()[1]}"), "cannot listen on"),
        ([*_serve(trust), "--proxy-protocol-from", "10.0.0.0/33"], "not an IP address"),
        ([*_serve(trust), "--metrics", "127.0.0.1:0", "--metrics-allow", "x"],
         "Invalid value for '--metrics-allow': 'x' is not an IP address or CIDR"),
        ([*_serve(trust), "--metrics-allow", "10.0.0.0/8"], "--metrics-allow needs --metrics"),
        ([*_serve(trust), "--metrics-cert", str(trust)], "--metrics-cert needs --metrics"),
        ([*_serve(trust), "--metrics", "127.0.0.1:0", "--metrics-key", str(key_file)],
         "--metrics-key needs --metrics-cert"),
        ([*_serve(trust), "--metrics", "127.0.0.1:0", "--metrics-client-ca", str(trust)],
         "--metrics-client-ca needs --metrics-cert"),
        ([*_serve(trust), "--metrics", "127.0.0.1:0", "--metrics-cert",
          str(tmp_path / "nocert.pem")], "cannot read"),
        ([*_serve(trust), "--metrics", "127.0.0.1:0", "--metrics-cert", str(key_file)],
         "cannot load the certificate"),
        ([*_serve(trust), "--relay-coalesce-us", "100001"], "not in the range 0<=x<=100000"),
        ([*_serve(trust), "--relay-sched", "fifo"], "'fifo' is not one of 'batch', 'normal'"),
        ([*_serve(trust), "--sndbuf-node", "-1"], "not in the range 0<=x<=67108864"),
        ([*_serve(trust), "--congestion-node", "nosuchalgo"],
         "congestion control 'nosuchalgo' cannot be used"),
        ([*_serve(trust), "--congestion-client", "x" * 40], "cannot be used"),
        ([*_serve(trust), "--congestion-client", "nosuchalgo"], "'--congestion-client'"),
        ([*_serve(trust), "--offer-timeout", "nan"], "'nan' is not a number of seconds"),
        ([*_serve(trust), "--heartbeat-interval", "inf"], "not in the range"),
        ([*_serve(trust), "--idle-timeout", "1e10"], "not in the range"),
        ([*_serve(trust), "--fin-timeout", "-1"], "not in the range"),
        ([*_serve(trust), "--max-handshakes", "0"], "not in the range x>=1"),
        ([*_serve(trust), "--max-waiting", "\u0661\u0662"], "digits other than 0-9"),
        ([*_serve(trust), "--offer-timeout", "\uff15"], "digits other than 0-9"),
        ([*_serve(trust), "--metrics", "9100"], "expected HOST:PORT"),
        ([*_serve(trust), "--metrics", f"127.0.0.1:{busy.getsockname()[1]}"], "cannot listen on"),
    ]
    try:
        for args, message in cases:
            res = _run(*args)
            assert res.returncode != 0, args
            assert message in res.stderr, (args, res.stderr)
            assert "Traceback" not in res.stderr, res.stderr
        res = _run(*_serve(trust), env=dict(os.environ, EDGEGW_RELAY_BACKEND="bogus"))
        assert res.returncode != 0 and "unknown relay backend" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        busy.close()


@pytest.mark.parametrize("option", ["--external", "--pnc", "--data", "--metrics"])
def test_gateway_listen_address_that_does_not_resolve(node_home: Path, option: str) -> None:
    """A host name the resolver refuses (.invalid never resolves) is one error line naming
    the address, not the resolver's bare '[Errno -2] ...'."""
    args = _serve(node_home / "gateway-trust.pem")
    if option == "--metrics":
        args += ["--metrics", "nosuch.invalid:2222"]
    else:
        args[args.index(option) + 1] = "nosuch.invalid:2222"
    res = _run(*args)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "Error: cannot listen on nosuch.invalid:2222: "), res.stderr
    assert "Traceback" not in res.stderr and "Errno" not in res.stderr


@pytest.mark.parametrize("args,message", [
    (["internal", "serve", "--home", "/nonexistent/home", "--gateway", "127.0.0.1:1"],
     "not an edgegw node home"),
    (["internal", "serve", "--gateway", "127.0.0.1:1"], "--home"),
    (["internal", "drain", "--home", "/nonexistent/home"], "not an edgegw node home"),
    (["internal", "serve", "--gateway", "127.0.0.1:1", "--drain-timeout", "nan"],
     "'nan' is not a number of seconds"),
    # a name getaddrinfo's idna codec refuses: a traceback (--listen), a dead link (--gateway)
    (["internal", "serve", "--home", "/nonexistent/home", "--listen", "a..b:0"],
     "Invalid value for '--listen': 'a..b:0': 'a..b' is not a valid host name"),
    (["internal", "serve", "--home", "/nonexistent/home", "--gateway", "a..b:1"],
     "Invalid value for '--gateway': 'a..b:1': 'a..b' is not a valid host name"),
    (["internal", "serve", "--home", "/nonexistent/home", "--forward", f"{'x' * 64}.example:22"],
     "Invalid value for '--forward'"),
    (["internal", "serve", "--home", "/nonexistent/home", "--gateway", "gw.example:+22"],
     "port '+22' is not a number"),
])
def test_node_bad_inputs(args: list[str], message: str) -> None:
    res = _run(*args, env={k: v for k, v in os.environ.items() if k != "EDGEGW_HOME"})
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_damaged_or_dangling_host_keys_are_one_line(node_home: Path) -> None:
    """A host key bit-flipped on disk makes asyncssh raise ValueError (not KeyImportError), a
    dangling host_*_key symlink fails the sort by mtime: `serve` names the file in one Error:
    line (and how to remove it), `hostkey list` shows it as unreadable beside the others."""
    import base64
    key = node_home / "ssh" / "host_ecdsa_key"
    lines = key.read_text().splitlines()
    body = base64.b64decode("".join(lines[1:-1]))
    at = body.rfind(b"\x00\x00\x00\x08nistp256")      # the private section's curve name
    body = body[:at] + b"\x00\x00\x00\x08nistp999" + body[at + 12:]
    key.write_text(f"{lines[0]}\n{base64.encodebytes(body).decode()}{lines[-1]}\n")
    serve = ["internal", "serve", "--home", str(node_home), "--listen", "127.0.0.1:0",
             "--workers", "1"]
    hint = f"remove it with: edgegw internal hostkey remove --home {node_home} "
    listing = ["internal", "hostkey", "list", "--home", str(node_home)]
    res = _run(*serve)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"Error: cannot read host key {key}: "), res.stderr
    assert res.stderr.rstrip().endswith(hint + key.name), res.stderr
    res = _run(*listing)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert f"unreadable - - {key.name} (" in res.stdout and "ssh-ed25519 256 SHA256:" in \
        res.stdout, res.stdout
    assert hint + key.name in res.stderr, res.stderr
    key.unlink()
    dangling = node_home / "ssh" / "host_gone_key"
    dangling.symlink_to(node_home / "nonexistent")
    res = _run(*serve)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"Error: cannot read host key {dangling}: "), res.stderr
    res = _run(*listing)
    assert res.returncode == 0 and f"unreadable - - {dangling.name} (" in res.stdout, res


def test_node_serve_needs_a_gateway_or_listen(node_home: Path) -> None:
    res = _run("internal", "serve", "--home", str(node_home))
    assert res.returncode != 0 and "--gateway" in res.stderr
    res = _run("internal", "serve", "--home", str(node_home), "--listen", "127.0.0.1:1",
               "--forward", "127.0.0.1:2")
    assert res.returncode != 0 and "cannot be combined" in res.stderr
    res = _run("internal", "serve", "--home", str(node_home), "--gateway", "127.0.0.1:1",
               "--congestion-gateway", "nosuchalgo")
    assert res.returncode != 0 and "--congestion-gateway" in res.stderr
    assert "'nosuchalgo' cannot be used" in res.stderr and "available here" in res.stderr
    for extra, message in ((["--metrics-allow", "10.0.0.0/8"], "--metrics-allow needs --metrics"),
                           (["--metrics", "127.0.0.1:0", "--metrics-allow", "10.0.0.0/40"],
                            "'10.0.0.0/40' is not an IP address or CIDR")):
        res = _run("internal", "serve", "--home", str(node_home), "--gateway", "127.0.0.1:1",
                   *extra)
        assert res.returncode != 0 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    corrupt = node_home / "node.json"
    corrupt.write_text("{not json")
    res = _run("internal", "serve", "--home", str(node_home), "--gateway", "127.0.0.1:1")
    assert res.returncode != 0 and "cannot read" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("text,message", [
    ("a..b:1", "'a..b' is not a valid host name (label empty or too long)"),
    (f"{'x' * 64}.example:1", "is not a valid host name"),
    (".:1", "is not a valid host name"),
    ("gw\udcff.example:1", "is not a valid host name"),      # a byte argv could not decode
    ("gw.example:+22", "port '+22' is not a number"),
    ("gw.example: 22", "port ' 22' is not a number"),
    ("gw.example:1_0", "port '1_0' is not a number"),
    ("gw.example:\uff12\uff12", "is not a number"),          # fullwidth digits: int() takes them
    ("gw.example:-1", "is not a number"),
    ("gw.example:65536", "out of range 0-65535"),
    ("gw.example:" + "9" * 5000, "out of range 0-65535"),   # int() itself refuses 5000 digits
])
def test_parse_hostport_refuses_what_the_resolver_or_int_would_mangle(text: str,
                                                                     message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_hostport(text)
    assert message in str(exc.value)


def test_parse_hostport_takes_names_addresses_and_ascii_ports() -> None:
    assert parse_hostport("b\u00fccher.example:22") == HostPort("b\u00fccher.example", 22)
    assert parse_hostport("gw.example.:0022") == HostPort("gw.example.", 22)
    assert parse_hostport("[fe80::1%eth0]:65535") == HostPort("fe80::1%eth0", 65535)
    assert parse_hostport(":0", default_host="0.0.0.0") == HostPort("0.0.0.0", 0)


class _Owner:
    node_id = "n1"

    def hello(self) -> NodeHello:
        raise AssertionError("never connected")

    def on_attached(self, link: GatewayLink) -> None: ...
    def on_detached(self, link: GatewayLink) -> None: ...
    def on_offer(self, link: GatewayLink, offer: Offer) -> None: ...
    def on_closed(self, link: GatewayLink, closed: Closed) -> None: ...


async def test_gateway_link_redials_a_name_the_resolver_refuses(
        caplog: pytest.LogCaptureFixture) -> None:
    """UnicodeError (from the idna codec) is no OSError: it ended the link task silently."""
    link = GatewayLink(_Owner(), HostPort("a..b", 1), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                       backoff_base=0.01, backoff_max=0.02)
    task = asyncio.create_task(link.run_forever())
    try:
        with caplog.at_level(logging.INFO, logger="edgegw.node.pnc"):
            await asyncio.sleep(0.5)
        assert not task.done(), task
        dials = [r for r in caplog.records if "label empty or too long" in r.getMessage()]
        assert len(dials) >= 2 and dials[0].levelno == logging.WARNING, caplog.text
    finally:
        await link.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_forward_to_a_name_the_resolver_refuses_is_unreachable() -> None:
    class Relay:
        def start(self, done: object) -> None: ...
        async def close(self) -> None: ...

    service = ForwardService(HostPort("a..b", 22), relay=Relay())  # type: ignore[arg-type]
    a, b = socket.socketpair()
    try:
        result = await service.serve_socket(a, SessionContext("0" * 16, "192.0.2.1", 4000, "g"))
    finally:
        a.close()
        b.close()
        await service.close()
    assert result.reason == "upstream unreachable" and service.active == 0
