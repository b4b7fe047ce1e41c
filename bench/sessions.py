"""Idle sessions: memory per held relayed connection (user space and kernel), and session
setup time (client connect -> SSH server banner) through the gateway vs direct.

Memory method, per path and repetition: take a baseline (relay PSS/RSS, /proc/meminfo,
TCP buffer pages, pipe fds), open N connections through the path to a C echo server, prove
each one end to end with a 1-byte echo, let the system settle, measure again, divide the
delta by N. The kernel figures are system-wide, so they include the client's and the echo
server's sockets too; `kernel_relay_*` subtracts the direct path's delta of the same
repetition, leaving what the relay adds (its two sockets, pipes and epoll entries).
"""
from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import struct
import time

from bench import netload
from bench.peers import (Ctx, EdgegwGateway, EdgegwSsh, HAProxy, RelayPath, Sshd, alive, choose,
                         relay_paths, start_all, stop_all)
from bench.procs import (Skip, kernel_other_kib, slab_object_kib, log, meminfo_kib, memory_kib, pipe_fds,
                         process_tree, tcp_mem_pages)
from bench.report import Metric, PartResult, Results

METRICS = [
    Metric("held", "sessions held", "", "{:.0f}"),
    Metric("pss_kib", "relay PSS/sess", "KiB", "{:.2f}"),
    Metric("rss_kib", "relay RSS/sess", "KiB", "{:.2f}"),
    Metric("node_pss_kib", "node PSS/sess", "KiB", "{:.2f}"),
    Metric("slab_obj_kib", "slab objs/sess", "KiB", "{:.2f}"),
    Metric("slab_kib", "Slab pages/sess", "KiB", "{:.2f}", table=False),
    Metric("sunreclaim_kib", "SUnreclaim/sess", "KiB", "{:.2f}", table=False),
    Metric("other_kib", "other kernel/sess", "KiB", "{:.2f}", table=False),
    Metric("kernel_relay_kib", "relay slab/sess", "KiB", "{:.2f}"),
    Metric("kernel_relay_all_kib", "relay slab+other/sess", "KiB", "{:.2f}", table=False),
    Metric("fds", "relay fds/sess", "", "{:.2f}"),
    Metric("pipes", "relay pipes/sess", "", "{:.2f}"),
    Metric("tcp_mem_kib", "TCP buf/sess", "KiB", "{:.2f}", table=False),
    Metric("open_s", "open all", "s", "{:.2f}"),
]

SETUP_METRICS = [
    Metric("banner_p50", "connect->banner p50", "µs", "{:.0f}"),
    Metric("banner_p99", "connect->banner p99", "µs", "{:.0f}"),
]

FD_HEADROOM = 300


def _fds_by_pid(pid: int) -> dict[int, int]:
    """Descriptors of each process in the tree: the fd limit applies to each one alone."""
    out = {}
    for p in process_tree(pid):
        try:
            out[p] = len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return out


def _fd_count(pid: int) -> int:
    return sum(_fds_by_pid(pid).values())


