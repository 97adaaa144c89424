"""Speed and peak memory of importance computations (MaSQ's claimed low cost), printed as tables.

    python benchmarks/importance.py [--synthetic] [--threads 2] [--naive-samples 2000]
    python benchmarks/importance.py --block-stats [--synthetic] [--threads 2]

Part 1 (default): one pass over D1 of D5-5 (MNIST classes 0-4 of the 55k training split) with a
784-800-800-10 ReLU MLP, per method:

- masq:        masq.importance.masq, B_MaSQ = 1000 (ordinary batch gradients)
- fisher:      masq.importance.fisher, batches of 1000 (closed-form per-sample squares)
- naive:       one forward + backward per sample (on a subset, time extrapolated linearly)
- vmap:        torch.func vmap(grad) per-sample gradients, chunks of --vmap-chunk samples
- weight-copy: the reference TensorFlow code's method, emulated: every batch of 100 samples
               gets 100 copies of the weights, one per sample (bmm), so the gradient of the
               summed loss w.r.t. the copies is the per-sample gradients: 100x the weights' memory

Part 2 (--block-stats): fisher_block_stats for the six tensors of a 784-30-30-10 net trained
briefly on the same data (1000 Adam iterations, B = 100, lr 1e-3), plus an estimated run on the
largest tensor for comparison.

Every measurement runs in a fresh child process with the thread count pinned; peak memory is
the child's peak RSS during the measured call, above its RSS just before it (data and model
already loaded). Without MNIST (or with --synthetic) the data are uniform random images of the
same shape, which the output says.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from _common import emit, load_d1, measure, pin_threads, print_table, run_child
from masq import importance

HIDDEN = (800, 800)
BLOCK_HIDDEN = (30, 30)


# ------------------------------------------------------------------------------- data, models


def mlp(hidden: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """784-hidden-10 ReLU MLP, PyTorch's default uniform init drawn from a seeded generator."""
    sizes = (784, *hidden, 10)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                bound = m.in_features**-0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)
    return model


def train_briefly(model: nn.Module, x: Tensor, y: Tensor, iterations: int = 1000) -> None:
    """Adam (lr 1e-3), batches of 100 drawn without replacement per epoch, seeded."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for _ in range(iterations):
        if pos + 100 > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + 100]
        pos += 100
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


# ------------------------------------------------------------- per-sample baseline methods


def naive_fisher(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """(1/n) sum_n g_n^2 with one forward and one backward per sample."""
    params = dict(model.named_parameters())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for n in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
        for k, g in zip(sums, torch.autograd.grad(loss, list(params.values())), strict=True):
            sums[k] += g.square()
    return {k: s / len(x) for k, s in sums.items()}


def vmap_fisher(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> dict[str, Tensor]:
    """(1/N) sum_n g_n^2 from torch.func per-sample gradients, ``chunk`` samples at a time."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def sample_loss(p: dict[str, Tensor], xn: Tensor, yn: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for s in range(0, len(x), chunk):
        for k, g in per_sample(params, x[s : s + chunk], y[s : s + chunk]).items():
            sums[k] += g.square().sum(0)
    return {k: v / len(x) for k, v in sums.items()}


def weight_copy_fisher(model: nn.Sequential, x: Tensor, y: Tensor, batch: int) -> dict[str, Tensor]:
    """The TensorFlow reference method: B weight copies, sample n uses copy n (bmm)."""
    names = [k for k, _ in model.named_parameters()]
    sums = [torch.zeros_like(p) for p in model.parameters()]
    for s in range(0, len(x), batch):
        xb, yb = x[s : s + batch], y[s : s + batch]
        copies = [
            p.detach().expand(len(xb), *p.shape).clone().requires_grad_()
            for p in model.parameters()
        ]
        h, it = xb.unsqueeze(1), iter(copies)
        for m in model:
            if isinstance(m, nn.Linear):
                w, b = next(it), next(it)
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:
                h = m(h)
        loss = nn.functional.cross_entropy(h.squeeze(1), yb, reduction="sum")
        for acc, g in zip(sums, torch.autograd.grad(loss, copies), strict=True):
            acc += g.square().sum(0)
    return {k: v / len(x) for k, v in zip(names, sums, strict=True)}


# ------------------------------------------------------------------------------- children


