"""Incremental Moment Matching: the merges (masq.consolidation.imm), the protocol
(masq.protocol.imm), its grid, table and command-line paths."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

import masq.data
from masq.cli import main
from masq.config import RunConfig
from masq.consolidation import QuadraticPenalty, check_config, ewc, imm
from masq.errors import ConfigError
from masq.grid import canonical, chunks
from masq.protocol import continue_run, run
from masq.protocol.phases import Context
from masq.runid import run_id
from masq.store import Store, load
from masq.tasks import Task
from masq.training import accuracies, eval_counts
from tests.synthetic import learnable_dataset

prun = importlib.import_module("masq.protocol.run")
Params = dict[str, Tensor]


def rand_params(seed: int, positive: bool = False) -> Params:
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}
    out = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    return {k: v.abs() + 0.1 for k, v in out.items()} if positive else out


def close(a: Params, b: Params, rtol: float = 1e-12, atol: float = 0.0) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


# ----------------------------------------------------------------------------- the merges


def test_mean_imm_of_identical_models_is_that_model() -> None:
    theta = rand_params(0)
    merged = imm.mean_imm([theta, theta, theta], [0.2, 0.3, 0.5])
    assert close(merged, theta)
    assert merged["0.weight"] is not theta["0.weight"]  # a new tensor, inputs untouched


def test_mean_imm_is_the_weighted_sum_entry_by_entry() -> None:
    a, b = rand_params(1), rand_params(2)
    merged = imm.mean_imm([a, b], [0.3, 0.7])
    for k in a:  # an independent spelling, element by element
        expected = [0.3 * x + 0.7 * y for x, y in zip(a[k].flatten(), b[k].flatten(), strict=True)]
        assert torch.allclose(merged[k].flatten(), torch.stack(expected), rtol=1e-14)


def test_mode_imm_with_equal_importances_is_mean_imm() -> None:
    a, b, f = rand_params(3), rand_params(4), rand_params(5, positive=True)
    assert close(imm.mode_imm([a, b], [f, f], [0.3, 0.7]), imm.mean_imm([a, b], [0.3, 0.7]))


def test_mode_imm_by_hand() -> None:
    """θ = (Σ α F θ) / (Σ α F) on numbers small enough to compute on paper."""
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    fa = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    fb = {"w": torch.tensor([3.0, 2.0], dtype=torch.float64)}
    merged = imm.mode_imm([a, b], [fa, fb], [0.5, 0.5])
    # (0.5*1*1 + 0.5*3*3) / (0.5*1 + 0.5*3) = 2.5;  (0 + 0.5*2*4) / (0.5*2 + 0.5*2) = 2
    assert torch.allclose(merged["w"], torch.tensor([2.5, 2.0], dtype=torch.float64), rtol=1e-7)


def test_mode_imm_with_one_importance_zero_returns_the_other_tasks_weights() -> None:
    a, b, fb = rand_params(6), rand_params(7), rand_params(8, positive=True)
    zero = {k: torch.zeros_like(v) for k, v in fb.items()}
    assert close(imm.mode_imm([a, b], [zero, fb], [0.5, 0.5]), b, rtol=1e-6)
    assert close(imm.mode_imm([a, b], [fb, zero], [0.5, 0.5]), a, rtol=1e-6)
    # an entry that no task finds important gets the α-weighted mean
    both = imm.mode_imm([a, b], [zero, zero], [0.25, 0.75])
    assert close(both, imm.mean_imm([a, b], [0.25, 0.75]), rtol=1e-12)


@pytest.mark.parametrize("merge", ["mean", "mode"])
def test_alpha_one_and_zero_recover_the_single_task_solutions(merge: str) -> None:
    a, b = rand_params(9), rand_params(10)
    fa, fb = rand_params(11, positive=True), rand_params(12, positive=True)

    def merged(alphas: list[float]) -> Params:
        if merge == "mean":
            return imm.mean_imm([a, b], alphas)
        return imm.mode_imm([a, b], [fa, fb], alphas)

    for alphas, expected in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        got = merged(alphas)
        assert all(torch.equal(got[k], expected[k]) for k in a)  # exactly, not nearly


@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e3])
def test_mode_imm_is_invariant_to_a_common_scale_of_the_importances(scale: float) -> None:
    """The scale trap of EWC (MaSQ "mean" is ~1000x smaller than the FIM) cannot apply."""
    thetas = [rand_params(13), rand_params(14), rand_params(15)]
    fs = [rand_params(16 + i, positive=True) for i in range(3)]
    # MaSQ-"mean"-sized importances (1e-10) with some exact zeros, where an absolute eps
    # of 1e-8 would swamp them
    tiny = [{k: v * 1e-10 * (v > 0.5) for k, v in f.items()} for f in fs]
    for base in (fs, tiny):
        scaled = [{k: v * scale for k, v in f.items()} for f in base]
        alphas = [0.2, 0.3, 0.5]
        assert close(imm.mode_imm(thetas, scaled, alphas), imm.mode_imm(thetas, base, alphas),
                     rtol=1e-10)  # fmt: skip
    # the tiny importances still steer the merge: not the mean
    mean = imm.mean_imm(thetas, [0.2, 0.3, 0.5])
    assert not close(imm.mode_imm(thetas, tiny, [0.2, 0.3, 0.5]), mean, rtol=1e-3)


def test_bad_merges_are_one_line_errors() -> None:
    a, b = rand_params(20), rand_params(21)
    for alphas in ([0.5, 0.6], [1.2, -0.2], [1.0], [math.nan, 1.0]):
        with pytest.raises(ConfigError, match="α"):
            imm.mean_imm([a, b], alphas)
    c = dict(b)
    del c["2.bias"]
    with pytest.raises(ConfigError, match=r"2\.bias"):
        imm.mean_imm([a, c], [0.5, 0.5])
    with pytest.raises(ConfigError, match="importance 2"):
        imm.mode_imm([a, b], [a, c], [0.5, 0.5])


def test_shares_and_alphas() -> None:
    assert imm.shares(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    s = imm.shares(0.01)
    assert len(s) == 101 and s[7] == 0.07 and s[-1] == 1.0
    assert imm.shares(0.3) == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert imm.share_alphas(2, 0.3) == [0.7, 0.3]
    assert imm.share_alphas(4, 0.4) == pytest.approx([0.2, 0.2, 0.2, 0.4])


# ----------------------------------------------------------------------------- transfer


def test_l2_transfer_value_and_the_gradient_added_in_training() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    prev = {k: v.detach() + 0.1 * (i + 1) for i, (k, v) in enumerate(net.named_parameters())}
    params = dict(net.named_parameters())
    value = imm.l2_transfer(params, prev, lam=0.3)
    by_hand = sum(0.3 * float(((params[k].detach() - prev[k]) ** 2).sum()) for k in prev)
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    autograd = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    ones = {k: torch.ones_like(v) for k, v in prev.items()}  # IMM's plan: F = 1 at 2 λ_T
    QuadraticPenalty(net, ewc.Anchor(prev, ones), 2 * 0.3)(net)
    for k, p in net.named_parameters():
        assert torch.allclose(p.grad, autograd[k], rtol=1e-6)
        assert torch.allclose(p.grad, 0.6 * (p.detach() - prev[k]), rtol=1e-6)


def test_drop_transfer_masks_the_difference() -> None:
    theta = {"w": torch.full((200, 100), 3.0)}
    prev = {"w": torch.full((200, 100), 1.0)}
    g = torch.Generator().manual_seed(0)
    zero = imm.drop_transfer(theta, prev, 0.0, g)
    assert torch.equal(zero["w"], theta["w"])
    eff = imm.drop_transfer(theta, prev, 0.5, g)["w"]
    # each entry is θ_prev (dropped) or θ_prev + (θ − θ_prev) / (1 − p) = 1 + 2 / 0.5 = 5
    assert set(eff.unique().tolist()) == {1.0, 5.0}
    assert abs(float((eff == 5.0).float().mean()) - 0.5) < 0.02
    assert abs(float(eff.mean()) - 3.0) < 0.1  # E[θ_eff] = θ
    with pytest.raises(ConfigError, match="drop_p"):
        imm.drop_transfer(theta, prev, 1.0, g)


# ----------------------------------------------------------------------------- protocol

SMALL = dict(
    slt="D5-5",
    hidden=(16,),
    iters1=20,
    iters2=20,
    lr2=1e-3,
    eval_every=10,
    batch_size=50,
    masq_batch=100,
    alpha_step=0.25,
)


@pytest.fixture
def learnable(monkeypatch: pytest.MonkeyPatch) -> list[Task]:
    dataset = learnable_dataset()
    monkeypatch.setattr(masq.data, "load", lambda name="mnist", **kwargs: dataset)
    return prun.make_tasks(RunConfig(**SMALL))


def imm_config(**changes: object) -> RunConfig:
    return RunConfig(**{**SMALL, "consolidation": "mode-imm", "importance": "fisher", **changes})


def trained(config: RunConfig, d1: prun.D1State, tasks: list[Task]) -> list[Params]:
    """The solutions θ_1..θ_T of an IMM run's phases (its kept weights)."""
    imp, seconds = prun.compute_importance(config, d1, tasks)
    weights = continue_run(config, d1, imp, tasks, seconds, keep_weights=True).weights
    assert weights is not None
    return weights


