"""masq.config: the one registry of configuration fields and everything derived from it.

The registry tests iterate :data:`masq.config.FIELDS`, so a field added there is checked at
every place it must reach (RunConfig, the CLI flags of ``masq run``/``compare``/``grid``, the
grid's axes and TOML keys, the run id, the shared-work keys of its stage, the report's
columns) without touching this file, except to name a second valid value of a new ``str``
field in :data:`OTHER_STR`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from masq import grid as masq_grid
from masq import report, runid, store
from masq.cli import build_parser, experiment_cmd, grid_cmd
from masq.config import (
    FIELD,
    FIELDS,
    FIRST_FIELDS,
    ID_FIELDS,
    IMPORTANCE_FIELDS,
    Choice,
    FieldSpec,
    FisherLabels,
    Hidden,
    Init,
    RunConfig,
    Scale,
    Scenario,
    Stage,
    hidden_text,
    lam_per_lr2,
    n_params,
    parse_hidden,
    round_sig,
)
from masq.consolidation import METHODS, method_label
from masq.errors import ConfigError
from masq.protocol.compare import COMPARE_METHODS

# A second valid value of every str field (a new str field must add one here).
OTHER_STR: dict[str, str] = {
    "slt": "D9-1",
    "dataset": "fashion-mnist",
    "device": "cuda:1",
    "importance": "fisher",
    "consolidation": "online-ewc",
}
# The fields `masq compare` chooses itself (its four methods), so it has no flags for them.
COMPARE_OWN: frozenset[str] = frozenset({"importance", "scale"})
# The fields of methods `masq compare` refuses (IMM: `masq imm` compares those), with the flags
# that select such a method there.
COMPARE_REFUSED: frozenset[str] = frozenset({"transfer", "transfer_lam", "drop_p", "alpha_step"})
# The fields whose `masq run` default is per SLT or a CLI choice, not the registry default.
CLI_DEFAULTS: frozenset[str] = frozenset({"hidden", "lr2", "lam", "device"})
# The flags without which a field's flag contradicts the defaults (and is refused), per command.
COMPANIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("run", "fisher_labels"): ("--importance", "fisher"),
    ("run", "fisher_samples"): ("--importance", "fisher"),
    ("run", "si_damping"): ("--importance", "si"),
    ("run", "si_gradient"): ("--importance", "si"),
    ("run", "gamma"): ("--consolidation", "online-ewc"),
    ("run", "permute_first"): ("--slt", "DP10-10"),
    ("compare", "permute_first"): ("--slt", "DP10-10"),
    ("compare", "gamma"): ("--consolidation", "online-ewc"),
    **{
        (command, name): ("--consolidation", "mean-imm", *transfer)
        for command in ("run", "compare")
        for name, transfer in (
            ("transfer", ()),
            ("alpha_step", ()),
            ("transfer_lam", ("--transfer", "l2")),
            ("drop_p", ("--transfer", "drop")),
        )
    },
}

# The other fields a field's non-default value needs (it is refused on the defaults' SLT).
FIELD_COMPANIONS: dict[str, dict[str, Any]] = {"permute_first": {"slt": "DP10-10"}}

IDS = [f.name for f in FIELDS]


def other_value(spec: FieldSpec) -> Any:
    """A valid value of ``spec`` other than its default."""
    if spec.kind is Hidden:
        return (*spec.default, 7)
    if issubclass(spec.kind, Choice):
        return next(m for m in spec.kind if m != spec.default)
    if spec.kind is bool:
        return not spec.default
    if spec.kind is int:
        return spec.default + 3
    if spec.kind is float:
        if spec.check == "unit":
            return spec.default / 2 if spec.default > 0 else 0.5
        return spec.default * 2 if spec.default > 0 else spec.default + 1.5
    assert spec.name in OTHER_STR, f"add a second valid value of {spec.name!r} to OTHER_STR"
    return OTHER_STR[spec.name]


def cli_tokens(spec: FieldSpec, value: Any) -> list[str]:
    """The command-line words giving ``value`` to ``spec``'s flag."""
    if spec.kind is bool:
        assert value is True, "boolean flags can only switch on"
        return [spec.flag]
    if spec.kind is Hidden:
        return [spec.flag, hidden_text(value)]
    if isinstance(value, Choice):
        return [spec.flag, value.value]
    return [spec.flag, str(value)]


