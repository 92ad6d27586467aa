"""Command line: ``m3embed train | encode | search | eval | mine``. Argument parsing -> config -> call."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model (see `m3embed train --help`)")
    p.set_defaults(func=_not_ready("train"))


def _add_retrieval(sub: argparse._SubParsersAction) -> None:
    for name in ("encode", "search", "eval", "mine"):
        p = sub.add_parser(name, help=f"{name} (not available yet)")
        p.set_defaults(func=_not_ready(name))


def _not_ready(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"m3embed {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3embed", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_retrieval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
