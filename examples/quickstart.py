"""EWC with MaSQ or the Fisher in your own training loop (docs/howto/own-loop.md).

Trains D1 (digits 0-4), computes the Fisher there, then trains D2 (digits 5-9) twice from that
same state: without EWC (λ = 0, the baseline) and with EWC, and prints both rows, so you can
see what the penalty did.

Run: .venv/bin/python examples/quickstart.py   (about a minute on 2 cores)
"""

import torch
import torch.nn.functional as F

from masq import importance, models, tasks
from masq.consolidation import ewc


def fit(
    model: torch.nn.Module,
    task: tasks.Task,
    lr: float,
    iters: int,
    anchor: ewc.Anchor | None = None,
    lam: float = 0.0,
) -> None:
    """Adam on ``task``'s training data, mini-batches of 100, with the EWC penalty if given."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    x, y = task.train
    for _ in range(iters):
        idx = torch.randint(len(y), (100,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if anchor is not None:
            loss = loss + ewc.penalty(model, anchor, lam)  # (λ/2) Σ F (θ − θ*)²
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model: torch.nn.Module, task: tasks.Task) -> float:
    """Test accuracy of ``model`` on ``task``."""
    x, y = task.test
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(iters: int = 500, lam: float = 1e4) -> dict[str, tuple[float, float]]:
    """Print and return {row: (D1 accuracy, D2 accuracy)} after D2, without and with EWC."""
    d1, d2 = tasks.make("D5-5", dataset="mnist", seed=0)  # classes 0-4, then 5-9
    model = models.mlp(hidden=(200, 200), seed=0)
    fit(model, d1, lr=1e-3, iters=iters)
    data = importance.batches(*d1.train, batch_size=1000)
    imp = importance.fisher(model, data)  # exact per-sample diagonal Fisher (1/N) Σ g²
    # imp = importance.masq(model, data)  # MaSQ: mean over batches of (batch-mean gradient)²
    anchor = ewc.anchor(model, imp)  # θ* and F, frozen copies
    after_d1 = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {}
    for name, weight in (("no EWC (λ = 0)", 0.0), (f"EWC+FIM (λ = {lam:g})", lam)):
        model.load_state_dict(after_d1)  # both re-trainings start from the same D1 state
        fit(model, d2, lr=1e-4, iters=iters, anchor=anchor if weight else None, lam=weight)
        rows[name] = (accuracy(model, d1), accuracy(model, d2))
        print(f"after D2, {name:<20} D1 {rows[name][0]:.3f}  D2 {rows[name][1]:.3f}")
    return rows


if __name__ == "__main__":
    main()
