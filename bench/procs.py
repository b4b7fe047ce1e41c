"""Processes, ports, CPU and memory accounting shared by every benchmark part.

Every process the suite starts is registered here and stopped by its PID (SIGTERM, then
SIGKILL) when its part ends, on Ctrl-C and on any exception, so a failed run leaves nothing
listening behind it.
"""
from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgegw.sockio import listening

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A path cannot run here; the message is the reason printed and stored in the JSON."""


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0,
              proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise Skip(f"{proc.name} exited ({proc.popen.returncode}) before listening on "
                       f"{port}: {proc.tail()}")
        if listening(port):
            return
        time.sleep(0.05)
    raise Skip(f"nothing listening on {host}:{port} after {timeout:.0f}s"
               + (f": {proc.tail()}" if proc else ""))


def raise_nofile(want: int = 200_000) -> int:
    """Holding 10,000 relayed sessions needs ~4 fds each across the processes we start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, want)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def which(prog: str) -> str | None:
    return shutil.which(prog) or next(
        (p for p in (f"/usr/sbin/{prog}", f"/sbin/{prog}") if os.access(p, os.X_OK)), None)


def need(prog: str) -> str:
    path = which(prog)
    if path is None:
        raise Skip(f"{prog} not installed (apt-get install "
                   f"{ {'sshd': 'openssh-server'}.get(prog, prog)})")
    return path


# --------------------------------------------------------------------------- processes

