"""What every command shares: bad input reported as one line, and under torchrun only rank 0 logging."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping


def quiet_unless_rank_0(rank: int) -> None:
    if rank != 0:  # under torchrun, rank 0 speaks for the job
        logging.getLogger("m3embed").setLevel(logging.WARNING)


def user_errors(run, *also: type[Exception], flags: Mapping[str, str] | None = None):
    """Report bad input (missing file, bad line, mismatched index, and the errors ``also`` names) as one
    line on stderr, exit status 2. An options class's complaint about a field is said in terms of the
    command's flag (:func:`options_in_flag_terms`; ``flags`` names the flags not spelt like the field)."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileNotFoundError, FileExistsError, ValueError, *also) as err:
            rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else None
            where = "" if rank is None else f" (rank {rank})"
            message = options_in_flag_terms(str(err), flags or {})
            print(f"m3embed {args.command}: error{where}: {message}", file=sys.stderr)
            return 2

    return wrapped


_OPTIONS_FIELD = re.compile(
    r"\b(?P<field>(?:IndexOptions|SearchOptions|MineOptions)\.(?P<name>\w+))(?P<must> must be >= )?"
)


def options_in_flag_terms(message: str, flags: Mapping[str, str]) -> str:
    """ "IndexOptions.batch_size must be >= 1, got 0" -> "--batch-size must be ≥ 1, got 0".

    A field is named by ``flags[field]`` ("IndexOptions.max_length": "--passage-max-length"), else by
    the flag spelt like it (``--batch-size``): the retrieval commands' flags are their options' fields.
    """

    def reword(m: re.Match) -> str:
        flag = flags.get(m["field"], "--" + m["name"].replace("_", "-"))
        return flag + (" must be ≥ " if m["must"] else "")

    return _OPTIONS_FIELD.sub(reword, message)
