"""EWC with MaSQ or the Fisher in your own training loop (the README's quickstart).

Run: .venv/bin/python examples/quickstart.py   (about half a minute on 2 cores)
"""

import torch
import torch.nn.functional as F

from masq import importance, models, tasks
from masq.consolidation import ewc

d1, d2 = tasks.make("D5-5", dataset="mnist", seed=0)  # classes 0-4, then 5-9
model = models.mlp(hidden=(200, 200), seed=0)


def fit(task: tasks.Task, lr: float, iters: int, anchor: ewc.Anchor | None, lam: float) -> None:
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


def accuracy(task: tasks.Task) -> float:
    x, y = task.test
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


fit(d1, lr=1e-3, iters=500, anchor=None, lam=0.0)
data = importance.batches(*d1.train, batch_size=1000)
imp = importance.fisher(model, data)  # exact per-sample diagonal Fisher (1/N) Σ g²
# imp = importance.masq(model, data)  # MaSQ: mean over batches of (batch-mean gradient)²
anchor = ewc.anchor(model, imp)  # θ* and F, frozen copies
fit(d2, lr=1e-4, iters=500, anchor=anchor, lam=1e4)
print(f"after D2 with EWC: D1 {accuracy(d1):.3f}  D2 {accuracy(d2):.3f}")
