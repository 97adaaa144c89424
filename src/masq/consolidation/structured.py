"""Structured consolidation penalties: K-FAC and per-layer Fisher blocks (the importances of
:mod:`masq.importance.kfac`), behind the :class:`~masq.consolidation.penalty.Penalty` interface.

Per nn.Linear layer, ΔW̄ = W̄ − W̄* with W̄ = ``[W | b]``, shape ``[out, cols]`` (the trainable parts,
:func:`masq.importance.kfac.stacked`); over anchors a (θ*^a and their factors) and layers:

- :class:`KFACPenalty` ("kfac"): with the layer's factors A [cols, cols] and G [out, out],

      P(θ) = (λ/2) Σ_a Σ_layers vec(ΔW̄)ᵀ (G ⊗ A) vec(ΔW̄) = (λ/2) Σ Σ trace(ΔW̄ᵀ G ΔW̄ A),
      ∇_W̄ P = λ Σ_a G ΔW̄ A     (A, G symmetric; W the columns :in, b the last column).

  Cost per layer and anchor: out² cols + out cols² multiply-adds; the Kronecker product is
  never formed.
- :class:`LayerFisherPenalty` ("fisher-blocks"): with the per-sample inputs V [N, cols] and
  the label-term rows U [N, T, out] (F = Σ_n Σ_t kron(u_nt, v_n) kron(u_nt, v_n)ᵀ),
  r_n = ΔW̄ v_n and s_nt = u_ntᵀ r_n,

      P(θ) = (λ/2) Σ_a Σ_layers Σ_n Σ_t s_nt²,    ∇_W̄ P = λ Σ_a Qᵀ V,  q_n = Σ_t s_nt u_nt.

  Cost per layer and anchor: 2 N out cols + 2 N T out multiply-adds: the product with the
  inputs is formed once per sample, not once per label term (C times less for "exact").

Both check λ (:func:`~masq.consolidation.penalty.check_lam`), the anchors' parameters
(:func:`~masq.consolidation.penalty.checked_anchors`) and the factors (present for every layer,
none for other keys, of the layer's shapes, finite) with one-line ConfigErrors; the factors are
moved to the parameters' device and dtype once, and :meth:`add_grad` writes into preallocated
buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from masq.consolidation.penalty import (
    AnchorLike,
    check_lam,
    checked_anchors,
    register_penalty_kind,
)
from masq.errors import ConfigError
from masq.importance.kfac import factor_key, linear_layers, stacked

__all__ = ["KFACPenalty", "Layer", "LayerFisherPenalty", "layers_of"]


@dataclass(frozen=True)
class Layer:
    """One nn.Linear of the penalty: its module name, the full names of its trainable weight
    and bias (None: frozen or absent), and W̄'s shape [out, cols] with cols = ins (+ 1)."""

    module: str
    weight: str | None
    bias: str | None
    out: int
    ins: int  # the weight's columns of W̄ (0 where the weight is frozen)

    @property
    def cols(self) -> int:
        """Columns of W̄: ins, plus one for a trainable bias."""
        return self.ins + (1 if self.bias is not None else 0)


def layers_of(model: nn.Module) -> list[Layer]:
    """The model's nn.Linear layers (:func:`masq.importance.kfac.linear_layers`: a one-line
    ConfigError when a trainable parameter lies elsewhere)."""
    return [
        Layer(
            m,
            site.weight,
            site.bias,
            site.module.out_features,
            site.module.in_features if site.weight is not None else 0,
        )
        for m, site in linear_layers(model).items()
    ]


def _factor(
    importance: Mapping[str, Tensor], key: str, shape: tuple[int, ...], like: Tensor, what: str
) -> Tensor:
    """importance[key] checked (present, of ``shape`` where given, finite) and moved to the
    device and dtype of ``like``; a one-line ConfigError naming the key otherwise."""
    if key not in importance:
        raise ConfigError(
            f"penalty: the {what} importance has no factor {key!r} (it holds "
            f"{sorted(importance)[:6]}); compute it on this model with the {what} measure"
        )
    f = importance[key]
    if tuple(f.shape) != shape:
        raise ConfigError(
            f"penalty: {what} factor {key!r} has shape {tuple(f.shape)}, the layer needs "
            f"{shape}; compute the importance on a model of this architecture"
        )
    if not bool(torch.isfinite(f).all()):
        bad = int((~torch.isfinite(f)).sum())
        raise ConfigError(
            f"penalty: {what} factor {key!r} has {bad} NaN/inf entries; check how it was computed"
        )
    return f.detach().to(like)


