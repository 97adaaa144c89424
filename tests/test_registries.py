"""The seams: the measure and method registries, the penalty kernel, canonical configs derived
from what each measure and method reads, and a measure of a user's own through the protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from masq import consolidation, importance
from masq.config import FIELD, IMPORTANCE_FIELDS, RunConfig
from masq.consolidation import (
    METHOD_FIELDS,
    METHODS,
    QuadraticPenalty,
    canonical,
    check_config,
    get_method,
    method_label,
)
from masq.consolidation.penalty import quadratic_grad_, quadratic_value
from masq.errors import ConfigError
from masq.importance import MEASURES, Measure, MeasureContext, get_measure, register_measure
from masq.models import mlp


def test_unknown_names_are_one_line_errors_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get_measure("fim")
    message = str(info.value)
    assert "\n" not in message and "'fim'" in message
    assert all(name in message for name in ("fisher", "masq", "l2", "none"))
    with pytest.raises(ConfigError, match=r"unknown consolidation method 'si'.*ewc"):
        get_method("si")
    with pytest.raises(ConfigError, match="importance: unknown importance measure 'fim'"):
        RunConfig(importance="fim").validate()
    with pytest.raises(ConfigError, match="consolidation: unknown consolidation method"):
        check_config(RunConfig(consolidation="ewc2"))


def test_every_registered_measure_and_method_declares_real_fields() -> None:
    for measure in MEASURES.values():
        assert set(measure.fields) <= set(IMPORTANCE_FIELDS) - {"importance"}, measure.name
        assert measure.timing in ("after", "during", "none")
    for method in METHODS.values():
        assert set(method.fields) <= set(METHOD_FIELDS), method.name
        assert method.family


def test_a_name_cannot_be_registered_twice_unless_replaced() -> None:
    fisher = get_measure("fisher")
    other = dataclasses.replace(fisher, label="F")
    with pytest.raises(ConfigError, match="already registered"):
        register_measure(other)
    assert register_measure(fisher) is fisher  # the same entry again is harmless
    try:
        assert register_measure(other, replace=True) is other
        assert method_label(RunConfig(importance="fisher")) == "EWC+F"
    finally:
        register_measure(fisher, replace=True)


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_canonical_keeps_exactly_what_the_measure_and_method_read(
    measure: str, method: str
) -> None:
    """Every importance and method field that neither the measure nor the method reads is at
    its default in the canonical config; those they read are kept (after the method's own
    rules, e.g. λ = 0 without importance). The pass's batch size counts as read only by
    MaSQ and the Fisher with batched labels, whose formulas it enters (the other FIMs do not
    depend on it: run ids of masq 0.1)."""
    changed = {
        "masq_batch": 10,
        "scale": "sum",
        "fisher_labels": "exact",
        "fisher_samples": 5,
        "si_damping": 0.5,
        "gamma": 0.5,
        "transfer": "l2-drop",
        "transfer_lam": 0.1,
        "drop_p": 0.2,
        "alpha_step": 0.25,
    }
    config = RunConfig(slt="D4-3-3", importance=measure, consolidation=method, lam=7.0, **changed)
    if not get_measure(measure).gives_importance and method == "mode-imm":
        return  # not a run (checked elsewhere)
    if get_measure(measure).kind != "diagonal" and method in ("online-ewc", "mode-imm"):
        with pytest.raises(ConfigError, match="structured"):
            check_config(config)  # a running sum / a merge of structured importances
        return
    got = canonical(check_config(config))
    own = dataclasses.replace(config, **get_method(method).canonical(config))  # λ = 0: no EWC
    m, f = get_method(got.consolidation), get_measure(got.importance)
    for name in (*IMPORTANCE_FIELDS, *METHOD_FIELDS):
        if name == "importance":
            continue
        read = name in f.reads(got) or name in m.reads(got)
        expected = getattr(own, name) if read else FIELD[name].default
        assert getattr(got, name) == expected, (measure, method, name)
    assert canonical(got) == got


def test_the_penalty_kernel_value_and_gradient_agree_with_autograd() -> None:
    """P = (λ/2) Σ_a Σ F^a (θ − θ^a)², ∇P = λ Σ_a F^a (θ − θ^a): the kernel's gradient is
    autograd's of its value, in float64 and float32; P = 0 and ∇P = 0 at the anchor."""
    for dtype in (torch.float64, torch.float32):
        model = mlp((5, 4), in_features=6, classes=3, seed=1).to(dtype)
        g = torch.Generator().manual_seed(0)
        anchors = []
        for _ in range(2):
            stars = {k: p.detach() + torch.randn(p.shape, generator=g, dtype=dtype)
                     for k, p in model.named_parameters()}  # fmt: skip
            imp = {k: torch.rand(p.shape, generator=g, dtype=dtype)
                   for k, p in model.named_parameters()}  # fmt: skip
            anchors.append(consolidation.Anchor(stars, imp))
        penalty = QuadraticPenalty(model, anchors, 3.5)
        params = dict(model.named_parameters())
        value = penalty.value(params)
        by_hand = sum(
            0.5 * 3.5 * float((a.importance[k] * (params[k].detach() - a.params[k]) ** 2).sum())
            for a in anchors
            for k in params
        )
        assert float(value.detach()) == pytest.approx(by_hand, rel=1e-6)
        value.backward()
        autograd = {k: p.grad.clone() for k, p in params.items()}
        model.zero_grad(set_to_none=True)
        penalty.add_grad(params)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for k, p in params.items():
            torch.testing.assert_close(p.grad, autograd[k], rtol=tol, atol=tol)
    at = consolidation.anchor(model, {k: torch.ones_like(p) for k, p in params.items()})
    model.zero_grad(set_to_none=True)
    zero = QuadraticPenalty(model, at, 2.0)
    assert float(zero.value(params).detach()) == 0.0
    zero.add_grad(params)
    assert all(float(p.grad.abs().max()) == 0.0 for p in params.values())


