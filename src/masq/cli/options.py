"""Command-line flags derived from the configuration registry (:data:`masq.config.FIELDS`).

``masq run``/``masq compare`` get one single-valued flag per field, ``masq grid`` one
multi-valued flag per axis; names, types, choices and help all come from the registry, so a
new field appears in both without touching this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from masq.config import (
    FIELD,
    FIELDS,
    HIDDEN_HELP,
    IMPORTANCE_FIELDS,
    Choice,
    Executor,
    FieldSpec,
    Hidden,
    Stage,
    Transfer,
    parse_hidden,
)
from masq.errors import ConfigError

# masq.importance and masq.consolidation (the registries) load torch: they are imported inside
# the functions that ask them, so that building a command's parser (and its --help) does not.

# Short spellings accepted for choices on the command line.
ALIASES: dict[str, str] = {"online": "online-ewc", "plain": "ewc"}
# Extra names of some flags (kept for the commands' history and the issue's spelling).
EXTRA_NAMES: dict[str, tuple[str, ...]] = {"consolidation": ("--ewc",)}
GRID_EXTRA_NAMES: dict[str, tuple[str, ...]] = {"seed": ("--seed-list",)}
# The value that means "no consolidation" where a user looks for it (--consolidation none): in
# masq the baseline without consolidation is the measure "none" (--importance none, λ = 0).
NO_CONSOLIDATION = "none"
# What a field's help adds in every command, beside the registry's text.
HELP_NOTES: dict[str, str] = {
    "importance": "; none: no EWC, the baseline",
    "consolidation": "; the baseline without consolidation is --importance none",
}
# One value for every phase (--iters, --lr): the fields each stands for where not given.
SHORTHANDS: dict[str, tuple[str, ...]] = {"iters": ("iters1", "iters2"), "lr": ("lr1", "lr2")}
# Help of --hidden: one architecture per value, written with dashes, for every command.
RUN_HIDDEN_HELP = "one architecture: its hidden layer sizes joined by dashes, e.g. 800-400-400"
GRID_HIDDEN_HELP = (
    "architectures, one per value, each written with dashes: --hidden 800-800 800-400-400 is "
    "two architectures"
)
# Help of --data-dir wherever a command reads the dataset's IDX files from a directory.
DATA_DIR_HELP = "directory with the dataset's IDX files"
# A token that starts like a negative number (-5, -1e-5, -.5, -inf, -nan) is a value, never an
# option: no flag of masq starts with "-" and a digit. (argparse's own rule, r"^-\d+$|^-\d*\.\d+$",
# reads "--lr2 -1e-5" as a missing value.)
NEGATIVE_NUMBER = re.compile(r"^-(\.?\d.*|inf|infinity|nan)$", re.IGNORECASE | re.DOTALL)


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` read tokens like ``-1e-5`` as values of the flag before them, so that
    ``--lr2 -1e-5`` reaches the same range check as ``--lr2=-1e-5``."""
    parser._negative_number_matcher = NEGATIVE_NUMBER  # the hook argparse consults


def dest(spec: FieldSpec) -> str:
    """The argparse destination of a field's flag: ``cfg_<name>``."""
    return f"cfg_{spec.name}"


def _choice_type(kind: type[Choice] | str) -> Any:
    def parse(text: str) -> str:
        return ALIASES.get(text, text)

    parse.__name__ = kind if isinstance(kind, str) else kind.__name__
    return parse


def registered(spec: FieldSpec) -> tuple[str, ...]:
    """The names a registry field takes: the measures for ``importance``, the methods for
    ``consolidation`` (built-in and registered by your code); () for other fields."""
    if spec.registry == "measure":
        from masq.importance import measure_names

        return measure_names()
    if spec.registry == "method":
        from masq.consolidation import method_names

        return method_names()
    return ()


# The names built into each registry, for help texts shown without importing the registries
# (they load torch: seconds); tests/test_newcomer.py checks them against the registries.
BUILT_IN: dict[str, tuple[str, ...]] = {
    "measure": ("fisher", "fisher-blocks", "kfac", "l2", "mas", "masq", "none", "si"),
    "method": ("ewc", "joint", "mean-imm", "mode-imm", "online-ewc"),
}
REGISTRY_MODULES: dict[str, str] = {"measure": "masq.importance", "method": "masq.consolidation"}


class RegisteredNames:
    """The names a registry field takes, looked up when a help text shows them: the registry's
    own (:func:`registered`, yours included) once it is imported, else the built-in ones
    (:data:`BUILT_IN`), so that ``--help`` never waits for torch."""

    def __init__(self, spec: FieldSpec) -> None:
        self.spec = spec

    def __str__(self) -> str:
        if REGISTRY_MODULES[self.spec.registry] in sys.modules:
            return ", ".join(registered(self.spec))
        return ", ".join(BUILT_IN[self.spec.registry])