def toml_value(value: Any) -> Any:
    """``value`` as a TOML file would give it (Enum members as strings, tuples as lists)."""
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flags(name: str) -> set[str]:
    return {s for a in subparser(name)._actions for s in a.option_strings}


def changed(spec: FieldSpec) -> RunConfig:
    companions = FIELD_COMPANIONS.get(spec.name, {})
    return RunConfig().with_(**companions, **{spec.name: other_value(spec)}).validate()


def record_of(config: RunConfig) -> dict[str, Any]:
    """A stored record of a two-task run of ``config`` (hand-made curves)."""
    curve = {"iteration": [0, 10], "D1": [0.5, 0.6], "D2": [0.1, 0.7], "D1∪D2": [0.3, 0.65]}
    point = {"iteration": 10, "D1": 0.6, "D2": 0.7, "D1∪D2": 0.65}
    result = {
        "config": config.to_dict(),
        "curves": [curve, curve],
        "best": point,
        "last": point,
        "accuracy": [[0.6, 0.7], [0.6, 0.7]],
    }
    return {"run_id": runid.run_id(config), "version": 2, "result": result}


# ----------------------------------------------------------------------------- the registry


def test_the_registry_is_consistent() -> None:
    assert len(set(IDS)) == len(IDS) and set(FIELD) == set(IDS)
    assert ID_FIELDS == tuple(f.name for f in FIELDS if f.stage != Stage.RUN)
    for spec in FIELDS:
        assert spec.flag == "--" + spec.name.replace("_", "-")
        assert spec.help and spec.check in ("", "positive", "nonneg", "unit")
    RunConfig().validate()  # the defaults are a valid run


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_is_a_runconfig_attribute_with_the_registry_default(spec: FieldSpec) -> None:
    value = getattr(RunConfig(), spec.name)
    assert value == spec.default and type(value) is type(spec.default)
    other = other_value(spec)
    assert getattr(RunConfig(**{spec.name: other}), spec.name) == other


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_has_a_flag_in_run_and_compare(spec: FieldSpec) -> None:
    assert spec.flag in flags("run")
    if spec.name in COMPARE_OWN:
        assert spec.flag not in flags("compare")
        assert all(spec.name in c or spec.name == "scale" for c in COMPARE_METHODS.values())
    else:
        assert spec.flag in flags("compare")
    # the flag's value reaches the config of both commands
    value = other_value(spec)
    if spec.kind is bool and value is False:
        value = True  # a switch can only turn a field on; False is the default anyway
    for command in ("run", "compare") if spec.name not in COMPARE_OWN else ("run",):
        extra = COMPANIONS.get((command, spec.name), ())
        args = build_parser().parse_args([command, *extra, *cli_tokens(spec, value)])
        if command == "compare" and spec.name in COMPARE_REFUSED:
            with pytest.raises(ConfigError, match="masq imm"):
                experiment_cmd.config_from_args(args)
            continue
        config = experiment_cmd.config_from_args(args)
        assert getattr(config, spec.name) == value


