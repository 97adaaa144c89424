"""Adam on stacked tensors: ``torch.optim.Adam``'s update for K runs with one learning rate
each, the EWC gradient λ_k F_k (θ_k − θ*) added first (:mod:`masq.stacked`) by the penalty
kernel (:func:`masq.consolidation.penalty.quadratic_grad_`) run by run; the vectorised
(CUDA) step forms the same two operations over whole stacked tensors, with a run mask.

The compiled step (opt-in: ``masq grid --compile-step``, the environment variable
:data:`masq.runtime.COMPILE_ENV`) fuses both into one loop per tensor with ``torch.compile``
(inductor), over the stacked tensors of all K runs at once: per entry, g' = g + λF ⊙ (θ − θ*)
(penalized runs), m ← β1 m + (1 − β1) g', v ← β2 v + (1 − β2) g'²,
θ ← θ − (lr / (1 − β1ᵗ)) m / (√v / √(1 − β2ᵗ) + ε): the same update as the fused kernel up
to float rounding, with one pass over the stack's memory instead of three per run. It compiles
once per process, architecture and stack size (5 to 25 s on the 2-core CPU); where compiling
fails, the step falls back to the eager path with a warning (:func:`compiled_step_active` says
which ran)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from masq.consolidation.penalty import quadratic_grad_
from masq.errors import ConfigError
from masq.fileio import warn
from masq.runtime import compile_step_requested
from masq.stacked.model import StackedMLP, stored_layout
from masq.training import AdamMoments, fused_adam_available

BETAS = (0.9, 0.999)
EPS = 1e-8
_compiled: dict[bool, Any] = {}  # with penalty or not -> the torch.compile'd step
_compile_failed: list[str] = []  # the reason, once compiling failed in this process


def compiled_step_active() -> bool:
    """Whether the compiled step is asked for and has not failed in this process."""
    return compile_step_requested() and not _compile_failed


def _penalty_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    lam_f: list[Tensor] | None,
    anchors: list[Tensor] | None,
    mask: Tensor,
    lr: Tensor,
    bias1: Tensor,
    bias2_sqrt: Tensor,
) -> None:
    """The step of all K runs (module docstring), in place, over the stacked tensors: ``mask``
    [K] (1: penalized) and ``lr`` [K] broadcast over each run's entries, anchors of leading
    dimension 1 over every run; scalars as 0-dim tensors so that one compiled graph serves
    every step."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq, strict=True)):
        shape = (-1,) + (1,) * (p.ndim - 1)
        if lam_f is not None and anchors is not None:
            g = g + mask.view(shape) * lam_f[i] * (p - anchors[i])
        m.lerp_(g, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        p.sub_(lr.view(shape) / bias1 * m / (v.sqrt() / bias2_sqrt + EPS))


def _compiled_step(penalty: bool) -> Any:
    if penalty not in _compiled:
        # one graph per architecture and stack size: a grid over many nets needs more than
        # dynamo's default of 8 before it would quietly fall back to eager
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(int(dynamo_config.recompile_limit), 256)
        _compiled[penalty] = torch.compile(_penalty_adam, dynamic=False, fullgraph=True)
    return _compiled[penalty]


@dataclass
class StackedAdam:
    """torch.optim.Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) on stacked tensors with
    one learning rate per run; ``step`` first adds the EWC gradient λ_k F_k (θ_k − θ*) where
    ``lam_f`` (λ_k F_k, stacked) and ``anchors`` (θ*: leading dimension 1, shared by every
    run, or K, run k's own) are given."""

    lrs: list[float]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    fused: bool
    steps: list[list[Tensor]] = field(default_factory=list)  # per run, per tensor (fused)
    scratch: list[Tensor] = field(default_factory=list)
    t: int = 0
    vectorized: bool = False  # one fused call per distinct lr for all its runs (CUDA default)
    compiled: bool = False  # penalty and Adam as one compiled step per run (module docstring)

    @classmethod
    def create(
        cls,
        model: StackedMLP,
        lrs: Sequence[float],
        fused: bool | None = None,
        vectorized: bool | None = None,
        compiled: bool | None = None,
    ) -> StackedAdam:
        """Fresh state for the K runs of ``model``. ``vectorized`` (default: on CUDA) steps all
        runs of one learning rate in one fused call and adds the penalty over whole stacked
        tensors; the CPU default goes run by run, which keeps each run's tensors in cache
        (measured per step of K = 16, 2 threads: 784-800-800-10 37 ms run by run against
        86 ms vectorised; 784-200-200-10 22 ms against 15 ms). ``compiled`` (default:
        :func:`compiled_step_active`) takes the compiled step on the run-by-run path."""
        device = model.params[0].device
        fused = fused_adam_available(device) if fused is None else fused
        vectorized = device.type == "cuda" if vectorized is None else vectorized
        steps = [
            [torch.zeros((), dtype=torch.float32, device=device) for _ in model.params]
            for _ in range(model.k)
        ]
        return cls(
            [float(lr) for lr in lrs],
            [torch.zeros_like(p) for p in model.params],
            [torch.zeros_like(p) for p in model.params],
            fused,
            steps,
            vectorized=bool(vectorized and fused),
            compiled=bool(compiled_step_active() if compiled is None else compiled),
        )

    @torch.no_grad()
    def load(self, model: StackedMLP, moments: Sequence[AdamMoments]) -> None:
        """Start run k from Adam's state ``moments[k]`` (``adam_state`` keep: the moments and
        step count its earlier phases left) instead of a fresh state. The runs of a stack have
        trained the same number of steps; a one-line ConfigError otherwise, or where the
        moments are not of ``model``'s parameters."""
        if len(moments) != model.k:
            raise ConfigError(f"stacked: give one Adam state per run (K = {model.k})")
        steps = {m.step for m in moments}
        if len(steps) != 1:
            raise ConfigError(
                f"stacked: the runs' Adam states have taken {sorted(steps)} steps; stack runs "
                "of one step count"
            )
        for run, m in enumerate(moments):
            if set(m.exp_avg) != set(model.keys) or set(m.exp_avg_sq) != set(model.keys):
                raise ConfigError(
                    f"stacked: Adam state of {sorted(m.exp_avg)[:4]}, the model has "
                    f"{model.keys[:4]}; carry the state of this architecture"
                )
            for i, key in enumerate(model.keys):
                first, second = stored_layout(m.exp_avg[key]), stored_layout(m.exp_avg_sq[key])
                if first.shape != self.exp_avg[i][run].shape or second.shape != first.shape:
                    raise ConfigError(
                        f"stacked: Adam state of {key!r} has shape {tuple(m.exp_avg[key].shape)}, "
                        "not that of the parameter; carry the state of this architecture"
                    )
                self.exp_avg[i][run].copy_(first)
                self.exp_avg_sq[i][run].copy_(second)
            for counter in self.steps[run]:
                counter.fill_(float(m.step))
        self.t = steps.pop()

    def moments(self, model: StackedMLP, run: int) -> AdamMoments:
        """Run ``run``'s Adam state (its step count, m and v in the parameters' own layouts,
        on the CPU): what :meth:`load` takes back."""

        def own(tensors: list[Tensor]) -> dict[str, Tensor]:
            return {
                key: stored_layout(t[run]).detach().to("cpu", copy=True).contiguous()
                for key, t in zip(model.keys, tensors, strict=True)
            }

        return AdamMoments(self.t, own(self.exp_avg), own(self.exp_avg_sq))

    @torch.no_grad()
    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lam_f: Sequence[Tensor] | None = None,
        anchors: Sequence[Tensor] | None = None,
        penalized: Sequence[bool] | None = None,
    ) -> None:
        """One Adam step of every run; the EWC gradient is added for the runs flagged in
        ``penalized`` (default: all) when ``lam_f`` and ``anchors`` are given."""
        self.t += 1
        penalty = lam_f is not None and anchors is not None
        if self.vectorized:
            self._vectorized_step(params, grads, lam_f if penalty else None, anchors, penalized)
            return
        if self.compiled and self._compiled_runs(params, grads, lam_f, anchors, penalized):
            return
        if penalty and not self.scratch:
            self.scratch = [torch.empty_like(p[0]) for p in params]
        for run in range(len(self.lrs)):  # run by run: its tensors stay in cache
            p_run, g_run = [p[run] for p in params], [g[run] for g in grads]
            # = penalty, spelled out so that mypy narrows lam_f and anchors
            if lam_f is not None and anchors is not None and (penalized is None or penalized[run]):
                stars = [a[run] if a.shape[0] > 1 else a[0] for a in anchors]
                lam_f_run = [lf[run] for lf in lam_f]
                quadratic_grad_(g_run, p_run, stars, lam_f_run, self.scratch)
            if self.fused:
                self._fused_step(run, p_run, g_run)
            else:
                self._plain_step(run, p_run, g_run)

    def _compiled_runs(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lam_f: Sequence[Tensor] | None,
        anchors: Sequence[Tensor] | None,
        penalized: Sequence[bool] | None,
    ) -> bool:
        """The compiled step of every run at once; False (nothing changed) where compiling
        failed, and from then on this optimizer takes the eager path."""
        penalty = lam_f is not None and anchors is not None
        device = params[0].device
        on = [1.0] * len(self.lrs) if penalized is None else [float(f) for f in penalized]
        args = (
            list(params),
            list(grads),
            self.exp_avg,
            self.exp_avg_sq,
            list(lam_f) if penalty and lam_f is not None else None,
            list(anchors) if penalty and anchors is not None else None,
            torch.tensor(on, device=device),
            torch.tensor(self.lrs, device=device),
            torch.tensor(1 - BETAS[0] ** self.t, device=device),
            torch.tensor(math.sqrt(1 - BETAS[1] ** self.t), device=device),
        )
        try:
            _compiled_step(penalty)(*args)
        except Exception as err:  # no C++ compiler, an unsupported torch: go eager
            _compile_failed.append(f"{type(err).__name__}: {err}".splitlines()[0][:200])
            warn(f"the compiled step failed ({_compile_failed[0]}); continuing without it")
            self.compiled = False
            return False
        for steps in self.steps:  # the fused kernel's counters stay in step with self.t
            torch._foreach_add_(steps, 1)
        return True

    def _vectorized_step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        lam_f: Sequence[Tensor] | None,
        anchors: Sequence[Tensor] | None,
        penalized: Sequence[bool] | None,
    ) -> None:
        """The same update with whole-stack operations: g += λF ⊙ (θ − θ*) for the penalized
        runs (a mask on the run dimension), then one fused Adam call per distinct lr."""
        if lam_f is not None and anchors is not None:
            if not self.scratch:
                self.scratch = [torch.empty_like(p) for p in params]
            mask = None
            if penalized is not None and not all(penalized):
                mask = torch.tensor(penalized, device=params[0].device)
            for p, g, lf, a, tmp in zip(params, grads, lam_f, anchors, self.scratch, strict=True):
                torch.sub(p, a, out=tmp)
                if mask is not None:
                    tmp.mul_(mask.view(-1, *([1] * (tmp.ndim - 1))))
                g.addcmul_(lf, tmp)
        by_lr: dict[float, list[int]] = {}
        for run, lr in enumerate(self.lrs):
            by_lr.setdefault(lr, []).append(run)
        for lr, runs in by_lr.items():
            _fused_adam(
                [p[run] for run in runs for p in params],
                [g[run] for run in runs for g in grads],
                [m[run] for run in runs for m in self.exp_avg],
                [v[run] for run in runs for v in self.exp_avg_sq],
                [s for run in runs for s in self.steps[run]],
                lr,
            )

    def _fused_step(self, run: int, params: list[Tensor], grads: list[Tensor]) -> None:
        _fused_adam(
            params,
            grads,
            [m[run] for m in self.exp_avg],
            [v[run] for v in self.exp_avg_sq],
            self.steps[run],
            self.lrs[run],
        )

    def _plain_step(self, run: int, params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = BETAS
        bias1 = 1 - beta1**self.t
        bias2_sqrt = math.sqrt(1 - beta2**self.t)
        for p, g, m, v in zip(params, grads, self.exp_avg, self.exp_avg_sq, strict=True):
            mr, vr = m[run], v[run]
            mr.lerp_(g, 1 - beta1)
            vr.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = vr.sqrt().div_(bias2_sqrt).add_(EPS)
            p.addcdiv_(mr, denom, value=-self.lrs[run] / bias1)


def _fused_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    steps: list[Tensor],
    lr: float,
) -> None:
    """One step of PyTorch's fused Adam kernel (the kernel of ``Adam(fused=True)``) on these
    tensor lists, their step counters first advanced by one."""
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(
        params,
        grads,
        exp_avg,
        exp_avg_sq,
        [],
        steps,
        lr=lr,
        beta1=BETAS[0],
        beta2=BETAS[1],
        weight_decay=0.0,
        eps=EPS,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )
