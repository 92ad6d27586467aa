"""The report of ``benchmarks/memory.py``: the CSV of measured points, the tables, checks and plots of
each workload, and ``memory.md`` from the template ``memory_report.md`` (the prose) and the
hand-written ``memory_notes.md`` (the findings).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from string import Template

from methods import LABELS, METHODS
from phase_trace import PHASES
from workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEMPLATE = HERE / "memory_report.md"

CSV_FIELDS = (
    "workload", "method", "batch", "status", "sub_batch", "peak_mb", "step_s", "loaded_mb", "loss",
    "steps", "threads", "device", "cpu_s", "load_avg", "run", "step_times_s", "wall_s", "predicted_mb",
    "phases",
)  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["batch"] = int(row["batch"])
        for key in ("peak_mb", "step_s", "loaded_mb", "cpu_s"):
            row[key] = float(row[key]) if row.get(key) else None
        row["sub_batch"] = int(row["sub_batch"]) if row.get("sub_batch") else None
        for key in ("load_avg", "phases", "step_times_s"):
            row[key] = json.loads(row[key]) if row.get(key) else None
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})


def _csv_value(value) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _point(rows: list[dict], workload: str, method: str, batch: int) -> dict | None:
    for row in rows:
        if row["workload"] == workload and row["method"] == method and row["batch"] == batch:
            return row if row["status"] == "ok" else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "not measured"
    return "**met**" if value <= target else "**missed**"


def _load(row: dict | None) -> str:
    loads = (row or {}).get("load_avg")
    return f"{loads[0]:.1f} → {max(loads[1:]):.1f}" if loads else "—"


class Checks:
    """The acceptance checks of one workload, as report lines (measured / target / met or missed)."""

    def __init__(self, rows: list[dict], workload: str) -> None:
        self.rows, self.workload = rows, workload
        self.lines = ["| check | measured | target | result |", "|---|---|---|---|"]

    def get(self, method: str, batch: int, key: str = "peak_mb"):
        return (_point(self.rows, self.workload, method, batch) or {}).get(key)

    def largest_batch(self, method: str, also: str | None = None) -> int | None:
        """The largest B at which ``method`` (and ``also``, if given) has a measured point."""
        batches = [
            r["batch"]
            for r in self.rows
            if r["workload"] == self.workload and r["method"] == method and r["status"] == "ok"
        ]
        batches = [b for b in batches if also is None or self.get(also, b) is not None]
        return max(batches, default=None)

    def slope(self, method: str, small: int, big: int) -> float | None:
        a, b = self.get(method, small), self.get(method, big)
        return None if a is None or b is None else (b - a) / (big - small)

    def add(
        self, what: str, measured: str, value: float | None, target: float | None, target_text: str = ""
    ) -> None:
        if target is None:  # shown for comparison, no target
            self.info(what, measured)
            return
        self.lines.append(
            f"| {what} | {measured} | {target_text or f'≤ {target:g}'} | {_verdict(value, target)} |"
        )

    def info(self, what: str, measured: str) -> None:
        self.lines.append(f"| {what} | {measured} | — | — |")

    def slope_check(self, method: str, small: int, big: int, target: float) -> float | None:
        a, b, s = self.get(method, small), self.get(method, big), self.slope(method, small, big)
        self.add(
            f"{LABELS[method]}: memory slope B={small}→{big}",
            f"({_fmt(b, '.0f')} − {_fmt(a, '.0f')} MB) / {big - small} = {_fmt(s, '.3f')} MB/query",
            s,
            target,
            f"≤ {target:g} MB/query",
        )
        return s

    def slope_info(self, method: str, small: int, big: int) -> None:
        self.info(
            f"{LABELS[method]}: memory slope B={small}→{big}",
            f"{_fmt(self.slope(method, small, big), '.1f')} MB/query",
        )

    def slope_ratio(self, a: str, b: str, small: int, big: int, target: float | None) -> None:
        sa, sb = self.slope(a, small, big), self.slope(b, small, big)
        self.add(
            f"memory slope B={small}→{big}, {LABELS[a]} / {LABELS[b]}",
            f"{_fmt(sa, '.3f')} / {_fmt(sb, '.2f')} MB/query = {_fmt(_ratio(sa, sb), '.3f')}×",
            _ratio(sa, sb),
            target,
            None if target is None else f"≤ {target:g}×",
        )

    def peak_ratio(
        self, a: str, b: str, batch: int, target: float | None, batch_b: int | None = None
    ) -> None:
        batch_b = batch_b or batch
        ma, mb = self.get(a, batch), self.get(b, batch_b)
        what = (
            f"peak, {LABELS[a]}, B={batch} / B={batch_b}"
            if a == b
            else f"peak, {LABELS[a]} / {LABELS[b]}, B={batch}"
        )
        self.add(
            what,
            f"{_fmt(ma, '.0f')} / {_fmt(mb, '.0f')} MB = {_fmt(_ratio(ma, mb), '.3f')}×",
            _ratio(ma, mb),
            target,
            None if target is None else f"≤ {target:g}×",
        )

    def time_ratio(self, a: str, b: str, batch: int, target: float | None) -> None:
        """Only between points of one invocation, run back to back (the load may change in between)."""
        ra, rb = self.get(a, batch, "run"), self.get(b, batch, "run")
        ta, tb = self.get(a, batch, "step_s"), self.get(b, batch, "step_s")
        if ta is not None and tb is not None and ra != rb:
            ta = tb = None  # not comparable
        pa, pb = _point(self.rows, self.workload, a, batch), _point(self.rows, self.workload, b, batch)
        self.add(
            f"step time, {LABELS[a]} / {LABELS[b]}, B={batch} (run {ra or '—'}, load {_load(pa)} / {_load(pb)})",
            f"{_fmt(ta, '.1f')} / {_fmt(tb, '.1f')} s = {_fmt(_ratio(ta, tb))}×",
            _ratio(ta, tb),
            target,
            None if target is None else f"≤ {target:g}×",
        )


def slopes(rows: list[dict], workload: str) -> list[str]:
    """Memory slope of every method between consecutive measured batch sizes, MB per query."""
    lines = ["| method | B interval | slope (MB/query) |", "|---|---|---|"]
    for method in METHODS:
        points = sorted(
            (r["batch"], r["peak_mb"])
            for r in rows
            if r["workload"] == workload and r["method"] == method and r["status"] == "ok"
        )
        for (b0, m0), (b1, m1) in zip(points, points[1:]):
            lines.append(f"| {LABELS[method]} | {b0}→{b1} | {(m1 - m0) / (b1 - b0):.3f} |")
    return lines if len(lines) > 2 else []


def phases(rows: list[dict], workload: str, method: str = "m3embed-cache") -> list[str]:
    """Peak RSS per phase of the last (timed) step of ``method``'s traced points."""
    points = [
        r
        for r in sorted(rows, key=lambda r: r["batch"])
        if r["workload"] == workload
        and r["method"] == method
        and r["status"] == "ok"
        and r.get("phases")
        and "step" in r["phases"][0]  # rows traced before score-level caching had other phases
    ]
    if not points:
        return []
    lines = [
        "| phase | " + " | ".join(f"B={r['batch']} held → peak MB (s)" for r in points) + " |",
        "|---|" + "---|" * len(points),
    ]
    table: dict[str, list[str]] = {}
    for k, row in enumerate(points):
        last = max(p["step"] for p in row["phases"])
        for p in row["phases"]:
            if p["step"] != last:
                continue
            cells = table.setdefault(p["phase"], ["—"] * len(points))
            cells[k] = f"{p['held_at_start_mb']:.0f} → {p['peak_mb']:.0f} ({p['seconds']:.1f})"
    for phase in PHASES:
        if phase in table:
            lines.append(f"| {PHASES[phase]} | " + " | ".join(table[phase]) + " |")
    return lines


