"""One definition per setting: a config field carries its default, help, flag and bounds.

Every config (``TrainConfig``, ``DataConfig``, ``MemoryConfig``, ``LossConfig``) declares its fields
with :func:`setting` and validates them in ``__post_init__`` with :func:`check_fields`; the type of
a field (``int``, ``float``, ``bool``, ``str``, a ``Literal``, ``| None``) is the check, and
``bounds`` adds a range. ``m3embed train`` builds its flags from the same fields (help, flag names,
choices, default), and :func:`build` is the one unknown-key check of config files. Adding a setting
is adding one field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Bounds:
    """Where a number must lie: ``Bounds(ge=1)`` is ">= 1", ``Bounds(ge=0, lt=1)`` is "in [0, 1)"."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""  # appended to the expectation, e.g. ", e.g. 2e-5"

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = ("]", self.le) if self.le is not None else (")", self.lt)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low[1] is not None:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"


NON_NEGATIVE = Bounds(ge=0)
POSITIVE = Bounds(gt=0)
AT_LEAST_1 = Bounds(ge=1)


def setting(
    default: Any,
    help: str,
    *,
    flag: str | tuple[str, ...] | None = None,
    metavar: str | None = None,
    bounds: Bounds | None = None,
    non_empty: bool = False,
    const: Any = None,
) -> Any:
    """A config field. ``help`` is the flag's help text; ``flag`` replaces the default ``--field-name``
    (a tuple adds aliases); ``bounds`` limits numbers; ``non_empty`` refuses ``""`` for strings;
    ``const`` is the value of the flag given without one (``--resume`` = ``--resume latest``)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "bounds": bounds, "non_empty": non_empty}
    meta["const"] = const
    return dataclasses.field(default=default, metadata=meta)


def flags(f: dataclasses.Field) -> tuple[str, ...]:
    """The command-line flag(s) of a config field, the first being its name in messages."""
    given = f.metadata.get("flag")
    if given is None:
        return ("--" + f.name.replace("_", "-"),)
    return (given,) if isinstance(given, str) else tuple(given)


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The field ``name`` of the config class ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config class (annotations are strings under PEP 563)."""
    return typing.get_type_hints(cls)


def members(hint: Any) -> list[Any]:
    """The alternatives of a type: ``int | Literal["a", "b"] | None`` -> [int, Literal["a"],
    Literal["b"], NoneType]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(hint) for m in members(arg)]
    if typing.get_origin(hint) is Literal:
        return [Literal[v] for v in typing.get_args(hint)]
    return [hint]


def literal_values(hint: Any) -> tuple[Any, ...]:
    """The values of every ``Literal`` in ``hint`` (``Literal["cls", "mean"] | None`` -> ("cls", "mean"))."""
    return tuple(v for m in members(hint) if typing.get_origin(m) is Literal for v in typing.get_args(m))


def _accepts(member: Any, value: Any, meta: Mapping[str, Any]) -> bool:
    if member is type(None):
        return value is None
    if typing.get_origin(member) is Literal:
        return value in typing.get_args(member)
    if member is bool:
        return isinstance(value, bool)
    bounds = meta.get("bounds")
    if member in (int, float):
        kinds = int if member is int else (int, float)
        return (
            isinstance(value, kinds) and not isinstance(value, bool) and (not bounds or bounds.holds(value))
        )
    if member is str:
        return isinstance(value, str) and (bool(value) or not meta.get("non_empty"))
    return isinstance(value, typing.get_origin(member) or member)


def _expected(member: Any, meta: Mapping[str, Any]) -> str:
    if member is type(None):
        return "null"
    if typing.get_origin(member) is Literal:
        return repr(typing.get_args(member)[0])
    if member is bool:
        return "true or false"
    if member in (int, float):
        bounds = meta.get("bounds")
        kind = "an integer" if member is int else "a number"
        return f"{kind} {bounds.describe()}" if bounds else kind
    if member is str:
        return "a non-empty string" if meta.get("non_empty") else "a string"
    return f"a {getattr(typing.get_origin(member) or member, '__name__', member)}"


def expectation(hint: Any, meta: Mapping[str, Any]) -> str:
    """What a value of this field must be, in words: "an integer >= 1 or null"."""
    parts = [_expected(m, meta) for m in members(hint)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    bounds = meta.get("bounds")
    return text + (bounds.note if bounds else "")


def check_fields(cfg: Any) -> None:
    """Raise ValueError naming class, field, expectation and value for the first field whose value
    does not fit its type and bounds, e.g. "DataConfig.batch_size must be an integer >= 1, got 0"."""
    hints = type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not any(_accepts(m, value, f.metadata) for m in members(hints[f.name])):
            expected = expectation(hints[f.name], f.metadata)
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be {expected}, got {value!r:.80}")


def build(cls: Callable[..., Any], values: Any, where: str, section: str) -> Any:
    """``cls(**values)`` for a config-file section; unknown keys are an error naming them (a typo must
    not be ignored silently), and so is a value of the wrong shape."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: section '{section}' must be a mapping of keys, got {values!r:.60}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad} in section '{section}'; known keys: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as err:  # e.g. a list where a number belongs, before __post_init__ sees it
        raise ValueError(f"{where}: section '{section}': {err}") from None
