"""Teacher scores (m3embed.teacher): equal to compute_score / CrossEncoder.predict, resumable to the byte,
kept unless overwritten, bad lines and folders named; and a training run that learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3embed.model import M3Model
from m3embed.scores import MODES
from m3embed.teacher import ScoreOptions, load_teacher, score_training_file
from m3embed.testing import sample_texts, tiny_decoder, tiny_model, tiny_tokenizer

WEIGHTS = (0.4, 0.2, 0.4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(xlmr_tokenizer) -> M3Model:
    return tiny_model("xlmr", tokenizer=xlmr_tokenizer, seed=3)


def write_train(path: Path, n: int = 7, seed: int = 0) -> Path:
    """``n`` lines of 1 or 2 positives and 0 to 3 negatives (a blank line in the middle)."""
    queries = sample_texts(n, seed=seed, max_words=6)
    passages = sample_texts(5 * n, seed=seed + 1, min_words=3, max_words=25)
    lines = []
    for i, q in enumerate(queries):
        lines.append(
            json.dumps(
                {
                    "query": q,
                    "pos": passages[5 * i : 5 * i + 1 + i % 2],
                    "neg": passages[5 * i + 2 : 5 * i + 2 + i % 4],
                    "id": i,
                }
            )
        )
        if i == 2:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("mode", ["dense", "sparse", "colbert", "colbert+sparse+dense"])
def test_written_scores_equal_compute_score(teacher: M3Model, tmp_path: Path, mode: str) -> None:
    train = write_train(tmp_path / "train.jsonl")
    options = ScoreOptions(mode=mode, weights=WEIGHTS, batch_size=4, chunk_lines=3)
    counts = score_training_file(teacher, train, tmp_path / "scored.jsonl", options)
    assert counts == {"lines": 7, "scored": 7, "kept": 0, "chunks": 3, "reused_chunks": 0}
    out = rows(tmp_path / "scored.jsonl")
    assert [r["id"] for r in out] == list(range(7))
    for r in out:
        want = teacher.compute_score(
            [(r["query"], p) for p in r["pos"] + r["neg"]], weights_for_different_modes=WEIGHTS
        )
        assert len(r["pos_scores"]) == len(r["pos"]) and len(r["neg_scores"]) == len(r["neg"])
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want[mode], rtol=0, atol=1e-5)
    assert mode in MODES and not (tmp_path / "scored.jsonl.parts").exists()


def test_cross_encoder_teacher_scores_equal_predict(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer("bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "ce"
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ce = load_teacher(folder)
    assert isinstance(ce, st.CrossEncoder)

    train = write_train(tmp_path / "train.jsonl")
    score_training_file(ce, train, tmp_path / "scored.jsonl", ScoreOptions(batch_size=3, chunk_lines=4))
    for r in rows(tmp_path / "scored.jsonl"):
        want = ce.predict([(r["query"], p) for p in r["pos"] + r["neg"]], show_progress_bar=False)
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want.tolist(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"--query-instruction\) is for an embedding-model teacher"):
        score_training_file(
            ce, train, tmp_path / "x.jsonl", ScoreOptions(query_instruction_for_retrieval="Find: ")
        )
    assert not (tmp_path / "x.jsonl").exists()


def test_a_query_instruction_scores_the_queries_as_the_model_reads_them(tmp_path: Path) -> None:
    """A decoder-only teacher reads its queries with their instruction (as encode_queries and search
    do); the scores written are those of the instructed query, in the given format."""
    teacher = tiny_decoder("qwen3")
    train = write_train(tmp_path / "train.jsonl")
    options = ScoreOptions(
        mode="dense",
        batch_size=4,
        query_instruction_for_retrieval="Find",
        query_instruction_format="{}: {}",
    )
    score_training_file(teacher, train, tmp_path / "scored.jsonl", options)
    moved = 0.0
    for r in rows(tmp_path / "scored.jsonl"):
        pairs = r["pos"] + r["neg"]
        want = teacher.compute_score([("Find: " + r["query"], p) for p in pairs])["dense"]
        plain = teacher.compute_score([(r["query"], p) for p in pairs])["dense"]
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want, rtol=0, atol=1e-5)
        moved = max(moved, *(abs(a - b) for a, b in zip(want, plain)))
    assert moved > 1e-3, f"the instruction should change the scores; largest change {moved}"
    with pytest.raises(ValueError, match=r"ScoreOptions\.query_instruction_format must contain two"):
        ScoreOptions(query_instruction_for_retrieval="Find", query_instruction_format="{}")


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_byte_identical_file(teacher: M3Model, tmp_path: Path) -> None:
    train = write_train(tmp_path / "train.jsonl", n=9)
    options = ScoreOptions(batch_size=4, chunk_lines=3)
    full = tmp_path / "full.jsonl"
    score_training_file(teacher, train, full, options)

    out = tmp_path / "resumed.jsonl"

    def die_after_first(k: int) -> None:
        if k == 0:
            raise Killed

    with pytest.raises(Killed):
        score_training_file(teacher, train, out, options, on_chunk=die_after_first)
    assert not out.exists() and len(list((tmp_path / "resumed.jsonl.parts").glob("part-*"))) == 1
    done: list[int] = []
    counts = score_training_file(teacher, train, out, options, on_chunk=done.append)
    assert counts["reused_chunks"] == 1 and done == [1, 2, 3]  # 10 lines (one blank): chunk 0 not redone
    assert out.read_bytes() == full.read_bytes()
    assert not (tmp_path / "resumed.jsonl.parts").exists()

    # A changed line invalidates its own chunk only; another teacher invalidates every chunk.
    with pytest.raises(Killed):
        score_training_file(teacher, train, out, options, on_chunk=lambda k: k == 1 and die_after_first(0))
    lines = train.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace('"id": 3', '"id": 33')  # line 5: chunk 1
    train.write_text("".join(lines))
    done.clear()
    score_training_file(teacher, train, out, options, on_chunk=done.append)
    assert done == [1, 2, 3] and rows(out)[3]["id"] == 33
    done.clear()
    score_training_file(
        tiny_model("xlmr", tokenizer=teacher.tokenizer, seed=4), train, out, options, on_chunk=done.append
    )
    assert done == [0, 1, 2, 3]


def test_scored_lines_are_kept_unless_overwrite(teacher: M3Model, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    kept_line = (
        '{"query": "a tool", "pos": ["p one"], "neg": ["n one"], "pos_scores": [9], "neg_scores": [1.5]}\n'
    )
    train.write_text(kept_line + '{"query": "a library", "pos": ["p two"], "neg": ["n two", "n three"]}\n')
    counts = score_training_file(teacher, train, tmp_path / "out.jsonl")
    assert (counts["scored"], counts["kept"]) == (1, 1)
    lines = (tmp_path / "out.jsonl").read_text().splitlines(keepends=True)
    assert lines[0] == kept_line and len(json.loads(lines[1])["neg_scores"]) == 2

    score_training_file(teacher, train, tmp_path / "over.jsonl", ScoreOptions(overwrite_scores=True))
    first = rows(tmp_path / "over.jsonl")[0]
    want = teacher.compute_score(
        [("a tool", "p one"), ("a tool", "n one")], weights_for_different_modes=WEIGHTS
    )
    torch.testing.assert_close(
        first["pos_scores"] + first["neg_scores"], want["colbert+sparse+dense"], rtol=0, atol=1e-5
    )


def test_mismatched_score_count_names_file_line_and_field(teacher: M3Model, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(
        '{"query": "q", "pos": ["p"], "neg": ["n"]}\n'
        '{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [0.5]}\n'
    )
    with pytest.raises(
        ValueError, match=r"train\.jsonl, line 2, field 'neg_scores': has 1 scores but 'neg' has 2"
    ):
        score_training_file(teacher, train, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.parts").exists()


def test_load_teacher_tells_the_folders_apart(teacher: M3Model, tmp_path: Path) -> None:
    teacher.save_pretrained(tmp_path / "m3")
    assert isinstance(load_teacher(tmp_path / "m3"), M3Model)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.txt").write_text("hi")
    with pytest.raises(
        ValueError, match=r"neither: not a teacher folder; expected a cross-encoder .* or an encoder"
    ):
        load_teacher(tmp_path / "neither")


def test_training_on_a_scored_file_learns_from_the_teacher(teacher: M3Model, tmp_path: Path) -> None:
    from m3embed.train import LOG_FILE, read_log, train
    from test_train import run_config, write_lines

    model_dir = tmp_path / "model"
    tiny_model("xlmr", seed=0).save_pretrained(model_dir)
    plain = write_lines(tmp_path / "train.jsonl")
    scored = tmp_path / "scored.jsonl"
    score_training_file(teacher, plain, scored, ScoreOptions(chunk_lines=8))
    kw = {"max_steps": 2, "save_steps": 0}
    train(run_config(str(model_dir), plain, tmp_path / "plain", **kw))
    train(run_config(str(model_dir), str(scored), tmp_path / "kd", **kw))
    plain_log = [e for e in read_log(tmp_path / "plain" / LOG_FILE) if "loss" in e]
    kd_log = [e for e in read_log(tmp_path / "kd" / LOG_FILE) if "loss" in e]
    assert len(kd_log) == 2
    # With teacher scores each contrastive part is the KD loss (m3_kd_loss, the default), so the same
    # first batch gives other dense/sparse/colbert/ensemble values ...
    for part in ("dense", "sparse", "colbert", "ensemble"):
        assert abs(kd_log[0][part] - plain_log[0][part]) > 1e-6, part
    # ... and the log names the teacher's share: with m3_kd_loss all of the contrastive terms, weighted.
    from m3embed.losses import LossConfig

    c = LossConfig()
    assert all("kd" in e for e in kd_log) and not any("kd" in e for e in plain_log)
    for e in kd_log:
        weighted = (
            c.dense_loss_weight * e["dense"]
            + c.ensemble_loss_weight * e["ensemble"]
            + c.sparse_loss_weight * e["sparse"]
            + c.colbert_loss_weight * e["colbert"]
        ) / c.contrastive_normalizer
        assert abs(e["kd"] - weighted) <= 1e-5 * max(1.0, abs(weighted)), (e["kd"], weighted)


SCORE_SCRIPT = """
import sys
from m3embed.distributed import leave_now, process_group
from m3embed.model import M3Model
from m3embed.teacher import ScoreOptions, score_training_file