def table(rows: list[dict], workload: str) -> list[str]:
    lines = [
        "| method | B | sub-batch | peak MB above loaded model | step s (wall) | step CPU s | load avg (1 min) "
        "before → after | loaded RSS MB | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["workload"] != workload:
            continue
        sub = row.get("sub_batch") or WORKLOADS[workload].sub_batch_of(row["method"]) or "—"
        run = row.get("run") or "—"
        if row["status"] == "ok":
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {sub} | {row['peak_mb']:.0f} | {row['step_s']:.1f} | "
                f"{_fmt(row.get('cpu_s'), '.1f')} | {_load(row)} | {_fmt(row.get('loaded_mb'), '.0f')} | {run} |"
            )
        else:
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {sub} | {row['status']} | — | — | — | — | {run} |"
            )
    return lines


def timing_runs(rows: list[dict], workload: str) -> dict[int, str]:
    """For each batch size, the invocation whose points give its step times: the one that measured
    most methods at that batch size (the latest on a tie). Times of other runs are not plotted."""
    out = {}
    for b in sorted({r["batch"] for r in rows if r["workload"] == workload}):
        counts: dict[str, int] = {}
        for r in rows:
            if r["workload"] == workload and r["batch"] == b and r["status"] == "ok" and r.get("run"):
                counts[r["run"]] = counts.get(r["run"], 0) + 1
        if counts:
            out[b] = max(counts, key=lambda run: (counts[run], run))
    return out


