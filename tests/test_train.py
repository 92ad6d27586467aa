"""The training loop, checkpoints, resume and ``m3embed train`` (tiny models, tiny data, fast)."""

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from m3embed import checkpoint as ckpt
from m3embed import settings
from m3embed.cli import build_parser, main
from m3embed.model import M3Config, M3Model
from m3embed.testing import sample_texts, tiny_model
from m3embed.train import LOG_FILE, SECTIONS, RunConfig, TrainConfig, demo_config, read_log, train
from test_data import BAD_LINES, BAD_PATH_IDS, BAD_PATHS, ex, write  # the data layer's cases, end to end

N_LINES, B, G = 16, 4, 3  # 4 batches per epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def write_lines(path, n=N_LINES, seed=0):
    queries = sample_texts(n, seed=seed, min_words=2, max_words=8)
    passages = sample_texts(n * 4, seed=seed + 1, min_words=5, max_words=30)
    with open(path, "w") as f:
        for i, q in enumerate(queries):
            f.write(
                json.dumps({"query": q, "pos": [passages[4 * i]], "neg": passages[4 * i + 1 : 4 * i + 4]})
                + "\n"
            )
    return str(path)


def write_beir(folder):
    """A 6-document, 2-query BEIR folder (split test) for evaluation during training."""
    (folder / "qrels").mkdir(parents=True)
    docs = sample_texts(6, seed=5, min_words=4, max_words=20)
    queries = sample_texts(2, seed=6, min_words=2, max_words=5)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(queries))
    )
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\t1\n")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("xlmr", dropout=0.1, seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("data") / "train.jsonl")


