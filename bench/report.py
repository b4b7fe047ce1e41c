"""Results: collected per repetition, summarised (min/median/max), printed as a table,
written as JSON and drawn as a dependency-free SVG chart."""
from __future__ import annotations

import datetime as _dt
import html
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "edgegw-bench/1"


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    fmt: str = "{:.1f}"
    table: bool = True       # False: JSON only (noisy or secondary figures)


@dataclass
class PathResult:
    status: str = "ok"            # ok | skipped | failed
    reason: str = ""
    values: dict[str, dict[int, float]] = field(default_factory=dict)   # metric -> rep -> value
    info: dict[str, object] = field(default_factory=dict)


@dataclass
class PartResult:
    name: str
    title: str
    metrics: list[Metric]
    baselines: list[str] = field(default_factory=list)   # paths ratios are taken against
    ratio_metrics: list[str] = field(default_factory=list)
    paths: dict[str, PathResult] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def path(self, name: str) -> PathResult:
        return self.paths.setdefault(name, PathResult())

    def add(self, path: str, key: str, rep: int, value: float | None) -> None:
        if value is None:
            return
        self.path(path).values.setdefault(key, {})[rep] = float(value)

    def skip(self, path: str, reason: str) -> None:
        pr = self.path(path)
        pr.status = "skipped"
        pr.reason = reason

    def fail(self, path: str, reason: str) -> None:
        pr = self.path(path)
        if pr.status == "ok":
            pr.status = "failed"
        pr.reason = (pr.reason + "; " if pr.reason else "") + reason

    def median(self, path: str, key: str) -> float | None:
        vals = self.paths.get(path, PathResult()).values.get(key)
        return statistics.median(vals.values()) if vals else None

    def ratio(self, path: str, base: str, key: str) -> float | None:
        """Median of per-repetition ratios (paired: same repetition, adjacent in time),
        falling back to the ratio of medians when repetitions do not line up."""
        a = self.paths.get(path, PathResult()).values.get(key, {})
        b = self.paths.get(base, PathResult()).values.get(key, {})
        paired = [a[r] / b[r] for r in a if r in b and b[r]]
        if paired:
            return statistics.median(paired)
        ma, mb = self.median(path, key), self.median(base, key)
        return ma / mb if ma is not None and mb else None

    def to_json(self) -> dict:
        paths = {}
        for name, pr in self.paths.items():
            metrics = {}
            for m in self.metrics:
                vals = pr.values.get(m.key)
                if not vals:
                    continue
                ordered = [vals[r] for r in sorted(vals)]
                metrics[m.key] = {"unit": m.unit, "label": m.label, "n": len(ordered),
                                  "min": min(ordered), "median": statistics.median(ordered),
                                  "max": max(ordered), "values": ordered}
            paths[name] = {"status": pr.status, "reason": pr.reason, "metrics": metrics,
                           "info": pr.info}
        ratios: dict[str, dict[str, dict[str, float]]] = {}
        for key in self.ratio_metrics:
            for base in self.baselines:
                if base not in self.paths:
                    continue
                for name in self.paths:
                    r = self.ratio(name, base, key)
                    if r is not None and name != base:
                        ratios.setdefault(key, {}).setdefault(name, {})[f"vs_{base}"] = r
        return {"title": self.title, "paths": paths, "ratios": ratios, "notes": self.notes}


class Results:
    def __init__(self, argv: list[str], options: dict, machine: dict) -> None:
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.argv = argv
        self.options = options
        self.machine = machine
        self.parts: dict[str, PartResult] = {}

    def part(self, pr: PartResult) -> PartResult:
        self.parts[pr.name] = pr
        return pr

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": self.argv,
            "options": self.options,
            "machine": self.machine,
            "parts": {name: p.to_json() for name, p in self.parts.items()},
        }

    def write(self, out: Path) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        data = self.to_json()
        js = out / f"bench-{stamp}.json"
        js.write_text(json.dumps(data, indent=2) + "\n")
        (out / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
        svg = out / f"bench-{stamp}.svg"
        svg.write_text(render_svg(data))
        (out / "latest.svg").write_text(svg.read_text())
        return js, svg


# --------------------------------------------------------------------------- table

def _cell(m: Metric, vals: dict[int, float] | None, spread: bool) -> str:
    if not vals:
        return "-"
    v = list(vals.values())
    med = m.fmt.format(statistics.median(v))
    if spread and len(v) > 1:
        return f"{med} ({m.fmt.format(min(v))}-{m.fmt.format(max(v))})"
    return med


def format_table(part: PartResult, spread: bool = False) -> str:
    cols = [m for m in part.metrics
            if m.table and any(m.key in pr.values for pr in part.paths.values())]
    header = ["path"] + [f"{m.label} [{m.unit}]" if m.unit else m.label for m in cols]
    ratio_cols: list[tuple[str, str]] = []
    for key in part.ratio_metrics:
        for base in part.baselines:
            if base in part.paths and any(key in pr.values for pr in part.paths.values()):
                ratio_cols.append((key, base))
    label_of = {m.key: m.label for m in part.metrics}
    header += [f"{label_of.get(k, k)} /{b}" for k, b in ratio_cols]
    rows = []
    skipped = []
    for name, pr in part.paths.items():
        if pr.status == "skipped" and not pr.values:
            skipped.append(f"  {name}: skipped - {pr.reason}")
            continue
        row = [name] + [_cell(m, pr.values.get(m.key), spread) for m in cols]
        for key, base in ratio_cols:
            r = part.ratio(name, base, key) if name != base else None
            row.append(f"{r:.2f}" if r is not None else "-")
        rows.append(row)
        if pr.status == "failed" or (pr.status == "skipped" and pr.values):
            skipped.append(f"  {name}: {pr.status} - {pr.reason}")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"== {part.title} =="]
    fmt_row = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt_row(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt_row(r) for r in rows]
    lines += skipped
    for k, v in part.notes.items():
        lines.append(f"  note {k}: {v}")
    return "\n".join(lines)


