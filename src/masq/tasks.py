"""Sequential learning tasks (SLTs): class splits and pixel permutations -> list[Task].

Specs are parsed by :mod:`masq.slt` (torch-free); this module builds the tensors.

Spec grammar (the paper's D5-5, D9-1, DP10-10 and their generalisations)::

    D<a>-<b>[-<c>...]            class splits: consecutive blocks of a, b, c... classes
                                 in the order 0, 1, ..., summing to the number of classes
    D<a>-<b>[...]:<c0>,<c1>,...  the same blocks taken over an explicit class order
    DP<n>-<n>[-<n>...]           permuted tasks over all n classes: task 1 unpermuted,
                                 every later task its own seeded pixel permutation

The paper's SLTs are ``D5-5``, ``D9-1`` and ``DP10-10``. Permutations come from a
``torch.Generator`` seeded by ``seed``; the global RNG is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from masq import data as masq_data
from masq.data import Dataset, Split
from masq.errors import ConfigError
from masq.slt import parse_spec

XY = tuple[Tensor, Tensor]


@dataclass(frozen=True, eq=False)
class Task:
    """One sub-task of an SLT.

    ``train``, ``val`` and ``test`` are pairs ``(x float32 [N, 784] in [0, 1], y int64 [N])``.
    ``permutation`` is the pixel permutation applied to every part (``x_perm = x[:, perm]``)
    or ``None`` for unpermuted images. A scenario (:func:`masq.scenarios.apply_scenario`) may
    relabel the parts: ``labels`` are then the values ``y`` takes (class ``classes[i]`` is
    label ``labels[i]``; None: the classes themselves), and ``units`` the output units the
    task may use when its identity is given (task-incremental; None: every unit).
    """

    name: str
    classes: tuple[int, ...]
    permutation: Tensor | None
    train: XY = field(repr=False)
    val: XY = field(repr=False)
    test: XY = field(repr=False)
    labels: tuple[int, ...] | None = None
    units: tuple[int, ...] | None = None


def permutations(
    n_tasks: int, pixels: int, seed: int, first_seed: int | None = None
) -> list[Tensor | None]:
    """Per task its pixel permutation: for tasks 2..T ``randperm(pixels)`` drawn in turn from
    one generator seeded with ``seed``; for task 1 None (unpermuted), or with ``first_seed``
    ``randperm(pixels)`` from a generator of its own seeded with it, so that tasks 2..T are the
    same either way."""
    generator = torch.Generator().manual_seed(seed)
    first = None
    if first_seed is not None:
        first = torch.randperm(pixels, generator=torch.Generator().manual_seed(first_seed))
    perms: list[Tensor | None] = [first]
    perms += [torch.randperm(pixels, generator=generator) for _ in range(n_tasks - 1)]
    return perms


def to_xy(split: Split, pad: int = 0) -> XY:
    """uint8 images [N, H, W] -> (x float32 [N, (H + 2·pad)(W + 2·pad)] = pixel / 255, y int64
    [N]): each image framed by ``pad`` rows and columns of zeros on every side, then flattened
    row by row (MNIST with pad 2: the 32×32 images of van de Ven & Tolias's code)."""
    images = torch.from_numpy(np.ascontiguousarray(split.images))
    if pad:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    x = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(np.ascontiguousarray(split.labels)).to(torch.int64)
    return x, y


def select(xy: XY, classes: Sequence[int], permutation: Tensor | None) -> XY:
    """The samples of ``xy`` whose label is in ``classes``, in order, pixels permuted."""
    x, y = xy
    mask = torch.isin(y, torch.as_tensor(list(classes), dtype=torch.int64))
    x_sel, y_sel = x[mask], y[mask]
    if permutation is not None:
        x_sel = x_sel[:, permutation]
    return x_sel.contiguous(), y_sel.contiguous()


def seeded_blocks(
    blocks: Sequence[Sequence[int]], num_classes: int, class_seed: int
) -> tuple[tuple[int, ...], ...]:
    """The class split with ``blocks``' sizes over π, a permutation of 0..num_classes−1 drawn
    by ``torch.randperm`` from a generator seeded with ``class_seed``: block t holds
    π[s_t], ..., π[s_t + |block t| − 1] with s_t = Σ_{u<t} |block u|."""
    generator = torch.Generator().manual_seed(class_seed)
    order = torch.randperm(num_classes, generator=generator).tolist()
    out, start = [], 0
    for block in blocks:
        out.append(tuple(order[start : start + len(block)]))
        start += len(block)
    return tuple(out)


def make(
    spec: str,
    *,
    dataset: str | Dataset = "mnist",
    seed: int = 0,
    data_dir: str | None = None,
    class_seed: int | None = None,
    pad: int = 0,
    first_seed: int | None = None,
    train_on_val: bool = False,
) -> list[Task]:
    """Build the tasks of SLT ``spec`` from ``dataset`` (a name for masq.data.load, or a Dataset).

    Every construction applies to the train, validation and test parts alike. ``spec`` must be
    a string, ``dataset`` a name or a Dataset, ``seed`` an integer >= 0 (one-line ConfigError
    otherwise). ``class_seed``: a class split's blocks are taken over a permutation of the
    classes drawn from it (:func:`seeded_blocks`) instead of the spec's order; a one-line
    ConfigError for a permuted SLT or a spec with its own class order. ``pad``: zero pixels
    added on every side of each image before any permutation (:func:`to_xy`); an integer >= 0.
    ``first_seed``: a permuted SLT's task 1 gets its own permutation drawn from it
    (:func:`permutations`); a one-line ConfigError for a class split. ``train_on_val``: every
    task trains on its validation samples too (the training file in its order, the validation
    part first); the validation part stays as it is.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"spec: give an SLT spec string such as 'D5-5', got {spec!r}")
    if not isinstance(dataset, str | Dataset):
        raise ConfigError(
            f"dataset: give a dataset name ('mnist', 'fashion-mnist') or a masq.data.Dataset, "
            f"got {type(dataset).__name__}"
        )
    for name, value in (("seed", seed), ("pad", pad)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ConfigError(f"{name}: must be an integer >= 0, got {value!r}")
    data = masq_data.load(dataset, data_dir=data_dir) if isinstance(dataset, str) else dataset
    parsed = parse_spec(spec, num_classes=data.num_classes)
    task_classes = parsed.task_classes
    if class_seed is not None:
        if parsed.permuted or ":" in spec:
            raise ConfigError(
                f"--class-order seeded: {spec!r} "
                + ("has every class in every task" if parsed.permuted else "fixes its class order")
                + "; use --class-order fixed, or a class split without an order (e.g. D2-2-2-2-2)"
            )
        task_classes = seeded_blocks(task_classes, data.num_classes, class_seed)
    if first_seed is not None and not parsed.permuted:
        raise ConfigError(
            f"--permute-first: {spec!r} is a class split without permutations; use it with a "
            "permuted SLT (e.g. DP10-10)"
        )
    parts = {name: to_xy(getattr(data, name), int(pad)) for name in ("train", "val", "test")}
    if train_on_val:
        parts["train"] = (
            torch.cat((parts["val"][0], parts["train"][0])),
            torch.cat((parts["val"][1], parts["train"][1])),
        )
    pixels = parts["train"][0].shape[1]
    n_tasks = len(parsed.task_classes)
    perms = permutations(n_tasks, pixels, seed, first_seed) if parsed.permuted else [None] * n_tasks
    return [
        Task(
            name=f"D{i + 1}",
            classes=classes,
            permutation=perm,
            train=select(parts["train"], classes, perm),
            val=select(parts["val"], classes, perm),
            test=select(parts["test"], classes, perm),
        )
        for i, (classes, perm) in enumerate(zip(task_classes, perms, strict=True))
    ]


def union_test(tasks: Sequence[Task], part: str = "test") -> XY:
    """D1 ∪ D2 ∪ ...: the concatenation of the tasks' ``part`` sets ("test" or "val")."""
    if part not in ("test", "val", "train"):
        raise ConfigError(f"unknown part {part!r}; use 'train', 'val' or 'test'")
    xs, ys = zip(*(getattr(t, part) for t in tasks), strict=True)
    return torch.cat(xs), torch.cat(ys)
