"""2 gloo processes: the training loop stopped and resumed gives the uninterrupted 2-process run's losses."""

import contextlib
import importlib.util
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from m3embed.report import PLOT_FILE
from m3embed.testing import sample_texts, tiny_model
from m3embed.train import LOG_FILE, RunConfig, read_log, train

WORLD, B, G, STEPS, KILL_AT = 2, 2, 3, 4, 2  # B queries per rank; global batch 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Killed(Exception):
    pass


def config(model_dir, data, out, **train_kw) -> RunConfig:
    return RunConfig.from_dict(
        {
            "train": {
                "model_name_or_path": model_dir,
                "output_dir": out,
                "max_steps": STEPS,
                "learning_rate": 1e-3,
                "warmup_steps": 1,
                "progress_bar": False,
                "threads": 1,
                **train_kw,
            },
            "data": {"train_data": data, "train_group_size": G, "batch_size": B},
            "memory": {"strategy": "cache", "sub_batch_size": 2},
        }
    )


def worker(rank, port, model_dir, data, tmp):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    from m3embed import distributed

    distributed.init_from_env(timeout_s=60, backend="gloo")  # one group for the three runs below
    try:
        full = train(config(model_dir, data, f"{tmp}/full"))

        def kill(step, metrics):
            if step == KILL_AT:
                raise Killed

        with contextlib.suppress(Killed):
            train(config(model_dir, data, f"{tmp}/killed", save_steps=KILL_AT), on_step=kill)
        resumed = train(config(model_dir, data, f"{tmp}/killed", save_steps=KILL_AT, resume="latest"))
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"full": full.losses, "resumed": resumed.losses}, f)
        torch.distributed.barrier()  # both ranks done before either tears gloo down
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_resume_equals_uninterrupted(tmp_path):
    model_dir = str(tmp_path / "model")
    tiny_model("xlmr", dropout=0.1, seed=0).save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    queries = sample_texts(12, seed=0, min_words=2, max_words=8)
    passages = sample_texts(48, seed=1, min_words=5, max_words=30)
    data.write_text(
        "".join(
            json.dumps({"query": q, "pos": [passages[4 * i]], "neg": passages[4 * i + 1 : 4 * i + 4]}) + "\n"
            for i, q in enumerate(queries)
        )
    )
    mp.spawn(worker, args=(free_port(), model_dir, str(data), str(tmp_path)), nprocs=WORLD, join=True)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    full = ranks[0]["full"]
    assert len(full) == STEPS
    for r in ranks:  # the loss is the global batch's: the same on every rank
        torch.testing.assert_close(r["full"], full, rtol=1e-5, atol=0)
        torch.testing.assert_close(r["resumed"], full[KILL_AT:], rtol=1e-5, atol=0)
    logged = read_log(tmp_path / "killed" / LOG_FILE)
    torch.testing.assert_close([e["loss"] for e in logged if "loss" in e], full, rtol=1e-5, atol=0)
    assert not (tmp_path / "full" / "rank1").exists()  # only rank 0 writes
    plot = [PLOT_FILE] if importlib.util.find_spec("matplotlib") else []  # drawn by rank 0 only too
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "checkpoint-4",
        "latest",
        LOG_FILE,
        *plot,
    ]
