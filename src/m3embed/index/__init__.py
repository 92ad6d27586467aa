"""Corpus encoding to an on-disk index folder: sharded, streamed, resumable.

Layout of an index folder::

    manifest.json                 model (name + fingerprint + config), options, counts, finished shards
    shard-00000/ids.json          document ids of the shard, in corpus order
    shard-00000/dense.npy         (n, D) float16 or float32
    shard-00000/sparse.npz        (n, vocab) scipy.sparse CSR, float32 lexical weights
    shard-00000/colbert.npy       (tokens, C) all ColBERT vectors of the shard, packed
    shard-00000/colbert_offsets.npy  (n + 1,) int64: document i owns rows offsets[i]:offsets[i+1]
    shard-00000/shard.json        the shard's manifest record (documents, vectors, hash of its documents)
    shard-00001/...

Before anything is written the whole corpus is read once: every line is checked (a bad line fails in
seconds, not after hours of encoding) and each shard's documents are hashed. The manifest keeps the
hash of every finished shard, so a rerun after a corpus fix encodes only the shards whose documents
changed.

Shard ``k`` always holds documents ``[k·shard_size, (k+1)·shard_size)`` of the corpus, so a run that
was interrupted resumes from its last finished shard: a shard is written to ``shard-0000k.tmp``,
renamed when complete, and only then recorded in the manifest. A finished shard folder carries its own
record (``shard.json``), so a shard finished after the last manifest write is kept too; anything else
is redone. The corpus is read as a stream (one shard in memory); within a shard ``M3Model.encode``
sorts the texts by length so batches carry little padding.

Several processes (``torchrun ... -m m3embed encode``) share one index: rank 0 prepares the folder,
every process encodes its turn of the shards left to do and writes them itself, and rank 0 writes the
one manifest when all are done. Resuming reads the shard records, so it does not matter which process
died, nor how many processes the next run has.
"""

from m3embed.index.encode import encode_corpus, index_folder
from m3embed.index.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_RECORD,
    index_summary,
    model_fingerprint,
    model_name,
    read_manifest,
    vocab_size,
)
from m3embed.index.options import DTYPES, Dtype, IndexOptions
from m3embed.index.reader import CorpusIndex
from m3embed.index.shards import CorpusScan, lexical_weights_to_csr, scan_corpus

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "MANIFEST",
    "SHARD_RECORD",
    "CorpusIndex",
    "CorpusScan",
    "Dtype",
    "IndexOptions",
    "encode_corpus",
    "index_folder",
    "index_summary",
    "lexical_weights_to_csr",
    "model_fingerprint",
    "model_name",
    "read_manifest",
    "scan_corpus",
    "vocab_size",
]
