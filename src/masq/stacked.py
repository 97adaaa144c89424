"""Batched re-training: K runs of one MLP trained at once as one stacked model.

D2 runs of a grid that share a D1 state differ only in ε2 (``lr``), λ and the importance F.
Here they are trained together: every parameter gets a leading run dimension K, the K
forward and backward passes become batched matmuls (``torch.baddbmm``; the first layer's
input batch is shared by all K runs), and Adam runs on the stacked tensors with a per-run
learning rate. Run k computes exactly what a separate :func:`masq.train.train_task` call
computes, up to float rounding:

    loss_k   = CE(f(x_B; θ_k), y_B)          (mean over the mini-batch B, the same B for all k)
    g_k      = ∇ loss_k + λ_k F_k ⊙ (θ_k − θ*)      (the gradient of (λ_k/2) Σ F_k (θ_k − θ*)²)
    m_k      = β1 m_k + (1 − β1) g_k,   v_k = β2 v_k + (1 − β2) g_k²
    θ_k     -= ε2_k / (1 − β1^t) · m_k / (sqrt(v_k / (1 − β2^t)) + eps)     (torch.optim.Adam)

with the mini-batches of ``train.minibatch_indices`` and the evaluation points of
``train.eval_iterations``. The gradient is back-propagated by hand (:func:`loss_grads`,
tested against autograd) into buffers allocated once.
The Adam step is PyTorch's own fused kernel (``torch._fused_adam_``, the kernel of
``Adam(fused=True)`` that ``train.make_adam`` uses) applied run by run, where this torch has
it for the device; otherwise the same update written with tensor operations.

Layout: weights are stored transposed, ``[K, in, out]`` (so ``h @ W`` and every gradient
comes out of its matmul in the parameter's own layout), biases ``[K, out]``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.torch_version import TorchVersion

from masq import __version__, experiment
from masq.errors import ConfigError
from masq.experiment import D1State, ExperimentConfig, Result
from masq.runtime import resolve_device
from masq.train import accuracies, eval_iterations, minibatch_indices

XY = tuple[Tensor, Tensor]
Curve = dict[str, list[float]]
BETAS = (0.9, 0.999)
EPS = 1e-8
LOOP_ELEMENTS = 1 << 16  # weight-gradient GEMMs run by run from this size (measured faster)
EVAL_ELEMENTS = 1 << 22  # at most this many hidden activations at once in evaluation

_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


@dataclass
class StackedMLP:
    """K MLPs (Linear/ReLU alternating, ReLU after every layer but the last) as stacked tensors.

    ``params`` is [W0, b0, W1, b1, ...]: weights ``[K, in, out]`` (transposed), biases
    ``[K, out]``; ``keys`` the matching ``nn.Sequential`` names ("0.weight", "0.bias", ...).
    """

    k: int
    params: list[Tensor]
    keys: list[str]

    @property
    def layers(self) -> int:
        return len(self.params) // 2


def linear_keys(state_dict: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """[(weight key, bias key)] of the Linear layers of an nn.Sequential MLP, in order."""
    indices: dict[int, set[str]] = {}
    for key in state_dict:
        match = _KEY.match(key)
        if not match:
            raise ConfigError(f"stacked: unexpected parameter {key!r}; expected an mlp() state")
        indices.setdefault(int(match.group(1)), set()).add(match.group(2))
    out = []
    for i in sorted(indices):
        if indices[i] != {"weight", "bias"}:
            raise ConfigError(f"stacked: layer {i} needs a weight and a bias")
        out.append((f"{i}.weight", f"{i}.bias"))
    return out


def _t(tensor: Tensor) -> Tensor:
    """A weight [out, in] as [in, out] (a bias unchanged)."""
    return tensor.t() if tensor.ndim == 2 else tensor


def stack_state(
    state_dict: Mapping[str, Tensor], k: int, device: torch.device | None = None
) -> StackedMLP:
    """K copies of one MLP state (every run starts from it)."""
    return stack_states([state_dict] * k, device)


def stack_states(
    states: Sequence[Mapping[str, Tensor]], device: torch.device | None = None
) -> StackedMLP:
    """The MLP states ``states`` (same architecture) as one stacked model."""
    keys = [key for pair in linear_keys(states[0]) for key in pair]
    params = [
        torch.stack([_t(s[key].detach()) for s in states])
        .to(device=device, dtype=torch.float32)
        .contiguous()
        for key in keys
    ]
    return StackedMLP(len(states), params, keys)


def unstack(model: StackedMLP, run: int) -> dict[str, Tensor]:
    """Run ``run``'s state dict (``nn.Sequential`` names and layouts, on the CPU)."""
    return {
        key: _t(p[run]).detach().to("cpu", copy=True).contiguous()
        for key, p in zip(model.keys, model.params, strict=True)
    }