def test_the_public_penalty_is_the_kernels_value() -> None:
    model = mlp((4,), in_features=5, classes=2, seed=2)
    imp = {k: torch.full_like(p, 2.0) for k, p in model.named_parameters()}
    a = consolidation.anchor(model, imp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    params = dict(model.named_parameters())
    assert torch.equal(
        consolidation.penalty(model, a, 5.0), quadratic_value(params, [(a.params, imp)], 5.0)
    )


def test_quadratic_grad_on_tensor_lists() -> None:
    theta = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    star = [torch.tensor([0.5, 2.5]), torch.tensor([[1.0]])]
    lam_f = [torch.tensor([2.0, 4.0]), torch.tensor([[10.0]])]
    grads = [torch.zeros(2), torch.ones(1, 1)]
    quadratic_grad_(grads, theta, star, lam_f, [torch.empty(2), torch.empty(1, 1)])
    assert grads[0].tolist() == [1.0, -2.0] and grads[1].tolist() == [[21.0]]


def test_labels_come_from_the_method_and_the_measure() -> None:
    labels = {
        (m, c): method_label(RunConfig(importance=m, consolidation=c, slt="D4-3-3"))
        for m in ("fisher", "masq", "l2", "none")
        for c in ("ewc", "online-ewc")
    }
    assert labels[("fisher", "ewc")] == "EWC+FIM"
    assert labels[("masq", "online-ewc")] == "online EWC+MaSQ (mean)"
    assert labels[("l2", "ewc")] == "L2" and labels[("l2", "online-ewc")] == "online L2"
    assert labels[("none", "ewc")] == labels[("none", "online-ewc")] == "no EWC"
    mode = RunConfig(importance="fisher", consolidation="mode-imm", transfer="drop")
    assert method_label(mode) == "mode-IMM+FIM, drop p=0.5"


def grad_abs(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], ctx: MeasureContext):
    """A user's measure: |∇ of the mean loss over the whole task|, per parameter."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
    grads = torch.autograd.grad(loss, params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: g.abs() for n, g in zip(names, grads, strict=True)}


def test_a_measure_of_your_own_runs_through_the_protocol(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from masq import data, protocol
    from tests.synthetic import learnable_dataset

    dataset = learnable_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)
    mine = Measure("grad-abs-test", label="|grad|", compute=grad_abs)
    monkeypatch.setitem(MEASURES, mine.name, mine)
    config = RunConfig(slt="D4-3-3", hidden=(16,), iters1=20, iters2=10, eval_every=10,
                       batch_size=20, importance="grad-abs-test", lam=1e4, lr2=1e-2)  # fmt: skip
    result = protocol.run(config)
    assert set(result.importance_summary) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert method_label(config) == "EWC+|grad|"
    plain = protocol.run(config.with_(importance="none", lam=0.0))
    assert result.weights is not None and plain.weights is not None
    moved = {k: float((result.weights[1][k] - result.weights[0][k]).abs().max()) for k in
             result.weights[0]}  # fmt: skip
    free = {k: float((plain.weights[1][k] - plain.weights[0][k]).abs().max()) for k in
            plain.weights[0]}  # fmt: skip
    assert moved != free  # the penalty changed the training
    assert importance.get_measure("grad-abs-test") is mine


class StepCounter:
    """A measure accumulated during training: F = the number of optimizer steps it saw, and
    the squared gradients summed over them (to check that .grad holds the step's gradient)."""

    def __init__(self, model: nn.Module, ctx: MeasureContext) -> None:
        self.params = dict(model.named_parameters())
        self.steps = 0
        self.squares = {k: torch.zeros_like(p) for k, p in self.params.items()}

    def step(self, model: nn.Module) -> None:
        self.steps += 1
        for k, p in self.params.items():
            assert p.grad is not None
            self.squares[k] += p.grad.detach() ** 2

    def importance(self) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, float(self.steps)) for k, v in self.squares.items()}


