"""Mining filters (m3embed.mine): the margins and max score against the positive's score, checked with
an independent computation (compute_score on the pairs); drop counts; short lines; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3embed.mine import MineOptions, mine_hard_negatives
from m3embed.model import M3Model
from m3embed.search import Searcher, SearchOptions
from m3embed.testing import sample_texts, tiny_decoder, tiny_model

WEIGHTS = (0.4, 0.2, 0.4)
N_DOCS, N_LINES = 40, 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(xlmr_tokenizer) -> M3Model:
    return tiny_model("xlmr", tokenizer=xlmr_tokenizer, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 documents; 8 lines whose query is the start of its first positive (odd lines: 2 positives),
    so the positives share tokens with the query and sparse scores separate them from the rest."""
    folder = tmp_path_factory.mktemp("mine")
    docs = sample_texts(N_DOCS, seed=1, min_words=8)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    lines = [
        {
            "query": " ".join(docs[3 * i].split()[:5]),
            "pos": [docs[3 * i]] + ([docs[3 * i + 1]] if i % 2 else []),
        }
        for i in range(N_LINES)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scores(model: M3Model, query: str, passages: list[str], mode: str) -> list[float]:
    """The independent computation: FlagEmbedding's compute_score on the pairs."""
    return model.compute_score([(query, p) for p in passages], weights_for_different_modes=WEIGHTS)[mode]


def test_relative_margin_keeps_negatives_below_the_positive_and_counts_drops(
    model: M3Model, data: Path, tmp_path: Path
) -> None:
    mode, margin = "sparse+dense", 0.1
    options = MineOptions(
        rank_range=(0, 20), negatives=5, mode=mode, weights=WEIGHTS, relative_margin=margin, write_scores=True
    )
    out = tmp_path / "mined.jsonl"
    counts = mine_hard_negatives(
        model, data / "train.jsonl", data / "corpus.jsonl", out, options, index_dir=tmp_path / "ix"
    )
    rows = read_rows(out)
    searcher = Searcher(
        tmp_path / "ix", model, SearchOptions(top_k=20, weights=WEIGHTS, query_max_length=128)
    )
    run = searcher.search([r["query"] for r in rows], mode)
    texts = {f"d{i}": t for i, t in enumerate(line["text"] for line in read_rows(data / "corpus.jsonl"))}
    expected_drops = 0
    for i, r in enumerate(rows):
        positive = min(scores(model, r["query"], r["pos"], mode))  # several positives: the lowest
        limit = (1 - margin) * positive
        torch.testing.assert_close(
            r["pos_scores"], scores(model, r["query"], r["pos"], mode), rtol=0, atol=1e-5
        )
        if r["neg"]:
            independent = scores(model, r["query"], r["neg"], mode)
            torch.testing.assert_close(r["neg_scores"], independent, rtol=0, atol=1e-5)
            assert max(independent) <= limit + 1e-5
        candidates = {texts[d] for d, _ in run[str(i)]} - set(r["pos"])
        expected_drops += sum(s > limit for s in scores(model, r["query"], sorted(candidates), mode))
    short = [r for r in rows if len(r["neg"]) < 5]
    assert counts == {
        "lines": N_LINES,
        "padded": 0,  # no random fill-up when a filter is set
        "dropped_max_score": 0,
        "dropped_absolute_margin": 0,
        "dropped_relative_margin": expected_drops,
        "short": len(short),
        "no_negatives": sum(not r["neg"] for r in short),
    }
    assert expected_drops > 0 and 0 < len(short) < N_LINES


def test_absolute_margin_and_max_score_are_counted_under_the_first_rule(
    model: M3Model, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mined.jsonl"
    options = MineOptions(rank_range=(0, 20), negatives=5, mode="sparse", absolute_margin=0.2)
    counts = mine_hard_negatives(model, data / "train.jsonl", data / "corpus.jsonl", out, options)
    for r in read_rows(out):
        if r["neg"]:
            positive = min(scores(model, r["query"], r["pos"], "sparse"))
            assert max(scores(model, r["query"], r["neg"], "sparse")) <= positive - 0.2 + 1e-5
    assert counts["dropped_absolute_margin"] > 0 and counts["dropped_max_score"] == 0

    # Every candidate scores above -1: all dropped by max_score (checked first), none left, none padded.
    options = MineOptions(rank_range=(0, 20), negatives=5, mode="sparse", absolute_margin=0.2, max_score=-1.0)
    counts = mine_hard_negatives(model, data / "train.jsonl", data / "corpus.jsonl", out, options)
    assert all(r["neg"] == [] for r in read_rows(out))
    assert counts["dropped_max_score"] > 0 and counts["dropped_absolute_margin"] == 0
    assert counts["short"] == counts["no_negatives"] == N_LINES and counts["padded"] == 0


def test_without_filters_fill_up_stays_and_written_scores_cover_it(
    model: M3Model, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mined.jsonl"
    options = MineOptions(rank_range=(36, 40), negatives=6, mode="dense", write_scores=True)
    counts = mine_hard_negatives(model, data / "train.jsonl", data / "corpus.jsonl", out, options)
    assert counts == {"lines": N_LINES, "padded": N_LINES}  # the summary of old, unchanged
    for r in read_rows(out):
        assert len(r["neg"]) == 6
        torch.testing.assert_close(
            r["neg_scores"], scores(model, r["query"], r["neg"], "dense"), rtol=0, atol=1e-5
        )


def test_with_an_instruction_every_written_score_is_of_the_instructed_query(
    data: Path, tmp_path: Path
) -> None:
    """The search ranks the instructed query; the positives' scores (which the filters compare with)
    and the fill-ups' scores must score that same text, not the bare query. A decoder-only model (whose
    last-token vector an instruction moves; a tiny random encoder's CLS vector barely does)."""
    model = tiny_decoder("qwen3")
    out = tmp_path / "mined.jsonl"
    options = MineOptions(
        rank_range=(30, 40),
        negatives=12,
        mode="dense",
        write_scores=True,
        query_instruction_for_retrieval="Find",
        query_instruction_format="{}: {}",
    )
    mine_hard_negatives(model, data / "train.jsonl", data / "corpus.jsonl", out, options)
    moved = 0.0
    for r in read_rows(out):
        assert not r["query"].startswith("Find: "), "the line keeps its own query"
        want = scores(model, "Find: " + r["query"], r["pos"] + r["neg"], "dense")
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want, rtol=0, atol=1e-5)
        plain = scores(model, r["query"], r["pos"], "dense")
        moved = max(moved, *(abs(a - b) for a, b in zip(plain, r["pos_scores"])))
    assert moved > 1e-3, f"the instruction should change the positives' scores; largest change {moved}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"relative_margin": 1.0}, r"MineOptions\.relative_margin must be in \[0, 1\), got 1\.0"),
        ({"relative_margin": -0.1}, r"MineOptions\.relative_margin must be in \[0, 1\), got -0\.1"),
        ({"absolute_margin": -0.5}, r"MineOptions\.absolute_margin must be >= 0, got -0\.5"),
        ({"weights": (0, 0, 0)}, r"MineOptions\.weights must be 3 non-negative numbers"),
    ],
)
def test_bad_filter_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        MineOptions(**kwargs)
    assert "\n" not in str(err.value)


def test_a_range_past_the_corpus_is_an_error(model: M3Model, data: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"rank_range starts at rank 40 but .*corpus\.jsonl has 40 documents"
    ):
        mine_hard_negatives(
            model,
            data / "train.jsonl",
            data / "corpus.jsonl",
            tmp_path / "o.jsonl",
            MineOptions(rank_range=(40, 60)),
        )
    assert not (tmp_path / "o.jsonl").exists()
