"""encode_corpus / Searcher / evaluate_beir / mining / CLI on a tiny random model and a tiny BEIR folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ir_measures
import numpy as np
import pytest
import torch

import m3embed.mine
from m3embed.beir import read_corpus, read_qrels, read_queries
from m3embed.cli import main
from m3embed.evaluate import compute_metrics, evaluate_beir, markdown_report
from m3embed.index import CorpusIndex, IndexOptions, encode_corpus
from m3embed.mine import MineOptions, mine_hard_negatives
from m3embed.model import M3Config, M3Model
from m3embed.search import MODES, Searcher, SearchOptions, read_trec, write_jsonl, write_trec
from m3embed.testing import sample_texts, tiny_model
from m3embed.train import train
from test_train import run_config, write_lines  # a checkpoint written by m3embed train

N_DOCS, N_QUERIES = 40, 6
WEIGHTS = (0.4, 0.2, 0.4)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BEIR folder (read-only for the tests): 40 documents, 6 queries in 2 languages."""
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir(parents=True)
    docs = sample_texts(N_DOCS, seed=1)
    _write_jsonl(
        folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(docs)]
    )
    queries = sample_texts(N_QUERIES, seed=2, max_words=6)
    langs = ["en", "de"]
    _write_jsonl(
        folder / "queries.jsonl",
        [{"_id": f"q{i}", "text": t, "lang": langs[i % 2]} for i, t in enumerate(queries)],
    )
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{3 * i}\t1" for i in range(N_QUERIES)]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def _corpus_texts(beir: Path) -> list[str]:
    return [d.text for d in read_corpus(beir / "corpus.jsonl")]


def _query_texts(beir: Path) -> dict[str, str]:
    return {qid: q.text for qid, q in read_queries(beir / "queries.jsonl").items()}


@pytest.fixture(scope="module")
def searcher(xlmr_tokenizer, beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Searcher:
    """The tiny BEIR corpus encoded once (3 shards) by a tiny model; candidates = the whole corpus."""
    model = tiny_model("xlmr", tokenizer=xlmr_tokenizer)
    index = tmp_path_factory.mktemp("index")
    encode_corpus(model, beir / "corpus.jsonl", index, IndexOptions(shard_size=16), show_progress_bar=False)
    return Searcher(index, model, SearchOptions(top_k=10, candidates=N_DOCS, weights=WEIGHTS))


def _brute_force(model, queries: dict[str, str], docs: list[str]) -> dict[str, np.ndarray]:
    """compute_score of every (query, doc) pair: {mode: (n_queries, n_docs)}."""
    pairs = [(q, d) for q in queries.values() for d in docs]
    scores = model.compute_score(pairs, weights_for_different_modes=list(WEIGHTS))
    return {m: np.array(scores[m]).reshape(len(queries), len(docs)) for m in MODES}


# ---------------------------------------------------------------------- search = brute force
def test_every_mode_equals_brute_force_compute_score(searcher: Searcher, beir: Path) -> None:
    queries = _query_texts(beir)
    brute = _brute_force(searcher.model, queries, _corpus_texts(beir))
    assert searcher.modes == MODES
    runs = searcher.search_modes(queries)
    for mode in MODES:
        for qi, qid in enumerate(queries):
            hits = runs[mode][qid]
            expected = brute[mode][qi]
            if mode == "sparse":  # only documents sharing a token with the query are returned
                expected = expected[expected > 0]
            top = np.sort(expected)[::-1][:10]
            got_scores = np.array([s for _, s in hits])
            assert len(hits) == len(top), mode
            np.testing.assert_allclose(got_scores, top, atol=1e-5, err_msg=mode)
            for doc_id, score in hits:  # each returned score is that document's brute-force score
                assert score == pytest.approx(brute[mode][qi][int(doc_id[1:])], abs=1e-5), mode


def test_numpy_dense_search_equals_faiss(searcher: Searcher, beir: Path) -> None:
    queries = _query_texts(beir)
    with_faiss = searcher.search(queries, "dense")
    exact = Searcher(searcher.index, searcher.model, SearchOptions(top_k=10, use_faiss=False)).search(
        queries, "dense"
    )
    for qid in queries:
        # same scores; ids may swap only between near-ties (faiss and NumPy round differently)
        np.testing.assert_allclose([s for _, s in with_faiss[qid]], [s for _, s in exact[qid]], atol=1e-5)
        exact_scores = dict(exact[qid])
        for doc_id, score in with_faiss[qid]:
            if doc_id in exact_scores:
                assert score == pytest.approx(exact_scores[doc_id], abs=1e-5)


def test_fusion_is_the_documented_weighted_mean(searcher: Searcher, beir: Path) -> None:
    w_d, w_s, w_c = 1.0, 2.0, 3.0
    custom = Searcher(searcher.index, searcher.model, SearchOptions(weights=(w_d, w_s, w_c)))
    enc = custom.encode_queries(_query_texts(beir))
    rows = np.arange(N_DOCS)
    s = custom.exact_scores(enc, 0, rows)
    np.testing.assert_allclose(
        s["sparse+dense"], (w_s * s["sparse"] + w_d * s["dense"]) / (w_s + w_d), rtol=1e-6
    )
    np.testing.assert_allclose(
        s["colbert+sparse+dense"],
        (w_c * s["colbert"] + w_s * s["sparse"] + w_d * s["dense"]) / (w_c + w_s + w_d),
        rtol=1e-6,
    )
    run = custom.search(enc, "colbert+sparse+dense", top_k=5)
    best = np.sort(s["colbert+sparse+dense"])[::-1][:5]
    np.testing.assert_allclose([x for _, x in run[enc.ids[0]]], best, atol=1e-6)


def test_hybrid_candidates_are_the_union_of_dense_and_sparse_top_n(searcher: Searcher, beir: Path) -> None:
    narrow = Searcher(searcher.index, searcher.model, SearchOptions(top_k=50, candidates=3))
    enc = narrow.encode_queries(_query_texts(beir))
    dense, sparse = narrow.search(enc, "dense", top_k=3), narrow.search(enc, "sparse", top_k=3)
    for mode in ("colbert", "sparse+dense", "colbert+sparse+dense"):
        run = narrow.search(enc, mode)
        for qid, hits in run.items():
            union = {d for d, _ in dense[qid]} | {d for d, _ in sparse[qid]}
            assert {d for d, _ in hits} == union


def test_dense_only_model_searches_and_evaluates_dense_only(beir: Path, tmp_path: Path) -> None:
    model = tiny_model("xlmr", config=M3Config(use_sparse=False, use_colbert=False))
    encode_corpus(model, beir / "corpus.jsonl", tmp_path / "dense_index", show_progress_bar=False)
    searcher = Searcher(tmp_path / "dense_index", model)
    assert searcher.modes == ("dense",)
    with pytest.raises(ValueError, match="sparse"):
        searcher.search(["a query"], "sparse")
    result = evaluate_beir(model, beir)
    assert result["info"]["modes"] == ["dense"]
    assert result["info"]["skipped_modes"] == list(MODES[1:])


# ---------------------------------------------------------------------- metrics
def test_metrics_equal_ir_measures_on_a_hand_made_run() -> None:
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 2, "d": 1}, "q3": {"e": 1}}
    run = {
        "q1": [("x", 3.0), ("a", 2.0), ("y", 1.0), ("b", 0.5)],
        "q2": [("d", 9.0), ("z", 8.0)] + [(f"n{i}", 7.0 - i * 0.01) for i in range(120)] + [("c", 0.1)],
        "q3": [("e", 1.0)],
    }
    means, per_query = compute_metrics(qrels, run)
    measures = {
        "ndcg@10": ir_measures.nDCG @ 10,
        "recall@100": ir_measures.R @ 100,
        "mrr@10": ir_measures.RR @ 10,
    }
    run_dict = {q: dict(hits) for q, hits in run.items()}
    expected = ir_measures.calc_aggregate(list(measures.values()), qrels, run_dict)
    for name, measure in measures.items():
        assert means[name] == pytest.approx(expected[measure])
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q2"]["recall@100"] == pytest.approx(0.5)  # c is at rank 123


