"""Peak training memory and step time versus batch size, per memory strategy and peer.

Every point (method, batch size) runs in a fresh subprocess (``--worker``) that loads the model,
builds one batch of B queries and B·G passages with exactly ``query_len`` / ``passage_len`` tokens
(the same token ids for every method), then runs the workload's training steps (forward + backward,
no optimiser step) and reports:

- peak memory above the loaded model: on CPU, the peak resident set size (``VmHWM``, reset with
  ``m3embed.peak_memory`` once the model and batch are in memory) minus the RSS at that moment; on
  CUDA, ``torch.cuda.max_memory_allocated()`` minus the memory allocated at that moment;
- the step time: the median wall time of the steps after the first (which includes allocator
  warm-up), or the only step's, and
  the 1-minute load average around the steps (the machine may be shared).

The pieces, one file each:

- ``methods.py``: the registry of methods: m3embed's ``none`` / ``checkpoint`` / ``cache`` strategies
  (``m3embed.memory.run_step`` with ``m3embed.losses.M3Objective``), FlagEmbedding's M3 training model
  with and without gradient checkpointing + sub-batches, and sentence-transformers'
  ``CachedMultipleNegativesRankingLoss`` (dense only), the peers when the optional ``peers`` extra is
  installed (``_peers.py`` builds them as their own trainers do);
- ``workloads.py``: the workloads as data (below) with the checks of each;
- ``phase_trace.py``: ``--trace``, the peak RSS of each phase of an m3embed step;
- ``report.py`` and its template ``memory_report.md``: the CSV, tables, checks, plots and memory.md;
- this file: the driver (a fresh subprocess per point) and the one-point worker.

Workloads (``workloads.WORKLOADS``: a model factory, a text source, lengths, the points of each method):
``default`` (the reference workload: all-MiniLM-L6-v2, query 32 / passage 128 tokens, group 2, three
heads, fp32), ``long`` (passage 512 tokens, group 8), ``bge-m3-width`` (a 2-layer random
XLM-RoBERTa at BGE-M3's width and vocabulary, passage 2048 tokens, group 8), ``wide-vocab`` and
``tiny`` (a small random XLM-R, seconds per point).

Training data: ``default`` and ``long`` read queries, positives and hard negatives from debdesc
(Debian package descriptions), which is **not part of m3embed**: give its ``train.jsonl.gz`` with
``--data`` (default ``data/debdesc/train/train.jsonl.gz`` relative to the working directory). The
random-model workloads generate their texts.

Writes ``<out>/memory.csv`` (rows of every workload run so far, re-measured points replaced),
``<out>/memory_runs.json`` (the commands), ``<out>/memory.md`` (tables, checks) and one plot per
workload (``memory.png`` for the default one).

    HF_HUB_OFFLINE=1 python benchmarks/memory.py --data PATH/train.jsonl.gz --trace   # default
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --workload long --data PATH/train.jsonl.gz
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --workload bge-m3-width
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --tiny     # quick check, writes to a temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may call a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from methods import METHODS, Point, unavailable  # noqa: E402  (after the offline settings)
from phase_trace import PhaseTrace  # noqa: E402
from report import checks, code_version, machine, plot, read_csv, table, write_csv, write_report  # noqa: E402
from workloads import DEFAULT_DATA, WORKLOADS, Workload  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ---------------------------------------------------------------------- worker: one point
def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(args: argparse.Namespace) -> None:
    import torch

    from m3embed.peak_memory import PeakMemory

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = WORKLOADS[args.workload]
    strategy = args.method.split("-", 1)[1]
    traced = args.trace and METHODS[args.method].needs is None and args.device == "cpu"
    trace = PhaseTrace(strategy) if traced else None
    point = Point(workload, args.method, args.batch, args.device, args.data, trace)
    step = METHODS[args.method].prepare(point)
    gc.collect()
    memory = PeakMemory(args.device)
    if not memory.start() and args.device == "cpu":
        raise RuntimeError("could not reset the RSS high-water mark through /proc/self/clear_refs")
    if trace is not None:
        trace.start(memory.baseline)
    times, cpu_times, losses, loads = [], [], [], [round(os.getloadavg()[0], 2)]
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        losses.append(step())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
        loads.append(round(os.getloadavg()[0], 2))
    peak = memory.peak_above_baseline()
    phases = None
    if trace is not None:  # the high-water mark was reset at each phase change: the peak is their max
        trace.enter("after")
        phases = trace.log
        peak = max(peak, *(int(p["peak_mb"] * 2**20) for p in phases))
    result = {
        "workload": workload.name,
        "method": args.method,
        "batch": args.batch,
        "status": "ok",
        "sub_batch": workload.sub_batch_of(args.method),
        "peak_mb": round(peak / 2**20, 1),
        "loaded_mb": round(memory.baseline / 2**20, 1),
        "step_s": round(statistics.median(times[1:] or times), 3),
        "step_times_s": [round(t, 3) for t in times],
        # CPU seconds (user + system, all threads) of the last step.
        "cpu_s": round(cpu_times[-1], 2),
        # 1-minute load average before the first step and after each step (this point's own threads
        # count in it: about `threads` when nothing else runs).
        "load_avg": loads,
        "loss": round(losses[-1], 5),
        "steps": args.steps,
        "threads": args.threads,
        "device": args.device,
        "phases": phases,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ====================================================================== driver
def _predicted_mb(points: list[tuple[int, float]], batch: int) -> float | None:
    """Linear extrapolation of a method's measured (B, MB) points to ``batch``."""
    points = sorted(dict(points).items())  # one point per batch size (the latest measured)
    if not points:
        return None
    if len(points) == 1:
        ((b0, m0),) = points
        return m0 * batch / b0
    (b0, m0), (b1, m1) = points[-2], points[-1]
    return m1 + (m1 - m0) / (b1 - b0) * (batch - b1)


