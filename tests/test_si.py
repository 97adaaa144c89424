"""SI (masq.importance.si): the path integral equals the loss decrease on a quadratic with SGD,
the tracker equals its naive twin on a tiny MLP trained by Adam with a penalty present (the
twin gets the task loss's gradients only), and the measure runs through the protocol."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from masq import protocol as pr
from masq.config import RunConfig
from masq.consolidation import Anchor, QuadraticPenalty, method_label
from masq.errors import ConfigError
from masq.importance import MeasureContext, get_measure, reference
from masq.importance.si import SITotalTracker, SITracker, si_tracker
from masq.models import mlp
from masq.runid import id_dict, run_id
from masq.training import TrainConfig
from masq.training.loop import phase_indices, train_task


class Vector(nn.Module):
    """One parameter vector θ (float64): the model of a quadratic loss."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def quadratic(theta: Tensor, h: Tensor, c: Tensor) -> Tensor:
    """L(θ) = ½ (θ − c)ᵀ H (θ − c)."""
    d = theta - c
    return 0.5 * d @ h @ d


@pytest.mark.parametrize("diagonal", [False, True])
def test_path_integral_with_sgd_on_a_quadratic_is_the_loss_decrease(diagonal: bool) -> None:
    """With θ(s+1) = θ(s) − η g(s), the Euler sum Σ_s −g·Δθ = Σ_s η|g|² and the exact decrease
    L(θ_s) − L(θ_{s+1}) = η|g|² − ½η² gᵀHg, so Σ_k ω_k − (L(θ_0) − L(θ_S)) = ½η² Σ_s gᵀHg
    exactly, which is at most ½ η λ_max Σ_k ω_k: relative error O(η). The test allows
    η λ_max (twice the bound) and checks the identity itself to float64 precision; with a
    diagonal H it holds per coordinate (ω_k is the decrease of the k-th term)."""
    g = torch.Generator().manual_seed(0)
    n, lr, steps = 6, 1e-3, 3000
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5)
    if not diagonal:
        h = a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    model = Vector(torch.randn(n, generator=g, dtype=torch.float64) * 3)
    theta0 = model.theta.detach().clone()
    tracker = SITracker(model, damping=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    curvature = 0.0
    for _ in range(steps):
        optimizer.zero_grad()
        quadratic(model.theta, h, c).backward()
        tracker.observe_grad(model)
        grad = model.theta.grad.detach().clone()
        curvature += float(grad @ h @ grad)
        optimizer.step()
        tracker.step(model)
    omega = tracker.path_integral()["theta"]
    decrease = float(quadratic(theta0, h, c) - quadratic(model.theta.detach(), h, c))
    total = float(omega.sum())
    lam_max = float(torch.linalg.eigvalsh(h).max())
    assert decrease > 0.5 * float(quadratic(theta0, h, c))  # a real descent
    assert abs(total - decrease) <= lr * lam_max * total
    assert total - decrease == pytest.approx(0.5 * lr**2 * curvature, rel=1e-6)
    if diagonal:  # coordinate by coordinate
        d0, d1 = theta0 - c, model.theta.detach() - c
        per = 0.5 * torch.diagonal(h) * (d0**2 - d1**2)
        torch.testing.assert_close(omega, per, rtol=lr * lam_max, atol=1e-12)
    # the naive twin on the same SGD path
    trajectory, grads = reference.sgd_path(lambda t: h @ (t - c), theta0, lr, steps)
    torch.testing.assert_close(reference.path_integral(trajectory, grads)["theta"], omega)


def adam_run(
    dtype: torch.dtype, damping: float = 0.1, *, total: bool = False
) -> tuple[
    SITotalTracker, list[dict[str, Tensor]], list[dict[str, Tensor]], list[dict[str, Tensor]]
]:
    """A tiny MLP trained 7 Adam steps by train_task with an EWC-like penalty added through
    ``penalty_grad`` and the tracker's hooks (``total``: an :class:`SITotalTracker`, whose
    step reads the gradient the step used). Returns the tracker, the trajectory θ(0..S), and
    the task loss's and the full loss's gradients at θ(s), recomputed independently (copies
    of the net, the loop's own mini-batches and loss: CE of the logits in float32)."""
    g = torch.Generator().manual_seed(3)
    model = mlp((5,), in_features=6, classes=3, seed=1).to(dtype)
    x = torch.randn(30, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (30,), generator=g)
    stars = {k: p.detach() + torch.randn(p.shape, generator=g).to(dtype)
             for k, p in model.named_parameters()}  # fmt: skip
    imp = {k: torch.rand(p.shape, generator=g).to(dtype) for k, p in model.named_parameters()}
    lam = 2.0
    penalty = QuadraticPenalty(model, [Anchor(stars, imp)], lam)
    config = TrainConfig(lr=0.05, iters=7, batch_size=8, seed=5)
    tracker = SITotalTracker(model, damping) if total else SITracker(model, damping)
    trajectory = [{k: p.detach().clone() for k, p in model.named_parameters()}]

    def after_step(net: nn.Module) -> None:
        tracker.step(net)
        trajectory.append({k: p.detach().clone() for k, p in model.named_parameters()})

    train_task(model, (x, y), config, penalty_grad=penalty,
               grad_hook=getattr(tracker, "observe_grad", None), step_hook=after_step)  # fmt: skip
    order = phase_indices(30, 8, 7, torch.Generator().manual_seed(5))
    task, full = [], []
    for theta, idx in zip(trajectory, order, strict=False):
        net = copy.deepcopy(model)  # the loop's loss: logits cast to float32, as it does
        net.load_state_dict(theta)
        loss = F.cross_entropy(net(x[idx]).float(), y[idx])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        task.append({k: gr.detach() for (k, _), gr in zip(net.named_parameters(), grads,
                                                           strict=True)})  # fmt: skip
        full.append({k: task[-1][k] + lam * imp[k].double() * (theta[k].double()
                     - stars[k].double()) for k in theta})  # fmt: skip
    return tracker, trajectory, task, full


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-7)]
)
def test_the_tracker_equals_its_naive_twin_under_adam_with_a_penalty(
    dtype: torch.dtype, rtol: float, atol: float
) -> None:
    tracker, trajectory, task, full = adam_run(dtype)
    assert tracker.steps == len(task) == 7
    fast = tracker.importance()
    slow = reference.si_importance(trajectory, task, 0.1)
    assert set(fast) == set(slow) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name in fast:
        assert fast[name].dtype == dtype
        torch.testing.assert_close(fast[name].double(), slow[name], rtol=rtol, atol=atol)
    omega = reference.path_integral(trajectory, task)
    for name, w in tracker.path_integral().items():
        assert w.dtype == torch.float64  # the accumulator
        torch.testing.assert_close(w, omega[name], rtol=rtol, atol=atol)
    # the gradient without the penalty is what counts: with it the twin differs
    with_penalty = reference.si_importance(trajectory, full, 0.1)
    gap = max(float((with_penalty[k] - slow[k]).abs().max()) for k in slow)
    assert gap > 1e3 * atol
    if dtype == torch.float64:  # negative ω clamped, and counted
        negative = sum(int((w < 0).sum()) for w in omega.values())
        assert tracker.clamped == negative > 0
        assert all(bool((v >= 0).all()) for v in fast.values())


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-7)]
)
def test_the_total_gradient_tracker_equals_its_twin_with_the_penalty(
    dtype: torch.dtype, rtol: float, atol: float
) -> None:
    """--si-gradient total: g(s) = ∇(CE + penalty) at θ(s), the gradient the step used; the
    trajectory is the task-gradient run's (the hook does not change training)."""
    tracker, trajectory, task, full = adam_run(dtype, total=True)
    assert not hasattr(tracker, "observe_grad") and tracker.steps == 7
    _, same, _, _ = adam_run(dtype)
    for a, b in zip(trajectory, same, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    fast = tracker.importance()
    slow = reference.si_importance(trajectory, full, 0.1)
    for name in fast:
        assert fast[name].dtype == dtype
        torch.testing.assert_close(fast[name].double(), slow[name], rtol=rtol, atol=atol)
    omega = reference.path_integral(trajectory, full)
    for name, w in tracker.path_integral().items():
        torch.testing.assert_close(w, omega[name], rtol=rtol, atol=atol)
    without = reference.si_importance(trajectory, task, 0.1)
    assert max(float((without[k] - slow[k]).abs().max()) for k in slow) > 1e3 * atol


def test_si_tracker_follows_si_gradient() -> None:
    model = Vector(torch.zeros(3, dtype=torch.float64))
    ctx = MeasureContext(settings={"si_damping": 0.1})
    assert type(si_tracker(model, ctx)) is SITracker  # task, the default
    for value, kind in (("task", SITracker), ("total", SITotalTracker)):
        ctx = MeasureContext(settings={"si_damping": 0.1, "si_gradient": value})
        assert type(si_tracker(model, ctx)) is kind
    with pytest.raises(ConfigError, match="si_gradient"):
        si_tracker(model, MeasureContext(settings={"si_damping": 0.1, "si_gradient": "both"}))


def test_without_observe_grad_the_step_reads_grad_and_damping_is_checked() -> None:
    model = Vector(torch.zeros(3, dtype=torch.float64))
    tracker = SITracker(model, 0.5)
    model.theta.grad = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        model.theta.add_(torch.tensor([-0.1, 0.1, 0.3], dtype=torch.float64))
    tracker.step(model)
    torch.testing.assert_close(
        tracker.path_integral()["theta"], torch.tensor([0.1, 0.2, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        tracker.importance()["theta"],
        torch.tensor([0.1 / 0.51, 0.2 / 0.51, 0.0], dtype=torch.float64),
    )
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="si_damping"):
            SITracker(model, bad)
    with pytest.raises(ConfigError, match="si_damping"):
        si_tracker(model, MeasureContext())


def test_damping_changes_omega_and_nothing_else() -> None:
    """Ω·(Δθ² + ξ) is ξ's invariant ω⁺: two dampings, one path."""
    small, trajectory, _, _ = adam_run(torch.float64, damping=1e-3)
    large, _, _, _ = adam_run(torch.float64, damping=1.0)
    a, b = small.importance(), large.importance()
    for k in a:
        delta2 = (trajectory[-1][k] - trajectory[0][k]) ** 2
        assert not torch.allclose(a[k], b[k])
        torch.testing.assert_close(a[k] * (delta2 + 1e-3), b[k] * (delta2 + 1.0))


# ----------------------------------------------------------------------------- protocol


SI_RUN = RunConfig(slt="D4-3-3", hidden=(8,), iters1=15, iters2=10, eval_every=5,
                   batch_size=20, importance="si", lam=10.0, lr2=1e-2)  # fmt: skip


def finite(values: object) -> bool:
    if isinstance(values, dict):
        return all(finite(v) for v in values.values())
    if isinstance(values, list | tuple):
        return all(finite(v) for v in values)
    return (
        isinstance(values, float | int)
        and float(values) == float(values)
        and abs(float(values)) != float("inf")
    )


@pytest.mark.parametrize("method", ["ewc", "online-ewc"])
def test_si_runs_through_the_protocol(data_learnable: None, method: str) -> None:
    config = SI_RUN.with_(consolidation=method, gamma=1.0)
    result = pr.run(config)
    assert get_measure("si").timing == "during"
    # Zenke et al.'s SI is online EWC with γ = 1 (one running Ω, the latest anchor)
    assert method_label(config) == ("SI (anchor per task)" if method == "ewc" else "SI")
    assert method_label(config.with_(gamma=0.5)) == (
        "SI (anchor per task)" if method == "ewc" else "SI (γ=0.5)"
    )
    assert method_label(config.with_(slt="D5-5")) == "SI"  # two tasks: one anchor either way
    assert len(result.curves) == 3 and len(result.accuracy) == 3
    assert finite(result.curves) and finite(result.accuracy) and finite(result.metrics)
    assert set(result.importance_summary) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert finite(result.importance_summary)
    assert result.importance_summary["0.weight"]["max"] > 0
    # tracked during training: task 1's importance costs no pass of its own, and its per-step
    # cost lies in the phase's training time
    timings = result.timings
    assert timings["importance"][0] == 0.0 and len(timings["importance"]) == 2
    assert all(s < t for s, t in zip(timings["importance"], timings["train"][1:], strict=True))
    plain = pr.run(config.with_(importance="none", lam=0.0))
    assert result.weights is not None and plain.weights is not None
    assert any(not torch.equal(result.weights[1][k], plain.weights[1][k])
               for k in plain.weights[1])  # fmt: skip  # the SI penalty changed phase 2


def test_si_damping_changes_task_one_importance_not_its_training(data_learnable: None) -> None:
    tasks = pr.make_tasks(SI_RUN)
    a = pr.train_first(SI_RUN, tasks)
    b = pr.train_first(SI_RUN.with_(si_damping=1e-3), tasks)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.tracked is not None and b.tracked is not None
    assert all(not torch.allclose(a.tracked[k], b.tracked[k]) for k in a.tracked)
    imp, seconds = pr.compute_importance(SI_RUN, a, tasks)
    assert seconds == 0.0 and all(torch.equal(imp[k], a.tracked[k]) for k in imp)


def test_si_gradient_total_changes_the_later_phases_only(data_learnable: None) -> None:
    """On task 1 (no penalty) the two gradients are one; from task 2 on the penalty's
    gradient enters ω, so Ω_2 and the weights after task 3 differ. The default keeps old run
    ids; total is in the id."""
    task_run = SI_RUN.with_(consolidation="online-ewc", gamma=1.0)
    total_run = task_run.with_(si_gradient="total")
    assert "si_gradient" not in id_dict(task_run)
    assert id_dict(total_run)["si_gradient"] == "total"
    assert run_id(total_run) != run_id(task_run)
    a, b = pr.run(task_run), pr.run(total_run)
    assert a.weights is not None and b.weights is not None
    assert all(torch.equal(a.weights[0][k], b.weights[0][k]) for k in a.weights[0])
    assert all(torch.equal(a.weights[1][k], b.weights[1][k]) for k in a.weights[1])
    assert any(not torch.equal(a.weights[2][k], b.weights[2][k]) for k in a.weights[2])


def test_grad_hook_sees_the_task_gradient_with_an_autograd_penalty_too() -> None:
    """With ``penalty=`` (autograd) and a grad_hook the loop backpropagates the task loss,
    calls the hook, then the penalty: the hook sees ∇CE alone, training is unchanged."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    config = TrainConfig(lr=0.05, iters=4, batch_size=8, seed=2)

    def penalty(net: nn.Module) -> Tensor:
        return sum((p**2).sum() for p in net.parameters()) * 0.3

    seen: list[Tensor] = []

    def hook(net: nn.Module) -> None:
        seen.append(net[0].weight.grad.detach().clone())

    model = mlp((5,), in_features=6, classes=3, seed=1)
    plain = copy.deepcopy(model)
    start = copy.deepcopy(model)
    train_task(model, (x, y), config, penalty=penalty, grad_hook=hook)
    train_task(plain, (x, y), config, penalty=penalty)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    idx = phase_indices(24, 8, 4, torch.Generator().manual_seed(2))[0]
    loss = F.cross_entropy(start(x[idx]), y[idx])
    (want,) = torch.autograd.grad(loss, [start[0].weight])
    torch.testing.assert_close(seen[0], want)