_RUNNING: list["Proc"] = []


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: str | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Proc":
        self._log = open(self.log_path, "ab")
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=self.cwd,
                                      start_new_session=True)
        _RUNNING.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 600) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def wait_log(self, needle: str, timeout: float = 30.0) -> str:
        """The first log line that holds `needle`, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.tail(1 << 20)
            if needle in text:
                return next(line for line in text.splitlines() if needle in line)
            if not self.alive():
                raise Skip(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            time.sleep(0.05)
        raise Skip(f"{self.name} did not log {needle!r} in {timeout:.0f}s: {self.tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop by PID; the process leads its own session, so its forked helpers
        (socat children, sshd session processes) are stopped through that group."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout if sig == signal.SIGTERM else 5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # leftover children of an exited leader (same group id = our PID)
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()
        if self in _RUNNING:
            _RUNNING.remove(self)


def stop_all() -> None:
    for p in reversed(list(_RUNNING)):
        try:
            p.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


atexit.register(stop_all)


def install_signal_handlers() -> None:
    def _term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)


def run(args: list[str], timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------- /proc accounting

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None:
            continue
        kids.setdefault(int(f[1]), []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """utime+stime of the process (all threads) plus, with tree=True, its live descendants
    and every reaped descendant (cutime/cstime). Each CPU-second is counted once: a child is
    either alive (own utime/stime) or reaped (in its reaper's cutime/cstime)."""
    total = 0
    for p in (process_tree(pid) if tree else [pid]):
        f = _stat_fields(p)
        if f is None:
            continue
        # fields after comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        total += int(f[11]) + int(f[12])
        if tree:
            total += int(f[13]) + int(f[14])
    return total / CLK_TCK


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Every thread of the process tree at `pid` onto `cpus`; threads and children it starts
    later inherit the setting from whoever starts them."""
    for p in process_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue   # exited meanwhile
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


def memory_kib(pid: int, tree: bool = True) -> dict[str, int]:
    """RSS and PSS (KiB) of the process (tree) from smaps_rollup."""
    rss = pss = 0
    for p in (process_tree(pid) if tree else [pid]):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss": rss, "pss": pss}


def meminfo_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])
    return out


def kernel_other_kib(mi: dict[str, int]) -> int:
    """Memory in use that no meminfo line attributes to user space, page cache, slab, stacks
    or page tables: mostly pages the kernel allocates directly (pipe buffers, socket buffers,
    vmalloc). Noisy system-wide; only the delta of a large N is meaningful."""
    used = mi["MemTotal"] - mi["MemFree"]
    known = (mi.get("Buffers", 0) + mi.get("Cached", 0) + mi.get("SwapCached", 0)
             + mi.get("AnonPages", 0) + mi.get("Slab", 0) + mi.get("KernelStack", 0)
             + mi.get("PageTables", 0) + mi.get("SecPageTables", 0))
    return used - known


def slab_object_kib() -> float | None:
    """Bytes held by allocated slab objects (sum of active_objs x objsize in /proc/slabinfo),
    in KiB. Unlike meminfo's Slab (whole pages), this does not depend on whether freed objects
    of an earlier path still sit in partially used slab pages."""
    try:
        lines = Path("/proc/slabinfo").read_text().splitlines()[2:]
    except OSError:
        return None
    total = 0
    for line in lines:
        cols = line.split()
        total += int(cols[1]) * int(cols[3])
    return total / 1024


def tcp_mem_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("mem") + 1])
    return 0


def pipe_fds(pid: int, tree: bool = True) -> int:
    n = 0
    for p in (process_tree(pid) if tree else [pid]):
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    if os.readlink(f"/proc/{p}/fd/{fd}").startswith("pipe:"):
                        n += 1
                except OSError:
                    pass
        except OSError:
            pass
    return n


def drop_caches_settle(seconds: float = 0.5) -> None:
    """Let deferred frees (RCU, TIME_WAIT) run before a memory baseline."""
    time.sleep(seconds)


# --------------------------------------------------------------------------- versions

def _first_line(args: list[str], containing: str = "") -> str:
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = [ln.strip() for ln in (cp.stdout + cp.stderr).strip().splitlines()]
    text = [ln for ln in text if containing in ln] or text
    return text[0] if text else "unknown"


VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_REPORTING = 5   # feature bit: the guest reports free pages to the host


PAGE_REPORTING_HOLD = Path("/sys/module/page_reporting/parameters/min_free_ms")


def page_reporting_hold_s(path: Path = PAGE_REPORTING_HOLD) -> float | None:
    """How long memory stays free before it is reported to the host, where the guest kernel
    has that setting (`page_reporting.min_free_ms`, not in every kernel), in seconds."""
    try:
        return int(path.read_text()) / 1000
    except (OSError, ValueError):
        return None


def free_page_reporting(root: Path = VIRTIO_DEVICES) -> str | None:
    """The virtio device through which this VM hands memory it frees back to its host, or None.

    With free page reporting on, the guest reports free memory to the host a couple of seconds
    after it is freed, and the host drops it; the next page the guest takes from it is faulted
    in again by the host. A 1 GiB file written to tmpfs then costs anything from 1x to 3.5x the
    CPU, depending on how many of its pages were reported since they were last used
    (bench/README.md, "Memory that the VM hands back")."""
    try:
        devices = sorted(root.iterdir())
    except OSError:
        return None
    for dev in devices:
        try:
            if int((dev / "device").read_text(), 16) != VIRTIO_ID_BALLOON:
                continue
            bound = (dev / "driver").exists()
            features = (dev / "features").read_text().strip()   # one digit per bit, bit 0 first
        except (OSError, ValueError):
            continue
        if bound and len(features) > VIRTIO_BALLOON_F_REPORTING \
                and features[VIRTIO_BALLOON_F_REPORTING] == "1":
            return dev.name
    return None


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "unknown"


def uptime_seconds() -> int | None:
    """Seconds since boot: a VM's first minutes may still fault in its memory from the host."""
    try:
        return int(float(Path("/proc/uptime").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def machine_facts() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import importlib.metadata as md
        edgegw_version = md.version("edgegw")
    except Exception:  # noqa: BLE001
        try:
            import edgegw
            edgegw_version = getattr(edgegw, "__version__", "source tree")
        except Exception as exc:  # noqa: BLE001
            edgegw_version = f"not importable: {exc}"
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    mem_gib = meminfo_kib()["MemTotal"] / 2**20
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": os.uname().release,
        "free_page_reporting": free_page_reporting() or "off",
        "page_reporting_hold_s": page_reporting_hold_s(),
        "tcp_congestion_control": _sysctl("net/ipv4/tcp_congestion_control"),
        "default_qdisc": _sysctl("net/core/default_qdisc"),
        "uptime_s": uptime_seconds(),
        "python": sys.version.split()[0],
        "haproxy": _first_line(["haproxy", "-v"]) if which("haproxy") else "missing",
        "iperf3": _first_line(["iperf3", "-v"]) if which("iperf3") else "missing",
        "openssh": _first_line(["ssh", "-V"]) if which("ssh") else "missing",
        "sshd": _first_line([which("sshd") or "sshd", "-V"], "OpenSSH") if which("sshd")
        else "missing",
        "socat": (_first_line(["socat", "-V"], "socat version") if which("socat") else "missing"),
        "gcc": _first_line(["gcc", "--version"]) if which("gcc") else "missing",
        "edgegw": edgegw_version,
        "git_rev": rev,
    }

