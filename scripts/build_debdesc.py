"""Build the debdesc retrieval task from Debian archive index files.

Each binary package's one-line synopsis (English, and every language of the Debian Description
Translation Project that translated it) is a query; the package's English long description is the
document. The recorded numbers in docs/training.md used Debian 12 "bookworm" ``main``::

    pip install bm25s
    python scripts/build_debdesc.py --out data/debdesc                       # download, then build
    python scripts/build_debdesc.py --from-dir MIRROR --out data/debdesc     # a local copy

The local folder has a mirror's layout: ``dists/<release>/<component>/binary-amd64/Packages[.xz|.gz]``
and ``dists/<release>/<component>/i18n/Translation-<lang>[.bz2|.xz|.gz]``. Downloads land in that
layout under ``<out>/debian-index/``, so a build can be repeated offline with ``--from-dir``.

What it does, in order (every choice is seeded by ``--seed``; the same inputs give the same files):

1. **Documents.** The English long description (continuation lines of ``Description``, from
   ``Packages`` or, as in every current release, from ``Translation-en`` joined on
   ``Description-md5``): lines of a paragraph joined by spaces, paragraphs (`` .``) by newlines.
   Packages without a long description are dropped.
2. **Near-duplicate collapse**, two passes, keeping the longest description of a group (ties: the
   smaller package name): (a) within one source package, descriptions whose first paragraph is the
   same after normalising (lower case, digits and punctuation removed, spaces collapsed) are one
   document: ``libfoo1``/``libfoo-dev``/``foo-doc`` differ only in a closing "This package
   contains ..." sentence; (b) across the archive, the same normalised full text is one document.
   A collapsed package's queries go with it (its positive would be another package's text).
3. **Queries.** ``<lang>:<package>`` with the synopsis as text. Dropped: a translated synopsis equal
   to the English one (untranslated), and synopses that several kept packages share in one language
   (ambiguous: one relevant document per query).
4. **Splits by source package**: a seeded hash of the source name against ``--fractions`` (train,
   dev, test), so every binary package of a source is in one split, and a source keeps its split
   across point releases. Then at most ``--cap-en`` / ``--cap-other`` queries per language and split
   are drawn (seeded), as in the recorded data.
5. **Hard negatives** for train queries: BM25 (``bm25s``, k1=1.5, b=0.75, no stemming) over the
   train documents, queried with the package's *English* synopsis for every language (BM25 finds
   nothing for a Japanese query over English text); the top ``--negatives`` hits other than the
   positive, filled up with seeded random train documents when BM25 finds fewer.

Output (``--out``): ``train/train.jsonl.gz`` (FlagEmbedding's ``{"query", "pos", "neg"}``, shuffled),
``train/train_ids.jsonl.gz`` (same order: ``{"qid", "lang", "pos_id", "neg_ids"}``),
``train/corpus.jsonl`` (train documents), ``dev/`` and ``test/`` (BEIR folders: ``corpus.jsonl`` with
every document of every split, ``queries.jsonl`` with ``lang``, ``qrels/test.tsv``) and ``STATS.md``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import logging
import lzma
import random
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger("build_debdesc")

SPLITS = ("train", "dev", "test")
# Languages of bookworm's i18n/ with translations worth a query set (the recorded data's 33; the
# regional de_DE, pt_AO and zh files hold a handful of lines, ml is empty).
DEFAULT_LANGS = (
    *("ca", "cs", "da", "de", "el", "eo", "es", "eu", "fi", "fr", "gl", "hr", "hu", "id", "it", "ja"),
    *("km", "ko", "nb", "nl", "pl", "pt", "pt_BR", "ro", "ru", "sk", "sr", "sv", "tr", "uk", "vi"),
    *("zh_CN", "zh_TW"),
)
# Suffixes tried, in order, for each index file; "" is the uncompressed file.
PACKAGES_SUFFIXES = (".xz", ".gz", "")
TRANSLATION_SUFFIXES = (".bz2", ".xz", ".gz", "")
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
_NON_WORD = re.compile(r"[\W\d_]+")


class BuildError(Exception):
    """A missing or unreadable input; the message names the file and what to do."""


@dataclass(frozen=True)
class Package:
    name: str
    source: str
    synopsis: str
    md5: str  # Description-md5: the key of the package's description in every Translation file
    text: str  # the English long description, formatted (empty when the package has none)


# --------------------------------------------------------------------------- reading index files


def find_index(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _open_text(path: Path) -> IO[str]:
    opener = _OPENERS.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def read_paragraphs(path: Path) -> Iterator[dict[str, str]]:
    """Deb822 paragraphs as ``{field: value}``; continuation lines are kept, joined by newlines."""
    try:
        with _open_text(path) as f:
            fields: dict[str, str] = {}
            last = None
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip(" \t\r"):  # only ASCII blanks end a paragraph (a U+00A0 line does not)
                    if fields:
                        yield fields
                    fields, last = {}, None
                elif line[0] in " \t":
                    if last is None:
                        raise BuildError(f"{path}, line {lineno}: continuation line outside a field")
                    fields[last] += "\n" + line
                else:
                    key, sep, value = line.partition(":")
                    if not sep:
                        raise BuildError(f"{path}, line {lineno}: expected 'Field: value', got {line!r:.60}")
                    last = key.strip()
                    fields[last] = value.strip()
            if fields:
                yield fields
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot read it as a {path.suffix or 'plain'} index file ({e})") from e


def format_long(value: str) -> str:
    """A Description field's continuation lines as text: `` .`` breaks paragraphs."""
    paragraphs: list[list[str]] = [[]]
    for line in value.split("\n")[1:]:
        line = line.strip()
        if line == ".":
            paragraphs.append([])
        elif line:
            paragraphs[-1].append(line)
    return "\n".join(" ".join(p) for p in paragraphs if p)