def plot(rows: list[dict], workload: str, path: Path) -> bool:
    """Memory vs batch size (lines), and step times as bars, each batch size's bars from one run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'm3embed[bench]'): no plot", file=sys.stderr)
        return False
    ok = [r for r in rows if r["workload"] == workload and r["status"] == "ok"]
    if not ok:
        return False
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    batches = sorted({r["batch"] for r in ok})
    runs = timing_runs(ok, workload)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        points = sorted((r["batch"], r["peak_mb"]) for r in ok if r["method"] == method)
        b, mem = zip(*points)
        ax_mem.plot(b, [m / 1024 for m in mem], marker="o", label=LABELS[method], color=f"C{k}")
        for i, batch in enumerate(batches):
            row = next((r for r in ok if r["method"] == method and r["batch"] == batch), None)
            if row is not None and row.get("run") == runs.get(batch):
                ax_time.bar(i + (k - (len(methods) - 1) / 2) * width, row["step_s"], width, color=f"C{k}")
    ax_mem.set_ylim(bottom=0)
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_xticks(batches, [str(b) for b in batches])
    ax_mem.set_xlabel("batch size (queries)")
    ax_mem.set_ylabel("peak memory above loaded model (GB)")
    ax_mem.set_title(f"memory vs batch ({workload} workload)")
    ax_mem.legend(fontsize=7, loc="upper left")
    ax_time.set_xticks(range(len(batches)), [f"B={b}\nrun {runs.get(b, '—')}" for b in batches])
    ax_time.set_yscale("log")
    ax_time.set_ylabel("step time, forward + backward (s, wall)")
    ax_time.set_title("step time: each batch size's methods from one run, back to back")
    for ax in (ax_mem, ax_time):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def code_version() -> str:
    """The commit measured, and whether src/m3embed differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/m3embed"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (src/m3embed modified)" if dirty else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem_gb:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


def write_report(out: Path, rows: list[dict], runs: dict) -> None:
    """``out/memory.md``: the template's prose, a section per measured workload, the notes."""
    sections = []
    for name, workload in WORKLOADS.items():
        if name in runs:
            sections += _section(workload, rows, runs[name])
    notes = out / "memory_notes.md"  # hand-written findings, kept across regenerations
    text = Template(TEMPLATE.read_text()).substitute(
        workloads="\n".join(sections), notes=notes.read_text().rstrip() if notes.exists() else ""
    )
    (out / "memory.md").write_text(text.split("-->\n", 1)[1].rstrip() + "\n")


def _section(workload, rows: list[dict], record: dict) -> list[str]:
    name = workload.name
    commands = [r["command"] for r in record["runs"]]
    several = "s (run one after the other; a later run's points replace earlier ones):"
    lines = [
        f"## {workload.title}",
        "",
        f"Workload: {workload.description}.",
        "",
        "Command" + (several if len(commands) > 1 else ":"),
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    for r in record["runs"]:
        lines.append(
            f"- run {r.get('started', '?')} (ended {r['date']}), m3embed {r.get('code', 'unknown')}: "
            f"{r['points']} point(s), {r['minutes']:.0f} min, {r['threads']} torch threads, "
            f"{r['steps']} step(s) per point; {r['machine']}"
            + (
                f"; glibc's mmap threshold fixed at {r['mmap_threshold']} bytes."
                if r.get("mmap_threshold")
                else "."
            )
        )
    lines += ["", *table(rows, name), ""]
    if record.get("plot"):
        lines += [f"![memory and step time vs batch, {name}]({record['plot']})", ""]
    lines += ["Checks against the project's targets:", "", *checks(rows, workload), ""]
    if slope_lines := slopes(rows, name):
        lines += ["Memory slope between consecutive batch sizes:", "", *slope_lines, ""]
    if phase_lines := phases(rows, name):
        lines += [
            "Where `cache`'s memory goes (`--trace`): RSS when each phase starts → its peak, MB above",
            "the loaded model, and its seconds, in the last step; RSS also counts heap freed but not",
            "yet returned to the OS by glibc.",
            "",
            *phase_lines,
            "",
        ]
    return lines


def checks(rows: list[dict], workload) -> list[str]:
    """The workload's checks as table lines."""
    c = Checks(rows, workload.name)
    workload.checks(c)
    return c.lines
