"""SFTP upload/download, tmpfs to tmpfs, with OpenSSH's `sftp -b` client: OpenSSH sshd
(directly, through HAProxy splice, through the edgegw gateway in --forward mode) against the
edgegw node's own SFTP server directly and through the gateway.

MB/s = file bytes / 1e6 / (wall time of `sftp -b` doing the transfer - the median wall time
of `sftp -b` doing only `pwd` on the same path and cipher in the same repetition), so the
connection setup is not charged to the transfer. Server CPU = the server process tree's
utime+stime delta per GiB (sshd's per-connection children are reaped into it)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from bench.peers import (EDGEGW_KERNEL_CC, EDGEGW_SNDBUF, NEAR_SNDBUF, Ctx, EdgegwGateway, EdgegwSsh,
                         HAProxy, RelayPath, Sshd, record_tcp, start_all, stop_all)
from bench.procs import (Skip, cpu_seconds, free_page_reporting, log, need,
                         page_reporting_hold_s, pin_tree, uptime_seconds)
from bench.report import Metric, PartResult, Results
from bench.sessions import ssh_keys
from edgegw.sockio import CC_AUTO, resolve_congestion

CIPHERS = {"aes": "aes128-gcm@openssh.com", "chacha": "chacha20-poly1305@openssh.com"}
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]


def _metrics() -> list[Metric]:
    out = []
    for c in CIPHERS:
        for d, dl in (("up", "upload"), ("down", "download")):
            out.append(Metric(f"{d}_{c}", f"{d} {c}", "MB/s", "{:.0f}"))
    for c in CIPHERS:
        for d in ("up", "down"):
            out.append(Metric(f"cpu_{d}_{c}", f"srv CPU {d} {c}", "s/GiB", "{:.2f}"))
    for c in CIPHERS:
        for d in ("up", "down"):
            out.append(Metric(f"relay_cpu_{d}_{c}", f"relay CPU {d} {c}", "s/GiB", "{:.2f}",
                              table=False))
    for c in CIPHERS:
        for d in ("up", "down"):
            out.append(Metric(f"node_cpu_{d}_{c}", f"fwd node CPU {d} {c}", "s/GiB", "{:.2f}",
                              table=False))
    return out


GATEWAY_VARIANTS = {"edgegw-gateway-sndbuf": EDGEGW_SNDBUF,
                    "edgegw-gateway-kernelcc": EDGEGW_KERNEL_CC}


class Target:
    """One SFTP endpoint: a path plus who logs in where, and which pid plays which role."""

    def __init__(self, name: str, path: RelayPath, user: str, remote_dir: str,
                 roles: dict[str, int]) -> None:
        self.name, self.path, self.user, self.remote_dir = name, path, user, remote_dir
        self.roles = roles


def sftp_batch(port: int, user: str, key: Path, cipher: str, commands: str,
               timeout: float, cpus: set[int] | None = None
               ) -> tuple[float, subprocess.CompletedProcess]:
    args = ["sftp", "-b", "-", "-P", str(port), "-i", str(key), *SSH_OPTS,
            "-o", f"Ciphers={cipher}", f"{user}@127.0.0.1"]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    t0 = time.monotonic()
    cp = subprocess.run(args, input=commands, capture_output=True, text=True, timeout=timeout,
                        preexec_fn=pin)
    return time.monotonic() - t0, cp


def make_source(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


FRESH_BOOT_S = 600   # a VM booted this recently may not have all its memory backed yet
# Memory held free this long before it is reported is mostly reused first: a run's transfers
# then write into pages the host still backs (bench/README.md, "Memory that the VM hands back")
QUIET_HOLD_S = 60


def memory_warnings(reporting: str | None, uptime: int | None,
                    hold_s: float | None = None) -> dict[str, str]:
    """Notes on what makes tmpfs transfers on this machine slow by turns, not by design."""
    notes = {}
    if reporting and hold_s is not None and hold_s >= QUIET_HOLD_S:
        notes["memory"] = (f"this VM hands memory back to its host ({reporting}) once it has "
                           f"stayed free for {hold_s:g} s (page_reporting.min_free_ms), longer "
                           "than transfers leave it free; see bench/README.md, 'Memory that "
                           "the VM hands back'")
    elif reporting:
        notes["memory"] = (f"this VM hands freed memory back to its host ({reporting}), "
                           "so one tmpfs transfer can cost up to 3.5x the CPU of the next; "
                           "see bench/README.md, 'Memory that the VM hands back'")
    if uptime is not None and uptime < FRESH_BOOT_S:
        notes["boot"] = (f"the machine booted {uptime} s ago: a VM's host may still be backing "
                         "its memory at first touch, which slows every new tmpfs file; see "
                         "bench/README.md, 'A VM's first minutes'")
    return notes


def own_cpu_layout(part: PartResult, targets: list[Target]) -> set[int] | None:
    """--sftp-own-cpu: each SSH server (sshd with its session processes, the edgegw node)
    alone on the last CPU, everything else (client, HAProxy, gateway, forwarding node) on the
    others, so that a relay's CPU time no longer comes out of the server's share, as it would
    not with the relay on a host of its own. Returns the client's CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        part.notes["cpus"] = "--sftp-own-cpu needs 2 CPUs or more: not applied"
        return None
    server, rest = {cpus[-1]}, set(cpus[:-1])
    for t in targets:
        for role, pid in t.roles.items():
            pin_tree(pid, server if role == "server" else rest)
    part.notes["cpus"] = (f"SSH servers alone on CPU {cpus[-1]}; client and relays on "
                          f"{','.join(map(str, sorted(rest)))} (--sftp-own-cpu)")
    return rest