def _synopsis(value: str) -> str:
    return value.split("\n", 1)[0].strip()


def read_translation(path: Path, lang: str) -> dict[str, str]:
    """``{Description-md5: Description-<lang> field}`` of one Translation file."""
    field = f"Description-{lang}"
    out: dict[str, str] = {}
    for i, p in enumerate(read_paragraphs(path), 1):
        if "Description-md5" not in p or field not in p:
            raise BuildError(
                f"{path}: paragraph {i} has no 'Description-md5' or {field!r} field (found {sorted(p)}); "
                f"is this the Translation-{lang} file?"
            )
        out.setdefault(p["Description-md5"], p[field])
    return out


def read_packages(index: Path, en_path: Path | None) -> list[Package]:
    """Binary packages of a Packages file, their long descriptions completed from Translation-en."""
    raw = []
    seen: set[str] = set()
    for i, p in enumerate(read_paragraphs(index), 1):
        if "Package" not in p or "Description" not in p:
            raise BuildError(
                f"{index}: paragraph {i} has no 'Package' or 'Description' field (found {sorted(p)})"
            )
        if p["Package"] in seen:  # a second version of the same package: keep the first
            continue
        seen.add(p["Package"])
        raw.append(p)
    needs_en = any("\n" not in p["Description"] for p in raw)
    english: dict[str, str] = {}
    if needs_en:
        if en_path is None:
            raise BuildError(
                f"{index}: descriptions have no long text and there is no i18n/Translation-en[.bz2|.xz|.gz] "
                f"next to it ({index.parent.parent / 'i18n'}); download it with the Packages file"
            )
        english = read_translation(en_path, "en")
    packages = []
    for p in raw:
        md5 = p.get("Description-md5") or hashlib.md5((p["Description"] + "\n").encode()).hexdigest()
        long_field = p["Description"] if "\n" in p["Description"] else english.get(md5, "")
        source = p.get("Source", p["Package"]).split()[0]
        packages.append(
            Package(p["Package"], source, _synopsis(p["Description"]), md5, format_long(long_field))
        )
    return packages


# --------------------------------------------------------------------------- downloading


