"""`python -m bench [PART ...] [--quick] [--repeat N] [--out DIR]`."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.peers import Ctx
from bench.report import Results, print_tables

PARTS = ("relay", "onehop", "latency", "sessions", "sftp")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("parts", nargs="*", choices=[*PARTS, []], metavar="PART",
                    help=f"which parts to run ({', '.join(PARTS)}; default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="short runs for smoke checks (under a minute, 1 repetition)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved repetitions per path (default 3, --quick 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                    help="where JSON and SVG go (default bench/results/)")
    ap.add_argument("--paths", default=None,
                    help="comma-separated path names to run (default: all), e.g. "
                         "direct,haproxy-splice,edgegw-splice")
    ap.add_argument("--sessions", type=int, default=None,
                    help="idle sessions to hold (default 10000, --quick 1000)")
    ap.add_argument("--sftp-mib", type=int, default=None,
                    help="SFTP file size in MiB (default 1024, --quick 64)")
    ap.add_argument("--sftp-own-cpu", action="store_true",
                    help="sftp: run the SSH server alone on the last CPU and the client and "
                         "relays on the others, as if each had its own host")
    ap.add_argument("--gateway-args", default="", metavar="ARGS",
                    help="extra options for every `edgegw serve` the run starts, e.g. "
                         "\"--sndbuf-client 131072 --sndbuf-node 131072\"")
    ap.add_argument("--node-args", default="", metavar="ARGS",
                    help="extra options for every `edgegw internal serve` that dials a gateway, "
                         "e.g. \"--congestion-gateway cubic\"")
    ap.add_argument("--spread", action="store_true", help="show (min-max) in the table")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = ap.parse_args(argv)
    parts = args.parts or list(PARTS)
    repeat = args.repeat or (1 if args.quick else 3)
    only = set(args.paths.split(",")) if args.paths else None

    procs.install_signal_handlers()
    nofile = procs.raise_nofile()
    options = {"parts": parts, "quick": args.quick, "repeat": repeat,
               "paths": sorted(only) if only else "all", "nofile": nofile,
               "sftp_own_cpu": args.sftp_own_cpu, "gateway_args": args.gateway_args,
               "node_args": args.node_args}
    results = Results(["python", "-m", "bench", *argv], options, procs.machine_facts())
    workdir = Path(tempfile.mkdtemp(prefix="edgegw-bench-"))
    ctx = Ctx(workdir, gateway_args=shlex.split(args.gateway_args),
              node_args=shlex.split(args.node_args))
    t0 = time.monotonic()
    procs.log(f"parts {', '.join(parts)}; repeat {repeat}; quick={args.quick}; logs in {workdir}")
    interrupted = False
    try:
        for name in parts:
            procs.log(f"--- {name} ---")
            mod = __import__(f"bench.{name}", fromlist=["run"])
            kw = {}
            if name == "sessions":
                kw["count"] = args.sessions
            if name == "sftp":
                kw["mib"] = args.sftp_mib
                kw["own_cpu"] = args.sftp_own_cpu
            try:
                mod.run(ctx, results, quick=args.quick, repeat=repeat, only=only, **kw)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the other parts' figures
                import traceback
                traceback.print_exc()
                procs.log(f"part {name} failed: {type(exc).__name__}: {exc}")
                results.parts.get(name) and results.parts[name].notes.update(
                    {"error": f"{type(exc).__name__}: {exc}"})
    except KeyboardInterrupt:
        interrupted = True
        procs.log("interrupted: stopping what was started, writing what was measured")
    finally:
        procs.stop_all()
        # this run's tmpfs homes and files only (peers.py and sftp.py name them by our pid)
        for home_files in Path("/dev/shm").glob(f"edgegw-bench-{os.getpid()}-*"):
            shutil.rmtree(home_files, ignore_errors=True)
    results.options["elapsed_s"] = round(time.monotonic() - t0, 1)
    results.options["interrupted"] = interrupted
    print_tables(results, spread=args.spread)
    js, svg = results.write(args.out)
    print(f"\nJSON: {js}\nSVG:  {svg}")
    if args.keep or interrupted:
        print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
