"""masq.analysis and ``masq analyze``: Table 2 against an explicit full Fisher, the FIM-vs-MaSQ
statistics on hand-made inputs, the λ sweep's expansion and reading, the commands end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import masq.data
from masq import analysis, grid, importance
from masq.cli import main
from masq.models import mlp
from tests.synthetic import learnable_dataset

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """masq.data.load gives a tiny learnable MNIST-shaped dataset (no disk, no network)."""
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq.data, "load", lambda *a, **k: ds)


def _net_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 12-5-3-4 net (perturbed biases) and 37 samples."""
    g = torch.Generator().manual_seed(seed)
    model = mlp((5, 3), in_features=12, classes=4, seed=seed).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(37, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (37,), generator=g)
    return model, x, y


def _explicit_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor's full block F = (1/N) Σ_n g_n g_nᵀ, one backward per sample."""
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    for n in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(r).T @ torch.stack(r) / len(x) for k, r in rows.items()}


# ----------------------------------------------------------------------------- diagonality


def test_table2_equals_the_explicit_full_fisher_for_every_tensor() -> None:
    model, x, y = _net_and_data()
    table = analysis.block_statistics(model, x, y, batch_size=10)  # uneven last batch
    blocks = _explicit_blocks(model, x, y)
    assert list(table["name"]) == list(blocks)
    for _, row in table.iterrows():
        f = blocks[row["name"]]
        p = f.shape[0]
        diag = torch.diagonal(f)
        off = f - torch.diag(diag)
        expect = {
            "diag_sum": float(diag.sum()),
            "diag_mean": float(diag.mean()),
            "offdiag_sum": float(off.sum()),
            "offdiag_abs_sum": float(off.abs().sum()),
        }
        if p > 1:
            expect["offdiag_mean"] = float(off.sum()) / (p * p - p)
            expect["offdiag_abs_mean"] = float(off.abs().sum()) / (p * p - p)
            expect["abs_mean_ratio"] = expect["offdiag_abs_mean"] / expect["diag_mean"]
        expect["abs_sum_ratio"] = expect["offdiag_abs_sum"] / expect["diag_sum"]
        for key, value in expect.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-13), (row["name"], key)
        assert row["mode"] == "exact" and row["num_params"] == p


def test_fisher_block_is_the_explicit_block_and_its_diagonal_the_fim() -> None:
    model, x, y = _net_and_data(1)
    blocks = _explicit_blocks(model, x, y)
    fim = importance.fisher(model, importance.batches(x, y, 8))
    for name in ("2.weight", "4.weight", "4.bias"):
        block = analysis.fisher_block(model, x, y, name, chunk=7)
        torch.testing.assert_close(block, blocks[name], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.diagonal(block), fim[name].reshape(-1).double())
    assert model.training  # mlp() returns a net in train mode; it is handed back so


def test_heatmap_and_table_markdown_render() -> None:
    model, x, y = _net_and_data()
    table = analysis.block_statistics(model, x, y, ["4.bias"])
    md = analysis.table2_markdown(table, "title")
    assert "| 4.bias | 4 | 4 | exact |" in md and "off-diag Σ\\|F\\|" in md
    fig = analysis.heatmap_figure({"4.bias": analysis.fisher_block(model, x, y, "4.bias")})
    assert len(fig.axes) == 2  # the map and its colour bar


# ----------------------------------------------------------------------------- statistics


def test_spearman_on_hand_made_inputs_with_ties_and_constants() -> None:
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: average ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert analysis.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(analysis.spearman([0, 0, 0], [1, 2, 3]))  # an all-zero tensor: no ranks
    assert math.isnan(analysis.spearman([5.0], [1.0]))
    t = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    assert analysis.spearman(t, t.square()) == pytest.approx(1.0)


