"""The paper's per-SLT defaults, read from a preset (``presets/defaults/paper_best.toml``):
the best architecture and re-training rate ε2 of each of the paper's SLTs (Gepperth & Wiech,
section 5), which the commands use when ``--hidden`` or ``--lr2`` is not given. Torch-free.
"""

from __future__ import annotations

import functools
import sys
from importlib import resources

from masq.config import parse_hidden
from masq.errors import ConfigError
from masq.slt import PAPER_SLTS, parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET = "paper_best.toml"


@functools.cache
def paper_best_table() -> dict[str, tuple[tuple[int, ...], float]]:
    """{SLT: (hidden sizes, ε2)} of the preset, for every SLT it names."""
    text = resources.files("masq").joinpath("presets", "defaults", PRESET).read_text("utf-8")
    values = tomllib.loads(text)
    table = {
        slt: (parse_hidden(entry["hidden"], f"{PRESET}: {slt}.hidden"), float(entry["lr2"]))
        for slt, entry in values["slts"].items()
    }
    if set(PAPER_SLTS) - set(table) or values["fallback"] not in table:
        raise ConfigError(f"{PRESET}: needs every paper SLT {PAPER_SLTS} and the fallback")
    table[""] = table[values["fallback"]]  # the fallback, under the empty name
    return table


def paper_best(slt: str) -> tuple[tuple[int, ...], float]:
    """(hidden sizes, ε2) of ``slt`` in the paper (PAPER.md section 5); other SLTs get the
    preset's fallback (D5-5's 800-800 at 1e-5)."""
    table = paper_best_table()
    return table.get(parse_spec(slt).text, table[""])


def paper_best_text() -> str:
    """ "D5-5: 800-800, lr2 1e-05, ..." for help texts."""
    table = paper_best_table()
    return ", ".join(
        f"{slt}: {'-'.join(map(str, h))}, lr2 {lr:g}" for slt, (h, lr) in table.items() if slt
    )


__all__ = ["PAPER_SLTS", "paper_best", "paper_best_table", "paper_best_text"]