def forward(model: StackedMLP, x: Tensor) -> Tensor:
    """Logits [K, B, classes] of the K nets on the shared input x [B, in]."""
    h = x.unsqueeze(0).expand(model.k, *x.shape)
    for layer in range(model.layers):
        if layer > 0:
            h = torch.relu(h)
        w, b = model.params[2 * layer], model.params[2 * layer + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w)
    return h


def task_losses(model: StackedMLP, x: Tensor, y: Tensor) -> Tensor:
    """Σ_k CE_k, CE_k = mean over the batch of −log softmax(f_k(x))_y (run k's task loss);
    differentiable (the autograd reference of :func:`loss_grads`)."""
    logits = forward(model, x)
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), y.repeat(k), reduction="sum") / b


@dataclass
class Workspace:
    """Buffers of one training step for mini-batches of ``batch`` (allocated once: fresh
    multi-megabyte tensors every step would cost page faults, not arithmetic)."""

    acts: list[Tensor]  # [K, B, out] per layer (post-ReLU for hidden layers; logits last)
    deltas: list[Tensor]  # [K, B, out] per layer: ∂(Σ_k loss_k)/∂(pre-activation)
    grads: list[Tensor]  # like model.params

    @classmethod
    def create(cls, model: StackedMLP, batch: int) -> Workspace:
        p0 = model.params[0]
        acts = [p0.new_empty(model.k, batch, b.shape[-1]) for b in model.params[1::2]]
        deltas = [torch.empty_like(a) for a in acts]
        return cls(acts, deltas, [torch.empty_like(p) for p in model.params])


@torch.no_grad()
def loss_grads(model: StackedMLP, ws: Workspace, x: Tensor, y: Tensor) -> list[Tensor]:
    """∇_θk CE_k of every run k (into ``ws.grads``), by hand-written back-propagation:

        z_l = a_{l-1} W_l + b_l,  a_l = relu(z_l),  a_0 = x (shared),  logits = z_L
        δ_L = (softmax(z_L) − onehot(y)) / B
        ∂W_l = a_{l-1}ᵀ δ_l,  ∂b_l = Σ_n δ_l,  δ_{l-1} = (δ_l W_lᵀ) ⊙ [a_{l-1} > 0]

    the gradient of the batch-mean cross-entropy, as autograd computes it (tested).
    """
    k, batch, layers = model.k, x.shape[0], model.layers
    h = x.unsqueeze(0).expand(k, *x.shape)
    for layer in range(layers):
        out = ws.acts[layer]
        w, b = model.params[2 * layer], model.params[2 * layer + 1]
        torch.baddbmm(b.unsqueeze(1), h, w, out=out)
        if layer < layers - 1:
            out.clamp_(min=0)
        h = out
    delta = ws.deltas[-1]
    delta.copy_(torch.softmax(ws.acts[-1], dim=2))
    delta[:, torch.arange(batch, device=x.device), y] -= 1.0
    delta.div_(batch)
    for layer in reversed(range(layers)):
        below = x.unsqueeze(0).expand(k, *x.shape) if layer == 0 else ws.acts[layer - 1]
        grad_w = ws.grads[2 * layer]
        if grad_w[0].numel() >= LOOP_ELEMENTS:  # large: one GEMM per run, no transposed copy
            for run in range(k):
                torch.mm(below[run].t(), delta[run], out=grad_w[run])
        else:
            torch.bmm(below.transpose(1, 2), delta, out=grad_w)
        torch.sum(delta, dim=1, out=ws.grads[2 * layer + 1])
        if layer > 0:
            prev = ws.deltas[layer - 1]
            torch.bmm(delta, model.params[2 * layer].transpose(1, 2), out=prev)
            prev.mul_(below > 0)
            delta = prev
    return ws.grads


