"""New heads: their starting weights (m3embed.heads) and their optimiser groups, through train()."""

import numpy as np
import pytest
import torch

from m3embed import checkpoint as ckpt
from m3embed import heads
from m3embed.data import DataConfig, TrainDataset
from m3embed.model import COLBERT_FILE, SPARSE_FILE, M3Config, M3Model
from m3embed.testing import sample_texts, tiny_model
from m3embed.train import NEW_HEAD_LR_SCALE, OPTIMIZER_GROUPS, train
from m3embed.train.optim import build_optimizer as _optimizer
from test_train import Killed, kill_at, run_config, write_lines

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """An encoder without BGE-M3 head files, like all-MiniLM-L6-v2 or any Hugging Face encoder."""
    path = tmp_path_factory.mktemp("bare") / "model"
    tiny_model("bert", dropout=0.1, seed=0).save_pretrained(path)
    (path / SPARSE_FILE).unlink()
    (path / COLBERT_FILE).unlink()
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("data") / "train.jsonl")


def dataset(path):
    return TrainDataset(DataConfig(train_data=path, train_group_size=3, batch_size=4))


def head_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("sparse_", "colbert_"))}


# ---------------------------------------------------------------------- initialisation
def test_new_heads_are_known_and_loaded_heads_are_not(tmp_path, bare_model_dir):
    assert M3Model.from_pretrained(bare_model_dir).new_heads == {"sparse", "colbert"}
    full = tmp_path / "full"
    tiny_model("bert").save_pretrained(full)
    assert M3Model.from_pretrained(full).new_heads == set()


def test_head_init_is_deterministic_under_the_seed(bare_model_dir, data_file):
    data = dataset(data_file)

    def initialised(seed):
        torch.manual_seed(123)  # the random init the encoder-based one replaces must not matter
        model = M3Model.from_pretrained(bare_model_dir)
        heads.init_new_heads(model, data, seed, max_length=64, sample_lines=8)  # of 16
        return head_state(model)

    a, b, other = initialised(0), initialised(0), initialised(1)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the seed picks the texts the sparse head is fitted on; the ColBERT identity needs none
    assert not torch.equal(a["sparse_linear.weight"], other["sparse_linear.weight"])
    assert torch.equal(a["colbert_linear.weight"], torch.eye(32))
    assert torch.equal(a["colbert_linear.bias"], torch.zeros(32))


def test_colbert_head_of_another_size_starts_semi_orthogonal():
    model = tiny_model("bert", config=M3Config(colbert_dim=16))
    heads.init_colbert_head(model.colbert_linear)
    w = model.colbert_linear.weight.detach()  # (16, 32): orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)


def test_sparse_head_is_the_least_squares_fit_of_sqrt_idf():
    """The fitted head solves the same regression as a dense least-squares solve over every token
    state, to sqrt(BM25 idf / Z) with Z the queries' mean Σ idf."""
    torch.manual_seed(0)
    model = tiny_model("bert", hidden=32)
    docs = sample_texts(60, seed=3, min_words=5, max_words=20)
    queries = sample_texts(10, seed=4, min_words=2, max_words=6)
    fit = heads.fit_sparse_head(model, queries, docs, max_length=32, fit_documents=60, ridge=1e-6)

    # the same regression, built naively: every non-special token state of every document
    special = set(model.special_ids.tolist())
    ids = [
        np.array([t for t in row if t not in special])
        for row in model.tokenizer(docs, truncation=True, max_length=32)["input_ids"]
    ]
    doc_freq = np.zeros(len(model.tokenizer))
    for row in ids:
        doc_freq[np.unique(row)] += 1
    idf = heads.bm25_idf(doc_freq, len(docs))
    scale = np.mean([idf[np.unique(row)].sum() for row in heads._token_ids(model, queries, 32, special)])
    assert fit.idf_scale == pytest.approx(scale)
    model.eval()
    with torch.no_grad():
        batch = model.tokenize(docs, 32)
        states = model.backbone(**batch).last_hidden_state
        keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], model.special_ids)
        h = torch.cat([states[keep].double(), torch.ones(int(keep.sum()), 1, dtype=torch.float64)], 1)
        y = torch.from_numpy(np.sqrt(idf / scale))[batch["input_ids"][keep]]
        want = torch.linalg.lstsq(h, y[:, None]).solution[:, 0]
        got = torch.cat([model.sparse_linear.weight[0], model.sparse_linear.bias]).double()
        pred_want, pred_got = h @ want, h @ got
    # least squares optimality (the head is stored in fp32, so compare the objective, not the weights)
    mse_got, mse_want = float(((pred_got - y) ** 2).mean()), float(((pred_want - y) ** 2).mean())
    assert mse_got <= mse_want * 1.01 + 1e-9, f"mean squared error {mse_got} vs lstsq's {mse_want}"
    assert mse_got < float(y.var()), f"no better than the mean: {mse_got} vs variance {float(y.var())}"
    assert fit.fitted_tokens == int(keep.sum()) and 0 < fit.r2 <= 1


