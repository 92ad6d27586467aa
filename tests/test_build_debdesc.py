"""scripts/build_debdesc.py on a hand-written mirror (tests/fixtures/debian): 19 packages, English
and German translations, three sources with several binaries and one near-duplicate across sources."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import shutil
import sys
from pathlib import Path

import pytest

from m3embed.beir import BeirFolder, read_corpus, read_qrels, read_queries
from m3embed.data import DataConfig, TrainDataset

pytest.importorskip("bm25s")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "debian"
MAIN = Path("dists/bookworm/main")
SEED = 3  # a seed whose hash puts documents in all three splits of the fixture's 13 sources
NEG = 3


def _load_script():
    spec = importlib.util.spec_from_file_location("build_debdesc", ROOT / "scripts" / "build_debdesc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_debdesc = _load_script()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """The fixture with Packages as .xz and Translation-de as .bz2, as a real mirror serves them."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    for name, opener, suffix in (
        ("binary-amd64/Packages", lzma.open, ".xz"),
        ("i18n/Translation-de", bz2.open, ".bz2"),
    ):
        plain = root / MAIN / name
        with opener(plain.with_name(plain.name + suffix), "wb") as f:
            f.write(plain.read_bytes())
        plain.unlink()
    return root


def run(mirror: Path, out: Path, *extra: str) -> int:
    args = [
        "--from-dir",
        str(mirror),
        "--out",
        str(out),
        "--fractions",
        "0.4,0.3,0.3",
        "--negatives",
        str(NEG),
    ]
    return build_debdesc.main([*args, "--seed", str(SEED), *extra])


