"""SI, Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance as each parameter's
share of the decrease of the task's loss along the training path (``--importance si``).

During the phase of task t, over its optimizer steps s (θ(s) before step s, θ(s+1) after it),
the path integral

    ω_k = Σ_s −g_k(s) · (θ_k(s+1) − θ_k(s)),    g(s) = ∇ CE_t(θ(s)) on the step's mini-batch,

and at the end of the phase

    Ω_k = max(ω_k, 0) / ((Δθ_k)² + ξ),    Δθ_k = θ_k(end) − θ_k(start of the phase),

with the damping ξ = ``RunConfig.si_damping``. For plain gradient descent Σ_k ω_k is the
decrease of the task's loss along the path up to O(η) (the Euler sum −gᵀΔθ differs from the
line integral by ½ ΔθᵀHΔθ per step: ``tests/test_si.py``).

Choices, and why:

- g is by default the gradient of the task loss ALONE (``--si-gradient task``: the
  cross-entropy of the phase's mini-batch), without the consolidation penalty's gradient,
  although Adam's step was computed from their sum: ω measures how much each parameter's
  movement decreased this task's loss, and the penalty's gradient would count the pull back
  towards the earlier tasks' anchor as the new task's contribution (Zenke et al.'s reference
  code accumulates the gradient of the unregularised loss too). The training loop hands it
  over through :meth:`SITracker.observe_grad`, called right after the backward pass of the
  task loss and before the penalty's gradient is added (``train_task(grad_hook=...)``).
  ``--si-gradient total`` takes the gradient the step used, penalty included
  (:class:`SITotalTracker`, which has no ``observe_grad``): van de Ven's code
  (GMvandeVen/continual-learning) accumulates ``p.grad`` after the backward pass of its total
  loss, and its peer tables were made so. On task 1, with no penalty, the two are equal.
- Negative Ω: Zenke et al. keep ω (and so Ω) as it is, negative entries included. masq clamps
  Ω at 0, because an importance enters the penalty (λ/2) Σ_k Ω_k (θ_k − θ*_k)² and EWC's
  anchor check refuses negative importance (a negative entry would reward moving away from
  the anchor). :attr:`SITracker.clamped` counts the clamped entries of the last
  :meth:`~SITracker.importance`.
- Summed over tasks: SI's surrogate loss c Σ_k Ω̃_k (θ_k − θ̃_k)² with Ω̃ = Σ_t Ω_t and θ̃
  the latest solution is masq's online EWC with γ = 1 (``--consolidation online-ewc
  --gamma 1``) at λ = 2c; with ``ewc`` each task keeps its own anchor instead.
- Arithmetic: the product g_k(s) · (θ_k(s+1) − θ_k(s)) is formed in the parameters' dtype
  (one rounding per term; the difference of two nearby floats is mostly exact) and summed in
  float64: ω is a sum of thousands of terms of both signs whose total may be much smaller
  than its terms, which float32 accumulation would blur. On the CPU (2 cores) for
  784-800-800-10 the tracker's ops cost about 0.8 ms per step with the float64 sum against
  0.35 ms all in float32, next to a 7-9 ms Adam step at batch 100. Ω comes back in each
  parameter's dtype.

Per step the tracker keeps one copy of the parameters (θ(s)) and one of the task gradient,
allocated once, and updates them with ``torch._foreach`` ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from masq.choices import SIGradient, choice
from masq.errors import ConfigError
from masq.importance.persample import trainable_params
from masq.importance.registry import Importance, Measure, MeasureContext, register_measure


def check_damping(damping: float) -> float:
    """``damping`` as a float; a one-line ConfigError unless it is finite and > 0."""
    value = float(damping)
    if not (value > 0 and value != float("inf")):
        raise ConfigError(f"si_damping: SI's damping ξ must be finite and > 0, got {damping}")
    return value


def si_omega(omega: Tensor, delta: Tensor, damping: float) -> tuple[Tensor, int]:
    """(Ω, the number of clamped entries): Ω = max(ω, 0) / (Δθ² + ξ), in ω's dtype."""
    clamped = int((omega < 0).sum())
    return omega.clamp(min=0) / (delta.square() + damping), clamped


