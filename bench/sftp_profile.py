"""Node SFTP throughput against OpenSSH's sshd + internal-sftp, interleaved, with optional
py-spy profile of the node. Standalone: needs /usr/sbin/sshd, OpenSSH's sftp client, and
(for --profile) py-spy.

    python bench/sftp_profile.py                       # 1 GiB, 3 reps, aes + chacha, up + down
    python bench/sftp_profile.py --reps 5 --ciphers aes
    python bench/sftp_profile.py --servers node --reps 1 --profile /tmp/node   # flame graphs

Everything lives under a fresh directory in /dev/shm (tmpfs -> tmpfs). Order per repetition:
for each cipher, for each server (sshd, node): upload, then download -- so the two servers
alternate under the same machine conditions. MB/s = file bytes / 1e6 / (wall time of
`sftp -b` doing the transfer - median wall time of `sftp -b` doing only `pwd` against the same
server and cipher), so connection setup is not charged to the transfer. Server CPU = utime +
stime (+ reaped children: sshd forks per session) of the server process per GiB moved.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgegw.sockio import free_port

CIPHERS = {"aes": "aes128-gcm@openssh.com", "chacha": "chacha20-poly1305@openssh.com"}
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]
TICK = os.sysconf("SC_CLK_TCK")


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer on port {port}")


def children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_tree(pid: int) -> float:
    """utime+stime of pid, its reaped children and its live descendants, in seconds."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo += children(p)
    return total / TICK


def settle(pid: int) -> None:
    """Wait until the server has reaped the finished session's processes."""
    deadline = time.monotonic() + 3
    while children(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


class Server:
    def __init__(self, name: str, port: int, user: str, remote_dir: str,
                 proc: subprocess.Popen) -> None:
        self.name, self.port, self.user, self.remote_dir, self.proc = \
            name, port, user, remote_dir, proc


def start_sshd(work: Path, pubkey: Path) -> Server:
    d = work / "sshd"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")],
                   check=True)
    shutil.copy(pubkey, d / "authorized_keys")
    (d / "files").mkdir()
    port = free_port()
    (d / "sshd_config").write_text(
        f"HostKey {d / 'hostkey'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "Subsystem sftp internal-sftp\nPidFile none\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nListenAddress 127.0.0.1\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config"),
                             "-p", str(port)], stderr=subprocess.DEVNULL)
    wait_port(port, proc, "sshd")
    import pwd
    return Server("sshd", port, pwd.getpwuid(os.getuid()).pw_name, str(d / "files"), proc)