def run(ctx: Ctx, results: Results, *, quick: bool, repeat: int, mib: int | None = None,
        only: set[str] | None = None, own_cpu: bool = False) -> PartResult:
    mib = mib or (32 if quick else 1024)
    size = mib << 20
    part = results.part(PartResult(
        "sftp", f"sftp: {mib} MiB tmpfs->tmpfs, OpenSSH sftp -b client", _metrics(),
        baselines=["openssh", "edgegw-node"],
        ratio_metrics=[f"{d}_{c}" for c in CIPHERS for d in ("up", "down")]))
    part.notes["units"] = "MB = 1e6 bytes; CPU s/GiB; relay CPU = HAProxy or edgegw gateway"
    for name, text in memory_warnings(free_page_reporting(), uptime_seconds(),
                                      page_reporting_hold_s()).items():
        part.notes[name] = text
        log(f"sftp: warning: {text}")
    try:
        need("sftp")
    except Skip as exc:
        part.skip("all", str(exc))
        return part
    key, pub = ssh_keys(ctx)
    me = pwd.getpwuid(os.getuid()).pw_name
    shm = Path("/dev/shm") / f"edgegw-bench-{os.getpid()}-sftp"
    shm.mkdir(parents=True, exist_ok=True)
    src, dl = shm / "source.bin", shm / "download.bin"
    ossh_dir = shm / "openssh"
    ossh_dir.mkdir(exist_ok=True)
    log(f"sftp: writing a {mib} MiB source file on tmpfs")
    make_source(src, size)

    def wanted(name: str) -> bool:
        return only is None or "all" in only or name in only

    sshd = Sshd(pub)
    # the same node through more gateways: with fixed send buffers (and behind HAProxy with the
    # same), and with the kernel's algorithm towards clients as a far client gets it: what the
    # relay costs when its sockets are paced by timer or not (bench/README.md, "Send buffers
    # and pacing", "Congestion control")
    variants = {name: args for name, args in GATEWAY_VARIANTS.items() if wanted(name)}
    if "edgegw-gateway-kernelcc" in variants:
        # auto gives this host's clients what it gives the Data hop: is that a change here?
        cc, said = resolve_congestion(CC_AUTO)
        if not cc:
            del variants["edgegw-gateway-kernelcc"]
            part.skip("edgegw-gateway-kernelcc", f"the kernel's algorithm is what auto gives "
                                                 f"clients here: {said}")
    edge = EdgegwSsh("bench", pub, variants=variants)
    running: list[RelayPath] = []
    targets: list[Target] = []
    try:
        running += start_all([sshd, edge], ctx, 0, part.skip)
        if sshd in running:
            targets.append(Target("openssh", sshd, me, str(ossh_dir), {"server": sshd.pids()["server"]}))
            hp = HAProxy(splice=True)
            hp.name = "openssh-via-haproxy-splice"
            eg = EdgegwGateway("splice")
            eg.name = "openssh-via-edgegw"
            for p in start_all([hp, eg], ctx, sshd.port, part.skip):
                running.append(p)
                roles = {"server": sshd.pids()["server"]}
                roles.update({("relay" if r in ("relay", "gateway") else r): pid
                              for r, pid in p.pids().items()})
                targets.append(Target(p.name, p, me, str(ossh_dir), roles))
        if edge in running:
            targets.append(Target("edgegw-node", edge.direct, "bench", ".",
                                  {"server": edge.pids()["server"]}))
            targets.append(Target("edgegw-gateway", edge, "bench", ".",
                                  {"server": edge.pids()["server"],
                                   "relay": edge.pids()["gateway"]}))
            for view in edge.variants.values():
                targets.append(Target(view.name, view, "bench", ".",
                                      {"server": edge.pids()["server"],
                                       "relay": view.pids()["gateway"]}))
            # the same node behind the peer relay: what a relay on this machine costs the node
            peers = [HAProxy(splice=True)]
            peers[0].name = "edgegw-node-via-haproxy-splice"
            if wanted("edgegw-node-via-haproxy-splice-sndbuf"):
                peers.append(HAProxy(splice=True, sndbuf=NEAR_SNDBUF))
                peers[1].name = "edgegw-node-via-haproxy-splice-sndbuf"
            for p in start_all(peers, ctx, edge.direct.port, part.skip):
                running.append(p)
                targets.append(Target(p.name, p, "bench", ".",
                                      {"server": edge.pids()["server"],
                                       "relay": p.pids()["relay"]}))
        if only is not None and "all" not in only:
            targets = [t for t in targets if t.name in only]
        record_tcp(part, running)
        client_cpus = own_cpu_layout(part, targets) if own_cpu else None
        limit = 120 + size / 5e6   # even 5 MB/s finishes
        total, step = repeat * len(CIPHERS) * len(targets), 0
        for rep in range(repeat):
            # every other repetition runs the paths in reverse, so no path always follows
            # the same neighbour (a drift over the round would favour one end of it)
            order = targets if rep % 2 == 0 else targets[::-1]
            for c, cipher in CIPHERS.items():
                for t in order:
                    step += 1
                    log(f"sftp [{step}/{total}] rep {rep + 1} {t.name} {c}: up+down {mib} MiB")
                    try:
                        t.path.check_alive()
                        transfer(part, t, rep, c, cipher, key, src, dl, size, limit,
                                 client_cpus)
                    except Skip as exc:
                        part.fail(t.name, str(exc))
                    except subprocess.TimeoutExpired:
                        t.path.mark_broken(f"sftp through {t.name} did not finish in "
                                           f"{limit:.0f}s")
                        part.fail(t.name, t.path.broken)
    finally:
        stop_all(running)
        shutil.rmtree(shm, ignore_errors=True)
    return part


