"""What every command shares: bad input reported as one line, and under torchrun only rank 0 logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def quiet_unless_rank_0(rank: int) -> None:
    if rank != 0:  # under torchrun, rank 0 speaks for the job
        logging.getLogger("m3embed").setLevel(logging.WARNING)


def user_errors(run, *also: type[Exception]):
    """Report bad input (missing file, bad line, mismatched index, and the errors ``also`` names) as one
    line on stderr, exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileNotFoundError, FileExistsError, ValueError, *also) as err:
            rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else None
            where = "" if rank is None else f" (rank {rank})"
            print(f"m3embed {args.command}: error{where}: {err}", file=sys.stderr)
            return 2

    return wrapped