def run_point(args: argparse.Namespace, workload: Workload, method: str, batch: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--workload", workload.name, "--method", method, "--batch", str(batch),
        "--steps", str(args.steps or workload.steps_of(batch)), "--threads", str(args.threads),
        "--device", args.device, "--data", str(args.data),
    ]  # fmt: skip
    if args.trace:
        command.append("--trace")
    if args.nice:
        command = ["nice", "-n", str(args.nice), *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    if args.mmap_threshold:  # glibc maps every block above it and unmaps it when freed (see --help)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=workload.point_timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timeout after {workload.point_timeout_s} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = round(time.perf_counter() - start, 1)
            return result
    if proc.returncode in (-9, 137):
        return {"status": "failed (killed: out of memory)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(proc.stderr[-3000:], file=sys.stderr)
    return {"status": f"failed (exit {proc.returncode}: {tail[0][:120]})"}


def run_workload(args: argparse.Namespace, workload: Workload, earlier: list[dict]) -> list[dict]:
    """Every point of the workload, batch size by batch size (so the methods compared at one B run
    close together in time, on a machine whose load may change)."""
    missing = unavailable()
    methods = [m for m in METHODS if m in workload.batches and (not args.methods or m in args.methods)]
    plan = sorted({b for m in methods for b in workload.batches[m] if not args.batches or b in args.batches})
    measured: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    for row in sorted(earlier, key=lambda r: r["batch"]):  # earlier runs' points inform the prediction
        if row["workload"] == workload.name and row["method"] in measured and row["status"] == "ok":
            measured[row["method"]].append((row["batch"], row["peak_mb"]))
    rows = []
    for batch in plan:
        for method in methods:
            if batch not in workload.batches[method]:
                continue
            row = {"workload": workload.name, "method": method, "batch": batch}
            predicted = _predicted_mb([pt for pt in measured[method] if pt[0] < batch], batch)
            if method in missing:
                row["status"] = missing[method]
            elif predicted is not None and predicted > args.max_mb:
                row["status"] = f"skipped (out of memory: predicted {predicted / 1024:.1f} GB)"
                row["predicted_mb"] = round(predicted)
            else:
                print(f"[{workload.name}] {method} B={batch} ...", end=" ", flush=True)
                row.update(run_point(args, workload, method, batch))
                if row["status"] == "ok":
                    measured[method].append((batch, row["peak_mb"]))
                    print(
                        f"{row['peak_mb']:.0f} MB, {row['step_s']:.1f} s/step (wall {row['wall_s']} s, "
                        f"load {row['load_avg']})"
                    )
                else:
                    print(row["status"])
            rows.append(row)
    return sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["batch"]))


