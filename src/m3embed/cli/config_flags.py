"""`m3embed train`'s settings as flags: one flag per config field, generated from the config classes,
and config errors about a flag reworded in terms of that flag."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import typing
from collections.abc import Mapping
from typing import Any, Literal

from m3embed import settings

_TRAIN_SECTIONS = {
    "train": "model, optimiser, run length, checkpoints, evaluation (section 'train')",
    "data": "training data (section 'data')",
    "memory": "memory strategy of the step (section 'memory')",
    "loss": "objective (section 'loss'; defaults are FlagEmbedding's BGE-M3 values; the formulas are in "
    "docs/design.md)",
}


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, in one group per section: the flags are the configs' fields."""
    from m3embed.train import SECTIONS

    for section, kind in SECTIONS.items():
        group = p.add_argument_group(_TRAIN_SECTIONS[section])
        hints = settings.type_hints(kind)
        for f in dataclasses.fields(kind):
            kwargs = _flag_kwargs(f, hints[f.name])
            default = "unset" if f.default is None or f.default == () else f.default
            kwargs["help"] = f"{f.metadata['help']} [{section}.{f.name}, default: {default}]"
            group.add_argument(
                *settings.flags(f), dest=f"{section}.{f.name}", default=argparse.SUPPRESS, **kwargs
            )


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse's arguments for a field of type ``hint``: a bool is --x/--no-x, a Literal gives the
    choices, a sequence or mapping takes several values, anything else is parsed by its type."""
    kinds = settings.members(hint)
    if bool in kinds:
        return {"action": argparse.BooleanOptionalAction}
    choices = settings.literal_values(hint)
    if all(typing.get_origin(k) is Literal or k is type(None) for k in kinds):
        return {"choices": choices}
    kwargs: dict[str, Any] = {"metavar": f.metadata["metavar"] or f.name.upper()}
    origins = {typing.get_origin(k) for k in kinds}
    if tuple in origins:
        kwargs.update(nargs="+")
    elif Mapping in origins:
        kwargs.update(nargs="+", type=_pair, action=_PairsToDict)
    else:
        kwargs["type"] = _value_parser(kinds, settings.expectation(hint, f.metadata))
    if f.metadata["const"] is not None:
        kwargs.update(nargs="?", const=f.metadata["const"])
    return kwargs


_NONE = ("none", "None", "null")


def _value_parser(kinds: list[Any], expected: str):
    """Text -> value for a field whose type has the alternatives ``kinds`` (e.g. int, 'auto', None)."""
    literals = [typing.get_args(k)[0] for k in kinds if typing.get_origin(k) is Literal]

    def parse(text: str) -> Any:
        if type(None) in kinds and text in _NONE:
            return None
        if text in literals:
            return text
        for kind in (int, float):
            if kind in kinds:
                with contextlib.suppress(ValueError):
                    return kind(text)
        if str in kinds:
            return text
        raise argparse.ArgumentTypeError(f"expected {expected.replace('null', repr('none'))}, got {text!r}")

    return parse


def _pair(text: str) -> tuple[int, int]:
    key, sep, value = text.partition("=")
    try:
        return int(key), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN_TOKENS=BATCH_SIZE, e.g. 128=32, got {text!r}"
        ) from None


class _PairsToDict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, dict(values))


_CONFIG_FIELD = re.compile(
    r"\b(?P<cls>\w+Config)\.(?P<key>\w+)(?P<rest> must be (?:an integer |a number )?(?P<op>>=|<=|>|<)? ?)?"
)


def in_flag_terms(message: str, given: dict[str, dict], config_file: str | None) -> str:
    """A config error about a setting the user gave as a flag, reworded in terms of that flag:
    "DataConfig.batch_size must be an integer >= 1, got 0" -> "--batch-size must be ≥ 1, got 0".
    Settings that came from a config file are named as its section.key, with the file."""
    from m3embed.train import SECTIONS

    section_of = {kind.__name__: (name, kind) for name, kind in SECTIONS.items()}

    def reword(m: re.Match) -> str:
        if m["cls"] not in section_of:
            return m[0]
        (section, kind), key = section_of[m["cls"]], m["key"]
        if key not in given.get(section, {}):  # from the config file (or a default)
            where = f" (in {config_file})" if config_file else ""
            return f"{section}.{key}{where}{m['rest'] or ''}"
        flag = settings.flags(settings.field_of(kind, key))[0]
        if not m["rest"]:
            return flag
        op = {">=": "≥ ", "<=": "≤ ", ">": "> ", "<": "< "}.get(m["op"] or "", "")
        return f"{flag} must be {op}"

    out = _CONFIG_FIELD.sub(reword, message)
    return out.replace(" or null,", " or 'none',") if out != message else out
