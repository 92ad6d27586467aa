"""The evaluation settings shared by the demo, ``m3embed train --eval`` and ``m3embed eval``.

One checkpoint must give one set of numbers wherever it is evaluated, so every evaluation entry point
takes its unset settings from :data:`EVAL_DEFAULTS` instead of keeping its own. The values are the ones
the built-in demo has always evaluated with (its training truncation, 32-token queries and 128-token
passages), so the README's demo table and ``m3embed eval`` on the demo's checkpoint agree.

The fusion weights of the hybrid modes are :data:`m3embed.scores.DEFAULT_WEIGHTS` (``scores`` is the
one place that knows the modes and how they fuse; ``m3embed.search.DEFAULT_WEIGHTS`` is the same
object); this module stays import-light so that ``--help`` can show its values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalDefaults:
    """Unset evaluation settings, one value each for every entry point."""

    query_max_length: int = 32  # query truncation in tokens (the demo's training length)
    passage_max_length: int = 128  # passage truncation in tokens (the demo's training length)
    batch_size: int = 64  # texts per encode batch (padding differs with it, so numbers can too)
    top_k: int = 100  # hits kept per query (Recall@100 needs 100)
    candidates: int = 100  # dense and sparse top-N fed to ColBERT rerank and fusion
    seed: int = 0  # seed of the --max-docs corpus sample
    split: str = "test"  # qrels/<split>.tsv

    def describe(self) -> str:
        """One line for ``--help``: the values every evaluation uses unless told otherwise."""
        return (
            f"queries {self.query_max_length} tokens, passages {self.passage_max_length} tokens, "
            f"batch {self.batch_size}, top-k {self.top_k}, candidates {self.candidates}, "
            f"sample seed {self.seed}, split {self.split}"
        )


EVAL_DEFAULTS = EvalDefaults()
