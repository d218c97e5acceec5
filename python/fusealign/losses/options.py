"""Typed option bundles: how a loss's options travel from the CLI (or a caller) to the math, validated once.

Every loss takes its options as one frozen dataclass (`DPOOptions`, `PPOOptions`, …: a docstring per field,
checks in `__post_init__`), passed as `options=`; keyword arguments of the same names are sugar on top:

    fa.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")                  # keywords
    fa.dpo_loss(pc, pr, rc, rr, options=fa.DPOOptions(beta=0.1, loss_type="ipo"))
    fa.dpo_loss(pc, pr, rc, rr, options=opts, beta=0.2)                     # a bundle with one field replaced

`resolve_options` is the one place that turns (options, keywords) into the bundle: an unknown keyword is a
TypeError that lists the bundle's fields, and the bundle's own `__post_init__` validates the result.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, TypeVar

T = TypeVar("T")


def resolve_options(cls: type[T], options: Optional[T], overrides: dict, *, caller: str) -> T:
    """`options` (an instance of the dataclass `cls`, or None for its defaults) with the keyword `overrides`
    replaced; `caller` names the function in error messages."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{caller}: options must be a {cls.__name__}, got {type(options).__name__}")
    aliases = getattr(cls, "ALIASES", {})  # older keyword spellings -> field names
    for old, new in aliases.items():
        if old in overrides:
            if new in overrides:
                raise TypeError(f"{caller}() got both {old!r} and {new!r} (the same option); pass {new!r} only")
            overrides = {**{k: v for k, v in overrides.items() if k != old}, new: overrides[old]}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its loss "
                        f"options are the fields of {cls.__name__}: {', '.join(sorted(names))}")
    if options is None:
        return cls(**overrides)
    return dataclasses.replace(options, **overrides) if overrides else options


def option_field(default, help: str, **kw):
    """A dataclass field with its help text (the CLI shows it as the flag's help)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})