with process_group() as ranks:
    done = []
    model = M3Model.from_pretrained(sys.argv[1])
    score_training_file(model, sys.argv[2], sys.argv[3], ScoreOptions(chunk_lines=2), ranks=ranks, on_chunk=done.append)
    with open(f"{sys.argv[3]}.rank{ranks.rank}", "w") as f:  # not stdout: the ranks' prints interleave
        f.write(" ".join(map(str, done)))
leave_now(0)  # what the m3embed command does on a torchrun rank (gloo's teardown can abort)
"""


def test_two_processes_share_the_chunks_and_write_the_one_process_file(
    teacher: M3Model, tmp_path: Path
) -> None:
    from test_encode_distributed import _run, _torchrun

    teacher.save_pretrained(
        tmp_path / "m3"
    )  # one tokenizer for every process (training one is not repeatable)
    train = write_train(tmp_path / "train.jsonl", n=8)  # 9 lines with the blank one: chunks 0..4
    score_training_file(
        M3Model.from_pretrained(tmp_path / "m3"), train, tmp_path / "one.jsonl", ScoreOptions(chunk_lines=2)
    )
    (tmp_path / "score.py").write_text(SCORE_SCRIPT)
    _run(
        _torchrun(
            str(tmp_path / "m3"), str(train), str(tmp_path / "two.jsonl"), script=tmp_path / "score.py"
        ),
        tmp_path,
    )
    done = [(tmp_path / f"two.jsonl.rank{rank}").read_text() for rank in (0, 1)]
    assert done == ["0 2 4", "1 3"]  # chunks dealt out in turn
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