# ---------------------------------------------------------------------- optimiser groups
def groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def test_groups_get_the_configured_rates_and_decay(tmp_path, bare_model_dir, data_file):
    config = run_config(
        bare_model_dir,
        data_file,
        tmp_path / "out",
        max_steps=1,
        warmup_steps=0,
        learning_rate=1e-4,
        head_learning_rate=3e-3,
        weight_decay=0.05,
        head_weight_decay=0.2,
    )
    model = M3Model.from_pretrained(bare_model_dir)
    opt = groups(_optimizer(model, config.train))
    assert list(opt) == list(OPTIMIZER_GROUPS)
    assert {n: (g["lr"], g["weight_decay"]) for n, g in opt.items()} == {
        "encoder": (1e-4, 0.05),
        "encoder_no_decay": (1e-4, 0.0),
        "heads": (3e-3, 0.2),
        "heads_no_decay": (3e-3, 0.0),
    }
    head_ids = {id(p) for h in (model.sparse_linear, model.colbert_linear) for p in h.parameters()}
    assert {id(p) for g in ("heads", "heads_no_decay") for p in opt[g]["params"]} == head_ids
    assert sum(len(g["params"]) for g in opt.values()) == len(list(model.parameters()))


def test_head_rate_defaults_to_a_multiple_for_new_heads_and_the_encoders_for_loaded_ones(
    tmp_path, bare_model_dir, data_file
):
    config = run_config(bare_model_dir, data_file, tmp_path / "out", learning_rate=1e-4)
    new = groups(_optimizer(M3Model.from_pretrained(bare_model_dir), config.train))
    assert new["heads"]["lr"] == pytest.approx(NEW_HEAD_LR_SCALE * 1e-4) and new["encoder"]["lr"] == 1e-4
    full = tmp_path / "full"
    tiny_model("bert").save_pretrained(full)
    loaded = groups(_optimizer(M3Model.from_pretrained(full), config.train))
    assert loaded["heads"]["lr"] == 1e-4  # FlagEmbedding's behaviour for trained BGE-M3 heads


def test_resume_restores_the_groups_exactly(tmp_path, bare_model_dir, data_file):
    """A run whose heads started new, stopped and resumed (its checkpoint then has head files, so the
    default rule alone would give the heads the encoder's rate): the groups equal the uninterrupted
    run's, and so do the losses."""
    kw = dict(learning_rate=1e-3, save_steps=3)
    full = train(run_config(bare_model_dir, data_file, tmp_path / "full", **kw))
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(run_config(bare_model_dir, data_file, out, **kw), on_step=kill_at(4))
    resumed = train(run_config(bare_model_dir, data_file, out, resume="latest", **kw))
    torch.testing.assert_close(resumed.losses, full.losses[3:], rtol=1e-5, atol=0)

    def saved_groups(path):
        state = ckpt.load_training_state(path)
        return [{k: v for k, v in g.items() if k != "params"} for g in state["optimizer"]["param_groups"]]

    assert saved_groups(resumed.checkpoint) == saved_groups(full.checkpoint)
    assert saved_groups(full.checkpoint)[2]["initial_lr"] == pytest.approx(NEW_HEAD_LR_SCALE * 1e-3)


def test_resuming_a_checkpoint_with_the_old_two_groups_is_refused_with_a_message(
    tmp_path, bare_model_dir, data_file
):
    out = tmp_path / "old"
    train(run_config(bare_model_dir, data_file, out, max_steps=2, save_steps=2))
    optimizer_file = ckpt.list_checkpoints(out)[-1] / ckpt.OPTIMIZER
    state = torch.load(optimizer_file, weights_only=True)
    state["param_groups"] = state["param_groups"][:2]  # as m3embed wrote it before the head groups
    torch.save(state, optimizer_file)
    with pytest.raises(ValueError, match="2 parameter groups.*cannot be resumed"):
        train(run_config(bare_model_dir, data_file, out, max_steps=4, resume="latest"))
