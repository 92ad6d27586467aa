"""The data layer: validation errors name file/line/field, random access, group sampling, batching."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import pickle
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from m3embed.data import (
    BatchStream,
    DataConfig,
    DataError,
    SameDatasetBatchSampler,
    TrainBatch,
    TrainDataset,
    build_batch,
    build_group,
)

DEMO = Path(__file__).resolve().parents[1] / "src" / "m3embed" / "demo_data"


def ex(i: int, n_neg: int = 3, pos: str | None = None, **extra: Any) -> dict[str, Any]:
    """A valid example whose texts say where they come from."""
    return {"query": f"q{i}", "pos": [pos or f"p{i}"], "neg": [f"n{i}.{j}" for j in range(n_neg)], **extra}


def write(path: Path, lines: list[Any]) -> Path:
    """Write dicts as JSON lines and str/bytes as they are (for broken lines); gzip when path ends .gz."""
    data = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
        + b"\n"
        for line in lines
    )
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def load(path: Path | list[Path], **kw: Any) -> TrainDataset:
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return TrainDataset(DataConfig(train_data=paths, **kw))


# ---------------------------------------------------------------------- validation
BAD_LINES = [
    ("malformed_json", '{"query": "q", "pos": ["p"]', None),
    ("not_an_object", '["q", "p"]', None),
    ("missing_query", {"pos": ["p"], "neg": ["n"]}, "query"),
    ("empty_query", {"query": "  ", "pos": ["p"], "neg": ["n"]}, "query"),
    ("query_not_str", {"query": 3, "pos": ["p"], "neg": ["n"]}, "query"),
    ("missing_pos", {"query": "q", "neg": ["n"]}, "pos"),
    ("empty_pos", {"query": "q", "pos": [], "neg": ["n"]}, "pos"),
    ("pos_is_str", {"query": "q", "pos": "p", "neg": ["n"]}, "pos"),
    ("pos_item_not_str", {"query": "q", "pos": ["p", 7], "neg": ["n"]}, "pos"),
    ("pos_item_empty", {"query": "q", "pos": [""], "neg": ["n"]}, "pos"),
    ("neg_not_list", {"query": "q", "pos": ["p"], "neg": "n"}, "neg"),
    ("neg_item_not_str", {"query": "q", "pos": ["p"], "neg": ["n", None]}, "neg"),
    (
        "pos_scores_count",
        {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0], "neg_scores": [0.0]},
        "pos_scores",
    ),
    (
        "neg_scores_count",
        {"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1.0], "neg_scores": [0.0]},
        "neg_scores",
    ),
    ("scores_not_numbers", {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["high"]}, "pos_scores"),
    ("prompt_not_str", {"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 1}, "prompt"),
    ("not_utf8", b'{"query": "caf\xe9", "pos": ["p"], "neg": ["n"]}', None),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize(("case", "bad", "field"), BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_line_raises_with_file_line_and_field(tmp_path, suffix, case, bad, field):
    # Line 3 is bad; a blank line 2 still counts as a line for the number reported.
    path = write(tmp_path / f"d{suffix}", [ex(0), "", bad, ex(1)])
    with pytest.raises(DataError) as info:
        load(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert f"{path}, line 3" in str(err)
    if field:
        assert repr(field) in str(err)
    assert "skip_bad_lines" in str(err)  # says how to go on


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_skip_bad_lines_counts_logs_and_keeps_the_good_ones(tmp_path, suffix, caplog):
    bad = [b[1] for b in BAD_LINES]
    lines = [ex(0)] + bad + [ex(1), "   ", ex(2)]
    path = write(tmp_path / f"d{suffix}", lines)
    with caplog.at_level(logging.WARNING, logger="m3embed.data"):
        ds = load(path, skip_bad_lines=True)
    assert ds.num_skipped == len(bad) and ds.skipped == {path.name: len(bad)}
    assert f"skipped {len(bad)} bad line(s)" in caplog.text and "line 2" in caplog.text
    assert [ds[i]["query"] for i in range(len(ds))] == ["q0", "q1", "q2"]


def test_file_with_only_bad_lines_is_an_error_even_when_skipping(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"query": ', {"query": "q"}])
    with pytest.raises(DataError, match="no valid training lines .2 bad lines skipped"):
        load(path, skip_bad_lines=True)


def test_json_array_file_is_rejected_with_a_conversion_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ex(0), ex(1)], indent=1))
    with pytest.raises(DataError, match="JSON array.*jq") as info:
        load(path)
    assert info.value.line == 1


def test_truncated_gzip_is_a_data_error(tmp_path):
    path = write(tmp_path / "d.jsonl.gz", [ex(i, n_neg=50) for i in range(200)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot decompress") as info:
        load(path)
    assert info.value.path == str(path)


BAD_PATHS = [
    (lambda d: d / "missing.jsonl", "does not exist"),
    (lambda d: (d / "x.txt").write_text("{}") and d / "x.txt", "does not end in"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .jsonl"),
]
BAD_PATH_IDS = ["missing", "suffix", "empty_folder"]


@pytest.mark.parametrize(("make", "match"), BAD_PATHS, ids=BAD_PATH_IDS)
def test_bad_paths_are_data_errors(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        load(make(tmp_path))


def test_single_line_without_negatives_cannot_form_a_group(tmp_path):
    path = write(tmp_path / "d.jsonl", [ex(0, n_neg=0)])
    with pytest.raises(DataError, match="train_group_size=8") as info:
        load(path)
    assert info.value.field == "neg"
    assert len(load(path, train_group_size=1)) == 1


# ---------------------------------------------------------------------- random access
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_getitem_reads_the_indexed_line(tmp_path, suffix):
    lines = [ex(i, pos_scores=[1.0], neg_scores=[0.1, 0.2, 0.3], prompt="P: ") for i in range(5)]
    lines[2] = ex(2, n_neg=0)  # no neg at all: defaulted to []
    del lines[2]["neg"]
    raw = [*lines[:3], "", *lines[3:]]
    path = tmp_path / f"d{suffix}"
    write(path, raw)
    if suffix == ".json":  # a UTF-8 BOM at the start must not break line 1
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load(path)
    assert len(ds) == 5 and ds.names == [path.name]
    assert ds._files[0].offsets.dtype.name == "int64"
    for i in (4, 0, 2, 3, 1, -1):  # out of order: each access seeks
        expected = dict(lines[i], dataset=path.name)
        expected.setdefault("neg", [])
        assert ds[i] == expected
    with pytest.raises(IndexError):
        ds[5]


def test_gzip_copy_is_removed_with_the_dataset(tmp_path):
    ds = load(write(tmp_path / "d.jsonl.gz", [ex(0), ex(1)]), tmp_dir=str(tmp_path))
    copy = ds._files[0].read_path
    assert copy.parent == tmp_path and copy.exists() and ds[1]["query"] == "q1"
    ds.close()
    del ds
    gc.collect()
    assert not copy.exists()


def test_folder_and_several_paths_concatenate_files_in_order(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    write(folder / "b.jsonl.gz", [ex(10), ex(11)])
    write(folder / "a.jsonl", [ex(0), ex(1), ex(2)])
    (folder / "notes.txt").write_text("ignored")
    extra = write(tmp_path / "a.jsonl", [ex(20)])  # same file name as folder/a.jsonl
    ds = load([folder, extra])
    assert ds.file_ranges == [(0, 3), (3, 5), (5, 6)]
    assert ds.names == [str(folder / "a.jsonl"), "b.jsonl.gz", str(extra)]
    assert [ds[i]["query"] for i in range(6)] == ["q0", "q1", "q2", "q10", "q11", "q20"]
    assert [ds.file_index(i) for i in range(6)] == [0, 0, 0, 1, 1, 2]


def test_dataset_pickles_for_data_loader_workers(tmp_path):
    ds = load(write(tmp_path / "d.jsonl.gz", [ex(0), ex(1)]))
    ds[0]  # opens a handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[1] == ds[1]


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"train_group_size": 0}, "train_group_size.*0"),
        ({"batch_size": -2}, "batch_size.*-2"),
        ({"batch_size": True}, "batch_size.*True"),
        ({"seed": "7"}, "seed.*'7'"),
        ({"query_instruction": 5}, "query_instruction.*5"),
        ({"skip_bad_lines": "yes"}, "skip_bad_lines.*'yes'"),
        ({"length_buckets": {}}, "length_buckets"),
        ({"length_buckets": {"x": 4}}, "key 'x'"),
        ({"length_buckets": {0: 0}}, r"length_buckets\[0\].*0"),
        ({"train_data": 3}, "train_data.*int"),
    ],
)
def test_config_errors_name_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**{"train_data": "x.jsonl", **kw})


def test_config_normalises_and_round_trips():
    cfg = DataConfig(train_data=Path("a.jsonl"), length_buckets={"256": 4, "0": 16, 128: 8})
    assert cfg.train_data == ("a.jsonl",)
    assert list(cfg.length_buckets.items()) == [(0, 16), (128, 8), (256, 4)]
    saved = json.loads(json.dumps(cfg.to_dict()))  # JSON turns int keys into strings
    assert DataConfig.from_dict(saved) == cfg
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['batchsize'\\]"):
        DataConfig.from_dict({**saved, "batchsize": 3})


# ---------------------------------------------------------------------- groups and batches
@pytest.fixture
def scored(tmp_path) -> TrainDataset:
    # Scores identify passages: pos j of example i scores 100*i + j, neg j scores 10*i + j / 10.
    lines = []
    for i in range(6):
        pos = [f"p{i}.{j}" for j in range(3)]
        neg = [f"n{i}.{j}" for j in range(10)]
        lines.append(
            {"query": f"q{i}", "pos": pos, "neg": neg, "pos_scores": [100.0 * i + j for j in range(3)],
             "neg_scores": [10.0 * i + j / 10 for j in range(10)]}
        )  # fmt: skip
    return load(write(tmp_path / "scored.jsonl", lines))


def test_batch_layout_and_teacher_scores_follow_the_chosen_passages(scored):
    batch = build_batch(scored, [4, 1, 3], group_size=5, seed=0, epoch=0)
    assert isinstance(batch, TrainBatch) and batch.dataset == "scored.jsonl" and batch.indices == [4, 1, 3]
    assert batch.queries == ["q4", "q1", "q3"] and len(batch.passages) == 15
    assert batch.teacher_scores.shape == (3, 5) and batch.teacher_scores.dtype == torch.float32
    for row, i in enumerate([4, 1, 3]):
        group = batch.passages[row * 5 : (row + 1) * 5]
        assert group[0].startswith(f"p{i}.") and all(p.startswith(f"n{i}.") for p in group[1:])
        assert len(set(group[1:])) == 4  # enough negatives: drawn without replacement
        p = int(group[0].split(".")[1])
        expected = [100.0 * i + p] + [10.0 * i + int(n.split(".")[1]) / 10 for n in group[1:]]
        assert batch.teacher_scores[row].tolist() == pytest.approx(expected)


def test_groups_are_deterministic_in_seed_epoch_and_index(scored):
    def draw(idx: int, seed: int = 0, epoch: int = 0) -> list[str]:
        return build_group(scored, idx, 5, seed, epoch).passages

    assert draw(2) == draw(2)
    assert build_batch(scored, [0, 2], 5, 0, 0).passages[5:] == draw(2)  # batch company does not matter
    epochs = {tuple(draw(2, epoch=e)) for e in range(6)}
    seeds = {tuple(draw(2, seed=s)) for s in range(6)}
    assert len(epochs) > 1 and len(seeds) > 1


def test_too_few_negatives_repeat_evenly(tmp_path):
    ds = load(write(tmp_path / "d.jsonl", [ex(0, n_neg=3)]))
    for epoch in range(5):
        counts = Counter(build_group(ds, 0, 8, seed=1, epoch=epoch).passages[1:])  # 7 from 3 negatives
        assert set(counts) == {"n0.0", "n0.1", "n0.2"} and max(counts.values()) <= 3


def test_empty_neg_draws_other_positives_of_the_same_file(tmp_path):
    lines = [ex(i, n_neg=0, pos_scores=[1.0], neg_scores=[]) for i in range(4)]
    lines.append(ex(4, n_neg=0, pos="p0"))  # shares its positive with example 0
    other = write(tmp_path / "other.jsonl", [ex(9)])
    ds = load([write(tmp_path / "d.jsonl", lines), other])
    for epoch in range(4):
        group = build_group(ds, 0, 4, seed=3, epoch=epoch)
        assert group.passages[0] == "p0" and group.teacher_scores is None
        assert set(group.passages[1:]) <= {"p1", "p2", "p3"}  # never p0 (example 4), never other.jsonl
        assert len(set(group.passages[1:])) == 3  # enough other examples: distinct
    assert build_batch(ds, [0, 1], 2, 0, 0).teacher_scores is None


def test_query_instruction_and_prompt(tmp_path):
    ds = load(write(tmp_path / "d.jsonl", [ex(0), ex(1, prompt="Find the package: ")]))
    batch = build_batch(ds, [0, 1], 2, 0, 0, query_instruction="query: ")
    assert batch.queries == ["query: q0", "Find the package: q1"]
    assert build_batch(ds, [0], 2, 0, 0).queries == ["q0"]
    llm = build_batch(ds, [0, 1], 2, 0, 0, "Find", instruction_format="Instruct: {}\nQuery: {}")
    assert llm.queries == ["Instruct: Find\nQuery: q0", "Instruct: Find the package: \nQuery: q1"]


def test_batch_errors(scored, tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        build_batch(scored, [0], 0, 0, 0)
    with pytest.raises(ValueError, match="at least one"):
        build_batch(scored, [], 2, 0, 0)
    two = load([write(tmp_path / "a.jsonl", [ex(0)]), write(tmp_path / "b.jsonl", [ex(1)])])
    with pytest.raises(ValueError, match="one dataset file"):
        build_batch(two, [0, 1], 2, 0, 0)


# ---------------------------------------------------------------------- sampler
@pytest.fixture
def three_files(tmp_path) -> TrainDataset:
    sizes = {"a.jsonl": 24, "b.jsonl": 16, "c.jsonl.gz": 8}
    base = 0
    for name, n in sizes.items():
        write(tmp_path / name, [ex(base + i) for i in range(n)])
        base += 100
    return load(tmp_path)


def run_epoch(sampler: SameDatasetBatchSampler) -> list[list[int]]:
    return list(sampler)


def test_sampler_covers_each_file_once_per_epoch_one_file_per_batch(three_files):
    s = SameDatasetBatchSampler(three_files, batch_size=4, seed=7)
    assert len(s) == 12
    e0 = run_epoch(s)
    assert s.epoch == 1 and len(e0) == 12 and all(len(b) == 4 for b in e0)
    assert sorted(i for b in e0 for i in b) == list(range(48))
    assert all(len({three_files.file_index(i) for i in b}) == 1 for b in e0)
    e1 = run_epoch(s)
    assert e1 != e0 and sorted(i for b in e1 for i in b) == list(range(48))
    again = SameDatasetBatchSampler(three_files, batch_size=4, seed=7)
    assert run_epoch(again) == e0  # same seed, same batches
    assert run_epoch(SameDatasetBatchSampler(three_files, batch_size=4, seed=8)) != e0
    files_in_order = [three_files.file_index(b[0]) for b in e0]
    assert files_in_order != sorted(files_in_order)  # batches of different files are interleaved


@pytest.mark.parametrize("stop_at", [0, 5, 11, 12, 17])
def test_resume_mid_epoch_gives_identical_following_batches(three_files, stop_at):
    full = SameDatasetBatchSampler(three_files, 4, seed=3)
    reference = run_epoch(full) + run_epoch(full)
    first = SameDatasetBatchSampler(three_files, 4, seed=3)
    seen: list[list[int]] = []
    while len(seen) < stop_at:
        for batch in first:
            seen.append(batch)
            if len(seen) == stop_at:
                break
    state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
    resumed = SameDatasetBatchSampler(three_files, 4, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # a training loop calling set_epoch must not restart the epoch
    rest = run_epoch(resumed)
    if resumed.epoch < 2:
        rest += run_epoch(resumed)
    assert seen + rest == reference


# ---------------------------------------------------------------------- prefetching
def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the prefetching thread did not get there in time"
        time.sleep(0.01)


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "m3embed-batches"]


def test_prefetched_batches_are_the_sampler_s_in_order_made_off_the_main_thread(three_files):
    def make(indices, epoch):
        return indices, threading.current_thread() is threading.main_thread()

    reference = SameDatasetBatchSampler(three_files, 4, seed=3)
    expected = [(e, b) for e in range(3) for b in run_epoch(reference)][:30]  # 2.5 epochs of 12 batches
    sync = BatchStream(SameDatasetBatchSampler(three_files, 4, seed=3), make, prefetch=0)
    ahead = BatchStream(SameDatasetBatchSampler(three_files, 4, seed=3), make, prefetch=3)
    with sync, ahead:
        made_here = [next(sync) for _ in range(30)]
        made_ahead = [next(ahead) for _ in range(30)]
    assert [(e, b) for e, (b, _) in made_here] == expected
    assert [(e, b) for e, (b, _) in made_ahead] == expected
    assert all(on_main for _, (_, on_main) in made_here)
    assert not any(on_main for _, (_, on_main) in made_ahead)
    assert not batch_threads()


@pytest.mark.parametrize("consumed, where", [(0, (0, 0)), (5, (0, 5)), (12, (0, 12)), (14, (1, 2))])
def test_stream_state_is_that_of_the_batches_consumed_not_of_those_made_ahead(three_files, consumed, where):
    made: list[list[int]] = []

    def make(indices, epoch):
        made.append(indices)
        return indices

    reference = SameDatasetBatchSampler(three_files, 4, seed=3)
    expected = run_epoch(reference) + run_epoch(reference)
    sampler = SameDatasetBatchSampler(three_files, 4, seed=3)
    with BatchStream(sampler, make, prefetch=4) as stream:
        seen = [next(stream)[1] for _ in range(consumed)]
        wait_until(lambda: len(made) >= consumed + 4)  # the thread is 4 batches ahead
        state = json.loads(json.dumps(stream.state_dict()))  # as saved in a checkpoint
        ahead = sampler.state_dict()
    assert (ahead["epoch"], ahead["position"]) != (state["epoch"], state["position"])
    assert (state["epoch"], state["position"]) == where
    resumed = SameDatasetBatchSampler(three_files, 4, seed=3)
    resumed.load_state_dict(state)
    with BatchStream(resumed, make, prefetch=0) as rest:
        assert seen + [next(rest)[1] for _ in range(24 - consumed)] == expected


def test_an_error_making_a_batch_is_raised_where_that_batch_is_wanted(three_files):
    def make(indices, epoch):
        if indices == broken:
            raise ValueError("cannot make this batch")
        return indices

    batches = run_epoch(SameDatasetBatchSampler(three_files, 4, seed=3))
    broken = batches[3]
    with BatchStream(SameDatasetBatchSampler(three_files, 4, seed=3), make, prefetch=2) as stream:
        assert [next(stream)[1] for _ in range(3)] == batches[:3]
        with pytest.raises(ValueError, match="cannot make this batch"):
            next(stream)
    assert not batch_threads()


def test_closing_stops_a_thread_that_waits_on_a_full_queue(three_files):
    made: list[list[int]] = []

    def make(indices, epoch):
        made.append(indices)
        return indices

    stream = BatchStream(SameDatasetBatchSampler(three_files, 4, seed=3), make, prefetch=1)
    with stream:
        next(stream)
        wait_until(lambda: len(made) == 3)  # 1 consumed, 1 queued, 1 made and waiting for room
        assert batch_threads()
    assert not batch_threads() and len(made) == 3
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)


def test_load_state_dict_rejects_other_settings(three_files):
    s = SameDatasetBatchSampler(three_files, 4, seed=3)
    with pytest.raises(ValueError, match="saved seed is 4.*'epoch': 3"):
        s.load_state_dict({**s.state_dict(), "seed": 4, "epoch": 2})
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "position": 13})


def test_ranks_split_the_same_global_batch_without_overlap(three_files):
    ranks = [SameDatasetBatchSampler(three_files, 2, seed=5, num_replicas=3, rank=r) for r in range(3)]
    global_ = SameDatasetBatchSampler(three_files, 6, seed=5).global_batches(0)
    assert ranks[0].global_batches(0) == global_  # the plan depends on the global batch size only
    per_rank = [run_epoch(s) for s in ranks]
    assert all(len(r) == len(global_) == 4 + 2 + 1 for r in per_rank)  # 24, 16, 8 by 6
    for step, batch in enumerate(global_):
        parts = [per_rank[r][step] for r in range(3)]
        assert [len(p) for p in parts] == [2, 2, 2] and sum(parts, []) == batch
    with pytest.raises(ValueError, match="rank"):
        SameDatasetBatchSampler(three_files, 2, seed=5, num_replicas=3, rank=3)


def test_no_positive_twice_in_a_batch_duplicates_are_deferred(tmp_path):
    # 12 queries in four languages share 3 documents; 4 have unique positives.
    lines = [ex(i, pos=f"doc{i % 3}") for i in range(12)] + [ex(i) for i in range(12, 16)]
    ds = load(write(tmp_path / "d.jsonl", lines))
    for seed in range(5):
        s = SameDatasetBatchSampler(ds, 4, seed=seed, drop_last=False)
        batches = run_epoch(s)
        for b in batches:
            positives = [ds[i]["pos"][0] for i in b]
            assert len(positives) == len(set(positives))
        assert sorted(i for b in batches for i in b) == list(range(16))  # deferred, not lost
        kept = run_epoch(SameDatasetBatchSampler(ds, 4, seed=seed))  # drop_last: only full batches
        assert all(len(b) == 4 for b in kept) and len(kept) >= 3


def test_length_buckets_choose_batch_size_and_never_mix(tmp_path):
    short = [ex(i) for i in range(12)]
    long = [ex(100 + i, pos=f"{i} " + "x" * 800) for i in range(12)]  # ~200 estimated tokens
    ds = load(write(tmp_path / "d.jsonl", short + long))
    s = SameDatasetBatchSampler(ds, 3, seed=0, length_buckets={128: 2})
    batches = run_epoch(s)
    assert sorted(len(b) for b in batches) == [2] * 6 + [3] * 4
    for b in batches:
        assert len({i >= 12 for i in b}) == 1
        assert len(b) == (2 if b[0] >= 12 else 3)
    with pytest.raises(ValueError, match="no full batch"):
        SameDatasetBatchSampler(ds, 30, seed=0)


def test_drop_last_false_keeps_rank_shares_equal(three_files):
    s = SameDatasetBatchSampler(three_files, 5, seed=1, num_replicas=2, drop_last=False)
    sizes = sorted(len(b) for b in s.global_batches(0))
    assert all(n % 2 == 0 for n in sizes) and sum(sizes) == 48  # 24, 16, 8 are all even
    assert sizes.count(10) == 3  # 24 -> 10+10+4, 16 -> 10+6, 8 -> 8


# ---------------------------------------------------------------------- demo data
def test_demo_train_file_is_valid_training_data():
    ds = load(DEMO / "train.jsonl")
    assert 250 <= len(ds) <= 350
    assert all(len(ds[i]["pos"]) == 1 and len(ds[i]["neg"]) == 3 for i in range(0, len(ds), 25))
    assert len(SameDatasetBatchSampler(ds, 8, seed=0)) >= 30


def test_demo_dev_folder_is_a_consistent_beir_folder():
    dev = DEMO / "dev"
    corpus = {json.loads(line)["_id"] for line in (dev / "corpus.jsonl").open(encoding="utf-8")}
    queries = [json.loads(line) for line in (dev / "queries.jsonl").open(encoding="utf-8")]
    rows = (dev / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "query-id\tcorpus-id\tscore"
    qrels = [r.split("\t") for r in rows[1:]]
    assert 900 <= len(corpus) <= 1100 and 120 <= len(queries) <= 180
    assert {q["_id"] for q in queries} == {q for q, _, _ in qrels}
    assert all(d in corpus for _, d, _ in qrels)
    assert len({q["lang"] for q in queries}) >= 8
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 1.5 * 2**20


def test_a_batch_mixing_scored_and_unscored_examples_gives_the_unscored_their_hard_label(tmp_path, caplog):
    """A group without scores (no scores, or no 'neg': e.g. all its mined negatives filtered out) in a
    batch with scored ones gets all the teacher's probability on its positive, so with m3_kd_loss its
    term is its plain contrastive loss and the scored groups keep their distillation."""
    import torch.nn.functional as F

    from m3embed.data.collate import HARD_LABEL_SCORE
    from m3embed.losses import LossConfig, contrastive_loss

    lines = [ex(0, pos_scores=[1.0], neg_scores=[0.0, 0.1, 0.2]), ex(1), ex(2, n_neg=0)]
    lines.append(ex(3, pos_scores=[0.5], neg_scores=[0.4, 0.9, -0.3]))
    ds = load(write(tmp_path / "mixed.jsonl", lines))
    assert build_batch(ds, [1, 2], 4, 0, 0).teacher_scores is None  # no scored group: no teacher
    with caplog.at_level(logging.INFO, logger="m3embed.data"):
        batch = build_batch(ds, [0, 1, 2, 3], 4, 0, 0)
    assert "mixed.jsonl: some examples have no pos_scores" in caplog.text
    raw = batch.teacher_scores
    assert raw[1].tolist() == raw[2].tolist() == [0.0] + [HARD_LABEL_SCORE] * 3, raw
    teacher = torch.softmax(raw.double(), dim=-1)
    assert teacher[1, 0] == 1.0 and teacher[1, 1:].abs().max() == 0.0, teacher
    # The loss against an independent row-by-row computation of FlagEmbedding's m3_kd_loss.
    g, b = 4, 4
    scores = torch.randn(b, b * g, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = contrastive_loss(scores, g, LossConfig(kd_loss_type="m3_kd_loss"), teacher)
    rows = []
    for r in range(b):
        if r in (1, 2):  # plain InfoNCE: the positive against every passage of the batch
            rows.append(F.cross_entropy(scores[r], torch.tensor(r * g)))
            continue
        term, masked = 0.0, scores[r].clone()
        for i in range(g):
            term = term + teacher[r, i] * F.cross_entropy(masked, torch.tensor(r * g + i))
            masked[r * g + i] = torch.finfo(torch.float64).min
        rows.append(term)
    want = torch.stack(rows).mean()
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, abs(want.item())), (got.item(), want.item())