@torch.no_grad()
def stacked_correct(model: StackedMLP, x: Tensor, y: Tensor) -> Tensor:
    """[K] int64: #{n : argmax f_k(x_n) == y_n} for every run k, in chunks."""
    width = max(p.shape[-1] for p in model.params[1::2])
    chunk = max(1, EVAL_ELEMENTS // (model.k * width))
    correct = torch.zeros(model.k, dtype=torch.int64, device=model.params[0].device)
    for start in range(0, int(y.shape[0]), chunk):
        logits = forward(model, x[start : start + chunk])
        correct += (logits.argmax(dim=2) == y[start : start + chunk]).sum(dim=1)
    return correct


def stacked_accuracies(
    model: StackedMLP, sets: Mapping[str, XY], unions: Mapping[str, Sequence[str]]
) -> list[dict[str, float]]:
    """Per run, ``train.accuracies`` of its counts on ``sets`` (and the unions)."""
    counts = {
        name: (stacked_correct(model, x, y).tolist(), int(y.shape[0]))
        for name, (x, y) in sets.items()
    }
    return [
        accuracies({name: (c[run], n) for name, (c, n) in counts.items()}, unions)
        for run in range(model.k)
    ]


def fused_adam_available(device: torch.device) -> bool:
    """Whether torch has the fused Adam kernel for ``device`` (CUDA; CPU from torch 2.4)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    return device.type == "cuda" or (
        device.type == "cpu" and TorchVersion(torch.__version__) >= (2, 4)
    )


@dataclass
class StackedAdam:
    """torch.optim.Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) on stacked tensors with
    one learning rate per run; ``step`` first adds the EWC gradient λ_k F_k (θ_k − θ*) where
    ``lam_f`` (λ_k F_k, stacked) and ``anchors`` (θ*, leading dimension 1) are given."""

    lrs: list[float]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    fused: bool
    steps: list[list[Tensor]] = field(default_factory=list)  # per run, per tensor (fused)
    scratch: list[Tensor] = field(default_factory=list)
    t: int = 0

    @classmethod
    def create(
        cls, model: StackedMLP, lrs: Sequence[float], fused: bool | None = None
    ) -> StackedAdam:
        device = model.params[0].device
        fused = fused_adam_available(device) if fused is None else fused
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
        )

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
        if penalty and not self.scratch:
            self.scratch = [torch.empty_like(p[0]) for p in params]
        for run in range(len(self.lrs)):  # run by run: its tensors stay in cache
            p_run, g_run = [p[run] for p in params], [g[run] for g in grads]
            if penalty and (penalized is None or penalized[run]):
                for p, g, lf, a, tmp in zip(
                    p_run, g_run, lam_f, anchors, self.scratch, strict=True
                ):
                    torch.sub(p, a[0], out=tmp)
                    g.addcmul_(lf[run], tmp)
            if self.fused:
                self._fused_step(run, p_run, g_run)
            else:
                self._plain_step(run, p_run, g_run)

    def _fused_step(self, run: int, params: list[Tensor], grads: list[Tensor]) -> None:
        steps = self.steps[run]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            grads,
            [m[run] for m in self.exp_avg],
            [v[run] for v in self.exp_avg_sq],
            [],
            steps,
            lr=self.lrs[run],
            beta1=BETAS[0],
            beta2=BETAS[1],
            weight_decay=0.0,
            eps=EPS,
            amsgrad=False,
            maximize=False,
            grad_scale=None,
            found_inf=None,
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


def lam_importance(
    model: StackedMLP, lams: Sequence[float], importances: Sequence[Mapping[str, Tensor]]
) -> list[Tensor] | None:
    """λ_k F_k per parameter in the stacked layout (zeros for λ_k = 0 or no importance);
    None when every λ_k F_k is zero. Keys of a non-empty F must match the model's."""
    if not any(lam > 0 and imp for lam, imp in zip(lams, importances, strict=True)):
        return None
    out = [torch.zeros_like(p) for p in model.params]
    for run, (lam, imp) in enumerate(zip(lams, importances, strict=True)):
        if not imp or lam == 0:
            continue
        if set(imp) != set(model.keys):
            raise ConfigError(
                f"stacked: importance keys {sorted(imp)} do not match the model's {model.keys}; "
                "compute the importance on this D1 state"
            )
        for i, key in enumerate(model.keys):
            f = _t(imp[key].to(device=out[i].device, dtype=torch.float32))
            if f.shape != out[i][run].shape:
                raise ConfigError(
                    f"stacked: importance of {key!r} has shape {tuple(imp[key].shape)}, "
                    "not that of the parameter"
                )
            out[i][run] = lam * f
    return out


