"""The naive twins of :mod:`masq.importance.kfac` and of its penalties
(:mod:`masq.consolidation.structured`): one backward pass per sample and label term, in float64
on a float64 copy of the model, explicit Kronecker products and explicit P × P blocks.

Notation as in :mod:`masq.importance.kfac`: ā_n = [a_n; 1], W̄ = [W | b] (the trainable parts),
δ_n = d l_n / d z_n; a label term of sample n is a target t with weight w (1, or p_c for
``labels="exact"``).

- :func:`kfac_factors`: A = (1/N) Σ_n ā_n ā_nᵀ, G = (1/N) Σ_n Σ_t w δ_nt δ_ntᵀ, with ā_n from a
  forward hook and δ_nt = d l / d e at e = 0 for an added zero e on the layer's output.
- :func:`layer_fisher_block`: F = (1/N) Σ_n Σ_t w g g ᵀ with g the flattened (row-major) gradient
  of [W | b] from :func:`~masq.importance.reference.core.sample_gradient`.
- :func:`kfac_penalty`, :func:`layer_block_penalty`: (λ/2) Σ_layers vec(ΔW̄)ᵀ F vec(ΔW̄) with
  F = torch.kron(G, A) or the explicit block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from masq.config import FisherLabels
from masq.errors import ConfigError
from masq.importance.diagonal import cross_entropy
from masq.importance.kfac import factor_key, kfac_labels
from masq.importance.reference.core import (
    float64_copy,
    labelled_samples,
    restricted,
    sample_gradient,
    unit_list,
)

__all__ = ["kfac_factors", "kfac_penalty", "layer_block_penalty", "layer_fisher_block"]


def _layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear with a trainable parameter, by module name."""
    return {
        m: mod
        for m, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters())
    }


def _trainable(layer: nn.Linear) -> tuple[bool, bool]:
    """(weight trainable, bias trainable)."""
    return layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad


def _bar(layer: nn.Linear, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """[W | b] of the trainable parts (``weight``, ``bias``: tensors shaped like the layer's)."""
    use_w, use_b = _trainable(layer)
    parts: list[Tensor] = []
    if use_w:
        assert weight is not None
        parts.append(weight)
    if use_b:
        assert bias is not None
        parts.append(bias.reshape(-1, 1))
    return torch.cat(parts, dim=1)


def _augmented(layer: nn.Linear, a: Tensor) -> Tensor:
    """ā = [a; 1] for one sample's input a [in] (a where the weight is trainable, the 1 where
    the bias is)."""
    use_w, use_b = _trainable(layer)
    parts = [a] if use_w else []
    if use_b:
        parts.append(a.new_ones(1))
    return torch.cat(parts)


def _labelled(
    work: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    labels: FisherLabels | str,
    generator: torch.Generator | None,
    units: list[int] | None,
) -> Iterator[tuple[Tensor, list[tuple[Tensor, Tensor | None]]]]:
    """(x_n, its label terms) for every sample (:func:`~masq.importance.reference.core.
    labelled_samples`), after refusing "batched"."""
    return labelled_samples(work, batches, kfac_labels(labels), generator, units)


@contextlib.contextmanager
def _probed(
    layers: dict[str, nn.Linear], inputs: dict[str, Tensor], zeros: dict[str, Tensor]
) -> Iterator[None]:
    """Forward hooks that record each layer's input and return its output plus a zero tensor
    e (requiring grad): d loss / d e is the layer's δ."""

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            inputs[name] = args[0].detach()
            zeros[name] = torch.zeros_like(output, requires_grad=True)
            return output + zeros[name]

        return record

    handles = [layer.register_forward_hook(hook(m)) for m, layer in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kfac_factors(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    labels: FisherLabels | str = FisherLabels.EXACT,
    generator: torch.Generator | None = None,
    outputs: Sequence[int] | Tensor | None = None,
) -> dict[str, Tensor]:
    """{"{m}.A": A, "{m}.G": G} (float64) with A = (1/N) Σ_n ā_n ā_nᵀ and
    G = (1/N) Σ_n Σ_t w δ_nt δ_ntᵀ, one forward and backward per sample and label term."""
    work = float64_copy(model)
    units = unit_list(outputs)
    loss = restricted(cross_entropy, units)
    layers = _layers(work)
    a_sums: dict[str, Tensor] = {}
    g_sums: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    zeros: dict[str, Tensor] = {}
    count = 0
    for xn, terms in _labelled(work, batches, labels, generator, units):
        for target, weight in terms:
            with _probed(layers, inputs, zeros):
                value = loss(work(xn.unsqueeze(0)), target.reshape(1)).sum()
            deltas = torch.autograd.grad(value, [zeros[m] for m in layers], allow_unused=True)
            for m, d in zip(layers, deltas, strict=True):
                out = layers[m].out_features
                d = xn.new_zeros(out, dtype=torch.float64) if d is None else d[0]
                w = 1.0 if weight is None else weight
                g_sums[m] = g_sums.get(m, 0) + w * torch.outer(d, d)
        for m, layer in layers.items():
            a = _augmented(layer, inputs[m][0])
            a_sums[m] = a_sums.get(m, 0) + torch.outer(a, a)
        count += 1
    result = {}
    for m in layers:
        result[factor_key(m, "A")] = a_sums[m] / count
        result[factor_key(m, "G")] = g_sums[m] / count
    return result


def layer_fisher_block(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    module: str,
    *,
    labels: FisherLabels | str = FisherLabels.EXACT,
    generator: torch.Generator | None = None,
    outputs: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """The explicit [P, P] Fisher block of layer ``module`` (W and b together, P = out × cols):
    F = (1/N) Σ_n Σ_t w g_nt g_ntᵀ, g_nt = the gradient of [W | b] flattened row-major."""
    work = float64_copy(model)
    layers = _layers(work)
    if module not in layers:
        raise ConfigError(f"unknown layer {module!r}; valid: {', '.join(layers)}")
    layer = layers[module]
    prefix = f"{module}." if module else ""
    units = unit_list(outputs)
    loss = restricted(cross_entropy, units)
    total: Tensor | int = 0
    count = 0
    for xn, terms in _labelled(work, batches, labels, generator, units):
        for target, weight in terms:
            g = sample_gradient(work, xn, target, loss)
            row = _bar(layer, g.get(f"{prefix}weight"), g.get(f"{prefix}bias")).flatten()
            total = total + (1.0 if weight is None else weight) * torch.outer(row, row)
        count += 1
    assert isinstance(total, Tensor)
    return total / count


def _explicit_penalty(
    model: nn.Module,
    anchor_params: Mapping[str, Tensor],
    blocks: Mapping[str, Tensor],
    lam: float,
) -> Tensor:
    """(λ/2) Σ_layers vec(ΔW̄)ᵀ F vec(ΔW̄) (float64) with F = blocks[module] explicit."""
    total = torch.zeros((), dtype=torch.float64)
    for m, layer in _layers(model).items():
        prefix = f"{m}." if m else ""
        now = _bar(layer, layer.weight, layer.bias).double()
        star = _bar(layer, anchor_params[f"{prefix}weight"], anchor_params.get(f"{prefix}bias"))
        d = (now - star.double()).flatten()
        total = total + d @ blocks[m].double() @ d
    return 0.5 * lam * total


def kfac_penalty(
    model: nn.Module,
    anchor_params: Mapping[str, Tensor],
    factors: Mapping[str, Tensor],
    lam: float,
) -> Tensor:
    """(λ/2) Σ_layers vec(ΔW̄)ᵀ (G ⊗ A) vec(ΔW̄), the Kronecker product formed explicitly
    (``torch.kron(G, A)``, row-major vec); float64."""
    blocks = {
        m: torch.kron(factors[factor_key(m, "G")].double(), factors[factor_key(m, "A")].double())
        for m in _layers(model)
    }
    return _explicit_penalty(model, anchor_params, blocks, lam)


def layer_block_penalty(
    model: nn.Module,
    anchor_params: Mapping[str, Tensor],
    blocks: Mapping[str, Tensor],
    lam: float,
) -> Tensor:
    """(λ/2) Σ_layers vec(ΔW̄)ᵀ F vec(ΔW̄) with the explicit blocks F {module: [P, P]}
    (:func:`layer_fisher_block`); float64."""
    return _explicit_penalty(model, anchor_params, blocks, lam)