def test_top_sets_overlap_and_cancellation_on_hand_made_inputs() -> None:
    assert list(analysis.top_set([0, 5, 5, 1], 0.25)) == [1, 2]  # ties at the threshold
    assert list(analysis.top_set([0, 0, 0, 0], 0.5)) == []  # zeros are never "top"
    assert list(analysis.top_set([1, 2, 3], 1e-9)) == [2]  # at least one entry
    fim = np.array([10, 9, 1, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    masq_mean = np.array([5, 0, 4, 0, 0, 0, 0, 0, 0, 0], dtype=float)
    assert analysis.top_overlap(fim, masq_mean, 0.2) == pytest.approx(0.5)
    assert analysis.top_overlap(fim, np.zeros(10), 0.2) == 0.0
    assert math.isnan(analysis.top_overlap(np.zeros(10), masq_mean, 0.2))
    # top-2 of the FIM: entries 0 and 1; MaSQ (sum) keeps 50 % of entry 0 and 5 % of entry 1
    assert analysis.cancellation_share(fim, [5, 0.45, 0, 0, 0, 0, 0, 0, 0, 0], 0.2) == 0.5
    at_bound = [1.0, 0.9, 0, 0, 0, 0, 0, 0, 0, 0]  # exactly 10 % of the FIM: not below
    assert analysis.cancellation_share(fim, at_bound, 0.2) == 0.0
    assert analysis.cancellation_share(fim, at_bound, 0.2, 0.11) == 1.0
    assert math.isnan(analysis.cancellation_share(np.zeros(10), np.zeros(10)))
    with pytest.raises(masq.ConfigError, match="--top"):
        analysis.top_set([1, 2], 0.0)
    with pytest.raises(masq.ConfigError, match="differ in size"):
        analysis.top_overlap([1, 2], [1, 2, 3])


def test_cancelling_share_is_measured_against_the_chance_level_of_masq_sum() -> None:
    """One batch of B = 4 per-sample gradients per one-entry tensor: agreeing (B·M = 4F),
    at the chance level of random signs (B·M = F) and cancelling exactly (M = 0). Only the
    last counts as cancelling; MaSQ mean compared with the FIM directly (M = F/B at chance)
    would call the chance-level entry cancelling too."""
    grads = {
        "agree": torch.tensor([[1.0], [1.0], [1.0], [1.0]]),
        "chance": torch.tensor([[1.0], [1.0], [-1.0], [1.0]]),
        "cancel": torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]),
    }
    fim = {n: g.square().mean(0) for n, g in grads.items()}
    mean = {n: g.mean(0).square() for n, g in grads.items()}
    total = {n: 4 * v for n, v in mean.items()}
    assert float(total["chance"]) == float(fim["chance"]) == 1.0
    imps = {"FIM": fim, "MaSQ mean": mean, "MaSQ sum": total}
    rows = {r["tensor"]: r for r in analysis.compare_rows(imps, top=1.0, cancel_below=0.3)}
    assert [rows[n]["cancel_share"] for n in grads] == [0.0, 0.0, 1.0]
    assert analysis.cancellation_share(fim["chance"], mean["chance"], 1.0, 0.3) == 1.0
    with pytest.raises(masq.ConfigError, match="MaSQ sum"):
        analysis.compare_rows({"FIM": fim, "MaSQ mean": mean})


def test_compare_rows_with_masq_batch_one_is_the_fim() -> None:
    """MaSQ(B = 1) == FIM: ratio 1, rank correlation 1, full overlap, nothing cancels."""
    model, x, y = _net_and_data(2)
    imps = analysis.measures(model.float(), x.float(), y, masq_batch=1)
    rows = analysis.compare_rows(imps, slt="D5-5", top=0.2)
    assert [r["tensor"] for r in rows] == [n for n, _ in model.named_parameters()]
    for r in rows:
        assert r["mean_ratio"] == pytest.approx(1.0, rel=1e-5)
        assert r["spearman"] == pytest.approx(1.0, abs=1e-6)
        assert r["top_overlap"] == 1.0 and r["cancel_share"] == 0.0
        assert r["max_MaSQ sum"] == pytest.approx(r["max_MaSQ mean"])


def test_compare_rows_with_one_batch_measures_jensen_and_scales() -> None:
    model, x, y = _net_and_data(3)
    imps = analysis.measures(model.float(), x.float(), y, masq_batch=len(x))
    rows = {r["tensor"]: r for r in analysis.compare_rows(imps)}
    for name, fim in imps["FIM"].items():
        full_grad = torch.autograd.grad(
            nn.functional.cross_entropy(model(x.float()), y), dict(model.named_parameters())[name]
        )[0]
        assert rows[name]["max_MaSQ mean"] == pytest.approx(float(full_grad.square().max()))
        assert rows[name]["max_MaSQ sum"] == pytest.approx(len(x) * rows[name]["max_MaSQ mean"])
        assert rows[name]["mean_ratio"] >= 1.0  # Jensen: MaSQ <= FIM
        assert rows[name]["mean_FIM"] == pytest.approx(float(fim.double().mean()))


# ----------------------------------------------------------------------------- λ sweep


def test_lam_grid_points_per_decade_and_errors() -> None:
    lams = analysis.lam_grid(1, 1e12, 2)
    assert len(lams) == 25 and lams[0] == 1.0 and lams[-1] == 1e12 and 1e6 in lams
    assert np.allclose(np.diff(np.log10(lams)), 0.5)
    assert analysis.lam_grid(1, 10, 3) == pytest.approx([1, 10 ** (1 / 3), 10 ** (2 / 3), 10])
    assert analysis.lam_grid(5, 5, 2) == [5.0]
    for lo, hi, m in ((0, 10, 2), (10, 1, 2), (1, 10, 0)):
        with pytest.raises(masq.ConfigError):
            analysis.lam_grid(lo, hi, m)