class Holder:
    """Opens and holds idle connections; each is proved end to end by a 1-byte echo."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.failed = 0

    def open(self, n: int, window: int = 128, timeout: float = 20.0,
             deadline_s: float = 300.0) -> None:
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, float] = {}
        todo = n
        hard_deadline = time.monotonic() + deadline_s
        while (todo or pending) and time.monotonic() < hard_deadline:
            while todo and len(pending) < window:
                s = socket.socket()
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", self.port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    self.failed += 1
                    todo -= 1
                    continue
                sel.register(s, selectors.EVENT_WRITE, "connect")
                pending[s] = time.monotonic()
                todo -= 1
            for key, _ in sel.select(0.2):
                s = key.fileobj
                if key.data == "connect":
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._drop(sel, pending, s)
                        continue
                    try:
                        s.send(b"x")
                    except OSError:
                        self._drop(sel, pending, s)
                        continue
                    sel.modify(s, selectors.EVENT_READ, "echo")
                else:
                    try:
                        got = s.recv(1)
                    except BlockingIOError:
                        continue
                    except OSError:
                        got = b""
                    if got != b"x":
                        self._drop(sel, pending, s)
                        continue
                    sel.unregister(s)
                    del pending[s]
                    self.socks.append(s)
            now = time.monotonic()
            for s, t0 in list(pending.items()):
                if now - t0 > timeout:
                    self._drop(sel, pending, s)
        for s in list(pending):
            self._drop(sel, pending, s)
        sel.close()

    def _drop(self, sel, pending, s) -> None:
        sel.unregister(s)
        pending.pop(s, None)
        s.close()
        self.failed += 1

    def close(self) -> None:
        """Reset every connection (SO_LINGER 0) so no TIME_WAIT lingers into the next path."""
        linger = struct.pack("ii", 1, 0)
        for s in self.socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            except OSError:
                pass
            s.close()
        self.socks.clear()


def _snapshot(path: RelayPath) -> dict:
    mi = meminfo_kib()
    snap = {"slab": mi["Slab"], "slab_obj": slab_object_kib(), "sunreclaim": mi["SUnreclaim"], "other": kernel_other_kib(mi),
            "tcp_pages": tcp_mem_pages(), "roles": {}}
    for role, pid in path.pids().items():
        mem = memory_kib(pid)
        snap["roles"][role] = {**mem, "fds": _fd_count(pid), "pipes": pipe_fds(pid) / 2,
                               "fds_by_pid": _fds_by_pid(pid)}
    return snap


def _relay_role(path: RelayPath) -> str | None:
    pids = path.pids()
    return "gateway" if "gateway" in pids else ("relay" if "relay" in pids else None)


def _cap_for(path: RelayPath, probe: Holder, base: dict, want: int) -> tuple[int, str]:
    """How many sessions this path can hold under the per-process fd limit, from the fds
    each process gained per probe session."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap, why = want, ""
    max_sessions = getattr(path, "max_sessions", None)
    if max_sessions is None and isinstance(path, HAProxy):   # same arithmetic as its config
        max_sessions = (limit - 200 - (2000 if path.splice else 0)) // 2 - 20
    if max_sessions is not None and max_sessions < cap:
        cap, why = max_sessions, (f"maxconn {max_sessions + 20} (derived from the fd limit "
                                  f"{limit}, which cannot be raised here)")
    held = max(1, len(probe.socks))
    for role, pid in path.pids().items():
        was = base["roles"][role]["fds_by_pid"]
        # per: what each process gained per session of the whole path (a process holding
        # half of them shows half its per-session cost), so its limit caps the path at:
        for p, n in _fds_by_pid(pid).items():
            per = (n - was.get(p, 0)) / held
            if per <= 0.5 / held:
                continue
            room = int((limit - FD_HEADROOM - was.get(p, 0)) / per)
            if room < cap:
                cap, why = room, (f"a {role} process gains {per:.2f} fds per session; "
                                  f"its fd limit {limit} (hard, cannot be raised here) "
                                  f"fits {room}")
    return max(held, cap), why


def measure_memory(part: PartResult, path: RelayPath, rep: int, n: int,
                   direct_kernel: dict[int, float], settle: float = 1.0) -> None:
    time.sleep(settle / 2)
    base = _snapshot(path)
    t0 = time.monotonic()
    probe = Holder(path.port)
    probe.open(min(200, n), timeout=10.0)
    if len(probe.socks) < probe.failed:
        probe.close()
        path.mark_broken(f"only {len(probe.socks)} of {min(200, n)} probe sessions were "
                         f"established end to end")
        raise Skip(path.broken)
    want, why = _cap_for(path, probe, base, n)
    if why:
        part.path(path.name).info["capped"] = why
    rest = Holder(path.port)
    rest.open(want - len(probe.socks))
    held = len(probe.socks) + len(rest.socks)
    failed = probe.failed + rest.failed
    open_s = time.monotonic() - t0
    time.sleep(settle)
    after = _snapshot(path)
    try:
        if held == 0:
            part.fail(path.name, "no session could be established")
            return
        if failed:
            part.path(path.name).info[f"failed_rep{rep}"] = failed
        part.add(path.name, "held", rep, held)
        part.add(path.name, "open_s", rep, open_s)
        part.add(path.name, "slab_kib", rep, (after["slab"] - base["slab"]) / held)
        part.add(path.name, "sunreclaim_kib", rep,
                 (after["sunreclaim"] - base["sunreclaim"]) / held)
        part.add(path.name, "other_kib", rep, (after["other"] - base["other"]) / held)
        part.add(path.name, "tcp_mem_kib", rep,
                 (after["tcp_pages"] - base["tcp_pages"]) * 4 / held)
        if base["slab_obj"] is not None:
            slab = (after["slab_obj"] - base["slab_obj"]) / held
            part.add(path.name, "slab_obj_kib", rep, slab)
        else:
            slab = (after["slab"] - base["slab"]) / held
        kernel = slab + (after["other"] - base["other"]) / held
        if path.name == "direct":
            direct_kernel[rep] = slab
            direct_kernel[-1 - rep] = kernel
        elif rep in direct_kernel:
            part.add(path.name, "kernel_relay_kib", rep, slab - direct_kernel[rep])
            part.add(path.name, "kernel_relay_all_kib", rep, kernel - direct_kernel[-1 - rep])
        role = _relay_role(path)
        if role:
            b, a = base["roles"][role], after["roles"][role]
            part.add(path.name, "pss_kib", rep, (a["pss"] - b["pss"]) / held)
            part.add(path.name, "rss_kib", rep, (a["rss"] - b["rss"]) / held)
            part.add(path.name, "fds", rep, (a["fds"] - b["fds"]) / held)
            part.add(path.name, "pipes", rep, (a["pipes"] - b["pipes"]) / held)
        if "node" in base["roles"]:
            b, a = base["roles"]["node"], after["roles"]["node"]
            part.add(path.name, "node_pss_kib", rep, (a["pss"] - b["pss"]) / held)
    finally:
        probe.close()
        rest.close()
        # let the relay notice the resets and free what it held before the next baseline
        deadline = time.monotonic() + 15
        role = _relay_role(path)
        while role and time.monotonic() < deadline:
            pid = path.pids()[role]
            if _fd_count(pid) <= base["roles"][role]["fds"] + 8:
                break
            time.sleep(0.2)