def start_node(work: Path, pubkey: Path, name: str = "node", src: str = "") -> Server:
    """`src`: run the node from another source tree (e.g. an unmodified export, for a
    before/after comparison in the same run)."""
    home = work / name
    env = dict(os.environ, PYTHONPATH=src) if src else None   # run from `work`: with -m,
    # the current directory would come before PYTHONPATH on sys.path
    edgegw = [sys.executable, "-m", "edgegw", "internal"]
    subprocess.run([*edgegw, "init", "--home", str(home)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*edgegw, "user", "add", "bench", "--home", str(home), "--key", str(pubkey)],
                   check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    proc = subprocess.Popen([*edgegw, "serve", "--home", str(home), "--workers", "1",
                             "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                            stderr=subprocess.DEVNULL, env=env, cwd=work)
    wait_port(port, proc, "edgegw internal serve")
    return Server(name, port, "bench", "/", proc)


def sftp(srv: Server, key: Path, cipher: str, commands: str) -> float:
    args = ["sftp", "-b", "-", "-P", str(srv.port), "-i", str(key), *SSH_OPTS,
            "-o", f"Ciphers={cipher}", f"{srv.user}@127.0.0.1"]
    t0 = time.perf_counter()
    cp = subprocess.run(args, input=commands.encode(), capture_output=True, timeout=600)
    el = time.perf_counter() - t0
    if cp.returncode:
        raise SystemExit(f"sftp against {srv.name} failed: {cp.stderr.decode()[-500:]}")
    return el


def summarize(path: Path, top: int = 25) -> None:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" for f in stack.split(";")[1:]]      # drop the thread/process frame
        if not frames:
            continue
        count = int(n)
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    print(f"--- {path.name}: {total} samples; self %  |  inclusive %")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ciphers", default="aes,chacha")
    ap.add_argument("--servers", default="sshd,node",
                    help="comma-separated: sshd, node, or LABEL=SRCDIR for a node run from "
                         "another source tree (PYTHONPATH=SRCDIR), e.g. base=/tmp/edgegw-base")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="py-spy record the node (first rep) to PREFIX-{up,down}-CIPHER.txt, "
                         "collapsed stacks (flamegraph.pl / speedscope read them), and print "
                         "the top functions")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sftp-profile-", dir="/dev/shm"))
    servers: list[Server] = []
    try:
        key = work / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        src = work / "src.bin"
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(a.size_mib):
                f.write(block)
        size = src.stat().st_size
        dl = work / "dl.bin"
        names = a.servers.split(",")
        for n in names:
            if n == "sshd":
                servers.append(start_sshd(work, Path(f"{key}.pub")))
            else:
                label, _, srcdir = n.partition("=")
                servers.append(start_node(work, Path(f"{key}.pub"), label, srcdir))
        res: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for rep in range(a.reps):
            for c in a.ciphers.split(","):
                for srv in servers:
                    base = statistics.median(sftp(srv, key, CIPHERS[c], "pwd\n")
                                             for _ in range(3))
                    remote = f"{srv.remote_dir.rstrip('/')}/x.bin"
                    for d, cmd in (("up", f"put {src} {remote}\n"),
                                   ("down", f"get {remote} {dl}\n")):
                        spy = None
                        if a.profile and rep == 0 and srv.name != "sshd":
                            spy = subprocess.Popen(
                                ["py-spy", "record", "-r", "250", "-f", "raw", "-o",
                                 f"{a.profile}-{d}-{c}.txt", "--pid", str(srv.proc.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            time.sleep(1.0)
                        settle(srv.proc.pid)
                        c0 = cpu_tree(srv.proc.pid)
                        el = sftp(srv, key, CIPHERS[c], cmd)
                        settle(srv.proc.pid)
                        cpu = cpu_tree(srv.proc.pid) - c0
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)
                            spy.wait()
                            summarize(Path(f"{a.profile}-{d}-{c}.txt"))
                        if d == "down":
                            assert dl.stat().st_size == size, "short download"
                            dl.unlink()
                        mbs = size / 1e6 / max(el - base, 1e-6)
                        cpu_gib = cpu / (size / 2**30)
                        res.setdefault((c, srv.name, d), []).append((mbs, cpu_gib))
                        print(f"rep {rep} {c:6} {srv.name:5} {d:4} {mbs:7.0f} MB/s "
                              f"{cpu_gib:5.2f} CPU-s/GiB", flush=True)
        print("\nmedians (MB/s up/down, server CPU-s/GiB up/down, ratio node/sshd)")
        for c in a.ciphers.split(","):
            for srv in servers:
                row = [statistics.median(x[i] for x in res[(c, srv.name, d)])
                       for i in (0, 1) for d in ("up", "down")]
                print(f"{c:6} {srv.name:5} {row[0]:5.0f} / {row[1]:5.0f} MB/s   "
                      f"{row[2]:5.2f} / {row[3]:5.2f} CPU-s/GiB")
            for srv in servers:
                if srv.name == "sshd" or "sshd" not in [s.name for s in servers]:
                    continue
                r = [statistics.median(x[i] for x in res[(c, srv.name, d)]) /
                     statistics.median(x[i] for x in res[(c, "sshd", d)])
                     for i in (0, 1) for d in ("up", "down")]
                print(f"{c:6} {srv.name}/sshd  {r[0]:5.2f} / {r[1]:5.2f} throughput  "
                      f"{r[2]:5.2f} / {r[3]:5.2f} CPU")
    finally:
        for srv in servers:
            srv.proc.terminate()
            try:
                srv.proc.wait(10)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