@pytest.mark.parametrize("spec", [f for f in FIELDS if f.name not in CLI_DEFAULTS], ids=str)
def test_run_without_flags_uses_the_registry_defaults(spec: FieldSpec) -> None:
    config = experiment_cmd.config_from_args(build_parser().parse_args(["run"]))
    assert getattr(config, spec.name) == spec.default


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_is_a_grid_axis_unless_run(spec: FieldSpec) -> None:
    axes = masq_grid.Grid().axes()
    if spec.stage == Stage.RUN:
        assert spec.name not in axes
        return
    assert spec.flag in flags("grid")
    assert axes[spec.name] == (spec.default,)
    assert spec.name in masq_grid.GRID_KEYS
    value = other_value(spec)
    if spec.kind is bool and value is False:
        value = True
    # from the command line ...
    args = build_parser().parse_args(["grid", "--preset", "none", *cli_tokens(spec, value)])
    assert getattr(grid_cmd.grid_from_args(args), spec.name) == (value,)
    # ... and from a TOML grid file's key
    grid = masq_grid.grid_from_mapping({spec.name: [toml_value(value)]})
    assert getattr(grid, spec.name) == (value,)


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_changes_the_run_id_unless_run(spec: FieldSpec) -> None:
    base, other = RunConfig(), changed(spec)
    if spec.stage == Stage.RUN:
        assert runid.run_id(other) == runid.run_id(base)
        assert spec.name not in runid.id_dict(other)
    else:
        assert runid.run_id(other) != runid.run_id(base)
        assert spec.name in runid.id_dict(other)


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_is_in_the_shared_work_keys_of_its_stage(spec: FieldSpec) -> None:
    first = spec.stage in (Stage.DATA, Stage.FIRST)
    imp = spec.stage == Stage.IMPORTANCE
    assert (spec.name in FIRST_FIELDS) == first
    assert (spec.name in IMPORTANCE_FIELDS) == imp
    base, other = RunConfig(), changed(spec)
    assert (masq_grid.d1_key(other) != masq_grid.d1_key(base)) == first
    assert (masq_grid.importance_key(other) != masq_grid.importance_key(base)) == (first or imp)


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_field_is_a_report_column(spec: FieldSpec) -> None:
    in_config = spec.stage != Stage.RUN and spec.name != "seed"
    assert (spec.name in report.CONFIG_FIELDS) == in_config
    config = changed(spec)
    row = store.flat_row(record_of(config))
    expected = runid.config_dict(config)[spec.name]
    assert row[spec.name] == (hidden_text(expected) if spec.kind is Hidden else expected)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("spec", [f for f in FIELDS if issubclass(f.kind, Choice)], ids=str)
def test_choices_coerce_from_strings(spec: FieldSpec) -> None:
    for member in spec.kind:
        for config in (
            RunConfig(**{spec.name: member.value}),
            RunConfig().with_(**{spec.name: member.value}),
            RunConfig.from_dict({spec.name: member.value}),
        ):
            value = getattr(config, spec.name)
            assert value is member and value == member.value and str(value) == member.value


def config_attempts(values: dict[str, Any]) -> tuple[Callable[[], object], ...]:
    """The three ways a value enters a config: ``with_``, ``from_dict``, the constructor."""
    return (
        lambda: RunConfig().with_(**values),
        lambda: RunConfig.from_dict(values),
        lambda: RunConfig(**values).validate(),
    )