def test_a_measure_tracked_during_training_gets_the_per_step_hook(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """The phase loop calls the tracker after every optimizer step of every phase whose
    importance the method takes; the grid runs such a run on its own (its own task 1)."""
    from masq import data, grid, protocol
    from masq.grid.plan import one_by_one
    from masq.runid import run_id
    from masq.store import load
    from tests.synthetic import learnable_dataset

    dataset = learnable_dataset()
    monkeypatch.setattr(data, "load", lambda name="mnist", **kwargs: dataset)
    tracked = Measure("steps-test", label="steps", tracker=StepCounter)
    assert tracked.timing == "during"
    monkeypatch.setitem(MEASURES, tracked.name, tracked)
    config = RunConfig(slt="D4-3-3", hidden=(8,), iters1=7, iters2=5, eval_every=5,
                       batch_size=20, importance="steps-test", lam=1.0, lr2=1e-3)  # fmt: skip
    result = protocol.run(config)
    assert result.importance_summary["0.weight"]["max"] == 7.0  # task 1: iters1 steps
    assert len(result.timings["importance"]) == 2  # tasks 1 and 2 (none after the last)
    configs = grid.expand(grid.Grid(slt=("D4-3-3",), hidden=((8,),), iters1=(7,), iters2=(5,),
                                    eval_every=(5,), batch_size=(20,), lr2=(1e-3,),
                                    importance=("steps-test",), lam=(1.0,)))  # fmt: skip
    assert one_by_one(configs) == {
        "importance 'steps-test' accumulates during its own task-1 training": 1
    }
    summary = grid.execute(configs, str(tmp_path), workers=1, progress=False)
    assert summary.done == 1 and not summary.failed and summary.d1_trained == 0
    (record,) = load(str(tmp_path)).to_dict("records")
    assert record["run_id"] == run_id(configs[0])