def test_drop_transfer_with_p_zero_is_plain_weight_transfer(learnable: list[Task]) -> None:
    d1 = prun.train_first(imm_config(), learnable)
    plain = trained(imm_config(), d1, learnable)
    p0 = trained(imm_config(transfer="drop", drop_p=0.0), d1, learnable)
    p5 = trained(imm_config(transfer="drop", drop_p=0.5), d1, learnable)
    assert close(p0[1], plain[1], rtol=1e-4, atol=1e-6)
    assert not close(p5[1], plain[1], rtol=1e-2, atol=1e-3)  # it does something
    # L2-transfer pulls θ_2 towards θ_1
    l2 = trained(imm_config(transfer="l2", transfer_lam=10.0), d1, learnable)

    def dist(s: Params) -> float:
        return sum(float(((s[k] - d1.state_dict[k]) ** 2).sum()) for k in s)

    assert dist(l2[1]) < 0.5 * dist(plain[1])


def evaluate_merges(
    config: RunConfig,
    tasks: list[Task],
    states: list[Params],
    importances: list[Params],
    shares: list[float],
) -> dict[str, list[float]]:
    """The accuracies of the merges of ``config``'s method at each share (what its end hook
    sweeps), evaluated through the protocol's context."""
    method = imm.MODE_IMM if config.consolidation == "mode-imm" else imm.MEAN_IMM
    ctx = Context(config, tasks, torch.device("cpu"))
    out: dict[str, list[float]] = {}
    for s in shares:
        merged = method.merge(states, importances, imm.share_alphas(len(states), s))
        for name, value in ctx.evaluate(merged).items():
            out.setdefault(name, []).append(value)
    return out