def print_tables(results: Results, spread: bool = False, file=sys.stdout) -> None:
    m = results.machine
    print(f"edgegw bench - {m.get('cpu_model')} x{m.get('cores')}, kernel {m.get('kernel')}, "
          f"tcp {m.get('tcp_congestion_control')}/{m.get('default_qdisc')}, "
          f"python {m.get('python')}; {results.options}", file=file)
    for part in results.parts.values():
        print(file=file)
        print(format_table(part, spread), file=file)


# --------------------------------------------------------------------------- SVG

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def _panel(title: str, unit: str, rows: list[tuple[str, list[tuple[str, float, float, float]]]],
           series: list[str], y0: int, width: int = 900) -> tuple[str, int]:
    """Horizontal grouped bars: rows of (path, [(series, median, min, max)])."""
    label_w, right = 190, 70
    bar_h, gap = 13, 9
    plot_w = width - label_w - right
    vmax = max([mx for _, bars in rows for _, _, _, mx in bars] + [1e-9])
    parts = [f'<text x="10" y="{y0 + 16}" font-size="15" font-weight="bold">'
             f'{html.escape(title)} ({html.escape(unit)})</text>']
    # legend
    lx = label_w
    for i, s in enumerate(series):
        parts.append(f'<rect x="{lx}" y="{y0 + 24}" width="12" height="12" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{lx + 16}" y="{y0 + 34}" font-size="12">{html.escape(s)}</text>')
        lx += 26 + 7 * len(s)
    y = y0 + 46
    for path, bars in rows:
        group_h = max(1, len(series)) * bar_h
        parts.append(f'<text x="{label_w - 8}" y="{y + group_h / 2 + 4}" font-size="12" '
                     f'text-anchor="end">{html.escape(path)}</text>')
        for s_name, med, lo, hi in bars:
            i = series.index(s_name)
            by = y + i * bar_h
            w = plot_w * med / vmax
            color = PALETTE[i % len(PALETTE)]
            parts.append(f'<rect x="{label_w}" y="{by}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{color}"><title>{html.escape(path)} {html.escape(s_name)}: '
                         f'{med:.3g} {html.escape(unit)} (min {lo:.3g}, max {hi:.3g})</title></rect>')
            if hi > lo:
                x1, x2 = label_w + plot_w * lo / vmax, label_w + plot_w * hi / vmax
                cy = by + (bar_h - 2) / 2
                parts.append(f'<line x1="{x1:.1f}" y1="{cy}" x2="{x2:.1f}" y2="{cy}" '
                             f'stroke="#333" stroke-width="1"/>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{by + bar_h - 3}" '
                         f'font-size="10">{med:.3g}</text>')
        y += group_h + gap
    return "\n".join(parts), y + 10


def _bars(part: dict, metric_series: list[tuple[str, str]]) -> tuple[list, list[str]]:
    rows, used = [], []
    for path, pr in part["paths"].items():
        bars = []
        for key, s_name in metric_series:
            m = pr["metrics"].get(key)
            if m:
                bars.append((s_name, m["median"], m["min"], m["max"]))
                if s_name not in used:
                    used.append(s_name)
        if bars:
            rows.append((path, bars))
    return rows, [s for _, s in metric_series if s in used]


def render_svg(data: dict) -> str:
    width = 900
    body, y = [], 10
    m = data["machine"]
    body.append(f'<text x="10" y="{y + 14}" font-size="13">edgegw bench {data["started"]} - '
                f'{html.escape(str(m.get("cpu_model")))} x{m.get("cores")}, '
                f'kernel {html.escape(str(m.get("kernel")))}; medians, whiskers min-max</text>')
    y += 30
    panels = []
    relay = data["parts"].get("relay")
    if relay:
        panels.append(("Relay throughput, iperf3", "Gbit/s", relay,
                       [("gbps_1", "1 stream"), ("gbps_4", "4 streams")]))
        panels.append(("Relay CPU per GB moved", "CPU-s/GB", relay,
                       [("cpu_gb_1", "relay, 1 stream"), ("cpu_gb_4", "relay, 4 streams"),
                        ("node_cpu_gb_1", "edgegw node, 1 stream"),
                        ("node_cpu_gb_4", "edgegw node, 4 streams")]))
    lat = data["parts"].get("latency")
    if lat:
        panels.append(("64-byte round trip", "µs", lat,
                       [("rtt_p50", "p50"), ("rtt_p99", "p99"), ("cycle_p50", "connect+echo+close p50")]))
    sftp = data["parts"].get("sftp")
    if sftp:
        panels.append(("SFTP 1 file tmpfs to tmpfs", "MB/s", sftp,
                       [("up_aes", "upload aes128-gcm"), ("down_aes", "download aes128-gcm"),
                        ("up_chacha", "upload chacha20"), ("down_chacha", "download chacha20")]))
    for title, unit, part, ms in panels:
        rows, series = _bars(part, ms)
        if not rows:
            continue
        svg, y = _panel(title, unit, rows, series, y, width)
        body.append(svg)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 10}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
