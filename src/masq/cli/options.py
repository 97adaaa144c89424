"""Command-line flags derived from the configuration registry (:data:`masq.config.FIELDS`).

``masq run``/``masq compare`` get one single-valued flag per field, ``masq grid`` one
multi-valued flag per axis; names, types, choices and help all come from the registry, so a
new field appears in both without touching this package.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from masq.config import FIELDS, Choice, Consolidation, FieldSpec, Hidden, Stage, parse_hidden

# Short spellings accepted for choices on the command line.
ALIASES: dict[str, str] = {"online": Consolidation.ONLINE_EWC.value, "plain": "ewc"}
# Extra names of some flags (kept for the commands' history and the issue's spelling).
EXTRA_NAMES: dict[str, tuple[str, ...]] = {"consolidation": ("--ewc",)}
GRID_EXTRA_NAMES: dict[str, tuple[str, ...]] = {"seed": ("--seed-list",)}


def dest(spec: FieldSpec) -> str:
    """The argparse destination of a field's flag: ``cfg_<name>``."""
    return f"cfg_{spec.name}"


def _choice_type(kind: type[Choice]) -> Any:
    def parse(text: str) -> str:
        return ALIASES.get(text, text)

    parse.__name__ = kind.__name__
    return parse


def _help(spec: FieldSpec, default: Any) -> str:
    if isinstance(spec.kind, type) and issubclass(spec.kind, Choice):
        shown = default.value if isinstance(default, Choice) else default
        return f"{spec.help} (default: {shown})"
    if spec.kind is Hidden:
        return f"{spec.help} (default: {'-'.join(map(str, default))})"
    return f"{spec.help} (default: {default})"


def add_run_flags(
    parser: argparse.ArgumentParser,
    *,
    skip: Sequence[str] = (),
    defaults: Mapping[str, str] | None = None,
) -> None:
    """One flag per configuration field (default None: "not given"); ``defaults`` overrides
    the help text of a default (e.g. per-SLT defaults)."""
    defaults = defaults or {}
    group = parser.add_argument_group("configuration (one value each)")
    for spec in FIELDS:
        if spec.name in skip:
            continue
        names = (spec.flag, *EXTRA_NAMES.get(spec.name, ()))
        text = f"{spec.help} (default: {defaults[spec.name]})" if spec.name in defaults else None
        text = text or _help(spec, spec.default)
        kw: dict[str, Any] = {"dest": dest(spec), "default": None, "help": text}
        if spec.kind is bool:
            group.add_argument(*names, action="store_true", **kw)
        elif spec.kind is Hidden:  # "*": a bare --hidden is a one-line error of parse_hidden
            group.add_argument(*names, nargs="*", metavar="N", **kw)
        elif isinstance(spec.kind, type) and issubclass(spec.kind, Choice):
            group.add_argument(*names, type=_choice_type(spec.kind), metavar="V", **kw)
        else:
            group.add_argument(*names, type=spec.kind, metavar="V", **kw)


def add_grid_flags(parser: argparse.ArgumentParser) -> None:
    """One multi-valued flag per grid axis (every field but the RUN ones), default None."""
    group = parser.add_argument_group(
        "axes (each takes one or more values; overrides the preset and the grid file)"
    )
    for spec in FIELDS:
        if spec.stage == Stage.RUN:
            continue
        names = (spec.flag, *GRID_EXTRA_NAMES.get(spec.name, ()))
        kw: dict[str, Any] = {"dest": dest(spec), "default": None, "help": spec.help}
        if spec.kind is bool:
            group.add_argument(*names, action="store_true", **kw)
        elif spec.kind is Hidden:
            group.add_argument(*names, nargs="+", metavar="ARCH", **kw)
        elif isinstance(spec.kind, type) and issubclass(spec.kind, Choice):
            kw["help"] = f"{spec.help}; values: {', '.join(spec.kind.values())}"
            group.add_argument(*names, nargs="+", type=_choice_type(spec.kind), metavar="V", **kw)
        else:
            group.add_argument(*names, nargs="+", type=spec.kind, metavar="V", **kw)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """{field name: value} of the configuration flags given on the command line."""
    out: dict[str, Any] = {}
    for spec in FIELDS:
        value = getattr(args, dest(spec), None)
        if value is not None:
            out[spec.name] = value
    return out


def hidden_from_tokens(tokens: Sequence[str]) -> tuple[int, ...]:
    """``--hidden 800 800`` or ``--hidden 800-800`` -> (800, 800)."""
    if len(tokens) == 1:
        return parse_hidden(tokens[0], "--hidden")
    return parse_hidden("-".join(tokens), "--hidden")