class RegistryAxis(argparse.Action):
    """A multi-valued flag that stores its values, as argparse's plain "store", and carries
    the :class:`RegisteredNames` its help text shows as ``%(registered)s``."""

    def __init__(self, *args: Any, registered: RegisteredNames, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registered = registered

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


def _is_choice(spec: FieldSpec) -> bool:
    return bool(spec.registry) or (isinstance(spec.kind, type) and issubclass(spec.kind, Choice))


def _help(spec: FieldSpec, default: Any) -> str:
    if _is_choice(spec):
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
    accept_negative_numbers(parser)
    group = parser.add_argument_group("configuration (one value each)")
    for spec in FIELDS:
        if spec.name in skip:
            continue
        names = (spec.flag, *EXTRA_NAMES.get(spec.name, ()))
        base = RUN_HIDDEN_HELP if spec.kind is Hidden else spec.help + HELP_NOTES.get(spec.name, "")
        text = f"{base} (default: {defaults[spec.name]})" if spec.name in defaults else None
        text = text or _help(dataclasses.replace(spec, help=base), spec.default)
        kw: dict[str, Any] = {"dest": dest(spec), "default": None, "help": text}
        if spec.kind is bool:  # --eval-val / --no-eval-val: a preset's true can be overridden
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif spec.kind is Hidden:  # "*": a bare or repeated value is a one-line error
            group.add_argument(*names, nargs="*", metavar="ARCH", **kw)
        elif _is_choice(spec):
            group.add_argument(
                *names, type=_choice_type(spec.registry or spec.kind), metavar="V", **kw
            )
        else:
            group.add_argument(*names, type=spec.kind, metavar="V", **kw)


def add_grid_flags(parser: argparse.ArgumentParser) -> None:
    """One multi-valued flag per grid axis (every field but the RUN ones), default None."""
    accept_negative_numbers(parser)
    group = parser.add_argument_group(
        "axes (each takes one or more values; overrides the preset and the grid file)"
    )
    for spec in FIELDS:
        if spec.stage == Stage.RUN:
            continue
        names = (spec.flag, *GRID_EXTRA_NAMES.get(spec.name, ()))
        help_text = spec.help + HELP_NOTES.get(spec.name, "")
        kw: dict[str, Any] = {"dest": dest(spec), "default": None, "help": help_text}
        if spec.kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif spec.kind is Hidden:
            kw["help"] = GRID_HIDDEN_HELP
            group.add_argument(*names, nargs="+", metavar="ARCH", **kw)
        elif spec.registry:  # its names are listed when the help is shown (they load torch)
            kw["help"] = f"{help_text}; values: %(registered)s"
            group.add_argument(
                *names, nargs="+", type=_choice_type(spec.registry), metavar="V",
                action=RegistryAxis, registered=RegisteredNames(spec), **kw,
            )  # fmt: skip
        elif _is_choice(spec):
            values = spec.kind.values()  # type: ignore[attr-defined]
            kw["help"] = f"{help_text}; values: {', '.join(values)}"
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
    """The one architecture of ``--hidden 800-800`` -> (800, 800).

    Several values (``--hidden 800 800``) are refused: in ``masq grid`` they are several
    architectures, so here they would mean something else; the message shows the dash notation.
    """
    if len(tokens) > 1:
        joined = "-".join(tokens)
        hint = f"--hidden {joined}" if re.fullmatch(r"[0-9x-]+", joined) else "--hidden 800-800"
        raise ConfigError(
            f"--hidden takes one architecture written with dashes, e.g. {hint}; got "
            f"{len(tokens)} values {' '.join(tokens)!r} (several architectures: use masq grid)"
        )
    if not tokens:
        raise ConfigError(f"--hidden: no architecture given; {HIDDEN_HELP}")
    return parse_hidden(tokens[0], "--hidden")


# The importance kinds an importance setting belongs to (for the message that refuses it).
def _flag_value(config: Any, name: str) -> str:
    """``--scale sum``: a flag with the value the run would record."""
    value = getattr(config, name)
    if isinstance(value, Choice):
        shown = value.value
    else:
        shown = value if isinstance(value, str) else f"{value:g}"
    return f"{FIELD[name].flag} {shown}"


def check_consistent(config: Any, names: Collection[str], *, compare: bool = False) -> None:
    """A one-line ConfigError when flags given together contradict each other.

    ``names`` are the fields given on the command line; a default never contradicts. For EWC
    and online EWC in ``masq run``: with no EWC (``--importance none`` or ``--lam 0``) no
    importance setting, no online EWC and no λ > 0 may be given; ``--scale`` needs MaSQ,
    ``--fisher-labels`` the FIM (``--masq-batch``, the batch size of the importance pass,
    serves both); ``--importance fisher|masq`` contradicts ``--lam 0``. For ``masq compare``
    (every method at once) ``--lam 0`` would turn EWC off in all its runs. For every
    consolidation, ``--gamma`` needs online EWC, and ``--lam`` a method with a penalty weight
    (not IMM or joint training). The IMM settings (``--transfer``,
    ``--transfer-lam``, ``--drop-p``, ``--alpha-step``) need IMM; ``--drop-p`` needs
    drop-transfer and ``--transfer-lam`` L2-transfer.
    """
    from masq.consolidation import get_method
    from masq.importance import get_measure

    given = set(names)
    method, measure = get_method(config.consolidation), get_measure(config.importance)
    if compare:
        from masq.protocol.compare import check_comparable

        check_comparable(config)  # IMM, joint: no EWC penalty to compare
    if "lam" not in method.fields:  # IMM, joint: no penalty weight to give
        if "lam" in given:
            raise ConfigError(
                f"{_flag_value(config, 'lam')} has no effect with "
                f"{_flag_value(config, 'consolidation')} (it has no penalty weight); drop --lam"
            )
    elif compare:
        if "lam" in given and config.lam == 0:
            raise ConfigError(
                "--lam 0 turns EWC off in every run of masq compare; give --lam > 0 (or leave "
                "it out: 1 / lr2)"
            )
    else:
        without = not measure.gives_importance
        if {"lam", "importance"} <= given and not without and config.lam == 0:
            raise ConfigError(
                f"--lam 0 turns EWC off, so {_flag_value(config, 'importance')} has no effect; "
                "give --lam > 0, or --importance none for a run without EWC"
            )
        if "lam" in given and without and config.lam != 0:
            raise ConfigError(
                f"{_flag_value(config, 'lam')} has no effect with "
                f"{_flag_value(config, 'importance')} (no EWC); drop --lam, or choose an "
                "importance measure"
            )
        off = without or config.lam == 0
        said_none = without and "importance" in given
        why = f"{_flag_value(config, 'importance')} (no EWC)" if said_none else "--lam 0 (no EWC)"
        used = () if off else measure.uses
        for name in IMPORTANCE_FIELDS:
            if name == "importance" or name not in given or name in used:
                continue
            context = why if off else _flag_value(config, "importance")
            raise ConfigError(
                f"{_flag_value(config, name)} has no effect with {context}; drop it, or use "
                f"{_owners_of_importance_field(name)}"
                + (" and --lam > 0" if config.lam == 0 else "")
            )
        if off and "consolidation" in given and method.name != "ewc":
            raise ConfigError(
                f"{_flag_value(config, 'consolidation')} has no effect with {why}; drop it, or "
                "choose an importance and λ > 0"
            )
    _check_method_fields(config, given)


def _owners_of_importance_field(name: str) -> str:
    """``--importance masq or fisher``: the measures that use importance field ``name``."""
    from masq.importance import MEASURES

    owners = [m.name for m in MEASURES.values() if name in m.uses]
    return "--importance " + " or ".join(owners) if owners else "a measure that uses it"


# The transfers that use an IMM setting (the others: every IMM run).
TRANSFER_USERS: dict[str, tuple[Transfer, ...]] = {
    "drop_p": (Transfer.DROP, Transfer.L2_DROP),
    "transfer_lam": (Transfer.L2, Transfer.L2_DROP),
}


def _check_method_fields(config: Any, given: Collection[str]) -> None:
    """One-line ConfigError when a method setting (:data:`masq.consolidation.METHOD_FIELDS`:
    γ, the IMM transfer settings, ...) is given where the run's method does not read it."""
    from masq.consolidation import METHOD_FIELDS, METHODS, get_method

    method = get_method(config.consolidation)
    for name in METHOD_FIELDS:
        if name not in given or name == "lam" or name in method.reads(config):
            continue
        users = TRANSFER_USERS.get(name)
        if name in method.fields and users and config.transfer not in users:
            wanted = " or ".join(t.value for t in users)
            raise ConfigError(
                f"{_flag_value(config, name)} has no effect with --transfer "
                f"{config.transfer.value}; drop it, or use --transfer {wanted}"
            )
        owners = [m for m in METHODS.values() if name in m.fields]
        families = " or ".join(dict.fromkeys(m.family or m.name for m in owners))
        names = " or ".join(m.name for m in owners)
        raise ConfigError(
            f"{_flag_value(config, name)} only applies to {families}; drop it, or use "
            f"--consolidation {names}"
        )


def add_execution_flags(p: argparse.ArgumentParser, *, ray: bool = False) -> None:
    """The "execution" flags of every command that runs grid configs (``masq grid``,
    ``masq consistency``, ``masq analyze lambda``, ``masq table1``): workers, threads, stack,
    data dir, progress; with ``ray`` also the executor and the Ray address."""
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: one per core; with --device cuda one "
                   "per GPU)")  # fmt: skip
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per local worker (default: cores // workers)"
                   + (", CPUs per Ray task (default: 1)" if ray else ""))  # fmt: skip
    g.add_argument("--stack", type=int, default=16,
                   help="runs whose later phases train at once as one stacked model (default: "
                   "16; 1: one by one)")  # fmt: skip
    if ray:
        g.add_argument("--executor", choices=Executor.values(), default=Executor.LOCAL.value,
                       help="local processes or a Ray cluster")  # fmt: skip
        address = "Ray cluster address (auto or HOST:PORT; default: start a local Ray)"
        g.add_argument("--address", default=None, help=address)
        g.add_argument("--ray-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="seconds to reach the Ray cluster at --address before giving up "
                       "(default: 30)")  # fmt: skip
    g.add_argument("--compile-step", action="store_true",
                   help="stacked runs on the CPU: penalty and Adam as one torch.compile'd step "
                   "(faster after a one-time compile of about 25 s per worker; the numbers "
                   "differ from the default step by float rounding; recorded in the records' "
                   "meta)")  # fmt: skip
    g.add_argument("--data-dir", default=None, metavar="DIR", help=DATA_DIR_HELP)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_process_flags(p: argparse.ArgumentParser, *, out_help: str) -> None:
    """``--out``, ``--threads`` and ``--data-dir`` of the commands that train in their own
    process (``masq run``, ``compare``, ``imm``, ``analyze diagonality``, ``analyze compare``)."""
    p.add_argument("--out", default=None, metavar="DIR", help=out_help)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help=DATA_DIR_HELP)