def run(ctx: Ctx, results: Results, *, quick: bool, repeat: int, count: int | None = None,
        only: set[str] | None = None) -> PartResult:
    n = count or (1000 if quick else 10000)
    part = results.part(PartResult(
        "sessions", f"sessions: memory per idle relayed session (N={n})", METRICS,
        baselines=[], ratio_metrics=[]))
    part.notes["method"] = ("fresh relay processes every round; PSS/RSS = relay process tree delta / N; slab objs = system-wide /proc/slabinfo active_objs x objsize delta / N; Slab = system-wide "
                            "/proc/meminfo delta / N (includes client and echo-server sockets);"
                            " 'relay slab' = that minus the direct path's, same repetition; "
                            "JSON also has SUnreclaim, 'other kernel' (pipe buffers, skbs: "
                            "MemTotal-MemFree minus every user/cache/slab/stack/page-table "
                            "line, noisy) and TCP buffer pages")
    part.notes["socat"] = "forks a process per connection: held at most 1000 sessions"
    # one gateway may relay in several processes (--relay-procs): 10,000 sessions need more
    # descriptors than one process may hold here
    paths = choose(relay_paths(include_engine=True) + [EdgegwGateway("splice", procs=2)],
                   only, quick)
    started = netload.start_echo_or_skip(ctx, part, paths)
    if started is None:
        return part
    echo, port = started
    running: list[RelayPath] = []
    try:
        direct_kernel: dict[int, float] = {}
        total, step = repeat * len(paths), 0
        for rep in range(repeat):
            # Fresh processes every round: a warm relay reuses the memory an earlier round
            # freed, and would show ~0 per session from the second round on.
            stop_all(running)
            running = start_all([p for p in paths if not p.broken], ctx, port,
                                part.skip if rep == 0 else part.fail)
            for path in running:
                step += 1
                want = min(n, 1000) if path.name == "socat" else n
                log(f"sessions [{step}/{total}] rep {rep + 1} {path.name}: holding {want}")
                try:
                    path.check_alive()
                    measure_memory(part, path, rep, want, direct_kernel,
                                   settle=0.5 if quick else 1.0)
                except Skip as exc:
                    part.fail(path.name, str(exc))
    finally:
        stop_all(running)
        echo.stop()
    setup_time(ctx, results, quick=quick, repeat=repeat, only=only)
    return part


# --------------------------------------------------------------------------- setup time

def setup_time(ctx: Ctx, results: Results, *, quick: bool, repeat: int,
               only: set[str] | None = None) -> PartResult:
    """Client connect -> SSH server banner, p50/p99, over sequential connections."""
    part = results.part(PartResult(
        "session_setup", "session setup: TCP connect -> SSH banner received (sequential)",
        SETUP_METRICS, baselines=["edgegw-node", "openssh"], ratio_metrics=["banner_p50"]))
    count = 50 if quick else 500
    part.notes["samples"] = f"{count} connections per path per repetition"
    keys = ssh_keys(ctx)
    paths: list[RelayPath] = []
    sshd = Sshd(keys[1])
    edge = EdgegwSsh("bench", keys[1])
    running: list[RelayPath] = []
    try:
        for p in (sshd, edge):
            running += start_all([p], ctx, 0, part.skip)
        if edge in running:
            paths += [edge.direct, edge]
        if sshd in running:
            paths.append(sshd)
            hp = HAProxy(splice=True)
            hp.name = "openssh-via-haproxy-splice"
            running += start_all([hp], ctx, sshd.port, part.skip)
            if hp in running:
                paths.append(hp)
        if only is not None and "all" not in only:
            paths = [p for p in paths if p.name in only]
        for rep in range(repeat):
            for path in paths:
                log(f"session setup rep {rep + 1} {path.name}: {count} banners")
                if not alive(part, path):
                    continue
                r = netload.client(ctx.workdir, "banner", path.port, count,
                                   timeout=60 if quick else 300)
                if r.get("n"):
                    part.add(path.name, "banner_p50", rep, r["p50"])
                    part.add(path.name, "banner_p99", rep, r["p99"])
                if r.get("failed"):
                    part.fail(path.name, f"{r['failed']} of {count} connections got no banner")
    finally:
        stop_all(running)
    return part


def ssh_keys(ctx: Ctx):
    """An ed25519 client key pair for every SSH path of the run: (private, public)."""
    import subprocess
    key = ctx.workdir / "client_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, capture_output=True)
    return key, key.with_suffix(".pub")
