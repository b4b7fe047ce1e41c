"""The paths a benchmark compares, each able to start, report its processes and stop.

Peer configurations are rendered from the small templates below so that what ran is exactly
what `bench/README.md` tells a reader to run by hand.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bench.procs import Proc, Skip, log, need, wait_port
from bench.report import PartResult
from edgegw.sockio import free_port

HAPROXY_CFG = """\
global
    maxconn {maxconn}
    maxpipes {maxpipes}
    nbthread {threads}
    tune.maxaccept 256
{sndbuf}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{target}
"""

# `option splice-auto` never spliced on this kind of machine (see /work/shared/ANCHORS.md):
# zero-copy has to be forced for both directions.
HAPROXY_SPLICE = "    option splice-request\n    option splice-response\n"

# Fixed send buffers on both sides of a relay, for near peers: HAProxy's tune.sndbuf.* and
# edgegw's --sndbuf-* (bench/README.md, "Send buffers and pacing").
NEAR_SNDBUF = 131072
HAPROXY_SNDBUF = "    tune.sndbuf.client {n}\n    tune.sndbuf.server {n}\n"
EDGEGW_SNDBUF = ("--sndbuf-client", str(NEAR_SNDBUF), "--sndbuf-node", str(NEAR_SNDBUF))
# the kernel's algorithm towards clients, as for a far client (the default, auto, gives this
# host's clients cubic: bench/README.md, "Congestion control")
EDGEGW_KERNEL_CC = ("--congestion-client", "kernel")

SOCAT_ARGS = ["TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
              "TCP:127.0.0.1:{target},nodelay"]

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 1000:30:2000
MaxSessions 100
UseDNS no
LogLevel ERROR
Subsystem sftp internal-sftp
"""


_HOMES_LOCK = threading.Lock()


@dataclass
class Ctx:
    """Shared by every path of one run: where logs, configs and node homes go."""

    workdir: Path
    gateway_args: list[str] = field(default_factory=list)   # appended to every `edgegw serve`
    node_args: list[str] = field(default_factory=list)      # and to every node dialing one
    homes: dict[str, Path] = field(default_factory=dict)
    # target port -> the Unix socket on which the C server behind it takes descriptors
    fdsocks: dict[int, Path] = field(default_factory=dict)

    def edgegw_home(self, key: str) -> Path:
        """A node home per key, created once per run (key generation takes a second); paths
        start in parallel threads, hence the lock."""
        with _HOMES_LOCK:
            return self._edgegw_home(key)

    def _edgegw_home(self, key: str) -> Path:
        if key not in self.homes:
            home = self.workdir / f"node-{key}"
            files = Path("/dev/shm") / f"edgegw-bench-{os.getpid()}-{key}"
            cp = subprocess.run([sys.executable, "-m", "edgegw", "internal", "init",
                                 "--home", str(home), "--files-root", str(files)],
                                capture_output=True, text=True, timeout=120)
            if cp.returncode != 0:
                raise Skip(f"edgegw internal init failed: {(cp.stderr or cp.stdout).strip()[-400:]}")
            self.homes[key] = home
        return self.homes[key]


class RelayPath:
    """Something a TCP client connects to that ends at `target` (or is `target`)."""

    name = "?"
    programs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.port = 0
        self.procs: dict[str, Proc] = {}
        self.broken = ""   # set when a run hung or a process died: later runs skip the path
        self.tcp: dict[str, str] = {}   # edgegw processes' TCP congestion control, by role

    def start(self, ctx: Ctx, target: int) -> None:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        """Processes whose CPU and memory the benchmark charges to this path, by role."""
        return {role: p.pid for role, p in self.procs.items()}

    def check_alive(self) -> None:
        if self.broken:
            raise Skip(self.broken)
        for role, p in self.procs.items():
            if not p.alive():
                self.broken = f"{self.name}: {role} exited: {p.tail(300)}"
                raise Skip(self.broken)

    def mark_broken(self, reason: str) -> None:
        self.broken = self.broken or reason

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()
        self.procs.clear()


class Direct(RelayPath):
    name = "direct"

    def start(self, ctx: Ctx, target: int) -> None:
        self.port = target


