"""Watching a run: TensorBoard scalars equal train_log.jsonl, the plot is a real PNG, and without the
optional packages a run warns once and finishes (tiny models, tiny data)."""

import contextlib
import dataclasses
import io
import json
import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from m3embed.cli import main
from m3embed.report import PLOT_FILE, TENSORBOARD_DIR, curves
from m3embed.train import LOG_FILE, SECTIONS, read_log, train
from test_train import (  # noqa: F401  (module fixtures used by name)
    Killed,
    cli_run,
    data_file,
    kill_at,
    model_dir,
    run_config,
    write_beir,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSS_PARTS = {"loss", "dense", "sparse", "colbert", "ensemble"} | {
    "distill_dense",
    "distill_sparse",
    "distill_colbert",
}
MODES = {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}


def float32(value):
    """What TensorBoard keeps of a logged number (its scalars are float32)."""
    return float(np.float32(value))


def scalars(log_dir):
    """{tag: [(step, value), ...]} of every scalar in a TensorBoard folder, read back by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def uninstall(monkeypatch, *packages):
    """Make ``packages`` unimportable, as if not installed: the package and any submodule already
    imported by an earlier test become None in sys.modules, so importing them raises ImportError."""
    for name in [m for m in sys.modules if m.split(".")[0] in packages] + list(packages):
        monkeypatch.setitem(sys.modules, name, None)


def check_png(path, size):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # lines and text, not a blank


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, model_dir, data_file):  # noqa: F811
    """`m3embed train --report-to tensorboard`: 3 steps, nDCG@10 at steps 0, 2 and 3."""
    pytest.importorskip("ir_measures")
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("watched")
    out = tmp / "run"
    argv = ["--max-steps", "3", "--eval", str(write_beir(tmp / "beir")), "--eval-steps", "2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_run(model_dir, data_file, out, *argv, "--report-to", "tensorboard") == 0
    return out, printed.getvalue()


def test_tensorboard_scalars_are_the_logged_numbers(watched_run):
    out, _ = watched_run
    entries = read_log(out / LOG_FILE)
    steps = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_ndcg@10" in e]
    assert [e["step"] for e in steps] == [1, 2, 3] and [e["step"] for e in evals] == [0, 2, 3]
    found = scalars(out / TENSORBOARD_DIR)

    expected = {}
    for entry in steps:
        for key, value in entry.items():
            if key != "step" and isinstance(value, int | float):
                expected.setdefault(f"train/{key}", []).append((entry["step"], float32(value)))
    for entry in evals:
        for mode, metrics in entry["eval"].items():
            for metric, value in metrics.items():
                expected.setdefault(f"eval/{metric}/{mode}", []).append((entry["step"], float32(value)))
    named = LOSS_PARTS | {"lr", "grad_norm", "queries_per_s", "tokens_per_s", "peak_rss_mb"}
    assert {f"train/{name}" for name in named} <= set(found)
    assert {f"eval/ndcg@10/{m}" for m in MODES} <= set(found)
    assert found == expected  # every logged number, nothing else
    for mode in MODES:  # spelled out for the numbers the issue names: nDCG@10 per output
        logged = [(e["step"], float32(e["eval_ndcg@10"][mode])) for e in evals]
        assert found[f"eval/ndcg@10/{mode}"] == logged


def test_the_plot_is_a_png_named_in_the_summary(watched_run):
    out, printed = watched_run
    png = out / PLOT_FILE
    check_png(png, (1280, 480))  # two panels: loss parts, nDCG@10 per output
    assert f"plot: {png}" in printed
    assert read_log(out / LOG_FILE)[-1]["summary"]["plot"] == str(png)


def test_the_plot_draws_every_loss_part_and_every_output(watched_run):
    out, _ = watched_run
    entries = read_log(out / LOG_FILE)
    drawn = curves(entries)
    assert set(drawn.losses) == LOSS_PARTS and set(drawn.evals) == MODES
    assert drawn.finished and drawn.last_step == 3
    steps = [e for e in entries if "loss" in e]
    for part in LOSS_PARTS:
        assert drawn.losses[part] == ([1, 2, 3], [e[part] for e in steps]), part
    evals = [e for e in entries if "eval" in e]
    for mode in MODES:
        assert drawn.evals[mode] == ([0, 2, 3], [e["eval_ndcg@10"][mode] for e in evals]), mode


def test_without_tensorboard_and_matplotlib_a_run_warns_once_and_finishes(
    tmp_path,
    monkeypatch,
    caplog,
    model_dir,  # noqa: F811
    data_file,  # noqa: F811
):
    uninstall(monkeypatch, "tensorboard", "matplotlib")
    caplog.set_level(logging.WARNING)
    out = tmp_path / "run"
    result = train(run_config(model_dir, data_file, out, max_steps=2, report_to="tensorboard"))
    assert result.steps == 2 and result.checkpoint == out / "checkpoint-2"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("m3embed")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "pip install 'm3embed[plot,tensorboard]'" in message and "training goes on" in message
    assert result.plot is None and not (out / PLOT_FILE).exists() and not (out / TENSORBOARD_DIR).exists()
    assert [e["step"] for e in read_log(out / LOG_FILE) if "loss" in e] == [1, 2]


def test_a_resumed_run_reads_as_one_run_in_tensorboard(tmp_path, model_dir, data_file):  # noqa: F811
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    kw = {"max_steps": 4, "save_steps": 2, "report_to": "tensorboard"}
    with pytest.raises(Killed):
        train(run_config(model_dir, data_file, out, **kw), on_step=kill_at(3))  # step 3 logged, not saved
    train(run_config(model_dir, data_file, out, resume="latest", **kw))
    logged = [(e["step"], float32(e["loss"])) for e in read_log(out / LOG_FILE) if "loss" in e]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert scalars(out / TENSORBOARD_DIR)["train/loss"] == logged  # the killed process's step 3 is hidden


def test_m3embed_plot_draws_an_unfinished_run_without_evaluations(
    tmp_path,
    capsys,
    model_dir,  # noqa: F811
    data_file,  # noqa: F811
):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(run_config(model_dir, data_file, out, max_steps=4), on_step=kill_at(2))
    with open(out / LOG_FILE, "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a line still being written
    assert main(["plot", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"plot: {out / PLOT_FILE}"
    check_png(out / PLOT_FILE, (640, 480))  # one panel: no evaluation
    drawn = curves(read_log(out / LOG_FILE))
    assert not drawn.finished and drawn.last_step == 2 and drawn.losses["loss"][0] == [1, 2]
    assert main(["plot", str(out / LOG_FILE), "--output", str(tmp_path / "elsewhere.png")]) == 0
    check_png(tmp_path / "elsewhere.png", (640, 480))


def test_curves_of_a_resumed_log_are_one_run_and_keep_evaluations_without_steps(tmp_path):
    entries = [
        {"step": 0, "eval_ndcg@10": {"dense": 0.5}, "eval": {"dense": {"ndcg@10": 0.5}}},
        {"step": 1, "epoch": 0, "loss": 2.0, "dense": 1.5, "lr": 1e-5, "grad_norm": 3.0, "dataset": "a"},
        {"step": 2, "epoch": 0, "loss": 1.8, "dense": 1.4, "lr": 2e-5, "grad_norm": 2.0, "dataset": "a"},
        {"resumed_from": "checkpoint-1", "resumed_at_step": 1},
        {"step": 2, "epoch": 0, "loss": 1.7, "dense": 1.3, "lr": 2e-5, "grad_norm": 2.5, "dataset": "a"},
    ]
    log = tmp_path / LOG_FILE
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    drawn = curves(read_log(log))
    assert drawn.losses == {"loss": ([1, 2], [2.0, 1.7]), "dense": ([1, 2], [1.5, 1.3])}  # no lr, no epoch
    assert drawn.evals == {"dense": ([0], [0.5])} and drawn.last_step == 2 and not drawn.finished
    only_eval = curves(entries[:1])
    assert only_eval.losses == {} and only_eval.evals == {"dense": ([0], [0.5])}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, f"{LOG_FILE} not found: give a training run's output folder"),
        ("", "has no step and no evaluation yet: nothing to plot"),
        (
            '{"step": 1, "loss": 2.0}\n{"step": 2, loss\n{"step": 3, "loss": 1.0}\n',
            f"{LOG_FILE}, line 2: not a JSON",
        ),
    ],
    ids=["no-log", "empty-log", "bad-line"],
)
def test_m3embed_plot_errors_are_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / LOG_FILE).write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3embed plot: error: ") and message in err and "Traceback" not in err


def test_m3embed_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    (tmp_path / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n')
    uninstall(monkeypatch, "matplotlib")
    assert main(["plot", str(tmp_path)]) == 2
    assert "pip install 'm3embed[plot]'" in capsys.readouterr().err
    assert not (tmp_path / PLOT_FILE).exists()


# ---------------------------------------------------------------------- the docs' example plot
DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_watch_command() -> list[str]:
    """The `m3embed train ...` line of docs/usage.md's TensorBoard example, as argv after `m3embed`."""
    text = (DOCS / "usage.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("m3embed train ") and "--output-dir" in ln)
    return shlex.split(line.split("#")[0])[1:]


def same_setting(key: str, documented, logged) -> bool:
    if key in ("train_data", "eval_data"):  # the packaged demo data: its path differs between installs
        as_parts = lambda v: [Path(p).parts[-2:] for p in (v if isinstance(v, list) else [v])]  # noqa: E731
        return as_parts(documented) == as_parts(logged)
    if key == "heads" and documented == "auto":  # the demo's encoder: auto is its family's "all"
        return logged in ("auto", "all")
    return documented == logged


def test_the_docs_plot_is_drawn_from_the_log_of_the_documented_command():
    """docs/train_log_demo.png names (PNG text chunk) the sha256 of the log it was drawn from, which is
    docs/train_log_demo.jsonl; that run's resolved config (its checkpoint's train_config.json, kept as
    docs/train_log_demo_config.json) is what docs/usage.md's command runs."""
    pytest.importorskip("PIL")
    from PIL import Image

    from m3embed.cli import build_parser
    from m3embed.cli.train import config_from_args
    from m3embed.report import LOG_SHA256_KEY, file_sha256

    log_file, png = DOCS / "train_log_demo.jsonl", DOCS / "train_log_demo.png"
    assert Image.open(png).info.get(LOG_SHA256_KEY) == file_sha256(log_file), (
        "the plot is not drawn from that log"
    )
    assert "](train_log_demo.png)" in (DOCS / "usage.md").read_text()

    documented = config_from_args(build_parser().parse_args(documented_watch_command())).to_dict()
    entries = read_log(log_file)
    logged = json.loads(
        (DOCS / "train_log_demo_config.json").read_text()
    )  # its checkpoint's train_config.json
    # A setting added since that run is absent from its config: the run had its default.
    defaults = {
        name: {f.name: f.default for f in dataclasses.fields(kind)} for name, kind in SECTIONS.items()
    }
    logged = {section: {**defaults[section], **values} for section, values in logged.items()}
    differ = [
        f"{section}.{key}: documented {value!r}, logged {logged[section].get(key)!r}"
        for section, values in documented.items()
        for key, value in values.items()
        if not same_setting(key, value, logged[section].get(key))
    ]
    assert not differ, differ
    assert "summary" in entries[-1] and entries[-1]["summary"]["steps"] == documented["train"]["max_steps"]