def child_method(args: argparse.Namespace) -> None:
    x, y, note = load_d1(args.synthetic)
    model = mlp(HIDDEN)
    n = len(x)
    if args.child == "naive":
        n = min(args.naive_samples, len(x))
    elif args.child in ("vmap", "weight-copy") and args.slow_samples:
        n = min(args.slow_samples, len(x))
    xs, ys = x[:n].contiguous(), y[:n].contiguous()
    work = {
        "masq": lambda: importance.masq(model, importance.batches(xs, ys, 1000)),
        "fisher": lambda: importance.fisher(model, importance.batches(xs, ys, 1000)),
        "naive": lambda: naive_fisher(model, xs, ys),
        "vmap": lambda: vmap_fisher(model, xs, ys, args.vmap_chunk),
        "weight-copy": lambda: weight_copy_fisher(model, xs, ys, 100),
    }[args.child]
    stats, imp = measure(work)
    check = None  # per-sample methods: largest deviation from fisher on the same samples
    if args.child in ("naive", "vmap", "weight-copy"):
        ref = importance.fisher(model, importance.batches(xs, ys, 1000))
        check = max(float((imp[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    total = sum(float(v.double().sum()) for v in imp.values())
    emit(
        stats
        | {"method": args.child, "samples": n, "total": len(x), "sum": total, "data": note}
        | {"check": check}
    )


def child_block(args: argparse.Namespace) -> None:
    x, y, note = load_d1(args.synthetic)
    model = mlp(BLOCK_HIDDEN)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    stats, block = measure(
        lambda: importance.fisher_block_stats(
            model,
            importance.batches(x, y, 1000),
            args.tensor,
            max_exact_params=args.max_exact,
            generator=torch.Generator().manual_seed(0),
        )
    )
    emit(stats | {"block": dataclasses.asdict(block), "samples": len(x), "data": note})


# --------------------------------------------------------------------------------- parent


def child_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    argv = [__file__, "--threads", str(args.threads), "--naive-samples", str(args.naive_samples)]
    argv += ["--vmap-chunk", str(args.vmap_chunk), "--slow-samples", str(args.slow_samples)]
    return argv + (["--synthetic"] if args.synthetic else []) + list(extra)


def run_methods(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for method in ("masq", "fisher", "naive", "vmap", "weight-copy"):
        r = run_child(child_argv(args, "--child", method), args.threads)
        factor = r["total"] / r["samples"]
        r["full_seconds"] = r["seconds"] * factor
        r["label"] = method if factor == 1 else f"{method} (n={r['samples']}, time x{factor:.2f})"
        rows.append(r)
        print(f"  {r['label']}: {r['full_seconds']:.2f} s, +{r['delta_mib']:.0f} MiB", flush=True)
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["full_seconds"] / base["full_seconds"]
        r["mem_ratio"] = r["delta_mib"] / base["delta_mib"]
        r["peak_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    print(f"\ndata: {rows[0]['data']}; N = {rows[0]['total']}; threads = {args.threads}")
    print_table(
        "Importance pass, 784-800-800-10 MLP (time for all N; extrapolated rows say so)",
        rows,
        [
            ("label", "method"),
            ("full_seconds", "seconds"),
            ("time_ratio", "time / masq"),
            ("delta_mib", "peak rise MiB"),
            ("mem_ratio", "rise / masq"),
            ("peak_rss_mib", "peak RSS MiB"),
            ("peak_ratio", "peak / masq"),
            ("sum", "sum of F (its samples)"),
            ("check", "max rel. dev. from fisher"),
        ],
    )
    fisher_row, naive_row = rows[1], rows[2]
    print(
        f"\nfisher / masq: time {fisher_row['time_ratio']:.2f}x (target <= 1.2), peak rise "
        f"{fisher_row['mem_ratio']:.2f}x (target <= 1.5), peak RSS {fisher_row['peak_ratio']:.2f}x;"
        f" naive / fisher time: {naive_row['full_seconds'] / fisher_row['full_seconds']:.1f}x "
        "(target >= 15)"
    )


def run_block_stats(args: argparse.Namespace) -> None:
    x, y, note = load_d1(args.synthetic)
    model = mlp(BLOCK_HIDDEN)
    train_briefly(model, x, y)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    print(f"data: {note}; N = {len(x)}; threads = {args.threads}")
    print(
        f"784-30-30-10 net trained 1000 Adam iterations (B=100, lr 1e-3): train accuracy {acc:.4f}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.pt")
        torch.save(model.state_dict(), state)
        runs = [(name, args.max_exact) for name, _ in model.named_parameters()] + [("0.weight", 0)]
        for name, max_exact in runs:
            extra = ["--child", "block", "--tensor", name, "--state", state]
            r = run_child(child_argv(args, *extra, "--max-exact", str(max_exact)), args.threads)
            b = r["block"]
            ci = b["offdiag_abs_mean_ci"]
            rows.append(
                b
                | r
                | {
                    "mode": "estimated" if b["estimated"] else "exact",
                    "ci": None if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]",
                }
            )
            print(f"  {name} ({rows[-1]['mode']}): {r['seconds']:.1f} s", flush=True)
    exact_seconds = sum(r["seconds"] for r in rows if not r["estimated"])
    print_table(
        "Full Fisher block per tensor: time, memory and statistics",
        rows,
        [
            ("name", "tensor"),
            ("num_params", "P"),
            ("mode", "mode"),
            ("seconds", "seconds"),
            ("delta_mib", "peak rise MiB"),
            ("peak_rss_mib", "peak RSS MiB"),
            ("diag_sum", "diag sum"),
            ("diag_mean", "diag mean"),
            ("offdiag_sum", "off sum"),
            ("offdiag_mean", "off mean"),
            ("offdiag_abs_sum", "off |.| sum"),
            ("offdiag_abs_mean", "off |.| mean"),
            ("ci", "95% CI |.| mean"),
        ],
    )
    peak = max(r["peak_rss_mib"] for r in rows) / 1024
    print(
        f"\nall six tensors exact: {exact_seconds:.1f} s (target <= 600 s); largest peak RSS "
        f"{peak:.2f} GiB (target <= 6 GiB)"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="random data instead of MNIST")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--naive-samples", type=int, default=2000, help="subset for the naive loop")
    p.add_argument(
        "--slow-samples", type=int, default=3000, help="subset for vmap/weight-copy (0: all)"
    )
    p.add_argument("--vmap-chunk", type=int, default=100, help="samples per vmap chunk")
    p.add_argument("--block-stats", action="store_true", help="run part 2 instead of part 1")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tensor", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--max-exact", type=int, default=25_000, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    pin_threads(args.threads)
    if args.child == "block":
        child_block(args)
    elif args.child:
        child_method(args)
    elif args.block_stats:
        run_block_stats(args)
    else:
        run_methods(args)


if __name__ == "__main__":
    main()