def run_config(model_dir, data_file, out, strategy="cache", memory=None, **train_kw) -> RunConfig:
    train_kw = {"max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 2, "progress_bar": False, **train_kw}
    return RunConfig.from_dict(
        {
            "train": {"model_name_or_path": model_dir, "output_dir": str(out), **train_kw},
            "data": {"train_data": data_file, "train_group_size": G, "batch_size": B},
            "memory": {"strategy": strategy, "sub_batch_size": 3, **(memory or {})},
            "loss": {"self_distill_start_step": 1},
        }
    )


class Killed(Exception):
    pass


def kill_at(step_to_die):
    def on_step(step, metrics):
        if step == step_to_die:
            raise Killed

    return on_step


def weights(path):
    model = M3Model.from_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def logged_losses(out):
    return [e["loss"] for e in read_log(out / LOG_FILE) if "loss" in e]


# ---------------------------------------------------------------------- resume
def test_resume_gives_the_uninterrupted_loss_sequence_and_weights(tmp_path, model_dir, data_file):
    full = train(run_config(model_dir, data_file, tmp_path / "full"))
    assert full.steps == 6 and len(full.losses) == 6

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(run_config(model_dir, data_file, out, save_steps=3), on_step=kill_at(4))  # dies after step 4
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]
    resumed = train(run_config(model_dir, data_file, out, save_steps=3, resume="latest"))
    assert resumed.steps == 6 and len(resumed.losses) == 3  # steps 4..6 again, crossing into epoch 1

    torch.testing.assert_close(logged_losses(out), full.losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=1e-5, atol=0)
    a, b = weights(full.checkpoint), weights(resumed.checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_prefetching_run_stopped_and_resumed_gives_the_uninterrupted_losses_exactly(
    tmp_path, model_dir, data_file
):
    in_loop = train(run_config(model_dir, data_file, tmp_path / "in-loop", prefetch_batches=0))
    full = train(run_config(model_dir, data_file, tmp_path / "full", prefetch_batches=3))
    assert full.losses == in_loop.losses  # batches made ahead are the same batches

    out = tmp_path / "killed"
    with pytest.raises(Killed):  # 3 batches made ahead: at step 3 the sampler is in epoch 1 already
        train(run_config(model_dir, data_file, out, save_steps=3, prefetch_batches=3), on_step=kill_at(4))
    saved = ckpt.load_training_state(out / "checkpoint-3")["trainer_state"]["sampler"]
    assert (saved["epoch"], saved["position"]) == (0, 3)  # the batches trained on
    resumed = train(run_config(model_dir, data_file, out, save_steps=3, prefetch_batches=3, resume="latest"))
    assert resumed.losses == full.losses[3:]
    assert logged_losses(out) == full.losses


def test_strategies_give_the_same_loss_curve(tmp_path, model_dir, data_file):
    curves = {
        s: train(run_config(model_dir, data_file, tmp_path / s, strategy=s, max_steps=3)).losses
        for s in ("none", "checkpoint", "cache")
    }
    torch.testing.assert_close(curves["checkpoint"], curves["none"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(curves["cache"], curves["none"], rtol=1e-4, atol=1e-6)


def test_layer_checkpointing_from_flag_or_file_is_saved_and_resumed(tmp_path, capsys, model_dir, data_file):
    """``memory.layer_checkpointing`` comes from ``--layer-checkpointing`` or a config file (the flag
    wins), is written in every checkpoint's config, and a run killed and resumed with it gives the
    uninterrupted run's losses, which are those of ``cache`` without it."""

    def resolved(*argv):
        assert main(["train", "--train-data", data_file, *argv, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)["memory"]["layer_checkpointing"]

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"memory": {"layer_checkpointing": True}}))
    assert resolved() is False and resolved("--layer-checkpointing") is True
    assert resolved("--config", str(cfg)) is True
    assert resolved("--config", str(cfg), "--no-layer-checkpointing") is False

    layers = {"layer_checkpointing": True}
    plain = train(run_config(model_dir, data_file, tmp_path / "plain", max_steps=4))
    full = train(run_config(model_dir, data_file, tmp_path / "full", memory=layers, max_steps=4))
    torch.testing.assert_close(full.losses, plain.losses, rtol=1e-4, atol=1e-6)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(
            run_config(model_dir, data_file, out, memory=layers, max_steps=4, save_steps=2),
            on_step=kill_at(3),
        )
    assert ckpt.load_training_state(out / "checkpoint-2")["configs"]["memory"]["layer_checkpointing"] is True
    resumed = train(
        run_config(model_dir, data_file, out, memory=layers, max_steps=4, save_steps=2, resume="latest")
    )
    torch.testing.assert_close(resumed.losses, full.losses[2:], rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- checkpoints
def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(
    tmp_path, model_dir, data_file, monkeypatch
):
    out = tmp_path / "run"
    real_save = torch.save

    def crashing_save(obj, path, *a, **kw):
        if ".tmp-checkpoint-4" in str(path) and str(path).endswith(ckpt.SCHEDULER):
            raise OSError("disk died")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk died"):
        train(run_config(model_dir, data_file, out, save_steps=2))
    monkeypatch.undo()

    assert (out / ".tmp-checkpoint-4").is_dir()  # the half-written one, never visible as checkpoint-4
    assert (out / ckpt.LATEST).read_text().strip() == "checkpoint-2"
    assert ckpt.find_checkpoint("latest", out).name == "checkpoint-2"
    M3Model.from_pretrained(out / "checkpoint-2")
    ckpt.load_training_state(out / "checkpoint-2")
    resumed = train(run_config(model_dir, data_file, out, save_steps=2, resume="latest"))
    assert resumed.steps == 6 and not (out / ".tmp-checkpoint-4").exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    train(run_config(model_dir, data_file, out, max_steps=5, save_steps=1, save_total_limit=2))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert (out / ckpt.LATEST).read_text().strip() == "checkpoint-5"
    saved = json.loads((out / "checkpoint-5" / ckpt.TRAIN_CONFIG).read_text())
    assert RunConfig.from_dict(saved) == run_config(
        model_dir, data_file, out, max_steps=5, save_steps=1, save_total_limit=2
    )


def test_freeze_encoder_trains_only_the_heads(tmp_path, model_dir, data_file):
    result = train(run_config(model_dir, data_file, tmp_path / "run", max_steps=2, freeze_encoder=True))
    before, after = weights(model_dir), weights(result.checkpoint)
    assert all(
        torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.") and "pooler" not in k
    )
    assert not torch.equal(before["colbert_linear.weight"], after["colbert_linear.weight"])


def test_step_metrics_are_logged(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    train(run_config(model_dir, data_file, out, max_steps=3))
    entries = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert "distill_dense" not in entries[1] and "distill_dense" in entries[2]  # start step 1: from step 3
    step = entries[2]
    for key in (
        "step",
        "loss",
        "dense",
        "sparse",
        "colbert",
        "ensemble",
        "distill_colbert",
        "lr",
        "head_lr",
        "grad_norm",
        "data_wait_s",
    ):
        assert key in step
    assert step["head_lr"] == step["lr"]  # heads loaded from the model's files: the encoder's rate
    assert 0 <= step["data_wait_s"] <= step["seconds"]
    assert step["queries_per_s"] > 0 and step["tokens_per_s"] > 0 and step["peak_rss_mb"] > 0
    assert "summary" in entries[-1]


def test_evaluation_during_training_reports_every_output(tmp_path, model_dir, data_file):
    pytest.importorskip("ir_measures")
    beir = write_beir(tmp_path / "beir")
    result = train(
        run_config(model_dir, data_file, tmp_path / "run", max_steps=2, eval_data=str(beir), eval_steps=1)
    )
    modes = {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    assert set(result.eval_before) == modes and set(result.eval_after) == modes
    evals = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in evals if "eval_ndcg@10" in e] == [0, 1, 2]


# ---------------------------------------------------------------------- configs
def test_train_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match=r"TrainConfig.learning_rate .* got -1"):
        TrainConfig(learning_rate=-1)
    with pytest.raises(ValueError, match=r"TrainConfig.max_steps .* got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\] in section 'train'"):
        RunConfig.from_dict({"train": {"lr": 1e-5}})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optim'\]"):
        RunConfig.from_dict({"optim": {}})


def test_config_round_trips_through_dict():
    config = RunConfig.from_dict(demo_config())
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_flags_override_the_config_file(tmp_path, capsys, data_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"train": {"learning_rate": 1e-5, "max_steps": 7}, "data": {"train_data": data_file}})
    )
    assert main(["train", "--config", str(cfg), "--lr", "3e-5", "--strategy", "none", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["learning_rate"] == 3e-5 and resolved["train"]["max_steps"] == 7
    assert resolved["memory"]["strategy"] == "none" and resolved["data"]["train_data"] == [data_file]
    toml = tmp_path / "run.toml"
    toml.write_text(f'[train]\nmax_steps = 3\n[data]\ntrain_data = "{data_file}"\n')
    assert main(["train", "--config", str(toml), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 3


def test_no_arguments_means_the_packaged_demo(capsys):
    assert main(["train", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["train_data"][0].endswith("demo_data/train.jsonl")
    assert resolved["train"]["eval_data"].endswith("demo_data/dev")
    assert resolved["memory"]["strategy"] == "cache" and resolved["train"]["pooling"] == "mean"


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            assert settings.flags(f)[0] in text and f"[{section}.{f.name}" in text and f.metadata["help"]


def test_every_config_field_has_a_flag_and_every_flag_a_field():
    """Adding a config key is a one-place edit: the field is the flag (and its help, choices, default)."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flag_dests = {a.dest for a in train._actions if a.option_strings} - {"help", "config", "print_config"}
    field_dests = {
        f"{section}.{f.name}" for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)
    }
    assert flag_dests == field_dests, (sorted(field_dests - flag_dests), sorted(flag_dests - field_dests))
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            assert f.metadata.get("help"), (
                f"{section}.{f.name} has no help: declare it with settings.setting()"
            )


def test_flags_reach_every_kind_of_field(capsys, data_file):
    argv = ["train", "--train-data", data_file, "--print-config", "--length-buckets", "0=8", "128=4"]
    argv += ["--sub-batch-size", "auto", "--max-steps", "none", "--pooling", "cls", "--no-drop-last"]
    argv += ["--ensemble-sparse-weight", "0.5", "--resume", "--output-dir", "x"]
    assert main(argv) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["length_buckets"] == {0: 8, 128: 4} and resolved["data"]["drop_last"] is False
    assert resolved["memory"]["sub_batch_size"] == "auto" and resolved["train"]["max_steps"] is None
    assert resolved["train"]["pooling"] == "cls" and resolved["loss"]["ensemble_sparse_weight"] == 0.5
    assert resolved["train"]["resume"] == "latest"


# ---------------------------------------------------------------------- bad input through the CLI
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize(("case", "bad", "field"), BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_training_lines_stop_before_training_with_exit_2(tmp_path, capsys, suffix, case, bad, field):
    """Every bad-line case of the data layer, through ``m3embed train``: one clean line, exit 2."""
    path = write(tmp_path / f"train{suffix}", [ex(0), "", bad, ex(1)])  # line 3 is bad
    out = tmp_path / "run"
    # --model points nowhere: the data error must come first, before any model loading.
    code = main(
        ["train", "--train-data", str(path), "--model", str(tmp_path / "missing"), "--output-dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"m3embed train: error: {path}, line 3") and "Traceback" not in err
    assert err.count("\n") == 1 and (field is None or repr(field) in err)
    assert not out.exists()


@pytest.mark.parametrize(("make", "match"), BAD_PATHS, ids=BAD_PATH_IDS)
def test_bad_training_paths_give_exit_2(tmp_path, capsys, make, match):
    code = main(["train", "--train-data", str(make(tmp_path)), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "--learning-rate must be > 0, e.g. 2e-5, got -1.0"),
        (["--group-size", "0"], "--group-size must be ≥ 1, got 0"),
        (["--resume"], "no checkpoint in"),
    ],
)
def test_bad_settings_give_a_clean_error_and_exit_2(tmp_path, capsys, data_file, argv, message):
    base = ["train", "--train-data", data_file, "--output-dir", str(tmp_path / "run")]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_config_files_give_a_clean_error(tmp_path, capsys):
    cases = {
        "typo.yaml": ("train:\n  learning_rat: 1e-5\n", "unknown key(s) ['learning_rat'] in section 'train'"),
        "broken.yaml": ("train: [unclosed\n", "not valid YAML"),
        "broken.toml": ("[train\n", "not valid TOML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, name
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err


# ---------------------------------------------------------------------- checkpoints load elsewhere
def test_cli_checkpoint_loads_in_m3embed_and_flagembedding(tmp_path, capsys, model_dir, data_file):
    out = tmp_path / "run"
    argv = ["train", "--model", model_dir, "--train-data", data_file, "--output-dir", str(out)]
    argv += ["--group-size", str(G), "--batch-size", str(B), "--max-steps", "2", "--no-progress-bar"]
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    path = out / "checkpoint-2"
    assert (path / "model.safetensors").exists()
    texts = sample_texts(3, seed=9)
    ours = M3Model.from_pretrained(path).encode(texts, return_dense=True, return_sparse=False)["dense_vecs"]
    try:
        from m3embed.peers import load_flagembedding_m3

        fe = load_flagembedding_m3()
    except ImportError:
        pytest.skip("FlagEmbedding not installed")
    theirs = fe.M3Embedder(str(path), use_fp16=False, devices="cpu").encode(texts)["dense_vecs"]
    torch.testing.assert_close(torch.as_tensor(theirs), torch.as_tensor(ours), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "pooling", "normalize"),
    [("xlmr", "cls", True), ("xlmr", "mean", True), ("bert", "mean", False)],
    ids=["cls", "mean", "mean-unnormalised-bert"],
)
def test_cli_checkpoint_loads_in_sentence_transformers(tmp_path, data_file, kind, pooling, normalize):
    """SentenceTransformer(checkpoint) is the dense encoder: our pipeline and vectors, offline, no remote code."""
    st = pytest.importorskip("sentence_transformers")
    model_dir, run = tmp_path / "model", tmp_path / "run"
    tiny_model(kind, config=M3Config(normalize=normalize)).save_pretrained(model_dir)
    argv = ["train", "--model", str(model_dir), "--train-data", data_file, "--output-dir", str(run)]
    argv += ["--group-size", str(G), "--batch-size", str(B), "--max-steps", "1", "--no-progress-bar"]
    assert main([*argv, "--pooling", pooling]) == 0
    ours = M3Model.from_pretrained(run / "checkpoint-1")
    assert (ours.config.pooling, ours.config.normalize) == (pooling, normalize)
    theirs = st.SentenceTransformer(str(run / "checkpoint-1"), device="cpu")
    # Without modules.json ST would build Transformer -> mean Pooling itself; the pipeline must be ours.
    modules = ["Transformer", "Pooling", "Normalize"] if normalize else ["Transformer", "Pooling"]
    assert [type(m).__name__ for m in theirs] == modules
    assert theirs.similarity_fn_name == ("cosine" if normalize else "dot")
    assert theirs.max_seq_length == 512
    texts = sample_texts(6, seed=9, min_words=1, max_words=40)
    expected = torch.as_tensor(ours.encode(texts, batch_size=4)["dense_vecs"])
    got = torch.as_tensor(theirs.encode(texts, batch_size=4))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resume_refuses_a_different_world_size(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    result = train(run_config(model_dir, data_file, out, max_steps=1))
    state = json.loads((result.checkpoint / ckpt.TRAINER_STATE).read_text())
    state["world_size"] = 2
    (result.checkpoint / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="saved with 2 process"):
        train(run_config(model_dir, data_file, out, max_steps=2, resume=str(result.checkpoint)))
    shutil.rmtree(out)


# ---------------------------------------------------------------------- a run's folder is the run's
def cli_run(model_dir, data_file, out, *extra):
    argv = ["train", "--model", model_dir, "--train-data", data_file, "--output-dir", str(out)]
    return main(argv + ["--group-size", str(G), "--batch-size", str(B), "--no-progress-bar", *extra])


def folder_digest(folder):
    """Every file's path and bytes under ``folder``: equal digests mean nothing was touched."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return digest


@pytest.fixture
def earlier_run(tmp_path, capsys, model_dir, data_file):
    """A finished 2-step run (checkpoint-2, latest, train_log.jsonl) in tmp_path / "run"."""
    out = tmp_path / "run"
    assert cli_run(model_dir, data_file, out, "--max-steps", "2") == 0
    capsys.readouterr()
    return out


def test_a_new_run_where_a_run_is_refused_and_every_byte_kept(earlier_run, capsys, model_dir, data_file):
    before = folder_digest(earlier_run)
    assert cli_run(model_dir, data_file, earlier_run, "--max-steps", "3") == 2
    err = capsys.readouterr().err
    assert f"output folder {earlier_run} already holds a training run" in err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert folder_digest(earlier_run) == before


@pytest.mark.parametrize("how", [[], ["--resume"], ["--overwrite"]], ids=["new", "resume", "overwrite"])
def test_a_start_that_fails_on_a_typo_leaves_the_earlier_run_untouched(
    earlier_run, tmp_path, capsys, model_dir, data_file, how
):
    """A wrong --eval path is found before anything in the folder is truncated or deleted."""
    before = folder_digest(earlier_run)
    code = cli_run(
        model_dir, data_file, earlier_run, "--max-steps", "3", "--eval", str(tmp_path / "typo"), *how
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if how:
        assert f"{tmp_path / 'typo'}: BEIR folder not found" in err
    assert folder_digest(earlier_run) == before


def test_overwrite_starts_over_and_keeps_files_that_are_not_the_runs(
    earlier_run, capsys, model_dir, data_file
):
    (earlier_run / "notes.txt").write_text("mine")
    assert cli_run(model_dir, data_file, earlier_run, "--max-steps", "1", "--overwrite") == 0
    assert "trained 1 step in" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(earlier_run)] == ["checkpoint-1"]
    assert (earlier_run / ckpt.LATEST).read_text().strip() == "checkpoint-1"
    entries = read_log(earlier_run / LOG_FILE)
    assert [e["step"] for e in entries if "loss" in e] == [1]  # nothing of the earlier run's log
    assert (earlier_run / "notes.txt").read_text() == "mine"


def test_a_resumed_run_appends_to_the_log_and_counts_its_own_steps(earlier_run, capsys, model_dir, data_file):
    log_before = (earlier_run / LOG_FILE).read_bytes()
    assert cli_run(model_dir, data_file, earlier_run, "--max-steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert "trained 2 steps (4 in total, resumed at step 2) in" in out
    assert f"log: {earlier_run / LOG_FILE}" in out
    assert (earlier_run / LOG_FILE).read_bytes().startswith(log_before)  # appended, never rewritten
    assert [e["step"] for e in read_log(earlier_run / LOG_FILE) if "loss" in e] == [1, 2, 3, 4]


def test_resuming_a_finished_run_says_so_and_leaves_its_folder_alone(
    earlier_run, capsys, model_dir, data_file
):
    before = folder_digest(earlier_run)
    assert cli_run(model_dir, data_file, earlier_run, "--max-steps", "2", "--resume") == 0
    out = capsys.readouterr().out
    assert "already finished at step 2" in out, out
    assert "trained 0 steps" not in out and "queries/s" not in out
    assert folder_digest(earlier_run) == before  # the log (and everything else) untouched


def test_the_start_of_a_run_logs_short_config_lines_and_names_the_trained_model(
    tmp_path, caplog, model_dir, data_file
):
    import logging

    eval_dir = write_beir(tmp_path / "beir")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="m3embed"):
        train(run_config(model_dir, data_file, out, max_steps=1, eval_data=str(eval_dir)))
    messages = [r.getMessage() for r in caplog.records]
    config = [m for m in messages if m.startswith("config ")]
    assert config and all(len(m) <= 150 for m in config), config  # + the log prefix: under 200
    assert config[0].startswith("config train: ") and "max_steps=1" in " ".join(config), config
    evaluating = [m for m in messages if m.startswith("evaluating ")]
    assert evaluating and all(f"the model trained in {out} at step" in m for m in evaluating), evaluating
    assert model_dir not in " ".join(evaluating)


def test_a_skipped_bad_line_is_warned_about_once(tmp_path, caplog, model_dir, data_file):
    import logging

    bad = tmp_path / "bad.jsonl"
    lines = Path(data_file).read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    config = run_config(model_dir, str(bad), tmp_path / "run", max_steps=1)
    config = config.replace("data", skip_bad_lines=True)
    with caplog.at_level(logging.INFO, logger="m3embed"):
        train(config)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "bad line" in r.getMessage()
    ]
    assert len(warned) == 1 and "line 4" in warned[0], "\n".join(warned)


def test_the_training_summary_names_its_log_and_no_library_bar_cuts_in(tmp_path, capfd, model_dir, data_file):
    assert cli_run(model_dir, data_file, tmp_path / "run", "--max-steps", "1") == 0
    captured = capfd.readouterr()
    assert "Writing model shards" not in captured.err
    assert f"log: {tmp_path / 'run' / LOG_FILE}" in captured.out


# ---------------------------------------------------------------------- errors name what was typed
@pytest.mark.parametrize("given", ["{tmp}/no-such-model", "./no-such-model", "runs/x/checkpoint-9"])
def test_a_missing_model_folder_is_named(tmp_path, capsys, data_file, given):
    given = given.format(tmp=tmp_path)
    code = main(["train", "--model", given, "--train-data", data_file, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"model folder {given} not found; give a BGE-M3-layout folder or a Hub name" in err
    assert not (tmp_path / "run").exists()


def test_an_owner_name_that_is_neither_a_folder_nor_reachable_says_so(tmp_path, capsys, data_file):
    code = main(
        ["train", "--model", "nobody/nothing", "--train-data", data_file, "--output-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "model folder nobody/nothing not found" in err
    assert "not a local folder" in err and "Hub is offline" in err  # conftest sets HF_HUB_OFFLINE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
        (["--max-steps", "0"], "--max-steps must be ≥ 1 or 'none', got 0"),
        (["--eval-batch-size", "0"], "--eval-batch-size must be ≥ 1, got 0"),
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ],
)
def test_setting_errors_name_the_flag(tmp_path, capsys, data_file, argv, message):
    code = main(["train", "--train-data", data_file, "--output-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Config." not in err


def test_setting_errors_from_a_file_name_the_file(tmp_path, capsys, data_file):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_data": data_file, "batch_size": 0}}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"data.batch_size (in {cfg}) must be an integer >= 1, got 0" in capsys.readouterr().err
