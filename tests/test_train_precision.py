"""fp16 loss scaling and non-finite steps in the training loop: a step that is not finite never reaches
the weights, too many in a row stop the run with a message, no checkpoint holds a non-finite weight,
and the scaler's state resumes exactly (tiny models, CPU float16 autocast)."""

import math

import pytest
import torch

from m3embed import checkpoint as ckpt
from m3embed.train import LOG_FILE, loop, read_log, train
from m3embed.train.precision import NonFiniteStop
from test_train import (  # noqa: F401  (module fixtures used by name)
    Killed,
    cli_run,
    data_file,
    kill_at,
    model_dir,
    run_config,
    weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def steps(out):
    return [e for e in read_log(out / LOG_FILE) if "loss" in e]


def finite(entry):
    return all(math.isfinite(v) for k, v in entry.items() if isinstance(v, float))


# A scale this high makes the first steps' fp16 activation gradients overflow; each skip halves it.
OVERFLOWING = 2.0**40


def test_an_overflowing_step_is_skipped_the_scale_backs_off_and_training_goes_on(
    tmp_path, model_dir, data_file
):
    out = tmp_path / "run"
    config = run_config(
        model_dir,
        data_file,
        out,
        fp16=True,
        fp16_init_scale=OVERFLOWING,
        max_steps=40,
        max_skipped_steps=40,
        save_steps=1,
        save_total_limit=None,
    )
    result = train(config)
    log = steps(out)
    skipped = [
        e["step"]
        for e, before in zip(log, [0] + [e["skipped_steps"] for e in log])
        if e["skipped_steps"] > before
    ]
    assert skipped and skipped[0] == 1, f"the first step should overflow; skipped steps: {skipped}"
    assert skipped == list(range(1, len(skipped) + 1)), f"skips should be the first steps only: {skipped}"
    assert len(skipped) < 40, "the scale never backed off far enough"
    assert result.skipped_steps == len(skipped)

    scales = [e["loss_scale"] for e in log]
    assert scales[0] == OVERFLOWING
    for k in range(len(skipped)):  # each skipped step halves the scale the next one uses
        assert scales[k + 1] == scales[k] / 2, f"step {k + 1}: {scales[k]} -> {scales[k + 1]}"
    for e in log[: len(skipped)]:
        assert not math.isfinite(e["grad_norm"]), e
    assert all(finite(e) for e in log[len(skipped) :]), [e for e in log if not finite(e)]
    for e in log:
        assert math.isfinite(e["loss"])  # the logged loss is unscaled, finite even when gradients overflow

    # The tiny model's folder has no pooler weights: transformers draws them anew at every load (unused).
    start = {k: v for k, v in weights(model_dir).items() if ".pooler." not in k}
    for step in skipped:  # no skipped step changed a parameter
        saved = weights(out / f"{ckpt.PREFIX}{step}")
        changed = [k for k in start if not torch.equal(start[k], saved[k])]
        assert not changed, f"step {step} was skipped but changed {changed[:3]}"
    trained = weights(result.checkpoint)
    assert any(not torch.equal(start[k], trained[k]) for k in start), (
        "the steps after the skips did not train"
    )
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_an_exploding_learning_rate_stops_the_run_with_the_last_good_checkpoint(
    tmp_path, capsys, model_dir, data_file
):
    out = tmp_path / "run"
    code = cli_run(
        model_dir,
        data_file,
        out,
        "--lr",
        "1e4",
        "--max-steps",
        "60",
        "--save-steps",
        "1",
        "--save-total-limit",
        "none",
        "--max-skipped-steps",
        "3",
    )
    err = capsys.readouterr().err
    assert code == 1, err
    message = [line for line in err.splitlines() if "training stopped" in line]
    assert len(message) == 1 and message[0].startswith("m3embed train: error: training stopped"), err
    log = steps(out)
    last = log[-1]["step"]
    bad = [not (math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"])) for e in log]
    assert last < 60, "the run did not stop"
    if any(bad):  # stopped by non-finite steps: the log ends in the run of them (3 in a row, the last of
        # which may be unlogged) and none came 3 in a row before (a finite step resets the count)
        trailing = len(bad) - next((i + 1 for i in range(len(bad) - 1, -1, -1) if not bad[i]), 0)
        earlier = [i for i in range(2, len(bad) - trailing) if all(bad[i - 2 : i + 1])]
        assert 1 <= trailing <= 3 and not earlier, ([e["step"] for e in log], bad)
    checkpoints = ckpt.list_checkpoints(out)
    assert checkpoints, "no checkpoint was written before the run went wrong"
    assert str(checkpoints[-1]) in message[0], (message, checkpoints[-1])
    for folder in checkpoints:  # every checkpoint loads and holds finite weights only
        bad = [k for k, v in weights(folder).items() if not torch.isfinite(v).all()]
        assert not bad, f"{folder.name} holds non-finite {bad[:3]}"


def test_fp16_killed_and_resumed_right_after_a_skipped_step_gives_the_same_losses_and_scales(
    tmp_path, model_dir, data_file
):
    def config(out, **kw):
        return run_config(
            model_dir,
            data_file,
            out,
            fp16=True,
            fp16_init_scale=OVERFLOWING,
            max_steps=40,
            max_skipped_steps=40,
            **kw,
        )

    full = train(config(tmp_path / "full"))
    first_applied = next(e["step"] for e in steps(tmp_path / "full") if math.isfinite(e["grad_norm"]))
    assert first_applied > 1, "no step was skipped"
    out = tmp_path / "killed"
    with pytest.raises(Killed):  # checkpoint right after the last skipped step, killed 2 steps later
        train(config(out, save_steps=first_applied - 1), on_step=kill_at(first_applied + 1))
    resumed = train(config(out, save_steps=first_applied - 1, resume="latest"))
    expected = [(e["loss"], e["loss_scale"], e["skipped_steps"]) for e in steps(tmp_path / "full")]
    assert [(e["loss"], e["loss_scale"], e["skipped_steps"]) for e in steps(out)] == expected
    assert resumed.losses == full.losses[first_applied - 1 :]
    assert resumed.skipped_steps == full.skipped_steps


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path, monkeypatch, model_dir, data_file):
    """A weight that goes NaN behind the guard's back (here: written after step 1) is caught at the
    step-2 save: the checkpoint is refused, with the parameter named."""
    runs = []

    def setup(config, info):
        runs.append(real_setup(config, info))
        return runs[-1]

    def poison(step, metrics):
        if step == 1:
            with torch.no_grad():
                runs[0].model.sparse_linear.weight.fill_(float("nan"))

    real_setup = loop.setup
    monkeypatch.setattr(loop, "setup", setup)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteStop, match="weights not finite") as caught:
        train(run_config(model_dir, data_file, out, max_steps=4, save_steps=2), on_step=poison)
    assert "sparse_linear.weight" in str(caught.value) and "checkpoint not written" in str(caught.value)
    assert ckpt.list_checkpoints(out) == []
    assert [e["skipped_steps"] for e in steps(out)] == [0, 1]  # step 2's loss was NaN: skipped, not applied


def test_fp16_and_bf16_together_is_an_error_naming_both_flags(tmp_path, capsys, model_dir, data_file):
    assert cli_run(model_dir, data_file, tmp_path / "run", "--fp16", "--bf16") == 2
    err = capsys.readouterr().err
    assert "--fp16 and --bf16 exclude each other" in err, err
    assert not (tmp_path / "run").exists()