class SITotalTracker:
    """SI's path integral over one phase (module docstring) with g(s) the gradient the
    optimizer step used, penalty included (``--si-gradient total``): a
    :class:`~masq.importance.StepTracker`.

    Built at the start of the phase (θ(start) is copied then). Per step the loop calls
    :meth:`step` after the optimizer step (``.grad`` is then the step's gradient);
    :meth:`importance` gives Ω at the end. The tracker follows the parameters of the
    ``model`` it was built on (the network itself, not a training wrapper); the ``model``
    argument of the hooks is not read. ``dtype`` is the accumulator's (float64)."""

    def __init__(
        self, model: nn.Module, damping: float, *, dtype: torch.dtype = torch.float64
    ) -> None:
        params = trainable_params(model)
        self.damping = check_damping(damping)
        self.names = list(params)
        self.params = list(params.values())
        with torch.no_grad():
            self.start = [p.detach().clone() for p in self.params]
            self.prev = [p.detach().clone() for p in self.params]
            self.grads = [torch.zeros_like(p) for p in self.params]
            self.omega = [torch.zeros_like(p, dtype=dtype) for p in self.params]
        self.observed = False
        self.steps = 0
        self.clamped = 0

    def _copy_grads(self) -> None:
        with torch.no_grad():
            dst, src = [], []
            for buffer, p in zip(self.grads, self.params, strict=True):
                if p.grad is None:
                    buffer.zero_()
                else:
                    dst.append(buffer)
                    src.append(p.grad.detach())
            if dst:
                torch._foreach_copy_(dst, src)

    def step(self, model: nn.Module) -> None:
        """ω += −g(s) · (θ(s+1) − θ(s)) after an optimizer step, with g(s) the ``.grad`` now
        (the gradient the step used; None counts as 0), or the one an ``observe_grad`` of
        this step copied (:class:`SITracker`)."""
        if not self.observed:
            self._copy_grads()
        self.observed = False
        with torch.no_grad():
            now = [p.detach() for p in self.params]
            torch._foreach_sub_(self.prev, now)  # θ(s) − θ(s+1)
            torch._foreach_mul_(self.prev, self.grads)  # −g · Δθ, in the parameters' dtype
            torch._foreach_add_(self.omega, self.prev)  # summed in the accumulator's dtype
            torch._foreach_copy_(self.prev, now)
        self.steps += 1

    def path_integral(self) -> Importance:
        """ω so far, {name: tensor in the accumulator's dtype}."""
        return {n: w.clone() for n, w in zip(self.names, self.omega, strict=True)}

    def importance(self) -> Importance:
        """Ω = max(ω, 0) / ((θ(now) − θ(start))² + ξ) per parameter, in its dtype; sets
        :attr:`clamped` to the number of entries whose ω was negative."""
        out: Importance = {}
        clamped = 0
        with torch.no_grad():
            for name, p, start, w in zip(
                self.names, self.params, self.start, self.omega, strict=True
            ):
                delta = p.detach().to(w.dtype) - start.to(w.dtype)
                value, n = si_omega(w, delta, self.damping)
                out[name] = value.to(p.dtype)
                clamped += n
        self.clamped = clamped
        return out


class SITracker(SITotalTracker):
    """SI's path integral over one phase with g(s) the gradient of the task loss alone (the
    default, ``--si-gradient task``): :class:`SITotalTracker` with the ``observe_grad`` hook,
    which the loop calls after the task loss's backward pass, before the penalty's gradient
    is added."""

    def observe_grad(self, model: nn.Module) -> None:
        """Copy g(s) = the parameters' ``.grad`` now (the task loss's gradient; None counts
        as 0) for the next :meth:`step`."""
        self._copy_grads()
        self.observed = True


def si_tracker(model: nn.Module, ctx: MeasureContext) -> SITotalTracker:
    """The registry's ``si`` tracker of ``model`` for one phase, with ξ from
    ``ctx.settings["si_damping"]`` and the gradient from ``ctx.settings["si_gradient"]``
    (``task`` when absent: :class:`SITracker`; ``total``: :class:`SITotalTracker`)."""
    if "si_damping" not in ctx.settings:
        raise ConfigError("importance 'si': the context lacks si_damping; pass it in settings")
    gradient = choice(SIGradient, ctx.settings.get("si_gradient", SIGradient.TASK), "si_gradient")
    kind = SITracker if gradient == SIGradient.TASK else SITotalTracker
    return kind(model, ctx.settings["si_damping"])


SI = register_measure(
    Measure(
        "si",
        label="SI",
        tracker=si_tracker,
        fields=("si_damping", "si_gradient"),
        standalone=True,
        online=True,
        reads_data=False,
        description="Synaptic Intelligence: path integral of −g·Δθ of the task loss over "
        "training, Ω = max(ω, 0)/(Δθ² + ξ) (Zenke et al. 2017)",
    )
)

__all__ = ["SI", "SITotalTracker", "SITracker", "check_damping", "si_omega", "si_tracker"]