def train_stacked(
    state_dict: Mapping[str, Tensor],
    train: XY,
    *,
    lrs: Sequence[float],
    lams: Sequence[float],
    importances: Sequence[Mapping[str, Tensor]],
    iters: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    eval_sets: Mapping[str, XY] | None = None,
    unions: Mapping[str, Sequence[str]] | None = None,
    device: torch.device | None = None,
) -> tuple[list[Curve], list[dict[str, Tensor]]]:
    """Re-train K = len(lrs) copies of ``state_dict`` on ``train`` at once (module docstring).

    Run k: Adam at ``lrs[k]``, penalty (λ_k/2) Σ F_k (θ − θ*)² with θ* = ``state_dict`` and
    F_k = ``importances[k]`` ({} for none); mini-batches from ``Generator().manual_seed(seed)``
    as ``train.train_task``. Returns (K curves as train_task's, K final state dicts).
    """
    k = len(lrs)
    if not (len(lams) == len(importances) == k) or k == 0:
        raise ConfigError("stacked: give one lr, one lam and one importance per run (K >= 1)")
    device = torch.device("cpu") if device is None else torch.device(device)
    model = stack_state(state_dict, k, device)
    anchors = [
        _t(state_dict[key].detach().to(device, torch.float32)).unsqueeze(0).contiguous()
        for key in model.keys
    ]
    lam_f = lam_importance(model, lams, importances)
    penalized = [lam > 0 and bool(imp) for lam, imp in zip(lams, importances, strict=True)]
    optimizer = StackedAdam.create(model, lrs)
    x, y = train[0].to(device), train[1].to(device)
    sets = {name: (a.to(device), b.to(device)) for name, (a, b) in (eval_sets or {}).items()}
    unions = dict(unions or {})
    names = [*sets, *unions]
    curves: list[Curve] = [{"iteration": [], **{n: [] for n in names}} for _ in range(k)]
    record_at = set(eval_iterations(iters, eval_every)) if sets else set()

    def record(it: int) -> None:
        for curve, acc in zip(curves, stacked_accuracies(model, sets, unions), strict=True):
            curve["iteration"].append(it)
            for n in names:
                curve[n].append(acc[n])

    if 0 in record_at:
        record(0)
    generator = torch.Generator().manual_seed(seed)
    workspace = Workspace.create(model, batch_size)
    for it, idx in enumerate(minibatch_indices(x.shape[0], batch_size, iters, generator), start=1):
        idx = idx.to(device)
        grads = loss_grads(model, workspace, x[idx], y[idx])
        optimizer.step(model.params, grads, lam_f, anchors, penalized)
        if it in record_at:
            record(it)
    return curves, [unstack(model, run) for run in range(k)]


def retrain_d2_stacked(
    configs: Sequence[ExperimentConfig],
    d1: D1State,
    importances: Sequence[Mapping[str, Tensor]],
    tasks: list,
    importance_seconds: Sequence[float] | None = None,
) -> list[Result]:
    """:func:`masq.experiment.retrain_d2` for K configs sharing ``d1`` at once: the same
    mini-batch stream (the "d2-batches" stream of the shared seed), evaluation sets and
    points, and records of the same format (``timings["d2_train"]`` is the stack's time / K;
    ``meta["stack"]`` = K)."""
    configs = [c.validate() for c in configs]
    if not configs:
        return []
    first = configs[0]
    for c in configs:
        experiment.check_same_d1(c, d1)
        if c.iters2 != first.iters2 or c.device != first.device:
            raise ConfigError("stacked: the runs of one stack need the same iters2 and device")
    seconds_imp = list(importance_seconds or [0.0] * len(configs))
    device = resolve_device(first.device)
    sets, unions = experiment.eval_sets(first, tasks)
    lams = [c.lam if c.importance != "none" else 0.0 for c in configs]
    imps = [
        dict(imp) if c.importance != "none" else {}
        for c, imp in zip(configs, importances, strict=True)
    ]
    for c, imp in zip(configs, imps, strict=True):
        if c.importance != "none" and set(imp) != set(d1.state_dict):
            raise ConfigError(
                f"stacked: importance keys {sorted(imp)} do not match the model's "
                f"{sorted(d1.state_dict)}; compute the importance on this D1 state"
            )
    start = time.perf_counter()
    curves, _ = train_stacked(
        d1.state_dict,
        tasks[1].train,
        lrs=[c.lr2 for c in configs],
        lams=lams,
        importances=imps,
        iters=first.iters2,
        batch_size=first.batch_size,
        eval_every=first.eval_every,
        seed=experiment.stream_seed(first.seed, "d2-batches"),
        eval_sets=sets,
        unions=unions,
        device=device,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    k = len(configs)
    results = []
    for c, curve, imp, s_imp in zip(configs, curves, imps, seconds_imp, strict=True):
        best, last = experiment.best_and_last(curve)
        results.append(
            Result(
                config=c,
                curve_d1=d1.curve,
                curve_d2=curve,
                best=best,
                last=last,
                importance_summary=experiment.summarize(imp) if imp else {},
                timings={"d1_train": d1.seconds, "importance": s_imp, "d2_train": seconds / k},
                meta={
                    "masq_version": __version__,
                    "torch_version": torch.__version__,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "stack": k,
                    "stack_seconds": seconds,
                },
            )
        )
    return results