class HAProxy(RelayPath):
    programs = ("haproxy",)

    def __init__(self, splice: bool, sndbuf: int = 0) -> None:
        """`sndbuf` > 0: fixed send buffers of that many bytes towards clients and servers."""
        super().__init__()
        self.splice = splice
        self.sndbuf = sndbuf
        self.name = "haproxy-splice" if splice else "haproxy"

    def start(self, ctx: Ctx, target: int) -> None:
        exe = need("haproxy")
        self.port = free_port()
        cfg = ctx.workdir / f"{self.name}-{self.port}.cfg"
        # Fit HAProxy's own fd arithmetic (2 per connection + 2 per pipe) in our limit.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        maxpipes = 1000 if self.splice else 0
        maxconn = min(40000, (nofile - 200 - 2 * maxpipes) // 2)
        self.max_sessions = maxconn - 20
        cfg.write_text(HAPROXY_CFG.format(maxconn=maxconn, maxpipes=maxpipes,
                                          threads=os.cpu_count() or 1,
                                          port=self.port, target=target,
                                          splice=HAPROXY_SPLICE if self.splice else "",
                                          sndbuf=HAPROXY_SNDBUF.format(n=self.sndbuf)
                                          if self.sndbuf else ""))
        check = subprocess.run([exe, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise Skip(f"haproxy rejected its config: {check.stderr.strip()[-400:]}")
        p = Proc(self.name, [exe, "-db", "-f", str(cfg)], ctx.workdir / f"{self.name}.log").start()
        self.procs["relay"] = p
        wait_port(self.port, proc=p)


class Socat(RelayPath):
    name = "socat"
    programs = ("socat",)

    def start(self, ctx: Ctx, target: int) -> None:
        exe = need("socat")
        self.port = free_port()
        args = [exe] + [a.format(port=self.port, target=target) for a in SOCAT_ARGS]
        p = Proc(self.name, args, ctx.workdir / "socat.log").start()
        self.procs["relay"] = p
        wait_port(self.port, proc=p)


def _edgegw_importable() -> None:
    cp = subprocess.run([sys.executable, "-m", "edgegw", "--help"], capture_output=True,
                        text=True, timeout=60)
    if cp.returncode != 0:
        raise Skip(f"`python -m edgegw` does not run yet: {cp.stderr.strip()[-300:]}")


def _relay_backend_available(backend: str) -> None:
    code = ("from edgegw.relay import available_backends; import sys; "
            f"sys.exit(0 if {backend!r} in available_backends() else 3)")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if cp.returncode == 3:
        raise Skip(f"relay backend {backend!r} not available (C engine not built? "
                   "run `python setup.py build_ext --inplace`)")
    if cp.returncode != 0:
        raise Skip(f"edgegw.relay does not import: {cp.stderr.strip()[-300:]}")


class EdgegwEngine(RelayPath):
    """edgegw's relay engine alone as a single-hop relay (bench/engine_relay.py)."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.name = f"edgegw-engine-{backend}"

    def start(self, ctx: Ctx, target: int) -> None:
        _relay_backend_available(self.backend)
        self.port = free_port()
        p = Proc(self.name, [sys.executable, "-m", "bench.engine_relay", str(self.port),
                             str(target), "--backend", self.backend],
                 ctx.workdir / f"{self.name}.log",
                 env={"EDGEGW_RELAY_BACKEND": self.backend}).start()
        self.procs["relay"] = p
        p.wait_log("ready", timeout=30)
        wait_port(self.port, proc=p)


# Relay comparisons run edgegw's sockets on the kernel's congestion control, as every socket
# of HAProxy's is (it has no setting for it): the defaults, "auto", would set cubic on the Data
# hop and towards this host's clients, and compare an unpaced relay with a paced one where the
# kernel's default is bbr. The run's --gateway-args / --node-args come after these and win.
KERNEL_CC_GATEWAY = ("--congestion-client", "kernel", "--congestion-node", "kernel")
KERNEL_CC_NODE = ("--congestion-gateway", "kernel")


def _start_gateway(path: RelayPath, ctx: Ctx, home: Path, backend: str, label: str,
                   procs: int = 0, role: str = "gateway", base: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> tuple[int, int]:
    """`edgegw serve` on free ports trusting `home`'s node, registered as path's `role` (also
    its gateway id, which the node logs when attached) and ready, with `base` options before
    the run's --gateway-args and `extra` after them; returns (external port, PNC port)."""
    ext, pnc, data = free_port(), free_port(), free_port()
    gw = Proc(f"{label} {role}",
              [sys.executable, "-m", "edgegw", "serve", "--external", f"127.0.0.1:{ext}",
               "--pnc", f"127.0.0.1:{pnc}", "--data", f"127.0.0.1:{data}",
               "--trust", str(home / "gateway-trust.pem"), "--relay-backend", backend,
               "--gateway-id", role, "--relay-procs", str(procs), *base, *ctx.gateway_args,
               *extra],
              ctx.workdir / f"{label}-{ext}-{role}.log",
              env={"EDGEGW_RELAY_BACKEND": backend}).start()
    path.procs[role] = gw
    gw.wait_log("listening: external=", timeout=30)
    path.tcp[role] = _logged(gw, "TCP congestion control: ")
    return ext, pnc


_NODE_CC = "Data connections: TCP congestion control "


def _logged(proc: Proc, prefix: str) -> str:
    """What `proc` logged after `prefix`, once it has."""
    return proc.wait_log(prefix).split(prefix, 1)[1].strip()


def record_tcp(part: PartResult, paths: list[RelayPath]) -> None:
    """Notes, for the JSON and the table, of what congestion control each edgegw process of
    `paths` chose (the Data hop's default, auto, depends on the kernel and privileges)."""
    for p in paths:
        if p.tcp:
            part.notes[f"tcp {p.name}"] = "; ".join(f"{role}: {said}"
                                                   for role, said in p.tcp.items())


class EdgegwGateway(RelayPath):
    """client -> `edgegw serve` -> `edgegw internal serve --forward` -> target.

    Two relay hops; the gateway's CPU (the DMZ relay) is reported apart from the node's."""

    def __init__(self, backend: str, *, node_mode: str = "forward", procs: int = 0) -> None:
        """`procs` > 0: the gateway relays in that many child processes (--relay-procs) and the
        node runs as many workers, so that neither is bound by one process's fd limit."""
        super().__init__()
        self.backend = backend
        self.node_mode = node_mode
        self.relay_procs = procs
        self.name = f"edgegw-{backend}" + (f"-{procs}procs" if procs else "")
        self.node_port = 0

    def start(self, ctx: Ctx, target: int) -> None:
        _edgegw_importable()
        _relay_backend_available(self.backend)
        home = ctx.edgegw_home(self.name if self.node_mode == "forward" else "sftp")
        env = {"EDGEGW_RELAY_BACKEND": self.backend}
        ext, pnc = _start_gateway(self, ctx, home, self.backend, self.name, self.relay_procs,
                                  base=KERNEL_CC_GATEWAY)
        node_args = [sys.executable, "-m", "edgegw", "internal", "serve", "--home", str(home),
                     "--workers", str(max(1, self.relay_procs)), "--gateway", f"127.0.0.1:{pnc}",
                     *KERNEL_CC_NODE, *ctx.node_args]
        if self.node_mode == "forward":
            node_args += ["--forward", f"127.0.0.1:{target}"]
        else:
            self.node_port = target
            node_args += ["--listen", f"127.0.0.1:{target}"]
        node = Proc(f"{self.name} node", node_args, ctx.workdir / f"{self.name}-{ext}-node.log",
                    env=env).start()
        self.procs["node"] = node
        node.wait_log("attached to gateway", timeout=30)
        self.tcp["node"] = _logged(node, _NODE_CC)
        self.port = ext


class EdgegwGatewayOneHop(RelayPath):
    """client -> `edgegw serve` -> C end (netload), one hop like HAProxy's: the node
    (bench/handoff_node.py) hands each Data connection to the C server behind `target`
    instead of relaying it again. Needs a target started with a descriptor socket."""

    name = "edgegw-splice-1hop"

    def start(self, ctx: Ctx, target: int) -> None:
        _edgegw_importable()
        _relay_backend_available("splice")
        fdsock = ctx.fdsocks.get(target)
        if fdsock is None:
            raise Skip("needs a C far end that takes descriptors (netload); iperf3 cannot")
        home = ctx.edgegw_home(self.name)
        ext, pnc = _start_gateway(self, ctx, home, "splice", self.name, base=KERNEL_CC_GATEWAY)
        node = Proc(f"{self.name} node",
                    [sys.executable, "-m", "bench.handoff_node", "--home", str(home),
                     "--gateway", f"127.0.0.1:{pnc}", "--fdsock", str(fdsock)],
                    ctx.workdir / f"{self.name}-{ext}-node.log").start()
        self.procs["node"] = node
        node.wait_log("attached to gateway", timeout=30)
        self.port = ext


class EdgegwNodeDirect(RelayPath):
    """`edgegw internal serve --listen`: the node's SSH/SFTP server without the gateway."""

    name = "edgegw-node"

    def start(self, ctx: Ctx, target: int = 0) -> None:
        _edgegw_importable()
        home = ctx.edgegw_home("sftp")
        self.port = free_port()
        node = Proc(self.name, [sys.executable, "-m", "edgegw", "internal", "serve",
                                "--home", str(home), "--workers", "1",
                                "--listen", f"127.0.0.1:{self.port}"],
                    ctx.workdir / f"{self.name}-{self.port}.log").start()
        self.procs["node"] = node
        wait_port(self.port, proc=node, timeout=30)


QUICK_PATHS = {"direct", "edgegw-splice", "edgegw-splice-1hop", "haproxy-splice", "haproxy",
               "socat"}


def choose(paths: list[RelayPath], only: set[str] | None, quick: bool) -> list[RelayPath]:
    """--paths wins; otherwise --quick keeps the core comparison (QUICK_PATHS)."""
    if only is not None and "all" not in only:
        return [p for p in paths if p.name in only]
    if quick and only is None:
        return [p for p in paths if p.name in QUICK_PATHS]
    return paths


def relay_paths(include_engine: bool = True,
                one_hop: RelayPath | None = None) -> list[RelayPath]:
    """Every TCP relay the relay/latency/sessions parts compare, ceiling first; `one_hop`
    (EdgegwGatewayOneHop, for parts whose far end is netload) follows edgegw-splice."""
    paths: list[RelayPath] = [Direct()]
    paths += [EdgegwGateway(b) for b in ("splice", "select", "python")]
    if one_hop is not None:
        paths.insert(2, one_hop)
    if include_engine:
        paths.append(EdgegwEngine("splice"))
    paths += [HAProxy(splice=True), HAProxy(splice=False), Socat()]
    return paths


# --------------------------------------------------------------------------- OpenSSH sshd

class Sshd(RelayPath):
    """OpenSSH's sshd with internal-sftp on a loopback port: its own host key and
    AuthorizedKeysFile in the run's temp dir, in the foreground (-D), stopped by PID."""

    name = "openssh"
    programs = ("sshd",)

    def __init__(self, pubkey: Path) -> None:
        super().__init__()
        self.pubkey = pubkey

    def start(self, ctx: Ctx, target: int = 0) -> None:
        exe = need("sshd")
        d = ctx.workdir / "sshd"
        d.mkdir(exist_ok=True)
        hk = d / "ssh_host_ed25519_key"
        if not hk.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)],
                           check=True, capture_output=True)
        (d / "authorized_keys").write_text(self.pubkey.read_text())
        os.chmod(d / "authorized_keys", 0o600)
        self.port = free_port()
        cfg = d / f"sshd_config-{self.port}"
        cfg.write_text(SSHD_CONFIG.format(port=self.port, dir=d))
        # sshd insists on its privilege separation directory even in the foreground.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        check = subprocess.run([exe, "-t", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise Skip(f"sshd rejected its config: {check.stderr.strip()[-400:]}")
        p = Proc(self.name, [exe, "-D", "-e", "-f", str(cfg)],
                 ctx.workdir / f"sshd-{self.port}.log").start()
        self.procs["server"] = p
        wait_port(self.port, proc=p)


