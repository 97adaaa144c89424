"""GPU checks: the production float32 path, stacked re-training and a tiny grid on CUDA.

Marked ``cuda``: they run where a CUDA device is present and are skipped (with the reason)
everywhere else, CI included (``pytest -m cuda`` selects them on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from masq import grid, stacked
from masq.consolidation import ewc
from masq.consolidation.penalty import QuadraticPenalty
from masq.importance import batches, fisher, masq, reference
from masq.models import mlp
from masq.training import TrainConfig, train_task

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=g)
    return x, (x[:, :4].sum(1) * 2).long().clamp(max=3)


@pytest.mark.parametrize("measure", ["fisher", "masq-mean", "masq-sum"])
def test_importance_on_cuda_matches_the_float64_reference(measure: str) -> None:
    x, y = data()
    model = mlp((12, 8), in_features=20, classes=4, seed=0).cuda()
    if measure == "fisher":
        got = fisher(model, batches(x.cuda(), y.cuda(), 16))
        want = reference.fisher(model.cpu(), batches(x, y, 16))
    else:
        scale = measure.split("-")[1]
        got = masq(model, batches(x.cuda(), y.cuda(), 16), scale=scale)
        want = reference.masq(model.cpu(), batches(x, y, 16), scale=scale)
    for k, v in want.items():
        assert got[k].device.type == "cuda"
        torch.testing.assert_close(got[k].cpu().double(), v, rtol=1e-4, atol=1e-5 * v.abs().max())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stacked_equals_separate_on_cuda(precision: str) -> None:
    x, y = data(400, seed=1)
    base = mlp((24, 16), in_features=20, classes=4, seed=5)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(9)
    imp = {k: torch.rand(v.shape, generator=gen) for k, v in state.items()}
    device = torch.device("cuda")
    curves, finals = stacked.train_stacked(
        state, (x, y), lrs=[1e-2, 3e-3], lams=[0.0, 50.0], importances=[imp, imp], iters=30,
        batch_size=25, eval_every=10, seed=7, eval_sets={"all": (x, y)}, device=device,
        precision=precision,
    )  # fmt: skip
    for run, (lr, lam) in enumerate(((1e-2, 0.0), (3e-3, 50.0))):
        model = mlp((24, 16), in_features=20, classes=4, seed=5).to(device)
        grad = QuadraticPenalty(model, ewc.anchor(model, imp), lam) if lam else None
        config = TrainConfig(lr=lr, iters=30, batch_size=25, eval_every=10, seed=7,
                             precision=precision)  # fmt: skip
        curve = train_task(model, (x, y), config, penalty_grad=grad, eval_sets={"all": (x, y)})
        tol = 1e-4 if precision == "fp32" else 0.02
        for k, v in model.state_dict().items():
            assert (v.cpu() - finals[run][k]).abs().max() <= tol * (1 + v.abs().max().item())
        assert max(abs(a - b) for a, b in zip(curve["all"], curves[run]["all"], strict=True)) <= (
            0.01 if precision == "fp32" else 0.05
        )


def test_tiny_grid_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from masq import data as masq_data
    from tests.synthetic import learnable_dataset

    dataset = learnable_dataset()
    monkeypatch.setattr(masq_data, "load", lambda name="mnist", **kw: dataset)
    g = grid.grid_from_mapping(
        {"hidden": "16", "iters1": 20, "iters2": 20, "batch_size": 25, "eval_every": 10,
         "masq_batch": 50, "lam": [0.0, 10.0], "lr2": [1e-3], "device": "cuda"}
    )  # fmt: skip
    configs = grid.expand(g)
    summary = grid.execute(configs, tmp_path, workers=1, stack=4, progress=False)
    assert summary.failed == {} and summary.done == len(configs) == 2
