"""The paper's per-SLT defaults, read from a preset (``presets/defaults/paper_best.toml``):
the paper's SLTs and, for each, its best architecture and re-training rate ε2 (Gepperth &
Wiech, section 5), which the commands use when ``--hidden`` or ``--lr2`` is not given and
Table 1, settled runs at. Torch-free.
"""

from __future__ import annotations

import functools
import sys
from importlib import resources

from masq.config import parse_hidden
from masq.errors import ConfigError
from masq.slt import parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET = "paper_best.toml"


@functools.cache
def _preset() -> tuple[dict[str, tuple[tuple[int, ...], float]], str]:
    """({SLT: (hidden sizes, ε2)} in the preset's order, the fallback SLT)."""
    text = resources.files("masq").joinpath("presets", "defaults", PRESET).read_text("utf-8")
    values = tomllib.loads(text)
    table = {
        slt: (parse_hidden(entry["hidden"], f"{PRESET}: {slt}.hidden"), float(entry["lr2"]))
        for slt, entry in values["slts"].items()
    }
    odd = [slt for slt in table if parse_spec(slt).text != slt]
    if odd or values["fallback"] not in table:
        raise ConfigError(f"{PRESET}: SLTs written as masq writes them ({odd}) and a fallback")
    return table, values["fallback"]


def paper_best_table() -> dict[str, tuple[tuple[int, ...], float]]:
    """{SLT: (hidden sizes, ε2)} for every SLT of the preset (the paper's), in its order."""
    return dict(_preset()[0])


# The paper's SLTs, in the order the paper and the commands take them.
PAPER_SLTS: tuple[str, ...] = tuple(paper_best_table())


def paper_best(slt: str) -> tuple[tuple[int, ...], float]:
    """(hidden sizes, ε2) of ``slt`` in the paper (the paper's §5); other SLTs get the
    preset's fallback (D5-5's 800-800 at 1e-5)."""
    table, fallback = _preset()
    return table.get(parse_spec(slt).text, table[fallback])


def paper_best_text() -> str:
    """ "D5-5: 800-800, lr2 1e-05, ..." for help texts."""
    return ", ".join(
        f"{slt}: {'-'.join(map(str, h))}, lr2 {lr:g}" for slt, (h, lr) in _preset()[0].items()
    )


__all__ = ["PAPER_SLTS", "paper_best", "paper_best_table", "paper_best_text"]