def test_merge_sweep_equals_evaluating_the_merged_model(learnable: list[Task]) -> None:
    """End to end: the recorded sweep at α_T = 0 and 1 is the accuracy of θ_1 and θ_2 measured
    while training (the accuracy matrix), and in between it is the accuracy of a net loaded
    with the merge computed here by hand from the kept weights and importances."""
    config = imm_config(eval_val=True)
    result = run(config)
    sweep, r = result.imm["sweep"], result.accuracy
    assert sweep["share"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for j, name in enumerate(("D1", "D2")):
        assert sweep[name][0] == r[0][j] and sweep[name][-1] == r[1][j]
        assert sweep["val:" + name][-1] == result.curves[1]["val:" + name][-1]
    theta1, theta2 = result.weights
    device = torch.device("cpu")
    f1, _ = prun.importance_of(config, prun.model_at(config, theta1, learnable), learnable[0], 0,
                               device)  # fmt: skip
    f2, _ = prun.importance_of(config, prun.model_at(config, theta2, learnable), learnable[1], 1,
                               device)  # fmt: skip
    total = sum(float(f[k].double().sum()) for f in (f1, f2) for k in f)
    guard = imm.DEFAULT_EPS * total / sum(f[k].numel() for f in (f1, f2) for k in f)
    sets = {"D1": learnable[0].test, "D2": learnable[1].test}
    for i, s in enumerate(sweep["share"]):
        merged = {
            k: ((1 - s) * (f1[k] + guard) * theta1[k] + s * (f2[k] + guard) * theta2[k])
            / ((1 - s) * (f1[k] + guard) + s * (f2[k] + guard))
            for k in theta1
        }
        acc = accuracies(eval_counts(prun.model_at(config, merged, learnable), sets),
                         {"D1∪D2": ("D1", "D2")})  # fmt: skip
        for name in ("D1", "D2", "D1∪D2"):
            assert sweep[name][i] == acc[name], (s, name)
    # the labelled points and the metrics read the sweep
    best = max(range(5), key=lambda i: (sweep["D1∪D2"][i], -i))
    val = max(range(5), key=lambda i: (sweep["val:D1∪D2"][i], -i))
    assert result.imm["test_best"]["share"] == sweep["share"][best]
    assert result.metrics["merged.union"] == sweep["D1∪D2"][best]
    assert result.metrics["merged_val.union"] == sweep["D1∪D2"][val]
    assert result.metrics["merged_val.alpha"] == sweep["share"][val]
    # the record survives JSON
    back = type(result).from_json(result.to_json())
    assert back.imm == json.loads(json.dumps(result.imm)) and back.metrics == result.metrics


def hand_tasks() -> list[Task]:
    """Two one-class tasks on 2-pixel inputs: D1 (3 test images, class 0), D2 (1, class 1)."""

    def part(n: int, label: int) -> tuple[Tensor, Tensor]:
        return torch.rand(n, 2, generator=torch.Generator().manual_seed(n)), torch.full(
            (n,), label, dtype=torch.int64
        )

    return [
        Task("D1", (0,), None, part(3, 0), part(3, 0), part(3, 0)),
        Task("D2", (1,), None, part(1, 1), part(1, 1), part(1, 1)),
    ]


def test_a_known_answer_by_hand() -> None:
    """A net whose logits are its output bias (all other weights 0): θ_1 has bias (1, 0),
    θ_2 has bias (0, 2). Mean-IMM predicts class 0 iff 1 − s > 2 s, i.e. s < 1/3. With
    importances F_1 = 1 and F_2 = (1, 4) on the bias, mode-IMM's bias is (1 − s,
    8 s / (1 + 3 s)): class 0 iff 3 s² + 6 s − 1 < 0, i.e. s < (√48 − 6) / 6 ≈ 0.155."""
    tasks = hand_tasks()
    config = RunConfig(slt="D1-1", hidden=(3,), consolidation="mean-imm", importance="none")
    model = prun.build_model(config, tasks)
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    theta1 = {**zero, "2.bias": torch.tensor([1.0, 0.0])}
    theta2 = {**zero, "2.bias": torch.tensor([0.0, 2.0])}
    ones = {k: torch.ones_like(v) for k, v in zero.items()}
    f2 = {**ones, "2.bias": torch.tensor([1.0, 4.0])}
    shares = [0.0, 0.1, 0.15, 0.16, 0.3, 0.33, 0.34, 0.5, 1.0]
    mean = evaluate_merges(config, tasks, [theta1, theta2], [], shares)
    mode = evaluate_merges(
        config.with_(consolidation="mode-imm", importance="fisher"),
        tasks,
        [theta1, theta2],
        [ones, f2],
        shares,
    )
    for s, m, d in zip(shares, mean["D1∪D2"], mode["D1∪D2"], strict=True):
        assert m == (0.75 if s < 1 / 3 else 0.25), s
        assert d == (0.75 if 3 * s * s + 6 * s - 1 < 0 else 0.25), s
    assert mean["val:D1"][0] == 1.0 and mean["val:D2"][-1] == 1.0


def test_three_tasks_sweep_the_last_share_and_the_uniform_alpha(learnable: list[Task]) -> None:
    config = RunConfig(**{**SMALL, "slt": "D4-3-3", "consolidation": "mean-imm",
                          "importance": "none", "alpha_step": 0.5})  # fmt: skip
    assert imm.sweep_shares(config.alpha_step, config.n_tasks) == [0.0, 1 / 3, 0.5, 1.0]
    result = run(config)
    assert result.imm["uniform"]["share"] == 1 / 3
    assert result.metrics["merged_uniform.union"] == result.imm["sweep"]["D1∪D2∪D3"][1]
    assert len(result.accuracy) == 3


def test_imm_configs_are_checked() -> None:
    with pytest.raises(ConfigError, match="mode-imm needs an importance"):
        check_config(RunConfig(consolidation="mode-imm", importance="none"))
    with pytest.raises(ConfigError, match="drop_p"):
        RunConfig(consolidation="mean-imm", drop_p=1.0).validate()
    with pytest.raises(ConfigError, match="unknown consolidation method 'imm'"):
        RunConfig(consolidation="imm").validate()


def test_canonical_keeps_only_what_matters() -> None:
    mean = canonical(RunConfig(consolidation="mean-imm", importance="fisher", lam=5.0,
                               transfer="l2", drop_p=0.3, transfer_lam=0.1))  # fmt: skip
    assert mean.importance == "none" and mean.lam == 1000.0 and mean.drop_p == 0.5
    assert mean.transfer_lam == 0.1
    mode = canonical(RunConfig(consolidation="mode-imm", importance="fisher", transfer="drop",
                               transfer_lam=0.1, scale="sum"))  # fmt: skip
    assert mode.importance == "fisher" and mode.transfer_lam == 1e-3 and mode.scale == "mean"
    ewc = canonical(RunConfig(transfer="drop", drop_p=0.2, alpha_step=0.1))
    assert ewc == canonical(RunConfig())
    # runs trained alike form one chunk; EWC runs stack as before
    configs = [mean.with_(transfer="weight"), canonical(mode.with_(transfer="weight")), ewc]
    got = chunks(configs, 16)
    assert sorted(len(c) for c in got) == [1, 2]


# ----------------------------------------------------------------------------- grid, table, CLI

TINY = ["--preset", "none", "--slt", "D5-5", "--hidden", "8", "--iters1", "10", "--iters2",
        "10", "--eval-every", "5", "--batch-size", "20", "--masq-batch", "50", "--lr2", "1e-2",
        "--alpha-step", "0.5"]  # fmt: skip
FAST = ["--workers", "1", "--threads", "1", "--no-progress"]


@pytest.fixture
def idx_dir(tmp_path: Path, data_fake: Callable) -> Path:
    return data_fake("mnist", n_train=5200, n_test=200).write(tmp_path / "idx")


def test_grid_stores_imm_records_and_table_lists_them(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = str(tmp_path / "res")
    axes = ["--consolidation", "ewc", "mean-imm", "mode-imm", "--importance", "fisher", "masq",
            "--transfer", "weight", "drop", "--lam", "0", "10", "--eval-val"]  # fmt: skip
    args = ["grid", *TINY, *axes, "--results", res, "--data-dir", str(idx_dir), *FAST]
    assert main(args) == 0
    # EWC: λ = 0 once + 2 importances; IMM: (mean + 2 mode) x 2 transfers
    df = load(res)
    assert len(df) == 3 + 6
    imm_rows = df[df["consolidation"].isin(["mean-imm", "mode-imm"])]
    assert len(imm_rows) == 6 and imm_rows["merged.union"].notna().all()
    store = Store(res)
    records = {rid: store.read_record(rid)["result"] for rid in imm_rows["run_id"]}
    assert all(set(r["imm"]["sweep"]["share"]) == {0.0, 0.5, 1.0} for r in records.values())
    assert all("imm" not in store.read_record(rid)["result"] for rid in df["run_id"]
               if rid not in records)  # fmt: skip
    # mean- and mode-IMM of one transfer were trained once: the same later curves
    by_transfer: dict[str, list] = {}
    for r in records.values():
        by_transfer.setdefault(r["config"]["transfer"], []).append(r["curves"][1])
    assert all(c == cs[0] for cs in by_transfer.values() for c in cs)
    # ... and the grid's record is that of a run of the protocol on its own
    one = next(r for r in records.values() if r["config"]["consolidation"] == "mode-imm")
    config = RunConfig.from_dict(one["config"])
    alone = run(config, tasks=prun.make_tasks(config, data_dir=str(idx_dir)))
    assert alone.imm["sweep"] == one["imm"]["sweep"]
    capsys.readouterr()

    group = ["--group-by", "consolidation", "importance", "transfer"]
    for select_on, label in (("val", "val-selected α"), ("test", "test-best α")):
        assert main(["table", "--results", res, "--select-on", select_on, *group]) == 0
        out = capsys.readouterr().out
        assert out.count(f"merged ({label})") == 6
        assert "mode-IMM+FIM, drop p=0.5" in out and "mean-IMM |" in out
        assert "| best |" in out and "| last |" in out  # the EWC rows are still there
    csv = (Path(res) / "table1_test_by_consolidation_importance_transfer.csv").read_text()
    assert "merged" in csv


def test_imm_command_writes_records_table_and_figure(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["imm", "--slt", "D5-5", "--hidden", "8", "--iters", "10", "--eval-every", "5",
            "--batch-size", "20", "--masq-batch", "50", "--lr2", "1e-2", "--alpha-step", "0.25",
            "--importance", "masq", "--scale", "sum", "--transfer", "l2", "--device", "cpu",
            "--data-dir", str(idx_dir), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean-IMM, L2 λ=0.001" in text and "mode-IMM+MaSQ (sum), L2 λ=0.001" in text
    assert (out / "imm.png").stat().st_size > 1000 and (out / "imm.md").exists()
    records = sorted(out.glob("*.json"))
    assert len(records) == 2
    configs = [RunConfig.from_dict(json.loads(p.read_text())["config"]) for p in records]
    assert {c.consolidation for c in configs} == {"mean-imm", "mode-imm"}
    assert all(run_id(c) == run_id(canonical(c)) for c in configs)  # the grid's run ids
    assert main(["imm", "--importance", "none", "--out", str(out)]) == 2
    assert "mode-IMM needs an importance" in capsys.readouterr().err


def test_imm_report_writes_one_figure_per_slt(
    tmp_path: Path, idx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    res = str(tmp_path / "res")
    axes = ["--consolidation", "mean-imm", "mode-imm", "--importance", "fisher",
            "--transfer", "drop", "l2", "--seed", "0", "1"]  # fmt: skip
    assert main(["grid", *TINY, *axes, "--results", res, "--data-dir", str(idx_dir), *FAST]) == 0
    figs = tmp_path / "figs"
    assert main(["imm-report", "--results", res, "--out", str(figs)]) == 0
    assert (figs / "imm_alpha_D5-5.png").stat().st_size > 1000
    rows = (figs / "imm_alpha.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3  # 2 transfers x 2 methods x 3 shares
    assert all(",2," in r for r in rows[1:])  # two seeds averaged