def transfer(part: PartResult, t: Target, rep: int, c: str, cipher: str, key: Path,
             src: Path, dl: Path, size: int, limit: float, cpus: set[int] | None) -> None:
    remote = f"{t.remote_dir}/upload.bin"
    hs = []
    for _ in range(3):
        el, cp = sftp_batch(t.path.port, t.user, key, cipher, "pwd\n", 60, cpus)
        if cp.returncode != 0:
            raise Skip(f"sftp login failed ({c}): {(cp.stderr or cp.stdout).strip()[-300:]}")
        hs.append(el)
    handshake = sorted(hs)[1]
    part.path(t.name).info[f"handshake_s_{c}_rep{rep}"] = round(handshake, 4)
    gib = size / 2**30
    for d, cmd in (("up", f"put {src} {remote}\n"), ("down", f"get {remote} {dl}\n")):
        before = {r: cpu_seconds(pid) for r, pid in t.roles.items()}
        el, cp = sftp_batch(t.path.port, t.user, key, cipher, cmd, limit, cpus)
        time.sleep(0.1)  # let sshd reap its session child into cutime/cstime
        after = {r: cpu_seconds(pid) for r, pid in t.roles.items()}
        if cp.returncode != 0:
            raise Skip(f"sftp {d} failed ({c}): {(cp.stderr or cp.stdout).strip()[-300:]}")
        if d == "down" and dl.stat().st_size != size:
            raise Skip(f"download has {dl.stat().st_size} bytes, expected {size}")
        net = max(el - handshake, 1e-3)
        part.add(t.name, f"{d}_{c}", rep, size / 1e6 / net)
        part.add(t.name, f"cpu_{d}_{c}", rep, (after["server"] - before["server"]) / gib)
        if "relay" in t.roles:
            part.add(t.name, f"relay_cpu_{d}_{c}", rep,
                     (after["relay"] - before["relay"]) / gib)
        if "node" in t.roles:
            part.add(t.name, f"node_cpu_{d}_{c}", rep, (after["node"] - before["node"]) / gib)
    if dl.exists():
        dl.unlink()