def add_single_run_flags(p: argparse.ArgumentParser, *, curves: bool) -> None:
    """The flags of ``masq run``, ``compare`` and ``imm`` beside the configuration:
    ``--iters`` and ``--lr`` (:func:`add_shorthand_flags`), :func:`add_process_flags`, with
    ``curves`` ``--csv`` and ``--tensorboard``, and ``--quiet``."""
    add_shorthand_flags(p)
    add_process_flags(p, out_help="output directory")
    if curves:
        p.add_argument("--csv", action="store_true", help="also write the curves as CSV")
        p.add_argument(
            "--tensorboard", metavar="DIR", default=None, help="write TensorBoard scalars"
        )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars: one line at the end of each phase"
    )


def add_shorthand_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--iters N`` and ``--lr V``: one value for every phase (:data:`SHORTHANDS`), the same
    flags in ``masq run``, ``compare``, ``imm`` and ``grid``; see :func:`shorthand_values`."""
    every = "of every phase: --{0}1 and --{0}2 where those are not given"
    p.add_argument(
        "--iters", type=int, default=None, metavar="N", help="iterations " + every.format("iters")
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        metavar="V",
        help="Adam learning rate " + every.format("lr"),
    )


def shorthand_values(args: argparse.Namespace) -> dict[str, Any]:
    """{field name: value} that ``--iters`` and ``--lr`` stand for (none when not given); the
    caller fills in only the fields not given themselves."""
    out: dict[str, Any] = {}
    for flag, names in SHORTHANDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.update(dict.fromkeys(names, value))
    return out


def without_consolidation(values: Mapping[str, Any], *, compare: bool = False) -> dict[str, Any]:
    """The configuration values of ``--consolidation none`` (no consolidation): the run
    without EWC, spelled importance "none" (λ = 0 unless given) with the default method.
    A contradicting ``--importance``, or ``masq compare`` (which runs that baseline already),
    is a one-line ConfigError."""
    out = dict(values)
    if out.get("consolidation") != NO_CONSOLIDATION:
        return out
    if compare:
        raise ConfigError(
            "--consolidation none: masq compare runs the baseline without consolidation (no "
            "EWC) beside the others already; drop --consolidation none"
        )
    measure = out.get("importance", NO_CONSOLIDATION)
    if measure != NO_CONSOLIDATION:
        raise ConfigError(
            f"--consolidation none (no consolidation) contradicts --importance {measure}; drop "
            "one of them (the baseline without EWC is --importance none)"
        )
    if out.get("lam", 0) != 0:
        raise ConfigError(
            f"--lam {out['lam']:g} has no effect with --consolidation none (no consolidation); "
            "drop --lam"
        )
    out.pop("consolidation")
    out["importance"] = NO_CONSOLIDATION
    return out
