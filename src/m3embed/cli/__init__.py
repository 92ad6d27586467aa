"""Command line: ``m3embed train | plot | encode | search | eval | mine | score``. Arguments -> config -> call."""

from __future__ import annotations

import argparse
import logging
import os

from m3embed.cli.mining import add_mining
from m3embed.cli.retrieval import add_retrieval
from m3embed.cli.train import add_plot, add_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3embed",
        description="Train and run BGE-M3-style embedding models (dense + sparse + ColBERT).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and other libraries' messages below WARNING",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_plot(sub)
    add_retrieval(sub)
    add_mining(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # m3embed's own progress at INFO; other libraries (transformers, faiss's loader, ...) only from
    # WARNING up unless -v: their INFO chatter says nothing a user has to act on.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("m3embed").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    code = int(args.func(args) or 0)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from m3embed.distributed import leave_now

        leave_now(code)  # a torchrun rank: skip the interpreter teardown that can abort after gloo
    return code