# ====================================================================== main
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.tiny:
        args.workload = "tiny"
    if args.worker:
        worker(args)
        return
    workload = WORKLOADS[args.workload]
    default_out = (
        Path(tempfile.gettempdir()) / "m3embed-memory-tiny"
        if workload.name.startswith("tiny")
        else REPO / "docs"
    )
    out = args.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report_only(out)
    else:
        measure(args, workload, out, sys.argv[1:] if argv is None else argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=tuple(WORKLOADS), default="default", help="what to measure")
    parser.add_argument("--tiny", action="store_true", help="= --workload tiny (seconds per point)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="debdesc train.jsonl.gz (default and long workloads)"
    )
    parser.add_argument("--methods", nargs="*", choices=tuple(METHODS), help="only these methods")
    parser.add_argument("--batches", nargs="*", type=int, help="only these batch sizes")
    parser.add_argument(
        "--steps",
        type=int,
        help="training steps per point (the median of all but the first is timed); default: the workload's",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per point")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-mb", type=float, default=16_000, help="skip points predicted above this")
    parser.add_argument("--nice", type=int, default=0, help="run points under `nice -n N`")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        metavar="BYTES",
        help="CPU: fix glibc's mmap threshold in each point (MALLOC_MMAP_THRESHOLD_), so freed blocks "
        "leave the resident set and the peak RSS counts live memory, not glibc's heap (slower steps)",
    )
    parser.add_argument("--trace", action="store_true", help="m3embed points: peak RSS of each phase")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite memory.md and the plots from memory.csv"
    )
    parser.add_argument("--fresh", action="store_true", help="drop this workload's earlier points")
    parser.add_argument("--out", type=Path, help="output folder (default docs/, --tiny: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=tuple(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return parser


def report_only(out: Path) -> None:
    """Regenerate memory.md and the plots from memory.csv and memory_runs.json; measure nothing."""
    rows, runs = read_csv(out / "memory.csv"), json.loads((out / "memory_runs.json").read_text())
    for key in runs:
        runs[key]["plot"] = WORKLOADS[key].plot if plot(rows, key, out / WORKLOADS[key].plot) else None
    write_report(out, rows, runs)


def measure(args: argparse.Namespace, workload: Workload, out: Path, argv: list[str]) -> None:
    """Run the workload's points, merge them into memory.csv, record the run, rewrite the report."""
    name, csv_path = workload.name, out / "memory.csv"
    start = time.perf_counter()
    started = dt.datetime.now(dt.UTC).strftime("%H:%M")
    rows = run_workload(args, workload, [] if args.fresh else read_csv(csv_path))
    for row in rows:
        row["run"] = started  # which invocation measured it (time ratios stay within one)
    minutes = (time.perf_counter() - start) / 60

    # Points of earlier runs are kept unless re-measured here (a long run can be done in parts).
    fresh = {(r["workload"], r["method"], r["batch"]) for r in rows}
    old = [r for r in read_csv(csv_path) if (r["workload"], r["method"], r["batch"]) not in fresh]
    if args.fresh:
        old = [r for r in old if r["workload"] != name]
    all_rows = sorted(
        old + rows, key=lambda r: (r["workload"], list(METHODS).index(r["method"]), int(r["batch"]))
    )
    write_csv(csv_path, all_rows)
    all_rows = read_csv(csv_path)  # one representation (numbers parsed) for the report

    runs_path = out / "memory_runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    png = workload.plot
    plotted = plot(all_rows, name, out / png)
    run = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/memory.py " + shlex.join(argv),
        "started": started,
        "code": code_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": args.threads,
        "steps": args.steps or "/".join(sorted({str(workload.steps_of(r["batch"])) for r in rows})),
        "minutes": round(minutes, 1),
        "points": len([r for r in rows if r["status"] == "ok"]),
        "mmap_threshold": args.mmap_threshold,
    }
    earlier = [] if args.fresh else runs.get(name, {}).get("runs", [])
    runs[name] = {"runs": [*earlier, run], "plot": png if plotted else None}
    runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    write_report(out, all_rows, runs)
    print("\n".join(table(all_rows, name) + [""] + checks(all_rows, workload)))
    print(f"\nwrote {csv_path}, {out / 'memory.md'}" + (f", {out / png}" if plotted else ""))


if __name__ == "__main__":
    main()
