"""The stacked engine's compiled step (``--compile-step``, masq.stacked.adam): penalty and Adam
in one torch.compile'd loop give torch.optim.Adam's update with the EWC gradient to float
rounding, per run, penalized or not; a failed compile falls back to the eager step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from masq.runtime import COMPILE_ENV
from masq.stacked import adam as stacked_adam
from masq.stacked.adam import BETAS, EPS, StackedAdam

SHAPES = [(6, 5), (6,), (3, 6), (3,)]
K = 3
LRS = [1e-2, 3e-3, 1e-2]
PENALIZED = [True, False, True]


class _Model:
    """What StackedAdam.create reads of a StackedMLP: its stacked params and K."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.k = params[0].shape[0]


def _state(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(K, *s, generator=gen) for s in SHAPES]
    lam_f = [torch.rand(K, *s, generator=gen) * 10 for s in SHAPES]
    anchors = [torch.randn(K, *s, generator=gen) for s in SHAPES]
    return params, lam_f, anchors


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(K, *s, generator=gen) for s in SHAPES]


def _run(compiled: bool, steps: int = 6) -> tuple[StackedAdam, list[torch.Tensor]]:
    params, lam_f, anchors = _state(0)
    opt = StackedAdam.create(_Model(params), LRS, fused=True, vectorized=False, compiled=compiled)
    for t in range(steps):
        opt.step(params, _grads(t), lam_f, anchors, PENALIZED)
    return opt, params


def _reference(steps: int = 6) -> list[torch.Tensor]:
    """torch.optim.Adam per run, the EWC gradient λF (θ − θ*) added to the penalized runs'."""
    params, lam_f, anchors = _state(0)
    out = []
    for run in range(K):
        ps = [p[run].clone().requires_grad_(True) for p in params]
        opt = torch.optim.Adam(ps, lr=LRS[run], betas=BETAS, eps=EPS)
        for t in range(steps):
            for i, p in enumerate(ps):
                g = _grads(t)[i][run].clone()
                if PENALIZED[run]:
                    g += lam_f[i][run] * (p.detach() - anchors[i][run])
                p.grad = g
            opt.step()
        out.append([p.detach() for p in ps])
    return [torch.stack([out[run][i] for run in range(K)]) for i in range(len(SHAPES))]


@pytest.fixture
def fresh_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process state without compiled steps or a recorded failure (restored afterwards)."""
    monkeypatch.setattr(stacked_adam, "_compiled", {})
    monkeypatch.setattr(stacked_adam, "_compile_failed", [])


def test_the_compiled_step_is_adam_with_the_ewc_gradient(fresh_compile: None) -> None:
    opt, params = _run(compiled=True)
    if not opt.compiled:
        pytest.skip(f"torch.compile is not usable here: {stacked_adam._compile_failed}")
    eager_opt, eager = _run(compiled=False)
    reference = _reference()
    for got, want, plain in zip(params, reference, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, _state(0)[0][0].new_zeros(got.shape))  # it moved
    for m, m_eager in zip(opt.exp_avg, eager_opt.exp_avg, strict=True):
        torch.testing.assert_close(m, m_eager, rtol=1e-5, atol=1e-7)
    assert [float(s[0]) for s in opt.steps] == [6.0] * K  # the fused kernel's counters follow


def test_a_failed_compile_falls_back_to_the_eager_step(
    fresh_compile: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(fn: object, **kwargs: object) -> object:
        def fail(*args: object) -> None:
            raise RuntimeError("no C++ compiler\nsecond line")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert stacked_adam.compiled_step_active()
    opt, params = _run(compiled=True)
    _, eager = _run(compiled=False)
    assert not opt.compiled and not stacked_adam.compiled_step_active()
    for got, want in zip(params, eager, strict=True):
        assert torch.equal(got, want)
    err = capsys.readouterr().err
    assert err.count("masq: warning: the compiled step failed (RuntimeError: no C++ compiler)") == 1


def test_the_environment_chooses_the_default(
    fresh_compile: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    params, _, _ = _state(0)
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert not StackedAdam.create(_Model(params), LRS).compiled
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert StackedAdam.create(_Model(params), LRS).compiled
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not StackedAdam.create(_Model(params), LRS).compiled


def test_grid_compile_step_records_it_and_matches_the_eager_grid(
    fresh_compile: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``masq grid --compile-step`` on a stack of two EWC runs: the records say so in their
    meta and equal the default grid's to float rounding."""
    import masq.data
    from masq.cli import main
    from tests.synthetic import learnable_dataset

    data = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq.data, "load", lambda *a, **k: data)
    monkeypatch.setenv(COMPILE_ENV, "0")  # main sets it: restored afterwards
    argv = ["grid", "--slt", "D5-5", "--hidden", "8", "--iters", "30", "--eval-every", "10",
            "--batch-size", "20", "--masq-batch", "50", "--importance", "fisher",
            "--lam", "10", "1000", "--workers", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main([*argv, "--results", str(tmp_path / "eager")]) == 0
    assert main([*argv, "--compile-step", "--results", str(tmp_path / "compiled")]) == 0

    def records(name: str) -> dict[str, dict[str, object]]:
        files = (tmp_path / name / "runs").glob("*.json")
        return {p.stem: json.loads(p.read_text())["result"] for p in files}

    eager, compiled = records("eager"), records("compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 2  # the same run ids
    if not stacked_adam.compiled_step_active():
        pytest.skip(f"torch.compile is not usable here: {stacked_adam._compile_failed}")
    for rid, rec in compiled.items():
        assert rec["meta"]["compiled_step"] is True and rec["meta"]["stack"] == 2  # type: ignore[index]
        assert eager[rid]["meta"]["compiled_step"] is False  # type: ignore[index]
        for key in ("last", "best"):
            for name, value in rec[key].items():  # type: ignore[attr-defined]
                if isinstance(value, float):
                    assert value == pytest.approx(eager[rid][key][name], abs=0.011)  # type: ignore[index]