def download(
    base_url: str, release: str, component: str, langs: list[str], dest: Path, timeout: float
) -> Path:
    """Fetch Release, Packages and Translation files into ``dest`` in a mirror's layout; returns dest."""
    dist = f"dists/{release}"
    wanted = [(f"{dist}/Release", ("",), False)]
    wanted.append((f"{dist}/{component}/binary-amd64/Packages", PACKAGES_SUFFIXES[:2], True))
    for lang in ["en", *langs]:
        wanted.append((f"{dist}/{component}/i18n/Translation-{lang}", TRANSLATION_SUFFIXES[:3], lang == "en"))
    for stem, suffixes, required in wanted:
        if find_index(dest / Path(stem).parent, Path(stem).name, suffixes):
            continue
        for suffix in suffixes:
            url = f"{base_url.rstrip('/')}/{stem}{suffix}"
            target = dest / f"{stem}{suffix}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(f"{target}.part", "wb") as f:
                        shutil.copyfileobj(r, f)
                Path(f"{target}.part").replace(target)
                logger.info("downloaded %s", url)
                break
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise BuildError(f"{url}: download failed (HTTP {e.code}); {_LOCAL_HINT}") from e
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise BuildError(f"{url}: download failed ({e}); {_LOCAL_HINT}") from e
        else:
            if required:
                raise BuildError(f"{base_url}/{stem}{{{','.join(suffixes)}}}: not on the mirror (HTTP 404)")
            logger.info("no %s on the mirror; skipping that language", stem)
    return dest


_LOCAL_HINT = (
    "copy dists/<release>/<component>/binary-amd64/Packages.xz and i18n/Translation-*.bz2 from a mirror "
    "into a folder with the same layout and pass it with --from-dir"
)


# --------------------------------------------------------------------------- building the task


def normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def collapse(packages: list[Package]) -> list[Package]:
    """Drop packages without a long description and collapse near-duplicates (module docstring, step 2)."""

    def keep_best(groups: dict[object, list[Package]]) -> list[Package]:
        return [min(g, key=lambda p: (-len(p.text), p.name)) for g in groups.values()]

    with_text = [p for p in packages if p.text]
    by_first: dict[object, list[Package]] = defaultdict(list)
    for p in with_text:
        by_first[(p.source, normalise(p.text.split("\n", 1)[0]))].append(p)
    kept = keep_best(by_first)
    by_text: dict[object, list[Package]] = defaultdict(list)
    for p in kept:
        by_text[normalise(p.text)].append(p)
    kept = sorted(keep_best(by_text), key=lambda p: p.name)
    logger.info(
        "%d packages, %d with a long description, %d after collapsing near-duplicates within a source, "
        "%d after collapsing equal texts",
        len(packages),
        len(with_text),
        len(by_first),
        len(kept),
    )
    return kept


