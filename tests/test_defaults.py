"""The paper's per-SLT defaults come from one preset (masq.defaults), torch-free."""

from __future__ import annotations

import subprocess
import sys

from masq.defaults import PAPER_SLTS, paper_best, paper_best_table, paper_best_text


def test_the_paper_best_settings_of_each_slt() -> None:
    """The paper's §5: 800-800 at 1e-5 (D5-5), 800-400-400 at 1e-4 (D9-1), 800-800-200 at
    1e-5 (DP10-10); any other SLT takes D5-5's."""
    assert paper_best("D5-5") == ((800, 800), 1e-5)
    assert paper_best("d9-1") == ((800, 400, 400), 1e-4)
    assert paper_best("DP10-10") == ((800, 800, 200), 1e-5)
    assert paper_best("D2-2-2-2-2") == paper_best("D5-5")
    assert set(PAPER_SLTS) <= set(paper_best_table())
    assert paper_best_text().startswith("D5-5: 800-800, lr2 1e-05")


def test_the_defaults_load_without_torch() -> None:
    code = "import sys, masq.defaults as d; d.paper_best('D9-1'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_paper_slts_and_table1_settled_come_from_the_preset() -> None:
    """One statement of the paper's SLTs and their architectures: the preset's."""
    from masq.analysis.settle import CAMPAIGN

    assert PAPER_SLTS == ("D5-5", "D9-1", "DP10-10")
    assert CAMPAIGN.slts == PAPER_SLTS
    assert dict(CAMPAIGN.architectures) == {s: paper_best(s)[0] for s in PAPER_SLTS}
    assert "" not in paper_best_table()