def test_a_query_missing_from_the_run_counts_as_zero() -> None:
    means, per_query = compute_metrics({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": [("a", 1.0)]})
    assert per_query["q2"] == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert means["mrr@10"] == pytest.approx(0.5)


def test_evaluate_beir_reports_every_mode_and_language(xlmr_model, beir: Path) -> None:
    result = evaluate_beir(xlmr_model, beir, max_docs=12, return_runs=True)
    assert result["info"]["modes"] == list(MODES)
    assert result["info"]["documents"] == 12 and result["info"]["corpus_documents"] == N_DOCS
    for mode in MODES:
        assert set(result[mode]) == {"ndcg@10", "recall@100", "mrr@10"}
        assert set(result["per_language"][mode]) == {"de", "en"}
        means, _ = compute_metrics(read_qrels(beir / "qrels" / "test.tsv"), result["runs"][mode])
        assert result[mode] == pytest.approx(means)
        n = sum(v["queries"] for v in result["per_language"][mode].values())
        assert n == N_QUERIES
    # every relevant document is in the subsample, so Recall@100 over 12 documents is 1
    assert result["dense"]["recall@100"] == pytest.approx(1.0)
    table = markdown_report(result)
    assert "| colbert+sparse+dense |" in table and "| de | 3 |" in table


# ---------------------------------------------------------------------- encode: shards, resume
class _Killed(Exception):
    pass


def test_encode_resumes_after_an_interrupted_shard(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch
) -> None:
    corpus = beir / "corpus.jsonl"
    options = IndexOptions(shard_size=7, dtype="float32")
    reference = CorpusIndex(
        encode_corpus(xlmr_model, corpus, tmp_path / "full", options, show_progress_bar=False)
    )

    real_encode = xlmr_model.encode
    calls: list[int] = []
    kill_at = [3]

    def flaky_encode(texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == kill_at[0]:
            raise _Killed  # the process dies while encoding the third shard
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(xlmr_model, "encode", flaky_encode)
    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        encode_corpus(xlmr_model, corpus, out, options, show_progress_bar=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001"]
    assert not manifest["complete"]
    (out / "shard-00002.tmp").mkdir(exist_ok=True)  # a half-written shard left behind
    with pytest.raises(ValueError, match="unfinished"):
        CorpusIndex(out)

    calls.clear()
    kill_at[0] = -1
    encode_corpus(xlmr_model, corpus, out, options, show_progress_bar=False)
    assert calls == [7, 7, 7, 5]  # only the 4 missing shards (of 7, 7, ..., 5 documents) are encoded
    assert max(calls) <= options.shard_size  # streamed: never more than one shard in memory
    resumed = CorpusIndex(out)
    assert resumed.ids == reference.ids == [f"d{i}" for i in range(N_DOCS)]
    np.testing.assert_allclose(resumed.dense, reference.dense, atol=1e-6)
    assert (resumed.sparse != reference.sparse).nnz == 0
    for row in (0, 13, 39):
        np.testing.assert_allclose(resumed.colbert_vecs(row), reference.colbert_vecs(row), atol=1e-6)
    assert not list(out.glob("*.tmp"))
    assert resumed.manifest["counts"]["documents"] == N_DOCS


def test_index_matches_model_encode_and_float16_storage(xlmr_model, beir: Path, tmp_path: Path) -> None:
    texts = _corpus_texts(beir)
    index = CorpusIndex(
        encode_corpus(
            xlmr_model,
            beir / "corpus.jsonl",
            tmp_path / "i16",
            IndexOptions(dtype="float16"),
            show_progress_bar=False,
        )
    )
    direct = xlmr_model.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert np.load(tmp_path / "i16" / "shard-00000" / "dense.npy").dtype == np.float16
    np.testing.assert_allclose(index.dense, direct["dense_vecs"], atol=2e-3)
    assert index.sparse[5].toarray()[0, [int(t) for t in direct["lexical_weights"][5]]] == pytest.approx(
        list(direct["lexical_weights"][5].values())
    )
    np.testing.assert_allclose(index.colbert_vecs(5), direct["colbert_vecs"][5], atol=2e-3)
    manifest = index.manifest
    assert manifest["counts"]["colbert_vectors"] == sum(len(v) for v in direct["colbert_vecs"])
    assert manifest["options"]["dtype"] == "float16" and manifest["model"]["fingerprint"]


# ---------------------------------------------------------------------- bad input
def test_missing_files_are_named(xlmr_model, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        encode_corpus(xlmr_model, tmp_path / "nope.jsonl", tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CorpusIndex(tmp_path)
    with pytest.raises(FileNotFoundError, match="qrels/test.tsv"):
        (tmp_path / "corpus.jsonl").write_text("")
        (tmp_path / "queries.jsonl").write_text("")
        evaluate_beir(xlmr_model, tmp_path)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"title": "t", "text": "some text"}, "_id"),
        ({"_id": "d2", "title": "t"}, "text"),
        ({"_id": "d2", "text": " "}, "text"),
    ],
)
def test_bad_corpus_line_names_file_line_and_field(
    xlmr_model, tmp_path: Path, line: dict, field: str
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    _write_jsonl(corpus, [{"_id": "d1", "text": "fine"}, line])
    with pytest.raises(ValueError, match=rf"corpus\.jsonl, line 2: .*'{field}'"):
        encode_corpus(xlmr_model, corpus, tmp_path / "index", show_progress_bar=False)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    _write_jsonl(
        queries, [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}, {"_id": "q1", "text": "c"}]
    )
    with pytest.raises(
        ValueError, match=r"queries\.jsonl, line 3: duplicate query id 'q1' \(first seen on line 1\)"
    ):
        read_queries(queries)
    corpus = tmp_path / "corpus.jsonl"
    _write_jsonl(corpus, [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    with pytest.raises(ValueError, match=r"corpus\.jsonl, line 2: duplicate document id 'd1'"):
        list(read_corpus(corpus))


def test_index_of_another_model_is_refused(searcher: Searcher, xlmr_tokenizer) -> None:
    other = tiny_model("xlmr", tokenizer=xlmr_tokenizer, seed=1)
    with pytest.raises(ValueError, match=r"index was built by .*fingerprint .* searching model .*re-encode"):
        Searcher(searcher.index, other)
    with torch.no_grad():
        other.load_state_dict(searcher.model.state_dict())
    Searcher(searcher.index, other)  # same weights: accepted


def test_resuming_with_another_model_is_refused(
    xlmr_model, xlmr_tokenizer, beir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    encode_corpus(xlmr_model, beir / "corpus.jsonl", out, show_progress_bar=False)
    other = tiny_model("xlmr", tokenizer=xlmr_tokenizer, seed=1)
    with pytest.raises(ValueError, match="cannot resume.*model fingerprint"):
        encode_corpus(other, beir / "corpus.jsonl", out, show_progress_bar=False)
    encode_corpus(other, beir / "corpus.jsonl", out, overwrite=True, show_progress_bar=False)
    Searcher(out, other)


# ---------------------------------------------------------------------- output files
def test_trec_and_jsonl_outputs(searcher: Searcher, beir: Path, tmp_path: Path) -> None:
    run = searcher.search(_query_texts(beir), "sparse+dense", top_k=5)
    write_trec(run, tmp_path / "run.trec")
    write_jsonl(run, tmp_path / "run.jsonl")
    back = read_trec(tmp_path / "run.trec")
    assert list(back) == list(run)
    for qid in run:
        assert [d for d, _ in back[qid]] == [d for d, _ in run[qid]]
    first = json.loads((tmp_path / "run.jsonl").read_text().splitlines()[0])
    assert first["query_id"] == "q0" and first["hits"][0]["rank"] == 1 and len(first["hits"]) == 5
    fields = (tmp_path / "run.trec").read_text().splitlines()[0].split()
    assert fields[1] == "Q0" and fields[3] == "1" and fields[5] == "m3embed"


# ---------------------------------------------------------------------- mining
def test_mined_negatives_come_from_the_rank_range_and_exclude_positives(
    xlmr_model, beir: Path, tmp_path: Path
) -> None:
    docs = _corpus_texts(beir)
    queries = list(_query_texts(beir).values())
    train = tmp_path / "train.jsonl"
    _write_jsonl(
        train,
        [
            {"query": q, "pos": [docs[3 * i]], "neg": ["old"], "neg_scores": [0.1], "type": "x"}
            for i, q in enumerate(queries)
        ],
    )
    options = MineOptions(rank_range=(2, 12), negatives=4, seed=0)
    stats = mine_hard_negatives(
        xlmr_model,
        train,
        beir / "corpus.jsonl",
        tmp_path / "mined.jsonl",
        options,
        index_dir=tmp_path / "mine_index",
    )
    assert stats == {"lines": N_QUERIES, "padded": 0}
    searcher = Searcher(
        tmp_path / "mine_index",
        xlmr_model,
        SearchOptions(top_k=12, query_max_length=options.query_max_length),
    )
    run = searcher.search(queries, "dense")
    for i, line in enumerate(json.loads(x) for x in (tmp_path / "mined.jsonl").read_text().splitlines()):
        allowed = {docs[int(d[1:])] for d, _ in run[str(i)][2:12]} - {docs[3 * i]}
        assert len(line["neg"]) == 4 and len(set(line["neg"])) == 4
        assert set(line["neg"]) <= allowed
        assert line["type"] == "x" and "neg_scores" not in line and line["pos"] == [docs[3 * i]]


def test_mining_pads_with_random_documents_when_the_range_is_too_short(
    xlmr_model, beir: Path, tmp_path: Path
) -> None:
    docs = _corpus_texts(beir)
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, [{"query": "a tool", "pos": [docs[0]]}])
    stats = mine_hard_negatives(
        xlmr_model,
        train,
        beir / "corpus.jsonl",
        tmp_path / "out.jsonl",
        MineOptions(rank_range=(38, 45), negatives=5),
    )
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert stats["padded"] == 1 and len(line["neg"]) == 5 and docs[0] not in line["neg"]


def test_bad_training_line_is_named(xlmr_model, beir: Path, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, [{"query": "q", "pos": ["p"]}, {"query": "q", "pos": []}])
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: field 'pos'"):
        mine_hard_negatives(xlmr_model, train, beir / "corpus.jsonl", tmp_path / "out.jsonl")


# ---------------------------------------------------------------------- CLI
def test_cli_encode_search_eval_mine(xlmr_model, beir: Path, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    index = tmp_path / "cli_index"
    assert (
        main(
            [
                "encode",
                str(model_dir),
                str(beir / "corpus.jsonl"),
                str(index),
                "--shard-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert CorpusIndex(index).manifest["counts"]["documents"] == N_DOCS
    runs = tmp_path / "runs"
    args = [
        "search",
        str(index),
        str(beir / "queries.jsonl"),
        "--mode",
        "dense",
        "colbert+sparse+dense",
        "--top-k",
        "5",
        "--output",
        str(runs),
    ]
    assert main(args) == 0
    assert sorted(p.name for p in runs.iterdir()) == [
        "colbert+sparse+dense.jsonl",
        "colbert+sparse+dense.trec",
        "dense.jsonl",
        "dense.trec",
    ]
    assert len(read_trec(runs / "dense.trec")) == N_QUERIES

    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(model_dir),
                str(beir),
                "--modes",
                "dense",
                "sparse",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    assert result["info"]["modes"] == ["dense", "sparse"] and "| sparse |" in (out / "eval.md").read_text()

    train = tmp_path / "train.jsonl"
    docs = _corpus_texts(beir)
    _write_jsonl(train, [{"query": "a query", "pos": [docs[0]], "neg": []}])
    mined = tmp_path / "mined.jsonl"
    assert (
        main(
            [
                "mine",
                str(model_dir),
                str(train),
                str(beir / "corpus.jsonl"),
                "--output",
                str(mined),
                "--range",
                "1",
                "10",
                "--negatives",
                "3",
            ]
        )
        == 0
    )
    assert len(json.loads(mined.read_text())["neg"]) == 3

    capsys.readouterr()
    assert main(["search", str(index), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_plain_text_corpus_and_tsv_queries(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("first document\n\nsecond document\n")
    assert [(d.id, d.text) for d in read_corpus(corpus)] == [
        ("1", "first document"),
        ("3", "second document"),
    ]
    queries = tmp_path / "queries.tsv"
    queries.write_text("q1\ta query\nq2\tanother\n")
    assert read_queries(queries)["q2"].text == "another"
    titled = tmp_path / "titled.jsonl"
    _write_jsonl(titled, [{"_id": 7, "title": "Title", "text": "body"}])
    assert list(read_corpus(titled))[0] == read_corpus.__globals__["Document"]("7", "Title body")


def test_evaluate_beir_encodes_only_what_the_modes_need(xlmr_model, beir: Path, tmp_path: Path) -> None:
    result = evaluate_beir(xlmr_model, beir, modes=("dense",), index_dir=tmp_path / "eval_index")
    assert result["info"]["modes"] == ["dense"] and result["info"]["skipped_modes"] == []
    options = CorpusIndex(tmp_path / "eval_index").manifest["options"]
    assert (options["dense"], options["sparse"], options["colbert"]) == (True, False, False)


def test_cli_model_without_head_files_encodes_then_searches(xlmr_model, beir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "no_heads"
    xlmr_model.save_pretrained(model_dir)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        (model_dir / name).unlink()  # like all-MiniLM-L6-v2: heads are initialised at load time
    index = tmp_path / "index"
    assert main(["encode", str(model_dir), str(beir / "corpus.jsonl"), str(index), "--no-progress"]) == 0
    args = [
        "search",
        str(index),
        str(beir / "queries.jsonl"),
        "--mode",
        "colbert",
        "--output",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0  # the seeded heads give the same fingerprint at search time


def test_flagembedding_m3_loads_without_its_package_init() -> None:
    from m3embed.peers import load_flagembedding_m3

    try:
        module = load_flagembedding_m3()
    except ImportError as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"FlagEmbedding not importable: {err}")
    assert hasattr(module, "M3Embedder")
    assert load_flagembedding_m3() is module


# ---------------------------------------------------------------------- input checked before encoding
def _counting_encode(model, monkeypatch) -> list[int]:
    """Patch ``model.encode`` to record how many texts each call encodes."""
    real_encode, calls = model.encode, []

    def encode(texts, **kwargs):
        calls.append(len(texts))
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    return calls


def test_bad_last_line_fails_before_any_shard_is_written(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = (beir / "corpus.jsonl").read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines) + '{"_id": "d40", "txt": "a typo in the field name"}\n')
    calls = _counting_encode(xlmr_model, monkeypatch)
    out = tmp_path / "index"
    with pytest.raises(ValueError, match=r"corpus\.jsonl, line 41: missing field 'text'"):
        encode_corpus(xlmr_model, corpus, out, IndexOptions(shard_size=7), show_progress_bar=False)
    assert calls == []  # nothing was encoded
    assert not list(out.glob("shard-*")) if out.exists() else True


def test_after_a_fix_only_the_shards_whose_documents_changed_are_encoded_again(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    _write_jsonl(corpus, rows)
    options = IndexOptions(shard_size=7)
    out = tmp_path / "index"
    encode_corpus(xlmr_model, corpus, out, options, show_progress_bar=False)

    rows[37]["text"] = "a corrected text"  # shard 5 holds documents 35-39
    _write_jsonl(corpus, rows)
    calls = _counting_encode(xlmr_model, monkeypatch)
    encode_corpus(xlmr_model, corpus, out, options, show_progress_bar=False)
    assert calls == [5]  # the other 35 documents are reused
    manifest = CorpusIndex(out).manifest
    assert manifest["last_run"] == {**manifest["last_run"], "encoded": 5, "reused": 35}

    fresh = CorpusIndex(
        encode_corpus(xlmr_model, corpus, tmp_path / "fresh", options, show_progress_bar=False)
    )
    updated = CorpusIndex(out)
    assert updated.ids == fresh.ids
    np.testing.assert_allclose(updated.dense, fresh.dense, atol=1e-6)
    assert manifest["counts"] == fresh.manifest["counts"]

    calls.clear()
    encode_corpus(xlmr_model, corpus, out, options, show_progress_bar=False)
    assert calls == []  # complete and unchanged: nothing to do


def test_empty_corpus_is_an_error(xlmr_model, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl: the corpus file has no documents"):
        encode_corpus(xlmr_model, corpus, tmp_path / "index", show_progress_bar=False)
    with pytest.raises(ValueError, match="has no documents"):
        encode_corpus(xlmr_model, [], tmp_path / "index", show_progress_bar=False)
    assert not (tmp_path / "index").exists()


def test_title_only_documents_are_encoded_from_their_title_and_counted(
    xlmr_model, tmp_path: Path, capsys
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    _write_jsonl(
        corpus,
        [
            {"_id": "d1", "title": "A title", "text": "and a body"},
            {"_id": "d2", "title": "Only a title", "text": ""},
            {"_id": "d3", "title": "", "text": "only a body"},
        ],
    )
    assert [d.text for d in read_corpus(corpus)] == ["A title and a body", "Only a title", "only a body"]
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    out = tmp_path / "index"
    assert main(["encode", str(model_dir), str(corpus), str(out), "--no-progress"]) == 0
    assert "1 document had no text; encoded from its title" in capsys.readouterr().out
    index = CorpusIndex(out)
    assert index.ids == ["d1", "d2", "d3"] and index.manifest["counts"]["title_only"] == 1
    direct = xlmr_model.encode(["Only a title"])["dense_vecs"][0]
    np.testing.assert_allclose(index.dense[1], direct, atol=1e-5)

    _write_jsonl(corpus, [{"_id": "d1", "text": "fine"}, {"_id": "d2", "title": " ", "text": ""}])
    with pytest.raises(ValueError, match=r"corpus\.jsonl, line 2: field 'text' .*no 'title'"):
        list(read_corpus(corpus))


def test_non_utf8_byte_names_file_line_and_offset(xlmr_model, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    first = b'{"_id": "d1", "text": "fine"}\n'
    corpus.write_bytes(first + b'{"_id": "d2", "text": "caf\xe9"}\n')  # Latin-1 'é'
    offset = len(first) + 26
    expected = rf"corpus\.jsonl, line 2, byte offset {offset}: not UTF-8 \(byte 0xe9\)"
    with pytest.raises(ValueError, match=expected):
        encode_corpus(xlmr_model, corpus, tmp_path / "index", show_progress_bar=False)
    queries = tmp_path / "queries.tsv"
    queries.write_bytes(b"q1\tok\nq2\t\xff\n")
    with pytest.raises(ValueError, match=r"queries\.tsv, line 2, byte offset 9: not UTF-8"):
        read_queries(queries)
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    assert main(["encode", str(model_dir), str(corpus), str(tmp_path / "i"), "--no-progress"]) == 2
    assert f"line 2, byte offset {offset}: not UTF-8" in capsys.readouterr().err


def test_mine_checks_its_input_first_and_never_leaves_partial_output(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch
) -> None:
    docs = _corpus_texts(beir)
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, [{"query": "a tool", "pos": [docs[0]]}] * 3 + [{"query": "q", "pos": "not a list"}])
    out = tmp_path / "mined.jsonl"
    out.write_text("an earlier output\n")
    calls = _counting_encode(xlmr_model, monkeypatch)
    with pytest.raises(ValueError, match=r"train\.jsonl, line 4: field 'pos'"):
        mine_hard_negatives(xlmr_model, train, beir / "corpus.jsonl", out)
    assert calls == []  # failed before encoding the corpus
    assert out.read_text() == "an earlier output\n"

    _write_jsonl(train, [{"query": "a tool", "pos": [docs[0]]}] * 3)
    real_batch = m3embed.mine._mine_batch

    def dies_after_writing(*args, **kwargs):
        real_batch(*args, **kwargs)
        raise KeyboardInterrupt  # the run is killed after some lines are written

    monkeypatch.setattr(m3embed.mine, "_mine_batch", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        mine_hard_negatives(xlmr_model, train, beir / "corpus.jsonl", out, MineOptions(queries_per_search=1))
    assert out.read_text() == "an earlier output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined.jsonl", "train.jsonl"]


def test_cli_mine_shows_progress_unless_told_not_to(xlmr_model, beir: Path, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    _write_jsonl(train, [{"query": "a tool", "pos": [_corpus_texts(beir)[0]]}])
    args = [
        "mine",
        str(model_dir),
        str(train),
        str(beir / "corpus.jsonl"),
        "--output",
        str(tmp_path / "o.jsonl"),
    ]
    assert main([*args, "--range", "1", "5", "--negatives", "2"]) == 0
    assert "Mining negatives" in capsys.readouterr().err
    assert main([*args, "--range", "1", "5", "--negatives", "2", "--no-progress"]) == 0
    assert "Mining negatives" not in capsys.readouterr().err


def test_cli_encode_ends_with_a_summary_line(xlmr_model, beir: Path, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    index = tmp_path / "index"
    args = ["encode", str(model_dir), str(beir / "corpus.jsonl"), str(index), "--shard-size", "16"]
    assert main([*args, "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"{re.escape(str(index))}: 40 documents in 3 shards, [\d.]+ KiB, [\d.]+ s", line), (
        line
    )


def test_cli_search_does_not_print_faiss_loader_chatter(
    searcher: Searcher, beir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("faiss")
    model_dir = tmp_path / "model"
    searcher.model.save_pretrained(model_dir)
    args = ["search", str(searcher.index.path), str(beir / "queries.jsonl"), "--model", str(model_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(m3embed.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "m3embed", *args, "--output", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "faiss" not in done.stderr, done.stderr


def test_eval_defaults_are_the_shared_ones_and_help_says_them(capsys) -> None:
    import inspect

    from m3embed.cli import build_parser
    from m3embed.eval_defaults import EVAL_DEFAULTS

    args = build_parser().parse_args(["eval", "MODEL", "FOLDER"])
    signature = inspect.signature(evaluate_beir).parameters
    for name in ("query_max_length", "passage_max_length"):  # unset: the model's, else the shared ones
        assert args.__dict__[name] is None and signature[name].default == getattr(EVAL_DEFAULTS, name)
    for name in ("batch_size", "top_k", "candidates", "seed"):
        assert getattr(args, name) == signature[name].default == getattr(EVAL_DEFAULTS, name), name
    assert args.split == signature["split"].default == EVAL_DEFAULTS.split
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert EVAL_DEFAULTS.describe() in help_text
    assert (
        "(default: the query_max_length the model was trained with (its train_config.json), "
        f"else {EVAL_DEFAULTS.query_max_length}, as the demo)"
    ) in help_text


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        (
            "qrels/test.tsv",
            b"query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td3\tx\n",
            r"test\.tsv, line 3: score 'x'",
        ),
        ("corpus.jsonl", b'{"_id": "d99", "title": "t"}\n', r"corpus\.jsonl, line 41: missing field 'text'"),
        (
            "queries.jsonl",
            b'{"_id": "q9", "text": "\xff"}\n',
            r"queries\.jsonl, line 7, byte offset \d+: not UTF-8",
        ),
    ],
)
def test_eval_checks_every_file_before_encoding(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch, file: str, content: bytes, message: str
) -> None:
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (folder / name).write_bytes((beir / name).read_bytes())
    if file == "qrels/test.tsv":
        (folder / file).write_bytes(content)
    else:
        (folder / file).write_bytes((folder / file).read_bytes() + content)  # a bad last line
    calls = _counting_encode(xlmr_model, monkeypatch)
    with pytest.raises(ValueError, match=message):
        evaluate_beir(xlmr_model, folder)
    assert calls == []


# ---------------------------------------------------------------------- the index finds its model
def test_search_finds_the_indexs_model_from_another_working_directory(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    xlmr_model.save_pretrained(repo / "runs" / "demo" / "checkpoint-18")
    elsewhere.mkdir()
    monkeypatch.chdir(repo)
    corpus, queries = str(beir / "corpus.jsonl"), str(beir / "queries.jsonl")
    assert main(["encode", "runs/demo/checkpoint-18", corpus, "index", "--no-progress"]) == 0
    manifest_path = repo / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model"]["name"] == str((repo / "runs" / "demo" / "checkpoint-18").resolve())

    monkeypatch.chdir(elsewhere)  # no --model: the recorded folder is found from here too
    assert main(["search", str(repo / "index"), queries, "--output", "runs"]) == 0
    assert len(read_trec(elsewhere / "runs" / "dense.trec")) == N_QUERIES

    # An index written before the path was recorded absolute: as typed, relative to the index's parent.
    manifest["model"]["name"] = "runs/demo/checkpoint-18"
    manifest_path.write_text(json.dumps(manifest))
    assert main(["search", str(repo / "index"), queries, "--output", "runs2"]) == 0

    (repo / "runs" / "demo" / "checkpoint-18").rename(repo / "runs" / "demo" / "moved")
    capsys.readouterr()
    assert main(["search", str(repo / "index"), queries]) == 2
    err = capsys.readouterr().err
    assert f"the model recorded in {manifest_path}, runs/demo/checkpoint-18, is not found" in err
    assert str(elsewhere / "runs/demo/checkpoint-18") in err and str(repo / "runs/demo/checkpoint-18") in err
    assert "pass --model PATH" in err

    manifest["model"]["name"] = str(repo / "runs" / "demo" / "checkpoint-18")  # a new index, model moved
    manifest_path.write_text(json.dumps(manifest))
    assert main(["search", str(repo / "index"), queries]) == 2
    err = capsys.readouterr().err
    assert f"the model recorded in {manifest_path}, {repo / 'runs/demo/checkpoint-18'}, is not found" in err
    assert "pass --model PATH" in err
    args = ["search", str(repo / "index"), queries, "--model", str(repo / "runs" / "demo" / "moved")]
    assert main([*args, "--output", "runs3"]) == 0


# ---------------------------------------------------------------------- one set of lengths per model
QUERY_LENGTH, PASSAGE_LENGTH = 12, 40  # shorter than most test texts, and no command's default


@pytest.fixture(scope="module")
def trained(xlmr_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written by `m3embed train` with non-default lengths (in its train_config.json)."""
    folder = tmp_path_factory.mktemp("trained")
    tiny_model("xlmr", tokenizer=xlmr_tokenizer).save_pretrained(folder / "base")
    data = write_lines(folder / "train.jsonl")
    config = run_config(
        str(folder / "base"),
        data,
        folder / "run",
        max_steps=2,
        query_max_length=QUERY_LENGTH,
        passage_max_length=PASSAGE_LENGTH,
    )
    return train(config).checkpoint


def _max_lengths_seen(monkeypatch) -> list[int]:
    """Patch ``M3Model.encode`` to record the max_length of every call."""
    real_encode, seen = M3Model.encode, []

    def encode(self, texts, **kwargs):
        seen.append(kwargs["max_length"])
        return real_encode(self, texts, **kwargs)

    monkeypatch.setattr(M3Model, "encode", encode)
    return seen


def _lengths_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("lengths:")]


def test_every_command_uses_the_lengths_the_checkpoint_was_trained_with(
    trained: Path, beir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    seen = _max_lengths_seen(monkeypatch)
    corpus, queries = str(beir / "corpus.jsonl"), str(beir / "queries.jsonl")
    train_file = tmp_path / "train.jsonl"
    _write_jsonl(train_file, [{"query": "a tool", "pos": [_corpus_texts(beir)[0]]}])
    source = f"(from {trained / 'train_config.json'})"
    both = f"lengths: queries {QUERY_LENGTH}, passages {PASSAGE_LENGTH} tokens {source}"
    runs = tmp_path / "runs"
    commands = [
        (
            ["encode", str(trained), corpus, str(tmp_path / "i")],
            {PASSAGE_LENGTH},
            f"passages {PASSAGE_LENGTH}",
        ),
        (
            ["search", str(tmp_path / "i"), queries, "--output", str(runs)],
            {QUERY_LENGTH},
            f"queries {QUERY_LENGTH}",
        ),
        (["eval", str(trained), str(beir), "--modes", "dense"], {QUERY_LENGTH, PASSAGE_LENGTH}, both),
        (
            ["mine", str(trained), str(train_file), corpus, "--output", str(tmp_path / "m.jsonl")],
            {QUERY_LENGTH, PASSAGE_LENGTH},
            both,
        ),
    ]
    for args, lengths, said in commands:
        seen.clear()
        caplog.clear()
        assert main([*args, "--no-progress"] if args[0] != "search" else args) == 0, args[0]
        assert set(seen) == lengths, args[0]
        lines = _lengths_lines(caplog)
        assert len(lines) == 1 and said in lines[0] and source in lines[0], (args[0], lines)

    caplog.clear()  # a flag wins over the checkpoint; each length says where it came from
    assert main(["eval", str(trained), str(beir), "--modes", "dense", "--query-max-length", "7"]) == 0
    assert _lengths_lines(caplog) == [
        f"lengths: queries 7 tokens (--query-max-length), passages {PASSAGE_LENGTH} tokens {source}"
    ]


def test_a_model_without_train_config_keeps_each_commands_default(
    xlmr_model, beir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    seen = _max_lengths_seen(monkeypatch)
    assert main(["eval", str(model_dir), str(beir), "--modes", "dense"]) == 0
    assert set(seen) == {32, 128}
    assert _lengths_lines(caplog) == [
        f"lengths: queries 32, passages 128 tokens (default; {model_dir} has no train_config.json)"
    ]


def _read_run_jsonl(path: Path) -> dict[str, list[tuple[str, float]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["query_id"]: [(h["doc_id"], h["score"]) for h in row["hits"]] for row in rows}


def test_encode_and_search_score_what_eval_scores(trained: Path, beir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "beir"  # graded qrels over the whole corpus: nDCG@10 moves with any reordering
    (folder / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (folder / name).write_bytes((beir / name).read_bytes())
    rows = [f"q{q}\td{d}\t{(q + d) % 4}" for q in range(N_QUERIES) for d in range(N_DOCS)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    modes = ["dense", "sparse", "colbert+sparse+dense"]
    # The same batch size as eval's: padding differs with it, and so may the last digits of a score.
    args = ["encode", str(trained), str(folder / "corpus.jsonl"), str(tmp_path / "i"), "--batch-size", "64"]
    assert main([*args, "--no-progress"]) == 0
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "search",
                str(tmp_path / "i"),
                str(folder / "queries.jsonl"),
                "--mode",
                *modes,
                "--output",
                str(runs),
            ]
        )
        == 0
    )
    assert main(["eval", str(trained), str(folder), "--modes", *modes, "--output", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    qrels = read_qrels(folder / "qrels" / "test.tsv")
    for mode in modes:
        means, _ = compute_metrics(qrels, _read_run_jsonl(runs / f"{mode}.jsonl"))
        assert abs(means["ndcg@10"] - result[mode]["ndcg@10"]) <= 1e-9, mode


# ---------------------------------------------------------------------- flags named in errors
@pytest.mark.parametrize("command", ["encode", "eval"])
def test_a_bad_batch_size_names_the_flag(xlmr_model, beir: Path, tmp_path: Path, capsys, command) -> None:
    model_dir = tmp_path / "model"
    xlmr_model.save_pretrained(model_dir)
    args = {
        "encode": ["encode", str(model_dir), str(beir / "corpus.jsonl"), str(tmp_path / "i")],
        "eval": ["eval", str(model_dir), str(beir)],
    }[command]
    assert main([*args, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert f"m3embed {command}: error: --batch-size must be ≥ 1, got 0" in err
    assert "Options" not in err