@pytest.mark.parametrize("spec", [f for f in FIELDS if issubclass(f.kind, Choice)], ids=str)
def test_a_bad_choice_is_a_one_line_error_naming_the_field(spec: FieldSpec) -> None:
    for attempt in config_attempts({spec.name: "bogus"}):
        with pytest.raises(ConfigError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and spec.name in message and "'bogus'" in message
        assert all(v in message for v in spec.kind.values())  # the accepted spellings


def wrong_types(spec: FieldSpec) -> list[Any]:
    if spec.kind is Hidden:
        return ["abc", [800, 0], 800]
    if issubclass(spec.kind, Choice):
        return [3, None]
    if spec.kind is bool:
        return [1, "yes"]
    if spec.kind is int:
        return [2.5, True, "3"]
    if spec.kind is float:
        return ["fast", True, None]
    return [5, "", None]


@pytest.mark.parametrize("spec", FIELDS, ids=IDS)
def test_a_value_of_the_wrong_type_is_a_one_line_error(spec: FieldSpec) -> None:
    for bad in wrong_types(spec):
        for attempt in config_attempts({spec.name: bad}):
            with pytest.raises(ConfigError) as info:
                attempt()
            message = str(info.value)
            assert "\n" not in message and spec.name in message, (bad, message)


def out_of_range(spec: FieldSpec) -> list[Any]:
    bad = {"positive": [0, -1], "nonneg": [-1], "unit": [-0.5, 1.5]}.get(spec.check, [])
    bad = [spec.kind(v) for v in bad]
    if spec.kind is float:
        bad += [math.inf, math.nan]
    return bad


@pytest.mark.parametrize("spec", [f for f in FIELDS if out_of_range(f)], ids=str)
def test_a_value_out_of_range_is_a_one_line_error(spec: FieldSpec) -> None:
    for bad in out_of_range(spec):
        with pytest.raises(ConfigError) as info:
            RunConfig(**{spec.name: bad}).validate()
        message = str(info.value)
        assert "\n" not in message and message.startswith(spec.name), (bad, message)


def test_an_slt_of_one_task_and_a_bad_device_are_errors() -> None:
    for slt in ("D10", "X5-5", "D5-4"):
        with pytest.raises(ConfigError, match="SLT spec"):
            RunConfig(slt=slt).validate()
    with pytest.raises(ConfigError, match="device"):
        RunConfig(device="gpu").validate()
    assert RunConfig(slt="D2-2-2-2-2").n_tasks == 5 and RunConfig().n_tasks == 2


def all_other() -> RunConfig:
    values = {f.name: other_value(f) for f in FIELDS}
    values["scenario"] = Scenario.CLASS_BLOCKS  # not the default, and class_units seen applies
    values["slt"] = "DP10-10-10"  # not the default, and permute_first applies
    return RunConfig(**values).validate()


@pytest.mark.parametrize("config", [RunConfig(), all_other()], ids=["defaults", "others"])
def test_pickle_and_dict_round_trips(config: RunConfig) -> None:
    assert pickle.loads(pickle.dumps(config)) == config
    d = config.to_dict()
    assert list(d) == IDS
    assert d["hidden"] == list(config.hidden)
    for spec in FIELDS:
        if issubclass(spec.kind, Choice):
            assert type(d[spec.name]) is str and d[spec.name] == getattr(config, spec.name).value
    back = RunConfig.from_dict(json.loads(json.dumps(d)))
    assert back == config and hash(back) == hash(config)
    assert all(type(getattr(back, f.name)) is type(getattr(config, f.name)) for f in FIELDS)


def test_from_dict_fills_defaults_and_refuses_unknown_keys() -> None:
    assert RunConfig.from_dict({"lr2": 1e-3}) == RunConfig(lr2=1e-3)
    assert RunConfig.from_dict({"lam": 100}).lam == 100.0
    assert type(RunConfig.from_dict({"lam": 100}).lam) is float
    with pytest.raises(ConfigError, match=r"unknown keys.*'lamda'"):
        RunConfig.from_dict({"lamda": 1.0})
    with pytest.raises(ConfigError, match="unknown fields"):
        RunConfig().with_(lamda=1.0)


def test_with_coerces_and_leaves_the_original_alone() -> None:
    base = RunConfig()
    new = base.with_(hidden="400-200", importance="fisher", lam=5, consolidation="online-ewc")
    assert new.hidden == (400, 200) and new.importance == "fisher"
    assert new.lam == 5.0 and type(new.lam) is float
    assert new.consolidation == "online-ewc"
    assert base == RunConfig()


# ----------------------------------------------------------------------------- one definition each


@pytest.mark.parametrize(
    ("values", "detailed", "label"),
    [
        ({"importance": "none", "lam": 0.0}, False, "no EWC"),
        ({"importance": "none", "lam": 100.0}, False, "no EWC"),
        ({"importance": "masq", "lam": 0.0}, False, "no EWC"),
        ({"importance": "fisher"}, False, "EWC+FIM"),
        ({"importance": "fisher", "masq_batch": 7}, True, "EWC+FIM"),
        ({"importance": "fisher", "fisher_labels": "sampled"}, False, "EWC+FIM (sample)"),
        ({"importance": "fisher", "fisher_labels": "exact"}, False, "EWC+FIM (exact)"),
        ({"importance": "masq"}, False, "EWC+MaSQ (mean)"),
        ({"importance": "masq", "scale": "sum"}, False, "EWC+MaSQ (sum)"),
        ({"importance": "masq"}, True, "EWC+MaSQ (mean, B=1000)"),
        ({"importance": "masq", "masq_batch": 50, "scale": "sum"}, True, "EWC+MaSQ (sum, B=50)"),
        ({"importance": "masq", "consolidation": "online-ewc"}, False, "online EWC+MaSQ (mean)"),
        (
            {"importance": "masq", "scale": "sum", "consolidation": "online-ewc"},
            True,
            "online EWC+MaSQ (sum, B=1000)",
        ),
        ({"importance": "fisher", "consolidation": "online-ewc"}, False, "online EWC+FIM"),
        (
            {"importance": "fisher", "fisher_labels": "exact", "consolidation": "online-ewc"},
            False,
            "online EWC+FIM (exact)",
        ),
        ({"importance": "none", "consolidation": "online-ewc"}, False, "no EWC"),
        ({"importance": "masq", "lam": 0.0, "consolidation": "online-ewc"}, False, "no EWC"),
    ],
)
def test_method_label(values: dict[str, Any], detailed: bool, label: str) -> None:
    config = RunConfig().with_(**values)
    assert method_label(config, detailed=detailed) == label
    assert method_label(config.to_dict(), detailed=detailed) == label  # a stored config


def test_method_label_of_a_mapping_without_the_newer_fields() -> None:
    row = {"importance": "masq", "lam": 100.0, "scale": "sum", "masq_batch": 1000}
    assert method_label(row) == "EWC+MaSQ (sum)"
    assert method_label({"importance": "fisher", "lam": 1.0}) == "EWC+FIM"


def test_round_sig_and_lam_per_lr2() -> None:
    assert 1 / 1e-5 != 100000.0  # the float slip that rounding removes
    assert lam_per_lr2(1.0, 1e-5) == 100000.0
    assert lam_per_lr2(10.0, 1e-6) == 1e7
    assert lam_per_lr2(0.1, 1e-4) == 1000.0
    assert lam_per_lr2(0.0, 1e-3) == 0.0
    assert round_sig(1 / 3, 3) == 0.333
    assert round_sig(123456.789, 4) == 123500.0
    assert round_sig(0.000123456, 2) == 0.00012
    assert round_sig(-2.71828, 3) == -2.72


def test_n_params() -> None:
    assert n_params((800, 800)) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert n_params("800-400-400") == 784 * 800 + 800 + 800 * 400 + 400 + 400 * 400 + 400 + 4010
    assert n_params((30,), in_features=4, classes=2) == 4 * 30 + 30 + 30 * 2 + 2


def test_model_size_limit_counts_the_padded_inputs() -> None:
    """A padded net has (28 + 2·pad)² inputs: one hidden layer of 2.2e6 units is 1.75e9
    parameters at 784 inputs (allowed) and 2.28e9 at 1,024 (refused, naming 1024 inputs)."""
    config = RunConfig(hidden=(2_200_000,))
    assert config.in_features == 784 and config.with_(pad=2).in_features == 1024
    config.validate()
    with pytest.raises(ConfigError, match=r"MLP 1024-2200000-10 has 2\.28e"):
        config.with_(pad=2).validate()


@pytest.mark.parametrize(
    ("value", "sizes"),
    [
        ("800-400-400", (800, 400, 400)),
        ("800x400", (800, 400)),
        ("30", (30,)),
        ("0800-040", (800, 40)),
        ([800, 400], (800, 400)),
        ((200,), (200,)),
    ],
)
def test_parse_hidden(value: Any, sizes: tuple[int, ...]) -> None:
    assert parse_hidden(value) == sizes


# strict: only ASCII digits and single separators; nothing is dropped or guessed
BAD_HIDDEN = [
    *("", " ", "abc", "800-0", "800-", "800--400", "x800", [], [800, True], [2.5], 800, None),
    *("20-x", "-5", "=-5", "+5", "800,400", "800 400", " 800-400", "800 - 400", "8_00"),
    *("800X400", "800x-400", "\uff18\uff10\uff10", "5e2", "800.0", "800\n"),
]


@pytest.mark.parametrize("bad", BAD_HIDDEN)
def test_parse_hidden_errors_are_one_line(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hidden(bad, "--hidden")
    message = str(info.value)
    assert message.startswith("--hidden: bad architecture") and "\n" not in message


def test_enums_are_strings() -> None:
    assert f"{Scale.SUM}" == "sum" and str(Init.TF) == "tf"
    assert json.dumps({"x": FisherLabels.EXACT}) == '{"x": "exact"}'
    assert {"ewc", "online-ewc", "mean-imm", "mode-imm"} <= set(METHODS)
