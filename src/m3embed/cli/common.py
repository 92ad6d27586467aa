"""What every command shares: bad input reported as one line, under torchrun only rank 0 logging, and the
flags and set-up of the commands that load a model (device, pooling, process group)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Mapping

from m3embed.backbones import POOLINGS


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
    r"\b(?P<field>(?:IndexOptions|SearchOptions|MineOptions|ScoreOptions)\.(?P<name>\w+))(?P<must> must be >= )?"
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


# ---------------------------------------------------------------------- flags and steps the model commands share
PASSAGE_FLAG = {"IndexOptions.max_length": "--passage-max-length"}  # eval's and mine's index


def index_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index-dir",
        help="keep the encoded corpus here (resumable) instead of a temporary folder; under torchrun "
        "on several machines, a folder every machine reaches",
    )


def dist_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun, the longest a process waits for the others (they finish about one shard "
        "apart; default 1800)",
    )


@contextlib.contextmanager
def processes(args: argparse.Namespace):
    """The process group torchrun describes (none for one process), for the length of a command."""
    from m3embed.distributed import process_group

    with process_group(args.dist_timeout) as ranks:
        quiet_unless_rank_0(ranks.rank)
        yield ranks


def model_args(p: argparse.ArgumentParser, pooling_default_from_index: bool = False) -> None:
    where = "the index's" if pooling_default_from_index else "the model's m3embed_config.json, else cls"
    p.add_argument("--pooling", choices=POOLINGS, help=f"dense pooling (default: {where})")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")


def instruction_args(p: argparse.ArgumentParser) -> None:
    """FlagEmbedding's query-instruction settings (search, eval, mine and score encode queries)."""
    p.add_argument(
        "--query-instruction-for-retrieval",
        "--query-instruction",
        metavar="TEXT",
        help="instruction put before every query, in --query-instruction-format (default: none)",
    )
    p.add_argument(
        "--query-instruction-format",
        metavar="FORMAT",
        help="template of instruction and query, e.g. $'Instruct: {}\\nQuery: {}' (default: the model "
        "family's: that one for decoder-only LLMs, '{}{}' for encoders)",
    )


def instructions(args: argparse.Namespace) -> dict[str, str | None]:
    """The instruction flags as the keyword arguments of search, evaluate, mine and score."""
    return {
        "query_instruction_for_retrieval": args.query_instruction_for_retrieval,
        "query_instruction_format": args.query_instruction_format,
    }


def weights_arg(p: argparse.ArgumentParser) -> None:
    """--weights: the fusion weights of search, eval, mine and score (as ``compute_score``'s)."""
    from m3embed.scores import DEFAULT_WEIGHTS

    p.add_argument(
        "--weights",
        type=float,
        nargs=3,
        default=DEFAULT_WEIGHTS,
        metavar=("DENSE", "SPARSE", "COLBERT"),
        help="fusion weights (default {} {} {})".format(*DEFAULT_WEIGHTS),
    )


def device_of(args: argparse.Namespace) -> str:
    """``--device``, else cuda where there is one, else cpu."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str, args: argparse.Namespace, config: dict | None = None):
    import torch

    from m3embed.model import M3Model

    overrides = dict(config or {})
    if args.pooling:
        overrides["pooling"] = args.pooling
    device = device_of(args)
    # Heads missing from the directory are initialised randomly: seed them so that `encode` and a later
    # `search` load the same model (same fingerprint) and `eval` numbers are reproducible.
    torch.manual_seed(0)
    return M3Model.from_pretrained(path, device=device, **overrides)
