"""Bad input never silently means something else: the command line's arguments and the library's
public functions refuse it with a one-line :class:`~masq.errors.MasqError` naming the argument and
the fix (issue "hardening": arguments and public functions)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from masq import data, importance, models, tasks
from masq import grid as masq_grid
from masq.cli import build_parser, experiment_cmd, main
from masq.cli.grid_cmd import grid_from_args
from masq.config import RunConfig
from masq.consolidation import ewc
from masq.errors import ConfigError, MasqError
from tests.synthetic import synthetic_dataset

FAST = ["--iters", "20", "--eval-every", "5", "--batch-size", "25", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dataset name loads the tiny synthetic dataset (no MNIST in unit tests)."""
    dataset = synthetic_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run ``masq argv``: exit 2, one line on stderr starting "masq: error:", with ``needles``,
    nothing on stdout (refused before any work). Returns the line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("masq: error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert captured.out == ""
    return err


def parse(*argv: str) -> RunConfig:
    return experiment_cmd.config_from_args(build_parser().parse_args(list(argv)))


def grid_of(*argv: str) -> object:
    return grid_from_args(build_parser().parse_args(["grid", "--preset", "none", *argv]))


# ----------------------------------------------------------------- one notation of architectures


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize(
    ("words", "hint"), [(["800", "800"], "--hidden 800-800"), (["20", "30", "40"], "20-30-40")]
)
def test_run_refuses_several_hidden_values_showing_the_dash_notation(
    command: str, words: list[str], hint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = [command, *FAST, "--hidden", *words, "--out", str(out)]
    refused(capsys, argv, "one architecture written with dashes", hint, "masq grid")
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "compare", "grid"])
@pytest.mark.parametrize(
    "argv",
    [
        ["--hidden=-5"],
        ["--hidden", "-5"],
        ["--hidden", "=-5"],
        ["--hidden", "20-x"],
        ["--hidden", "800,800"],
        ["--hidden", "800-"],
        ["--hidden", "-800-800"],
        ["--hidden", "8_00"],
    ],
    ids=" ".join,
)
def test_hidden_with_other_characters_is_refused(
    command: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o")
    rest = ["--preset", "none", "--dry-run"] if command == "grid" else [*FAST, "--out", out]
    line = refused(capsys, [command, *argv, *rest], "bad architecture", "800-400-400")
    value = argv[0].split("=", 1)[1] if len(argv) == 1 else argv[1]
    assert repr(value) in line  # the value as given, nothing dropped


@pytest.mark.parametrize("text", ["30", "800-800", "800-400-400", "800x400x400", "7-0300"])
def test_run_and_grid_read_an_architecture_alike(text: str) -> None:
    expected = tuple(int(p) for p in text.replace("x", "-").split("-"))
    assert parse("run", "--hidden", text).hidden == expected
    assert parse("compare", "--hidden", text).hidden == expected
    assert grid_of("--hidden", text).hidden == (expected,)  # type: ignore[attr-defined]
    toml = masq_grid.grid_from_mapping({"hidden": [text]}, masq_grid.Grid())
    assert toml.hidden == (expected,)


def test_grid_takes_one_architecture_per_value() -> None:
    grid = grid_of("--hidden", "800-800", "800-400-400", "30")
    assert grid.hidden == ((800, 800), (800, 400, 400), (30,))  # type: ignore[attr-defined]
    # in a TOML file a list of numbers is one architecture, a list of strings several
    assert masq_grid.grid_from_mapping({"hidden": [800, 800]}).hidden == ((800, 800),)
    both = masq_grid.grid_from_mapping({"hidden": ["800-800", "20"]})
    assert both.hidden == ((800, 800), (20,))


def test_hidden_help_shows_the_dash_notation(capsys: pytest.CaptureFixture[str]) -> None:
    for command, needle in (("run", "800-400-400"), ("grid", "--hidden 800-800 800-400-400")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert needle in text, command


# ----------------------------------------------------------- NaN and inf in every grid axis

FLOAT_AXES = ["--lam", "--lr2", "--lr1", "--gamma", "--lam-per-lr2"]


@pytest.mark.parametrize("flag", FLOAT_AXES)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "-1e-5"])
def test_grid_float_axes_refuse_nan_inf_and_out_of_range(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "r"
    argv = ["grid", "--preset", "none", flag, "1e-3", value, "--results", str(results)]
    name = flag[2:].replace("-", "_")
    refused(capsys, argv, f"{name}:")
    assert not results.exists()


@pytest.mark.parametrize("key", ["lam", "lr2", "lr1", "gamma", "lam_per_lr2"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_grid_file_values_refuse_nan_and_inf(key: str, value: str, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f"{key} = [0.5, {value}]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        masq_grid.load_grid_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:") and "\n" not in message


def test_a_grid_built_in_code_is_checked_too() -> None:
    for changes in ({"lam": (1.0, math.nan)}, {"lr2": (math.inf,)}, {"lam_per_lr2": (-1.0,)}):
        bad = masq_grid.Grid(**changes)
        with pytest.raises(ConfigError, match=next(iter(changes))):
            bad.check()
        with pytest.raises(ConfigError):
            masq_grid.expand(bad)
    masq_grid.Grid(lam=(0.0, 10.0), gamma=(0.0, 1.0)).check()  # the range's ends are fine


# ------------------------------------------ negative numbers in scientific notation after a flag


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--lr2", "-1e-5", "lr2: must be > 0"),
        ("--lr1", "-1E-3", "lr1: must be > 0"),
        ("--lam", "-1e3", "lam: must be >= 0"),
        ("--lam", "-inf", "lam: must be a finite number"),
        ("--gamma", "-2.5e-1", "gamma: must be between 0 and 1"),
        ("--seed", "-1", "seed: must be >= 0"),
    ],
)
def test_negative_scientific_numbers_reach_the_range_check(
    command: str,
    flag: str,
    value: str,
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "o")
    spaced = refused(capsys, [command, *FAST, flag, value, "--out", out], needle)
    joined = refused(capsys, [command, *FAST, f"{flag}={value}", "--out", out], needle)
    assert spaced == joined


@pytest.mark.parametrize(
    ("flag", "value"), [("--lr2", "-1e-5"), ("--lam-per-lr2", "-1e-2"), ("--lam", "-.5e2")]
)
def test_grid_negative_scientific_numbers_reach_the_range_check(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["grid", "--preset", "none", "--dry-run"]
    spaced = refused(capsys, [*base, flag, value], "must be")
    assert spaced == refused(capsys, [*base, f"{flag}={value}"], "must be")


# ----------------------------------------------------------------------- contradictory flags


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--importance", "none", "--lam", "1000"], ["--lam 1000", "--importance none"]),
        (["--importance", "fisher", "--scale", "sum"], ["--scale sum", "--importance fisher"]),
        (["--importance", "masq", "--fisher-labels", "sampled"], ["--fisher-labels sample"]),
        (["--fisher-labels", "exact"], ["--fisher-labels exact", "--importance masq"]),
        (["--gamma", "0.5"], ["--gamma 0.5", "online"]),
        (["--ewc", "plain", "--gamma", "0.5"], ["--gamma 0.5", "online"]),
        (["--importance", "none", "--scale", "sum"], ["--scale sum", "--importance none"]),
        (["--importance", "none", "--masq-batch", "10"], ["--masq-batch 10"]),
        (["--importance", "none", "--ewc", "online"], ["online-ewc", "--importance none"]),
        (["--importance", "masq", "--lam", "0"], ["--lam 0", "--importance masq"]),
        (["--lam", "0", "--scale", "sum"], ["--scale sum", "--lam 0"]),
    ],
)
def test_contradictory_run_flags_are_refused(
    argv: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    line = refused(capsys, ["run", *FAST, *argv, "--out", str(out)], *needles)
    assert "no effect" in line or "only applies" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "needle"), [(["--lam", "0"], "--lam 0"), (["--gamma", "0.3"], "--gamma 0.3")]
)
def test_contradictory_compare_flags_are_refused(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(capsys, ["compare", *FAST, *argv, "--out", str(tmp_path / "o")], needle)


@pytest.mark.parametrize(
    ("command", "argv", "needles"),
    [
        ("imm", ["--drop-p", "0.3"], ["--drop-p 0.3", "--transfer weight", "drop or l2-drop"]),
        ("imm", ["--transfer", "l2", "--drop-p", "0.3"], ["--drop-p 0.3", "--transfer l2"]),
        ("imm", ["--transfer", "drop", "--transfer-lam", "0.1"], ["--transfer-lam 0.1", "l2"]),
        ("run", ["--transfer", "drop"], ["--transfer drop", "only applies to IMM"]),
        ("run", ["--drop-p", "0.2"], ["--drop-p 0.2", "only applies to IMM"]),
        ("compare", ["--alpha-step", "0.1"], ["--alpha-step 0.1", "only applies to IMM"]),
        ("run", ["--consolidation", "joint", "--lam", "10"], ["--lam 10", "joint", "drop --lam"]),
        ("run", ["--consolidation", "mean-imm", "--lam", "5"], ["--lam 5", "mean-imm"]),
    ],
)
def test_imm_settings_without_their_transfer_are_refused(
    command: str,
    argv: list[str],
    needles: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "o"
    refused(capsys, [command, *FAST, *argv, "--out", str(out)], *needles)
    assert not out.exists()


def test_imm_settings_with_their_transfer_are_accepted() -> None:
    config = parse("run", "--consolidation", "mode-imm", "--transfer", "l2-drop", "--drop-p",
                   "0.3", "--transfer-lam", "0.01", "--alpha-step", "0.05")  # fmt: skip
    assert (config.transfer, config.drop_p, config.transfer_lam, config.alpha_step) == (
        "l2-drop",
        0.3,
        0.01,
        0.05,
    )


def test_flags_that_agree_are_accepted() -> None:
    # masq 0.1's spelling is accepted and means the new name
    assert parse("run", "--importance", "fisher", "--fisher-labels", "sampled").fisher_labels == (
        "sample"
    )
    assert parse("run", "--importance", "masq", "--scale", "sum").scale == "sum"
    assert parse("run", "--importance", "fisher", "--masq-batch", "50").masq_batch == 50
    online = parse("run", "--ewc", "online", "--gamma", "0.5")
    assert (online.consolidation, online.gamma) == ("online-ewc", 0.5)
    none = parse("run", "--importance", "none", "--lam", "0")
    assert (none.importance, none.lam) == ("none", 0.0)
    assert parse("compare", "--fisher-labels", "exact", "--masq-batch", "20").masq_batch == 20


def test_a_default_gives_way_visibly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--importance none alone: λ = 0 (not 1 / lr2); --lam 0 alone: importance "none"."""
    none = parse("run", "--importance", "none")
    assert (none.importance, none.lam) == ("none", 0.0)
    zero = parse("run", "--lam", "0")
    assert (zero.importance, zero.lam) == ("none", 0.0)
    assert parse("run", "--importance", "fisher").lam == 100000.0  # 1 / lr2 as before
    assert (
        main(["run", *FAST, "--hidden", "8", "--importance", "none", "--out", str(tmp_path)]) == 0
    )
    assert "no EWC λ=0 " in capsys.readouterr().out
    # the record is the grid's canonical configuration of that run
    assert masq_grid.canonical(none) == none and masq_grid.canonical(zero) == zero


def test_grid_merges_contradictory_combinations_and_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Axes combine by design: 2 importances x 2 scales x 2 λ = 8 combinations; λ = 0 makes the
    4 of them one run "none", and the FIM ignores the scale (2 -> 1): 1 + 1 + 2 = 4 runs."""
    argv = ["--hidden", "8", "--importance", "fisher", "masq", "--scale", "mean", "sum"]
    argv += ["--lam", "0", "1"]
    configs = masq_grid.expand(grid_of(*argv))
    by_hand = {("none", "mean", 0.0), ("fisher", "mean", 1.0), ("masq", "mean", 1.0)}
    by_hand.add(("masq", "sum", 1.0))
    assert {(c.importance, c.scale.value, c.lam) for c in configs} == by_hand
    assert main(["grid", "--preset", "none", *argv, "--dry-run", "--workers", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("grid: 4 runs (") and "8 combinations" in first, first


# -------------------------------------------------------------- the library's public functions


def tiny(hidden: tuple[int, ...] = (3,), seed: int = 0) -> nn.Sequential:
    return models.mlp(hidden, in_features=4, classes=3, seed=seed).double()


def ones_like(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


def one_line(info: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    message = str(info.value)
    assert isinstance(info.value, MasqError) and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_penalty_with_an_anchor_of_other_widths_names_the_tensor() -> None:
    anchor = ewc.anchor(tiny((3,)), ones_like(tiny((3,))))
    other = tiny((5,))  # same depth (same names), other widths
    with pytest.raises(ConfigError) as info:
        ewc.penalty(other, anchor, 1.0)
    one_line(info, "'0.weight'", "(3, 4)", "(5, 4)")


@pytest.mark.parametrize("lam", [math.nan, math.inf, -math.inf, -1.0, "x", None])
def test_penalty_refuses_a_lambda_that_is_not_a_finite_number_at_least_zero(lam: object) -> None:
    model = tiny()
    anchor = ewc.anchor(model, ones_like(model))
    with pytest.raises(ConfigError) as info:
        ewc.penalty(model, anchor, lam)  # type: ignore[arg-type]
    one_line(info, "lam:")
    assert float(ewc.penalty(model, anchor, 0.0).detach()) == 0.0  # the end of the range is fine


@pytest.mark.parametrize(("bad", "what"), [(-0.5, "1 negative"), (math.nan, "1 NaN/inf")])
def test_anchor_refuses_negative_or_nan_importance(bad: float, what: str) -> None:
    model = tiny()
    imp = ones_like(model)
    imp["2.bias"][1] = bad
    with pytest.raises(ConfigError) as info:
        ewc.anchor(model, imp)
    one_line(info, "'2.bias'", what)
    imp["2.bias"][1] = math.inf
    with pytest.raises(ConfigError, match="NaN/inf"):
        ewc.Anchor(dict(model.named_parameters()), imp)
    imp["2.bias"][1] = 0.0  # zero importance is fine
    ewc.anchor(model, imp)


@pytest.mark.parametrize("spec", [None, 5, ("D5-5",)])
def test_tasks_make_refuses_a_spec_that_is_not_a_string(spec: object) -> None:
    with pytest.raises(ConfigError) as info:
        tasks.make(spec, dataset=synthetic_dataset())  # type: ignore[arg-type]
    one_line(info, "spec:", "D5-5")


@pytest.mark.parametrize(("kwargs", "needle"), [({"seed": None}, "seed:"), ({"seed": -1}, "seed:"),
                                                ({"dataset": None}, "dataset:")])  # fmt: skip
def test_tasks_make_checks_seed_and_dataset(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        tasks.make("DP10-10", **{"dataset": synthetic_dataset(), **kwargs})
    one_line(info, needle)


@pytest.mark.parametrize("hidden", [800, None, 2.5, "800 800", "20-x"])
def test_mlp_refuses_hidden_that_is_not_an_architecture(hidden: object) -> None:
    with pytest.raises(ConfigError) as info:
        models.mlp(hidden)  # type: ignore[arg-type]
    one_line(info, "hidden")


def test_mlp_reads_the_dash_notation() -> None:
    model = models.mlp("30-20", in_features=4, classes=2)
    assert [tuple(p.shape) for p in model.parameters()][::2] == [(30, 4), (20, 30), (2, 20)]


def _data(n: int = 12, width: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


MEASURES = {
    "fisher": importance.fisher,
    "masq": importance.masq,
}


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("label", [3, 10, -1])
def test_importance_refuses_labels_out_of_range(measure: str, label: int) -> None:
    x, y = _data()
    y[7] = label  # in the second batch of 5
    with pytest.raises(ConfigError) as info:
        MEASURES[measure](tiny(), importance.batches(x, y, 5))
    one_line(info, "y: batch 1", f"to {max(label, 2)}" if label > 0 else "from -1", "3 outputs")


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("shape", [(12, 5), (12,), (12, 2, 2)])
def test_importance_refuses_inputs_of_the_wrong_width(measure: str, shape: tuple) -> None:
    x, y = _data()
    x = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ConfigError) as info:
        MEASURES[measure](tiny(), importance.batches(x, y, 5))
    one_line(info, "x: batch 0", str(tuple([5, *shape[1:]])), "[B, 4]")


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_importance_refuses_nan_or_inf_inputs(measure: str, value: float) -> None:
    x, y = _data()
    x[11, 2] = value  # the third batch
    x[10, 0] = value
    with pytest.raises(ConfigError) as info:
        MEASURES[measure](tiny(), importance.batches(x, y, 5))
    one_line(info, "x: batch 2", "2 NaN or inf")


@pytest.mark.parametrize("measure", MEASURES)
def test_importance_refuses_float_labels_and_unequal_lengths(measure: str) -> None:
    x, y = _data()
    with pytest.raises(ConfigError) as info:
        MEASURES[measure](tiny(), [(x, y.double())])
    one_line(info, "y: batch 0", "float64")
    with pytest.raises(ConfigError) as info:
        MEASURES[measure](tiny(), [(x, y[:-1])])
    one_line(info, "batch 0", "(12, 4)", "(11,)")


def test_importance_checks_leave_good_inputs_and_own_losses_alone() -> None:
    """Valid batches give the reference's values; a custom loss may take float targets; the
    sampled and exact FIM do not read the labels, so they are not checked."""
    x, y = _data()
    model = tiny()
    fast = importance.fisher(model, importance.batches(x, y, 5))
    slow = importance.reference.fisher(model, importance.batches(x, y, 5))
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-14)

    def squared(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (logits - target).square().sum(1)

    targets = torch.randn(12, 3, dtype=torch.float64)
    imp = importance.masq(model, importance.batches(x, targets, 6), loss=squared)
    assert all(bool(torch.isfinite(t).all()) for t in imp.values())
    y[0] = 99  # unused by "exact"
    importance.fisher(model, importance.batches(x, y, 5), labels="exact")