def test_sweep_expansion_shares_one_task1_state_per_seed() -> None:
    lams = analysis.lam_grid(1, 1e12, 2)
    g = analysis.sweep_grid("D5-5", (8,), 1e-3, lams, seeds=2, base={"iters1": 7})
    configs = analysis.sweep_configs([g, g])  # duplicates dropped
    assert len(configs) == 2 * (1 + 3 * len(lams))
    labels: dict[str, set[float]] = {}
    for c in configs:
        key = "none" if c.lam == 0 else f"{c.importance}/{c.scale}"
        labels.setdefault(key, set()).add(c.lam)
        assert c.iters1 == 7 and c.hidden == (8,) and c.lr2 == 1e-3
    assert labels == {"none": {0.0}, **{k: set(lams) for k in ("fisher/mean", "masq/mean",
                                                                  "masq/sum")}}  # fmt: skip
    assert len(grid.plan(configs)) == 2  # one task-1 state per seed
    assert len({grid.importance_key(c) for c in configs if c.lam > 0}) == 2 * 3


def _sweep_df() -> pd.DataFrame:
    rows = []
    base = {"slt": "D5-5", "hidden": "8", "lr2": 1e-3, "masq_batch": 1000, "consolidation": "ewc",
            "fisher_labels": "true", "scale": "mean"}  # fmt: skip
    acc = {0.0: 0.50, 1.0: 0.50, 10.0: 0.70, 100.0: 0.705, 1000.0: 0.60}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        rows.append({**base, "importance": "none", "lam": 0.0, "seed": seed,
                     "best.union": 0.8 + shift, "last.union": 0.5 + shift})  # fmt: skip
        for lam, a in acc.items():
            if lam > 0:
                rows.append({**base, "importance": "fisher", "lam": lam, "seed": seed,
                             "best.union": 0.9, "last.union": a + shift})  # fmt: skip
    return pd.DataFrame(rows)


