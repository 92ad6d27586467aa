"""`m3embed score` and `m3embed mine`'s filters as a user types them: the same files as the Python
functions, the counts printed, and bad input as one line on stderr with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3embed.cli import main
from m3embed.mine import MineOptions, mine_hard_negatives
from m3embed.model import M3Model
from m3embed.teacher import ScoreOptions, score_training_file
from m3embed.testing import sample_texts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = (0.4, 0.2, 0.4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model, a 30-document corpus and a 6-line training file (query = start of its positive)."""
    root = tmp_path_factory.mktemp("cli_mining")
    tiny_model("xlmr", seed=3).save_pretrained(root / "model")
    docs = sample_texts(30, seed=1, min_words=8)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    lines = [
        {
            "query": " ".join(docs[4 * i].split()[:5]),
            "pos": [docs[4 * i]],
            "neg": docs[4 * i + 1 : 4 * i + 1 + i % 3],
        }
        for i in range(6)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def model(folder: Path) -> M3Model:
    return M3Model.from_pretrained(folder / "model", device="cpu")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_score_command_writes_the_python_functions_file(
    folder: Path, model: M3Model, tmp_path, capsys
) -> None:
    out = tmp_path / "scored.jsonl"
    argv = ["score", str(folder / "train.jsonl"), "--teacher", str(folder / "model"), "-o", str(out)]
    assert main([*argv, "--mode", "sparse+dense", "--chunk-lines", "4", "--no-progress"]) == 0
    assert f"wrote {out}: 6 lines, 6 scored, 0 kept" in capsys.readouterr().out
    options = ScoreOptions(mode="sparse+dense", chunk_lines=4)
    score_training_file(model, folder / "train.jsonl", tmp_path / "python.jsonl", options)
    assert out.read_bytes() == (tmp_path / "python.jsonl").read_bytes()
    for r in rows(out):  # and the scores are compute_score's
        want = model.compute_score(
            [(r["query"], p) for p in r["pos"] + r["neg"]], weights_for_different_modes=WEIGHTS
        )
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want["sparse+dense"], rtol=0, atol=1e-5)
    # A rerun keeps every scored line as it is, unless --overwrite-scores.
    again = tmp_path / "again.jsonl"
    assert (
        main(["score", str(out), "--teacher", str(folder / "model"), "-o", str(again), "--no-progress"]) == 0
    )
    assert "6 lines, 0 scored, 6 kept" in capsys.readouterr().out
    assert again.read_bytes() == out.read_bytes()


def test_score_reads_and_writes_gzip(folder: Path, tmp_path, capsys) -> None:
    import gzip

    plain = (folder / "train.jsonl").read_bytes()
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(plain))
    model = str(folder / "model")
    for name in ("a.jsonl", "b.jsonl.gz"):
        argv = ["score", str(tmp_path / "train.jsonl.gz"), "--teacher", model, "-o", str(tmp_path / name)]
        assert main([*argv, "--mode", "dense", "--no-progress"]) == 0
    assert gzip.decompress((tmp_path / "b.jsonl.gz").read_bytes()) == (tmp_path / "a.jsonl").read_bytes()
    assert len(rows(tmp_path / "a.jsonl")) == 6


def test_mine_command_filters_counts_and_writes_scores(
    folder: Path, model: M3Model, tmp_path, capsys
) -> None:
    out = tmp_path / "mined.jsonl"
    argv = ["mine", str(folder / "model"), str(folder / "train.jsonl"), str(folder / "corpus.jsonl")]
    flags = ["--output", str(out), "--range", "0", "20", "--negatives", "4", "--mode", "sparse"]
    flags += [
        "--relative-margin",
        "0.2",
        "--write-scores",
        "--no-progress",
        "--index-dir",
        str(tmp_path / "ix"),
    ]
    assert main([*argv, *flags]) == 0
    printed = capsys.readouterr().out
    options = MineOptions(
        rank_range=(0, 20), negatives=4, mode="sparse", relative_margin=0.2, write_scores=True
    )
    counts = mine_hard_negatives(
        model,
        folder / "train.jsonl",
        folder / "corpus.jsonl",
        tmp_path / "py.jsonl",
        options,
        index_dir=tmp_path / "ix",
    )
    assert out.read_bytes() == (tmp_path / "py.jsonl").read_bytes()
    drops = ", ".join(
        f"{counts[f'dropped_{rule}']} by {rule}"
        for rule in ("max_score", "absolute_margin", "relative_margin")
    )
    assert f"wrote {out}: 6 lines, 0 padded with random documents; candidates dropped: {drops}" in printed
    for r in rows(out):  # the written scores obey the rule, checked against compute_score
        want = model.compute_score(
            [(r["query"], p) for p in r["pos"] + r["neg"]], weights_for_different_modes=WEIGHTS
        )
        torch.testing.assert_close(r["pos_scores"] + r["neg_scores"], want["sparse"], rtol=0, atol=1e-5)
        assert all(s <= 0.8 * min(r["pos_scores"]) + 1e-5 for s in r["neg_scores"]), r


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--relative-margin", "1"], "--relative-margin must be in [0, 1), got 1.0"),
        (["--relative-margin", "-0.1"], "--relative-margin must be in [0, 1), got -0.1"),
        (["--absolute-margin", "-1"], "--absolute-margin must be ≥ 0, got -1.0"),
        (["--weights", "0", "0", "0"], "--weights must be 3 non-negative numbers, not all 0"),
        (["--range", "40", "60"], "--range starts at rank 40 but"),
    ],
)
def test_bad_mine_flags_are_one_line_errors(folder: Path, tmp_path, capsys, extra, message) -> None:
    argv = ["mine", str(folder / "model"), str(folder / "train.jsonl"), str(folder / "corpus.jsonl")]
    assert main([*argv, "--output", str(tmp_path / "o.jsonl"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m3embed mine: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_score_input_is_one_line_errors(folder: Path, tmp_path, capsys) -> None:
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hi")
    mismatched = tmp_path / "mismatched.jsonl"
    mismatched.write_text(
        '{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [0.5]}\n'
    )
    model, train = str(folder / "model"), str(folder / "train.jsonl")
    cases = [
        ([train, "--teacher", str(neither)], "neither: not a teacher folder"),
        ([str(mismatched), "--teacher", model], "line 1, field 'neg_scores': has 1 scores but 'neg' has 2"),
        ([str(tmp_path / "missing.jsonl"), "--teacher", model], "missing.jsonl"),
        (
            [train, "--teacher", model, "--weights", "1", "-1", "0"],
            "--weights must be 3 non-negative numbers",
        ),
        ([train, "--teacher", model, "--chunk-lines", "0"], "--chunk-lines must be ≥ 1, got 0"),
    ]
    for args, message in cases:
        assert main(["score", *args, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("m3embed score: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o.jsonl").exists()
