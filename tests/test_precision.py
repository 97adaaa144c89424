"""Evaluation schedules, bf16 training and the direct EWC gradient (speed without new maths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from masq import protocol, stacked
from masq.config import RunConfig
from masq.consolidation import ewc
from masq.consolidation.penalty import QuadraticPenalty
from masq.models import mlp
from masq.training import TrainConfig, eval_counts, eval_iterations, train_task


def data(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=g)
    y = (x[:, :5].sum(1) > 2.5).long() + 2 * (x[:, 5] > 0.5).long()
    return x, y


# ----------------------------------------------------------------------------- schedules


def test_schedules_by_hand() -> None:
    assert eval_iterations(7, 3) == [0, 3, 6, 7]
    assert eval_iterations(7, 3, "every") == [0, 3, 6, 7]
    assert eval_iterations(5, 250, "paper") == [0, 1, 2, 3, 4, 5]
    dense = eval_iterations(5000, 250, "dense-early")
    expected = [*range(0, 101, 2), *range(120, 1001, 20), *range(1100, 5001, 100)]
    assert dense == expected and len(dense) == 136
    assert eval_iterations(130, 250, "dense-early") == [*range(0, 101, 2), 120, 130]
    assert eval_iterations(1025, 250, "dense-early")[-3:] == [980, 1000, 1025]


def test_train_task_records_at_the_schedule() -> None:
    x, y = data()
    model = mlp((8,), in_features=20, classes=4, seed=0)
    config = TrainConfig(lr=1e-2, iters=12, batch_size=25, eval_schedule="paper")
    curve = train_task(model, (x, y), config, eval_sets={"all": (x, y)})
    assert curve["iteration"] == list(range(13))


# ----------------------------------------------------------------------------- bf16


def test_bf16_runs_the_matmuls_in_bfloat16_and_keeps_float32_state() -> None:
    x, y = data()
    seen: list[torch.dtype] = []
    model = mlp((16,), in_features=20, classes=4, seed=0)
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    config = TrainConfig(lr=1e-2, iters=5, batch_size=25, precision="bf16")
    train_task(model, (x, y), config)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen.clear()
    train_task(model, (x, y), TrainConfig(lr=1e-2, iters=2, batch_size=25))
    assert set(seen) == {torch.float32}


def test_bf16_training_follows_fp32_closely() -> None:
    x, y = data()
    finals = {}
    for precision in ("fp32", "bf16"):
        model = mlp((32,), in_features=20, classes=4, seed=1)
        config = TrainConfig(lr=1e-2, iters=60, batch_size=25, precision=precision)
        curve = train_task(model, (x, y), config, eval_sets={"all": (x, y)})
        finals[precision] = (curve["all"][-1], [p.detach().clone() for p in model.parameters()])
    assert abs(finals["fp32"][0] - finals["bf16"][0]) <= 0.05
    pairs = list(zip(finals["fp32"][1], finals["bf16"][1], strict=True))
    differ = [not torch.equal(a, b) for a, b in pairs]
    assert any(differ)  # bf16 really changed the arithmetic
    for a, b in pairs:  # Adam's sign-driven steps let single weights drift; the bulk stays
        assert (a - b).abs().mean() < 0.1 * a.abs().mean()


def test_bf16_evaluation_counts_from_bfloat16_logits() -> None:
    x, y = data(2000, seed=3)
    model = mlp((32,), in_features=20, classes=4, seed=2)
    with torch.no_grad():
        by_hand = (model.to(torch.bfloat16)(x.to(torch.bfloat16)).argmax(1) == y).sum()
    model = model.float()
    (correct, total) = eval_counts(model, {"s": (x, y)}, precision="bf16")["s"]
    assert total == 2000 and abs(correct - int(by_hand)) <= 20  # autocast vs a bf16 model
    fp32 = eval_counts(model, {"s": (x, y)})["s"][0]
    assert abs(correct - fp32) <= 40


def test_stacked_bf16_matches_separate_bf16() -> None:
    x, y = data(400, seed=4)
    base = mlp((24, 16), in_features=20, classes=4, seed=5)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    imp = {
        k: torch.rand_like(v, generator=torch.Generator().manual_seed(9)) for k, v in state.items()
    }
    lrs, lams = [1e-2, 3e-3], [0.0, 50.0]
    curves, finals = stacked.train_stacked(
        state, (x, y), lrs=lrs, lams=lams, importances=[imp, imp], iters=30, batch_size=25,
        eval_every=10, seed=7, eval_sets={"all": (x, y)}, precision="bf16",
    )  # fmt: skip
    for run, (lr, lam) in enumerate(zip(lrs, lams, strict=True)):
        model = mlp((24, 16), in_features=20, classes=4, seed=5)
        anchor = ewc.anchor(model, imp)
        config = TrainConfig(lr=lr, iters=30, batch_size=25, eval_every=10, seed=7,
                             precision="bf16")  # fmt: skip
        grad = QuadraticPenalty(model, anchor, lam) if lam > 0 else None
        curve = train_task(model, (x, y), config, penalty_grad=grad, eval_sets={"all": (x, y)})
        assert curve["iteration"] == curves[run]["iteration"]
        pairs = zip(curve["all"], curves[run]["all"], strict=True)
        assert max(abs(a - b) for a, b in pairs) <= 0.03
        for k, v in model.state_dict().items():
            assert (v - finals[run][k]).abs().max() <= 0.02 * v.abs().max() + 1e-3


def test_importance_of_a_bf16_run_is_computed_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from masq import data as masq_data
    from tests.synthetic import learnable_dataset

    dataset = learnable_dataset()
    monkeypatch.setattr(masq_data, "load", lambda name="mnist", **kw: dataset)
    config = RunConfig(hidden=(16,), iters1=20, iters2=10, batch_size=25, masq_batch=50,
                       eval_every=10, precision="bf16")  # fmt: skip
    tasks = protocol.make_tasks(config)
    d1 = protocol.train_first(config, tasks)
    model = protocol.build_model(config, tasks)
    model.load_state_dict(d1.state_dict)
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    device = torch.device("cpu")
    got, _ = protocol.importance_of(config, model, tasks[0], 0, device)
    as_fp32, _ = protocol.importance_of(config.with_(precision="fp32"), model, tasks[0], 0, device)
    assert set(seen) == {torch.float32}
    assert all(torch.equal(got[k], as_fp32[k]) for k in got)


# ----------------------------------------------------------------------------- the penalty


def autograd_update(model: torch.nn.Module, anchors: list[ewc.Anchor], lam: float) -> dict:
    for p in model.parameters():
        p.grad = None
    ewc.penalty(model, anchors, lam).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("n_anchors", [1, 3])
def test_penalty_gradient_equals_the_autograd_gradient(n_anchors: int) -> None:
    model = mlp((12, 8), in_features=20, classes=4, seed=0).double()
    anchors = []
    for a in range(n_anchors):
        other = mlp((12, 8), in_features=20, classes=4, seed=10 + a).double()
        gen = torch.Generator().manual_seed(a)
        imp = {k: torch.rand(v.shape, generator=gen, dtype=torch.float64)
               for k, v in other.named_parameters()}  # fmt: skip
        anchors.append(ewc.anchor(other, imp))
    expected = autograd_update(model, anchors, 123.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # it adds to what is there
    QuadraticPenalty(model, anchors, 123.0)(model)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k] + 1.0, rtol=1e-12, atol=1e-12)


def test_training_with_the_direct_gradient_equals_training_with_the_autograd_penalty() -> None:
    x, y = data()
    imp = None
    results = []
    for mode in ("autograd", "direct"):
        model = mlp((16,), in_features=20, classes=4, seed=3)
        if imp is None:
            gen = torch.Generator().manual_seed(1)
            imp = {k: torch.rand(v.shape, generator=gen) for k, v in model.named_parameters()}
        anchor = ewc.anchor(model, imp)
        config = TrainConfig(lr=1e-2, iters=40, batch_size=25, seed=2)
        if mode == "autograd":

            def penalty(m: torch.nn.Module, a: ewc.Anchor = anchor) -> torch.Tensor:
                return ewc.penalty(m, a, 10.0)

            train_task(model, (x, y), config, penalty=penalty)
        else:
            train_task(model, (x, y), config, penalty_grad=QuadraticPenalty(model, anchor, 10.0))
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_penalty_gradient_refuses_bad_lambda_and_keys() -> None:
    model = mlp((4,), in_features=20, classes=4, seed=0)
    anchor = ewc.anchor(model, {k: torch.ones_like(v) for k, v in model.named_parameters()})
    for lam in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ewc.ConfigError, match="lam"):
            QuadraticPenalty(model, anchor, lam)
    other = mlp((5,), in_features=20, classes=4, seed=0)
    bad = ewc.anchor(other, {k: torch.ones_like(v) for k, v in other.named_parameters()})
    with pytest.raises(ewc.ConfigError):
        QuadraticPenalty(mlp((4, 4), in_features=20, classes=4), bad, 1.0)
    with pytest.raises(ewc.ConfigError, match=r"'0.weight' has shape \(5, 20\)"):
        QuadraticPenalty(model, bad, 1.0)  # same names, other widths
    _ = F


# ----------------------------------------------------------------------------- stacked Adam


def test_vectorized_stacked_adam_equals_the_run_by_run_step() -> None:
    """The whole-stack update (the CUDA default) is the run-by-run one, bit for bit."""
    states = [mlp((6, 5), in_features=7, classes=3, seed=s).state_dict() for s in range(4)]
    outs = []
    for vectorized in (False, True):
        model = stacked.stack_states(states)
        gen = torch.Generator().manual_seed(0)
        lam_f = [torch.rand(p.shape, generator=gen) for p in model.params]
        anchors = [torch.rand((1, *p.shape[1:]), generator=gen) for p in model.params]
        opt = stacked.StackedAdam.create(model, [1e-2, 1e-3, 1e-2, 5e-3], vectorized=vectorized)
        assert opt.vectorized is vectorized
        for _ in range(3):
            grads = [torch.rand(p.shape, generator=gen) for p in model.params]
            opt.step(model.params, grads, lam_f, anchors, [True, False, True, True])
        outs.append([p.clone() for p in model.params])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_phase_indices_are_the_minibatch_stream() -> None:
    from masq.training import minibatch_indices, phase_indices

    rows = phase_indices(23, 5, 9, torch.Generator().manual_seed(4))
    stream = list(minibatch_indices(23, 5, 9, torch.Generator().manual_seed(4)))
    assert rows.shape == (9, 5) and all(
        torch.equal(r, s) for r, s in zip(rows, stream, strict=True)
    )
    assert phase_indices(23, 5, 0, torch.Generator()).shape == (0, 5)


def test_wait_policy_is_passive_only_on_a_busy_machine_and_never_overrides_the_user() -> None:
    from masq.cli.waitpolicy import wait_policy_env

    assert wait_policy_env({}, busy=True) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_policy_env({}, busy=False) == {}
    assert wait_policy_env({"OMP_WAIT_POLICY": "ACTIVE"}, busy=True) == {}


def test_the_wait_policy_reads_what_runs_now_not_the_load_average(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Busy means: other runnable threads (procs_running minus this one) fill the cores now;
    a high load average left by a finished command does not count."""
    from masq.cli import waitpolicy

    assert waitpolicy.runnable_threads("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n") == 3
    assert waitpolicy.runnable_threads("cpu  1 2 3\n") is None
    stat = tmp_path / "stat"
    monkeypatch.setattr(waitpolicy, "STAT", str(stat))
    monkeypatch.setattr(waitpolicy, "usable_cores", lambda: 2)
    monkeypatch.setattr(waitpolicy.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    stat.write_text("procs_running 1\n", encoding="ascii")  # only this process
    assert waitpolicy.others_running(pause=0) == 0 and not waitpolicy.oversubscribed()
    stat.write_text("procs_running 3\n", encoding="ascii")  # two others on two cores
    assert waitpolicy.others_running(pause=0) == 2 and waitpolicy.oversubscribed()
    stat.write_text("procs_running 2\n", encoding="ascii")
    assert not waitpolicy.oversubscribed()
    monkeypatch.setattr(waitpolicy, "STAT", str(tmp_path / "missing"))
    assert waitpolicy.others_running() is None and waitpolicy.oversubscribed()  # load average


def test_a_record_says_which_wait_policy_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    from masq.protocol.result import run_meta

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert run_meta(torch.device("cpu"))["omp_wait_policy"] == "default"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    meta = run_meta(torch.device("cpu"))
    assert meta["omp_wait_policy"] == "PASSIVE" and meta["threads"] == torch.get_num_threads()
    assert meta["cpu"] and meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_state_s_fingerprint_tells_bit_equal_states_apart() -> None:
    from masq.protocol.result import state_fingerprint

    state = {"b": torch.linspace(0, 1, 6).reshape(2, 3), "a": torch.ones(3)}
    same = {"a": torch.ones(3), "b": torch.linspace(0, 1, 6).reshape(2, 3)}  # other order
    assert state_fingerprint(state) == state_fingerprint(same)
    assert len(state_fingerprint(state)) == 16
    nudged = {**state, "b": torch.nextafter(state["b"], torch.tensor(2.0))}  # one ulp each
    assert state_fingerprint(nudged) != state_fingerprint(state)
    assert state_fingerprint({**state, "b": state["b"].reshape(3, 2)}) != state_fingerprint(state)
    assert state_fingerprint({"c": state["a"], "b": state["b"]}) != state_fingerprint(state)


def test_importing_the_cli_changes_no_environment_and_loads_no_torch() -> None:
    """The thread settings are made when a command starts (masq.cli.main), not on import."""
    import subprocess
    import sys

    code = (
        "import os, sys; before = dict(os.environ); import masq.cli; "
        "sys.exit(dict(os.environ) != before or 'torch' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_the_processor_is_read_from_the_first_block_of_cpuinfo(tmp_path: Path) -> None:
    from masq.runtime import cpu_model

    info = tmp_path / "cpuinfo"
    first = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    first += "model name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: avx512f\n\n"
    info.write_text(first + first.replace("25", "23").replace("9654", "7B12"), encoding="utf-8")
    assert cpu_model(str(info)) == "AMD EPYC 9654 96-Core Processor (family 25, model 17)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n", encoding="utf-8")
    assert cpu_model(str(info)) == "Some CPU"  # no family or model numbers: the name alone
    assert cpu_model(str(tmp_path / "missing"))  # elsewhere: platform's name, or "unknown"