def test_sweep_frame_and_needed_lambda() -> None:
    frame = analysis.sweep_frame(_sweep_df())
    fim = frame[frame["method"] == "EWC+FIM"].set_index("lam")
    assert fim.loc[10.0, "last_mean"] == pytest.approx(0.71)
    assert fim.loc[10.0, "last_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert set(fim["seeds"]) == {2}
    needed = analysis.needed_lambda(frame, tolerance=0.01).set_index("criterion")
    last = needed.loc["last"]
    assert (last["lam_best"], last["lam_lo"], last["lam_hi"]) == (100.0, 10.0, 100.0)
    assert last["acc"] == pytest.approx(0.715) and last["acc_lam0"] == pytest.approx(0.51)
    best = needed.loc["best"]  # a flat curve: the smallest λ wins, the range is everything
    assert (best["lam_best"], best["lam_lo"], best["lam_hi"]) == (1.0, 1.0, 1000.0)
    fig = analysis.sweep_figure(frame, "D5-5")
    assert len(fig.axes) == 2


# ----------------------------------------------------------------------------- commands


def test_analyze_diagonality_command_with_a_given_state(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp((5, 3), seed=4)
    state_file = tmp_path / "state.pt"
    torch.save(model.state_dict(), state_file)
    out = tmp_path / "an"
    args = ["analyze", "diagonality", "--hidden", "5-3", "--state", str(state_file),
            "--samples", "60", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = pd.read_csv(out / "table2.csv")
    assert list(table["name"]) == [n for n, _ in model.named_parameters()]
    x, y = masq.data.load().train.images, masq.data.load().train.labels
    d1 = np.isin(y, [0, 1, 2, 3, 4])
    xs = torch.from_numpy(x[d1][:60]).reshape(-1, 784).float() / 255
    ys = torch.from_numpy(y[d1][:60]).long()
    fim = importance.fisher(model, importance.batches(xs, ys, 60))
    for _, row in table.iterrows():
        assert row["diag_sum"] == pytest.approx(float(fim[row["name"]].double().sum()), rel=1e-5)
    manifest = json.loads((out / "diagonality.json").read_text(encoding="utf-8"))
    assert manifest["analysis"] == "diagonality" and manifest["samples"] == 60
    assert manifest["state"] == str(state_file) and f"state {state_file}" in manifest["title"]
    assert manifest["command"].startswith("masq analyze diagonality --slt D5-5 --hidden 5-3")
    assert (out / "fisher_blocks.png").stat().st_size > 5000
    assert "Table 2" in capsys.readouterr().out


def test_analyze_lambda_and_compare_commands_end_to_end(
    tmp_path: Path, tiny_data: None, capsys: pytest.CaptureFixture[str]
) -> None:
    res = tmp_path / "lam"
    args = ["analyze", "lambda", "--slt", "D5-5", "--hidden", "6", "--iters1", "20", "--iters2",
            "10", "--eval-every", "5", "--masq-batch", "50", "--lam-max", "10", "--per-decade",
            "1", "--precision", "bf16", "--results", str(res), "--workers", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "λ sweep: 7 runs" in out and "done: 7 runs now, 0 were stored" in out
    frame = pd.read_csv(res / "lambda.csv")
    assert sorted(frame["method"].unique()) == [
        "EWC+FIM", "EWC+MaSQ (mean)", "EWC+MaSQ (sum)", "no EWC"]  # fmt: skip
    assert (res / "lambda_D5-5.png").stat().st_size > 5000
    manifest = json.loads((res / "lambda.json").read_text(encoding="utf-8"))
    assert manifest["lams"] == [1.0, 10.0] and manifest["runs"] == 7
    assert manifest["precision"] == "bf16" and manifest["config"]["precision"] == "bf16"
    assert "--precision bf16" in manifest["command"]
    assert manifest["runs_now"] == 7
    assert main(args) == 0  # resumed
    assert "done: 0 runs now, 7 were stored" in capsys.readouterr().out
    resumed = json.loads((res / "lambda.json").read_text(encoding="utf-8"))
    assert resumed["runs_now"] == 0  # "seconds" is this invocation's, and says so
    from masq.report.html import _analysis_caption

    assert "took" in _analysis_caption("lambda", manifest)
    caption = _analysis_caption("lambda", resumed)
    assert "its last invocation ran 0 of the 7 runs in" in caption and "took" not in caption

    an = tmp_path / "an"
    assert main(["analyze", "compare", "--results", str(res), "--out", str(an)]) == 0
    out = capsys.readouterr().out
    assert "from the cache" in out  # the sweep's task-1 state, not trained again
    rows = pd.read_csv(an / "compare.csv")
    assert list(rows["tensor"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert (rows["max_FIM"] >= rows["max_MaSQ mean"]).all()  # Jensen
    assert json.loads((an / "compare.json").read_text(encoding="utf-8"))["states"][0]["slt"] == (
        "D5-5"
    )


def test_analyze_lambda_dry_run_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    estimate_module = __import__("masq.grid.estimate", fromlist=["estimate"])
    monkeypatch.setattr(
        estimate_module, "measure", lambda *a, **k: dict.fromkeys(
            ("d1_iter", "d2_iter", "d2_iter_one", "eval_sample_one", "eval_sample_stack",
             "importance_sample"), 1e-4)
    )  # fmt: skip
    res = tmp_path / "never"
    args = ["analyze", "lambda", "--slt", "D5-5", "D9-1", "--seeds", "2", "--results", str(res),
            "--dry-run", "--workers", "1", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "λ sweep: 304 runs (2 SLT(s) × 2 seed(s)" in out  # 2 x 2 x (1 + 25 x 3)
    assert "shared work: 4 task-1 trainings, 12 importance passes" in out
    assert "estimated time with 1 worker(s)" in out
    assert not res.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "--results", "r", "--slt", "D5-5"], "either --results DIR or --slt"),
        (["compare", "--top", "0"], "--top must lie in (0, 1]"),
        (["lambda", "--lam-min", "0", "--dry-run"], "--lam-min must be a positive"),
        (["lambda", "--per-decade", "0", "--dry-run"], "--per-decade must be >= 1"),
        (["lambda", "--precision", "bf17", "--dry-run"], "precision: unknown value 'bf17'"),
        (["diagonality", "--state", "nowhere.pt"], "--state 'nowhere.pt': no such file"),
        (["diagonality", "--samples", "-1"], "--samples must be >= 0"),
    ],
)
def test_analyze_bad_input_is_one_line_and_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["analyze", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masq: error:") and message in err and "\n" not in err


def test_analyze_lambda_reports_an_aborted_grid_in_one_line(
    tmp_path: Path,
    tiny_data: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure that would fail every run stops the sweep with its traceback and one line
    (as `masq grid` does), exit status 1, never an escaping GridAborted."""
    from masq import protocol

    def broken(*a: object, **kw: object) -> list:
        raise RuntimeError("stacked kernel broke")

    monkeypatch.setattr(protocol, "continue_stacked", broken)
    args = ["analyze", "lambda", "--slt", "D5-5", "--hidden", "6", "--iters1", "20", "--iters2",
            "10", "--eval-every", "5", "--masq-batch", "50", "--lam-max", "10", "--per-decade",
            "1", "--results", str(tmp_path / "lam"), "--workers", "1", "--threads", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.rstrip().splitlines()
    assert err[-1].startswith("masq analyze lambda: every run of the first group failed")