def alive(part: "PartResult", path: RelayPath) -> bool:
    """True while the path's processes run; else the path is marked failed for this part."""
    try:
        path.check_alive()
    except Skip as exc:
        part.fail(path.name, str(exc))
        return False
    return True


def stream_rounds(part: "PartResult", running: list[RelayPath], repeat: int,
                  label: str) -> Iterator[tuple[int, int, RelayPath]]:
    """(rep, streams, path) for the throughput parts, interleaved: every path at 1 stream,
    then at 4, per round; paths that died are skipped (and marked failed)."""
    total, step = repeat * 2 * len(running), 0
    for rep in range(repeat):
        for streams in (1, 4):
            for path in running:
                step += 1
                log(f"{label} [{step}/{total}] rep {rep + 1} {path.name} {streams} stream(s)")
                if alive(part, path):
                    yield rep, streams, path


def start_all(paths: list[RelayPath], ctx: Ctx, target: int,
              on_skip) -> list[RelayPath]:
    """Start every path that can run here (in parallel: most of the wait is interpreter
    start-up and key loading); the others are reported through on_skip(name, reason) and
    left out. Returns the running paths in their original order."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.procs import log

    def one(p: RelayPath) -> str | None:
        try:
            log(f"starting {p.name}")
            p.start(ctx, target)
            return None
        except Skip as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken path must not end the run
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, len(paths))) as pool:
        outcomes = list(pool.map(one, paths))
    running = []
    for p, err in zip(paths, outcomes):
        if err is None:
            running.append(p)
        else:
            p.stop()
            log(f"skip {p.name}: {err}")
            on_skip(p.name, err)
    return running


def stop_all(paths: list[RelayPath]) -> None:
    for p in reversed(paths):
        p.stop()


class _View(RelayPath):
    """Another entry point into processes owned by a parent path (stopping it is a no-op)."""

    def __init__(self, name: str, parent: RelayPath) -> None:
        super().__init__()
        self.name = name
        self.parent = parent
        self.roles: dict[str, str] = {}

    def start(self, ctx: Ctx, target: int = 0) -> None:
        raise Skip(f"{self.name} is started through {self.parent.name}")

    def pids(self) -> dict[str, int]:
        return {role: self.parent.procs[src].pid for role, src in self.roles.items()
                if src in self.parent.procs}

    def check_alive(self) -> None:
        self.parent.check_alive()

    def stop(self) -> None:
        pass


class EdgegwSsh(RelayPath):
    """One node serving SSH/SFTP itself, reachable directly (`--listen`, the view `.direct`,
    named edgegw-node), through a gateway (this path, edgegw-gateway) and through one more
    gateway per entry of `variants` (view name -> that gateway's extra options, e.g.
    edgegw-gateway-sndbuf -> EDGEGW_SNDBUF; the views are `.variants`): the node dials them
    all."""

    name = "edgegw-gateway"

    def __init__(self, user: str, pubkey: Path, backend: str = "splice",
                 variants: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__()
        self.user, self.pubkey, self.backend = user, pubkey, backend
        self.direct = _View("edgegw-node", self)
        self.direct.roles = {"server": "node"}
        self.variant_args = dict(variants or {})
        self.variants: dict[str, _View] = {}
        for name in self.variant_args:
            view = self.variants[name] = _View(name, self)
            view.roles = {"server": "node", "gateway": name.removeprefix("edgegw-")}

    def pids(self) -> dict[str, int]:
        return {"server": self.procs["node"].pid, "gateway": self.procs["gateway"].pid}

    def start(self, ctx: Ctx, target: int = 0) -> None:
        _edgegw_importable()
        home = ctx.edgegw_home("ssh")
        if not (home / ".bench-user").exists():
            cp = subprocess.run([sys.executable, "-m", "edgegw", "internal", "user", "add",
                                 self.user, "--home", str(home), "--key", str(self.pubkey)],
                                capture_output=True, text=True, timeout=60)
            if cp.returncode != 0:
                raise Skip(f"edgegw internal user add failed: "
                           f"{(cp.stderr or cp.stdout).strip()[-300:]}")
            (home / ".bench-user").write_text(self.user)
        env = {"EDGEGW_RELAY_BACKEND": self.backend}
        gateways = {"gateway": _start_gateway(self, ctx, home, self.backend, "ssh")}
        for name, view in self.variants.items():
            role = view.roles["gateway"]
            gateways[role] = _start_gateway(self, ctx, home, self.backend, "ssh", role=role,
                                            extra=self.variant_args[name])
        listen = free_port()
        dial = [arg for _, pnc in gateways.values() for arg in ("--gateway", f"127.0.0.1:{pnc}")]
        node = Proc("edgegw node (ssh)",
                    [sys.executable, "-m", "edgegw", "internal", "serve", "--home", str(home),
                     "--workers", "1", *dial, "--listen", f"127.0.0.1:{listen}",
                     *ctx.node_args],
                    ctx.workdir / f"ssh-node-{listen}.log", env=env).start()
        self.procs["node"] = node
        for role in gateways:
            node.wait_log(f"attached to gateway {role} at", timeout=30)
        self.tcp["node"] = _logged(node, _NODE_CC)
        wait_port(listen, proc=node, timeout=30)
        self.port = gateways["gateway"][0]
        self.direct.port = listen
        for view in self.variants.values():
            view.port = gateways[view.roles["gateway"]][0]

    def files_dir(self, ctx: Ctx) -> Path:
        """Where the bench user's uploads land (tmpfs, see Ctx.edgegw_home)."""
        return Path("/dev/shm") / f"edgegw-bench-{os.getpid()}-ssh" / self.user