def split_of(source: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """A source package's split: a seeded hash mapped to [0, 1) against the cumulative fractions."""
    digest = hashlib.blake2b(f"{seed}:{source}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "dev" if u < fractions[0] + fractions[1] else "test"


@dataclass(frozen=True)
class Query:
    qid: str
    lang: str
    text: str
    pos_id: str


def make_queries(docs: list[Package], translations: dict[str, dict[str, str]]) -> list[Query]:
    """English and translated synopses of the kept packages (module docstring, step 3)."""
    queries = []
    for p in docs:
        queries.append(Query(f"en:{p.name}", "en", p.synopsis, p.name))
        for lang, table in translations.items():
            text = _synopsis(table.get(p.md5, ""))
            if text and text != p.synopsis:
                queries.append(Query(f"{lang}:{p.name}", lang, text, p.name))
    counts = Counter((q.lang, q.text) for q in queries)
    unique = [q for q in queries if counts[(q.lang, q.text)] == 1]
    logger.info(
        "%d queries, %d after dropping synopses shared by several packages", len(queries), len(unique)
    )
    return unique


def sample_queries(
    queries: list[Query], split: dict[str, str], caps: dict[str, tuple[int, ...]], seed: int
) -> dict[str, list[Query]]:
    """At most ``caps[lang][i]`` queries per language in split i, drawn with a seeded RNG."""
    groups: dict[tuple[str, str], list[Query]] = defaultdict(list)
    for q in queries:
        groups[(split[q.pos_id], q.lang)].append(q)
    out: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for (s, lang), group in sorted(groups.items()):
        cap = caps["en" if lang == "en" else "other"][SPLITS.index(s)]
        rng = random.Random(f"{seed}:sample:{s}:{lang}")
        out[s].extend(sorted(rng.sample(group, cap), key=lambda q: q.qid) if len(group) > cap else group)
    return out


def mine_negatives(
    queries: list[Query], train_docs: list[Package], english: dict[str, str], n_neg: int, seed: int
) -> list[list[str]]:
    """``n_neg`` document ids per query, never its positive (module docstring, step 5)."""
    try:
        import bm25s
    except ImportError:
        raise BuildError(
            "mining negatives needs bm25s: pip install bm25s (or pip install -e '.[bench]')"
        ) from None
    if n_neg == 0:
        return [[] for _ in queries]
    ids = [d.name for d in train_docs]
    if len(ids) <= n_neg:
        logger.warning("only %d train documents: fewer than %d negatives per query", len(ids), n_neg)
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(
        bm25s.tokenize([d.text for d in train_docs], stopwords=None, show_progress=False), show_progress=False
    )
    # One BM25 search per package, shared by that package's queries in every language.
    packages = sorted({q.pos_id for q in queries})
    k = min(n_neg + 1, len(ids))
    tokens = bm25s.tokenize([english[p] for p in packages], stopwords=None, show_progress=False)
    hits, scores = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    found = {
        p: [ids[int(d)] for d, s in zip(row, row_scores) if s > 0 and ids[int(d)] != p]
        for p, row, row_scores in zip(packages, hits, scores)
    }
    out = []
    for q in queries:
        neg = found[q.pos_id][:n_neg]
        rng = random.Random(f"{seed}:fill:{q.qid}")
        while len(neg) < min(n_neg, len(ids) - 1):
            pick = ids[rng.randrange(len(ids))]
            if pick != q.pos_id and pick not in neg:
                neg.append(pick)
        out.append(neg)
    filled = sum(1 for p in packages if len(found[p]) < min(n_neg, len(ids) - 1))
    logger.info("negatives: %d of %d packages filled up with random train documents", filled, len(packages))
    return out


# --------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps gzip output byte-identical between runs.
    with gzip.GzipFile(path, "wb", mtime=0) if path.suffix == ".gz" else open(path, "wb") as raw:
        raw.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _doc_row(p: Package) -> dict:
    return {"_id": p.name, "title": "", "text": p.text}


def write_train(
    out: Path, queries: list[Query], negatives: list[list[str]], docs: dict[str, Package], seed: int
) -> None:
    order = list(range(len(queries)))
    random.Random(f"{seed}:shuffle").shuffle(order)
    lines, ids = [], []
    for i in order:
        q, neg = queries[i], negatives[i]
        lines.append({"query": q.text, "pos": [docs[q.pos_id].text], "neg": [docs[n].text for n in neg]})
        ids.append({"qid": q.qid, "lang": q.lang, "pos_id": q.pos_id, "neg_ids": neg})
    _write_jsonl(out / "train.jsonl.gz", lines)
    _write_jsonl(out / "train_ids.jsonl.gz", ids)


def _lang_order(lang: str) -> tuple[bool, str]:
    return (lang != "en", lang)


def write_beir(out: Path, queries: list[Query], corpus: list[Package]) -> None:
    queries = sorted(queries, key=lambda q: (_lang_order(q.lang), q.pos_id))
    _write_jsonl(out / "corpus.jsonl", [_doc_row(p) for p in corpus])
    _write_jsonl(out / "queries.jsonl", [{"_id": q.qid, "text": q.text, "lang": q.lang} for q in queries])
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q.qid}\t{q.pos_id}\t1\n" for q in queries)


def write_stats(
    path: Path, by_split: dict[str, list[Query]], n_docs: int, n_train_docs: int, origin: str
) -> None:
    counts = {s: Counter(q.lang for q in qs) for s, qs in by_split.items()}
    langs = sorted(
        {lang for c in counts.values() for lang in c}, key=lambda x: (x != "en", -counts["train"][x], x)
    )
    lines = [
        "# Sizes",
        "",
        "## debdesc",
        "",
        f"Built by scripts/build_debdesc.py from {origin}.",
        "",
        f"Evaluation corpus: {n_docs:,} English documents (the same corpus.jsonl in dev/ and test/).",
        "",
        f"Train corpus (train-split documents only, used for negative mining): {n_train_docs:,} documents.",
        "",
        "| lang | train | dev | test |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {lang} | " + " | ".join(str(counts[s][lang]) for s in SPLITS) + " |" for lang in langs]
    lines.append("| **total** | " + " | ".join(f"**{len(by_split[s]):,}**" for s in SPLITS) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main


def _release_line(dist: Path) -> str:
    release = dist / "Release"
    if not release.is_file():
        return ""
    fields = next(read_paragraphs(release), {})
    parts = [f"{k} {fields[k]}" for k in ("Version", "Date") if k in fields]
    return f" ({', '.join(parts)})" if parts else ""


def build(args: argparse.Namespace) -> dict[str, list[Query]]:
    langs = args.langs if args.langs is not None else DEFAULT_LANGS
    if args.from_dir is not None:
        root = Path(args.from_dir)
        if not root.is_dir():
            raise BuildError(
                f"{root}: --from-dir folder not found (expected a mirror's dists/{args.release}/ layout)"
            )
        origin = f"the local index files in {root}"
    else:
        root = download(
            args.mirror, args.release, args.component, langs, args.out / "debian-index", args.timeout
        )
        origin = f"{args.mirror}"
    dist = root / "dists" / args.release
    comp = dist / args.component
    index = find_index(comp / "binary-amd64", "Packages", PACKAGES_SUFFIXES)
    if index is None:
        raise BuildError(f"{comp / 'binary-amd64' / 'Packages'}[.xz|.gz]: not found; {_LOCAL_HINT}")
    origin = f'Debian "{args.release}" {args.component}{_release_line(dist)}, {origin}'
    i18n = comp / "i18n"
    packages = read_packages(index, find_index(i18n, "Translation-en", TRANSLATION_SUFFIXES))
    translations = {}
    for lang in langs:
        path = find_index(i18n, f"Translation-{lang}", TRANSLATION_SUFFIXES)
        if path is None:
            if args.langs is not None:
                raise BuildError(
                    f"{i18n / f'Translation-{lang}'}[.bz2|.xz|.gz]: not found (asked for by --langs)"
                )
            continue
        translations[lang] = read_translation(path, lang)
    logger.info("translations: %s", ", ".join(sorted(translations)) or "none")

    docs = collapse(packages)
    split = {p.name: split_of(p.source, args.seed, args.fractions) for p in docs}
    caps = {"en": args.cap_en, "other": args.cap_other}
    by_split = sample_queries(make_queries(docs, translations), split, caps, args.seed)
    by_name = {p.name: p for p in docs}
    train_docs = [p for p in docs if split[p.name] == "train"]
    english = {p.name: p.synopsis for p in docs}
    negatives = mine_negatives(by_split["train"], train_docs, english, args.negatives, args.seed)

    out: Path = args.out
    write_train(out / "train", by_split["train"], negatives, by_name, args.seed)
    _write_jsonl(out / "train" / "corpus.jsonl", [_doc_row(p) for p in train_docs])
    for s in ("dev", "test"):
        write_beir(out / s, by_split[s], docs)
    write_stats(out / "STATS.md", by_split, len(docs), len(train_docs), origin)
    logger.info(
        "wrote %s: %s queries",
        out,
        ", ".join(f"{s} {len(by_split[s])}" for s in SPLITS),
    )
    return by_split


def _triple(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected TRAIN,DEV,TEST as three whole numbers, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected TRAIN,DEV,TEST fractions summing to 1, got {text!r}")
    return parts  # type: ignore[return-value]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (train/, dev/, test/, STATS.md)"
    )
    src = parser.add_argument_group("where the index files come from (default: download from --mirror)")
    src.add_argument(
        "--from-dir", metavar="DIR", help="a local folder in a mirror's layout (dists/<release>/...)"
    )
    src.add_argument(
        "--mirror", default="http://deb.debian.org/debian", help="mirror base URL (default: %(default)s)"
    )
    src.add_argument("--release", default="bookworm", help="distribution (default: %(default)s)")
    src.add_argument("--component", default="main", help="archive component (default: %(default)s)")
    src.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per download request (default: %(default)s)"
    )
    src.add_argument(
        "--langs",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated translation languages, each required (default: the recorded data's 33, "
        "those present)",
    )
    task = parser.add_argument_group("the task")
    task.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of splits, sampling, fill-up and shuffle (default: %(default)s)",
    )
    task.add_argument(
        "--fractions",
        type=_fractions,
        default=(0.80, 0.06, 0.14),
        help="share of source packages in train,dev,test (default: 0.80,0.06,0.14, the recorded proportions)",
    )
    task.add_argument(
        "--cap-en",
        type=_triple,
        default=(14000, 700, 1500),
        help="most English queries per split (default: 14000,700,1500)",
    )
    task.add_argument(
        "--cap-other",
        type=_triple,
        default=(2500, 110, 260),
        help="most queries per split in each other language (default: 2500,110,260)",
    )
    task.add_argument(
        "--negatives", type=int, default=7, help="BM25 hard negatives per train query (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"build_debdesc: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