def _check_keys(importance: Mapping[str, Tensor], known: set[str], what: str) -> None:
    """A one-line ConfigError when the importance holds keys that are no layer's factor."""
    extra = sorted(set(importance) - known)
    if extra:
        raise ConfigError(
            f"penalty: the {what} importance holds {extra[:4]}, factors of no nn.Linear layer "
            "of this model; compute it on this model"
        )


def _grads(params: Mapping[str, Tensor], layer: Layer) -> tuple[Tensor | None, Tensor | None]:
    """The .grad of the layer's weight and bias (a zero one created where None)."""
    out: list[Tensor | None] = []
    for name in (layer.weight, layer.bias):
        if name is None:
            out.append(None)
            continue
        p = params[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out[0], out[1]


def _difference_(scratch: Tensor, params: Mapping[str, Tensor], layer: Layer, star: Tensor) -> None:
    """scratch = W̄ − W̄* in place: W̄'s columns copied in, then W̄* subtracted."""
    if layer.weight is not None:
        scratch[:, : layer.ins].copy_(params[layer.weight])
    if layer.bias is not None:
        scratch[:, layer.ins].copy_(params[layer.bias])
    scratch.sub_(star)


def _add_(
    grad_w: Tensor | None,
    grad_b: Tensor | None,
    left: Tensor,
    right: Tensor,
    layer: Layer,
    lam: float,
) -> None:
    """∇W̄ += λ left @ right, split into the weight (columns :ins) and the bias (column ins)."""
    if grad_w is not None:
        grad_w.addmm_(left, right[:, : layer.ins], alpha=lam)
    if grad_b is not None:
        grad_b.addmv_(left, right[:, layer.ins], alpha=lam)


class _Structured:
    """What both penalties share: λ, the layers, the anchors' W̄* per layer (on the
    parameters' device and dtype) and a scratch ΔW̄ per layer."""

    what = ""

    def __init__(
        self, model: nn.Module, anchors: AnchorLike | Sequence[AnchorLike], lam: float
    ) -> None:
        self.lam = check_lam(lam)
        named = dict(model.named_parameters())
        self.anchor_list = checked_anchors(named, anchors)
        self.layers = layers_of(model)
        # the parameter whose device and dtype the layer's tensors take
        self.like = [named[layer.weight or layer.bias or ""] for layer in self.layers]
        pairs = list(zip(self.layers, self.like, strict=True))
        with torch.no_grad():
            self.stars = [
                [stacked(*self._pair(a.params, layer)).to(like) for layer, like in pairs]
                for a in self.anchor_list
            ]
        self.scratch = [like.new_empty(layer.out, layer.cols) for layer, like in pairs]

    @staticmethod
    def _pair(tensors: Mapping[str, Tensor], layer: Layer) -> tuple[Tensor | None, Tensor | None]:
        """(W, b) of ``layer`` from ``tensors`` (None where not trainable)."""
        w = None if layer.weight is None else tensors[layer.weight]
        b = None if layer.bias is None else tensors[layer.bias]
        return w, b

    def _delta(self, params: Mapping[str, Tensor], layer: Layer, star: Tensor) -> Tensor:
        """ΔW̄ = W̄ − W̄* (differentiable in ``params``)."""
        return stacked(*self._pair(params, layer)) - star

    def __call__(self, model: nn.Module) -> None:
        """:meth:`add_grad` for ``model``'s parameters (``train_task(penalty_grad=...)``)."""
        self.add_grad(dict(model.named_parameters()))

    def add_grad(self, params: Mapping[str, Tensor]) -> None:
        """Add ∇P to each parameter's .grad (each penalty defines it)."""
        raise NotImplementedError

    def _load(
        self,
        names: tuple[str, str],
        pick: Callable[[Mapping[str, Tensor], Layer, Tensor], tuple[Tensor, Tensor]],
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Per anchor, per layer, the two factors ``names`` ("A", "G" or "U", "V") picked and
        checked by ``pick(importance, layer, like)``, after refusing keys of no layer."""
        known = {factor_key(layer.module, n) for layer in self.layers for n in names}
        factors = []
        for a in self.anchor_list:
            _check_keys(a.importance, known, self.what)
            factors.append(
                [
                    pick(a.importance, layer, like)
                    for layer, like in zip(self.layers, self.like, strict=True)
                ]
            )
        return factors


class KFACPenalty(_Structured):
    """P(θ) = (λ/2) Σ_a Σ_layers trace(ΔW̄ᵀ G ΔW̄ A) for anchors holding K-FAC factors
    ("{module}.A", "{module}.G": :func:`masq.importance.kfac.kfac_factors`); module docstring."""

    what = "K-FAC"

    def __init__(
        self, model: nn.Module, anchors: AnchorLike | Sequence[AnchorLike], lam: float
    ) -> None:
        super().__init__(model, anchors, lam)
        self.factors = self._load(("A", "G"), self._pair_of)
        self.products = [torch.empty_like(s) for s in self.scratch]  # G ΔW̄ per layer

    def _pair_of(
        self, importance: Mapping[str, Tensor], layer: Layer, like: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(A [cols, cols], G [out, out]) of ``layer``, checked."""
        a = _factor(importance, factor_key(layer.module, "A"), (layer.cols,) * 2, like, self.what)
        g = _factor(importance, factor_key(layer.module, "G"), (layer.out,) * 2, like, self.what)
        return a, g

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """P(θ) at ``params``: Σ ((G ΔW̄ A) ⊙ ΔW̄) per layer (differentiable)."""
        terms = []
        for stars, factors in zip(self.stars, self.factors, strict=True):
            for layer, star, (a, g) in zip(self.layers, stars, factors, strict=True):
                d = self._delta(params, layer, star)
                terms.append(((g @ d @ a) * d).sum())
        return (0.5 * self.lam) * torch.stack(terms).sum()

    @torch.no_grad()
    def add_grad(self, params: Mapping[str, Tensor]) -> None:
        """∇W̄ += λ (G ΔW̄) A for every anchor and layer, without autograd."""
        for stars, factors in zip(self.stars, self.factors, strict=True):
            for i, (layer, star, (a, g)) in enumerate(
                zip(self.layers, stars, factors, strict=True)
            ):
                grad_w, grad_b = _grads(params, layer)
                _difference_(self.scratch[i], params, layer, star)
                torch.mm(g, self.scratch[i], out=self.products[i])
                _add_(grad_w, grad_b, self.products[i], a, layer, self.lam)


class LayerFisherPenalty(_Structured):
    """P(θ) = (λ/2) Σ_a Σ_layers Σ_n Σ_t (u_ntᵀ ΔW̄ v_n)² for anchors holding per-layer Fisher
    blocks ("{module}.U" [N, T, out], "{module}.V" [N, cols]:
    :func:`masq.importance.kfac.layer_fisher_factors`); module docstring. Per layer and step
    r = V ΔW̄ᵀ [N, out] is formed once for all label terms, s_nt = u_ntᵀ r_n, and the gradient
    is λ Qᵀ V with q_n = Σ_t s_nt u_nt."""

    what = "Fisher-block"

    def __init__(
        self, model: nn.Module, anchors: AnchorLike | Sequence[AnchorLike], lam: float
    ) -> None:
        super().__init__(model, anchors, lam)
        self.factors = self._load(("U", "V"), self._rows)

    def _rows(
        self, importance: Mapping[str, Tensor], layer: Layer, like: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(U [N, T, out], V [N, cols]) of ``layer``, checked to have the same N."""
        u_key, v_key = factor_key(layer.module, "U"), factor_key(layer.module, "V")
        u_in = importance.get(u_key)
        n, t = (u_in.shape[0], u_in.shape[1]) if u_in is not None and u_in.ndim == 3 else (0, 1)
        u = _factor(importance, u_key, (n, t, layer.out), like, self.what)
        v = _factor(importance, v_key, (n, layer.cols), like, self.what)
        return u, v

    def value(self, params: Mapping[str, Tensor]) -> Tensor:
        """P(θ) at ``params``: Σ s², s_nt = u_ntᵀ (ΔW̄ v_n), per layer (differentiable)."""
        terms = []
        for stars, factors in zip(self.stars, self.factors, strict=True):
            for layer, star, (u, v) in zip(self.layers, stars, factors, strict=True):
                r = v @ self._delta(params, layer, star).T  # [N, out]
                s = (u @ r[:, :, None]).squeeze(2)  # [N, T]
                terms.append((s * s).sum())
        return (0.5 * self.lam) * torch.stack(terms).sum()

    @torch.no_grad()
    def add_grad(self, params: Mapping[str, Tensor]) -> None:
        """∇W̄ += λ Qᵀ V, q_n = Σ_t s_nt u_nt, for every anchor and layer, without autograd."""
        for stars, factors in zip(self.stars, self.factors, strict=True):
            for i, (layer, star, (u, v)) in enumerate(
                zip(self.layers, stars, factors, strict=True)
            ):
                grad_w, grad_b = _grads(params, layer)
                _difference_(self.scratch[i], params, layer, star)
                r = v @ self.scratch[i].T  # [N, out]
                s = torch.bmm(u, r[:, :, None])  # [N, T, 1]
                q = torch.bmm(s.transpose(1, 2), u).squeeze(1)  # [N, out]
                _add_(grad_w, grad_b, q.T, v, layer, self.lam)


register_penalty_kind("kfac", KFACPenalty)
register_penalty_kind("fisher-blocks", LayerFisherPenalty)