@pytest.fixture(scope="module")
def built(mirror, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("debdesc")
    assert run(mirror, out) == 0
    return out


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _sources() -> dict[str, str]:
    packages = build_debdesc.read_paragraphs(FIXTURE / MAIN / "binary-amd64" / "Packages")
    return {p["Package"]: p.get("Source", p["Package"]) for p in packages}


def test_train_files_load_with_m3embed_readers(built):
    dataset = TrainDataset(
        DataConfig(train_data=str(built / "train" / "train.jsonl.gz"), train_group_size=NEG + 1)
    )
    lines = _jsonl(built / "train" / "train.jsonl.gz")
    ids = _jsonl(built / "train" / "train_ids.jsonl.gz")
    assert len(dataset) == len(lines) == len(ids) > 0
    assert set(dataset[0]) >= {"query", "pos", "neg"}
    assert all(set(r) == {"qid", "lang", "pos_id", "neg_ids"} for r in ids)
    assert {r["lang"] for r in ids} <= {"en", "de"}
    train_corpus = {d.id: d.text for d in read_corpus(built / "train" / "corpus.jsonl")}
    assert {r["pos_id"] for r in ids} <= set(train_corpus)


def test_dev_and_test_are_beir_folders(built):
    corpus = {d.id: d.text for d in read_corpus(built / "dev" / "corpus.jsonl")}
    assert (built / "test" / "corpus.jsonl").read_bytes() == (built / "dev" / "corpus.jsonl").read_bytes()
    for split in ("dev", "test"):
        folder = BeirFolder.locate(built / split)
        queries, qrels = read_queries(folder.queries), read_qrels(folder.qrels)
        assert queries and set(queries) == set(qrels)
        for qid, q in queries.items():
            lang, package = qid.split(":", 1)
            assert q.lang == lang and qrels[qid] == {package: 1} and package in corpus
    stats = (built / "STATS.md").read_text()
    assert "| lang | train | dev | test |" in stats and 'Debian "bookworm" main' in stats


def test_no_source_package_in_two_splits(built):
    sources = _sources()
    split_of_source: dict[str, set[str]] = {}
    train = [r["pos_id"] for r in _jsonl(built / "train" / "train_ids.jsonl.gz")]
    dev = [q.split(":", 1)[1] for q in read_queries(built / "dev" / "queries.jsonl")]
    test = [q.split(":", 1)[1] for q in read_queries(built / "test" / "queries.jsonl")]
    for split, packages in (("train", train), ("dev", dev), ("test", test)):
        assert packages, f"{split} is empty; pick another SEED"
        for p in packages:
            split_of_source.setdefault(sources[p], set()).add(split)
    assert all(len(s) == 1 for s in split_of_source.values()), split_of_source
    train_docs = {d.id for d in read_corpus(built / "train" / "corpus.jsonl")}
    assert all(len(split_of_source.get(sources[p], {"train"}) - {"train"}) == 0 for p in train_docs)


def test_near_duplicates_are_collapsed(built):
    corpus = {d.id: d.text for d in read_corpus(built / "dev" / "corpus.jsonl")}
    # same source and same first paragraph: the longest description stays
    assert "0ad-data-common" in corpus and "0ad-data" not in corpus
    assert "vim" in corpus and "vim-tiny" not in corpus
    assert len({"libcurl4", "libcurl4-openssl-dev"} & set(corpus)) == 1
    # another source, same text up to case and punctuation; and a package without a long description
    assert "htop" in corpus and "htop-copy" not in corpus and "transitional-dummy" not in corpus
    # different first paragraphs in one source, or different sources: both stay
    assert {"0ad", "curl", "openssh-client", "openssh-server"} <= set(corpus)
    assert len({build_debdesc.normalise(t) for t in corpus.values()}) == len(corpus)
    # a collapsed package's queries went with it
    qids = {r["qid"] for r in _jsonl(built / "train" / "train_ids.jsonl.gz")}
    for split in ("dev", "test"):
        qids |= set(read_queries(built / split / "queries.jsonl"))
    assert {q.split(":", 1)[1] for q in qids} <= set(corpus)
    assert "de:0ad" in qids and "en:0ad" in qids


def test_positive_is_the_package_description_and_negatives_differ(built):
    corpus = {d.id: d.text for d in read_corpus(built / "dev" / "corpus.jsonl")}
    train_docs = {d.id for d in read_corpus(built / "train" / "corpus.jsonl")}
    assert corpus["vim"] == (
        "Vim is an almost compatible version of the UNIX editor Vi.\nMany new features have been added: "
        "multi level undo, syntax highlighting, command line history, on-line help, filename completion "
        "and block operations."
    )
    lines = _jsonl(built / "train" / "train.jsonl.gz")
    for line, ids in zip(lines, _jsonl(built / "train" / "train_ids.jsonl.gz"), strict=True):
        assert ids["qid"] == f"{ids['lang']}:{ids['pos_id']}"
        assert line["pos"] == [corpus[ids["pos_id"]]]
        assert len(ids["neg_ids"]) == len(line["neg"]) == min(NEG, len(train_docs) - 1)
        assert ids["pos_id"] not in ids["neg_ids"] and len(set(ids["neg_ids"])) == len(ids["neg_ids"])
        assert set(ids["neg_ids"]) <= train_docs
        assert line["neg"] == [corpus[n] for n in ids["neg_ids"]] and line["pos"][0] not in line["neg"]


def test_same_seed_same_bytes_other_seed_other_split(mirror, built, tmp_path):
    assert run(mirror, tmp_path / "again") == 0
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for f in files:
        assert (built / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    assert run(mirror, tmp_path / "other", "--seed", "4") == 0
    assert (tmp_path / "other" / "STATS.md").read_text() != (built / "STATS.md").read_text()


def test_missing_inputs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    assert build_debdesc.main(["--from-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "nowhere") in err and "not found" in err
    (tmp_path / "empty").mkdir()
    assert build_debdesc.main(["--from-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "binary-amd64/Packages" in err and "--from-dir" in err


def test_a_language_asked_for_but_missing_is_an_error(mirror, tmp_path, capsys):
    assert run(mirror, tmp_path / "o", "--langs", "de,fr") == 1
    assert "Translation-fr" in capsys.readouterr().err
