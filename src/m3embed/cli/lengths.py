"""The length flags of ``encode | search | eval | mine``: unset unless given, and then the lengths the
model was trained with, else the command's default (:mod:`m3embed.lengths`)."""

from __future__ import annotations

import argparse

FLAGS = {"query_max_length": "--query-max-length", "passage_max_length": "--passage-max-length"}


def length_help(key: str, default: int, note: str = "") -> str:
    """``--help`` of a length flag: the rule that sets it when it is not given."""
    what = key.split("_")[0]
    return (
        f"{what} truncation in tokens (default: the {key} the model was trained with (its "
        f"train_config.json), else {default}{note})"
    )


def add_length_args(p: argparse.ArgumentParser, defaults: dict[str, int], note: str = "") -> None:
    """--query-max-length and --passage-max-length (the keys of ``defaults``), None unless given."""
    for key, default in defaults.items():
        p.add_argument(FLAGS[key], type=int, help=length_help(key, default, note))


def resolve(
    model: str, args: argparse.Namespace, defaults: dict[str, int], flags: dict[str, str] = FLAGS
) -> tuple[dict[str, int], str]:
    """The lengths a command encodes with (:func:`m3embed.lengths.resolve_lengths`: the flag, else the
    model's, else ``defaults``) and the line that says them; ``flags`` maps each key to its flag."""
    from m3embed.lengths import resolve_lengths

    given = {key: getattr(args, flags[key].lstrip("-").replace("-", "_")) for key in defaults}
    return resolve_lengths(model, given, defaults, {key: flags[key] for key in defaults})
