"""The paper's analyses, computed from trained states or read from stored results.

- :mod:`~masq.analysis.diagonality`: Table 2 (the paper's §5.3), full Fisher-block
  statistics of every weight matrix and bias vector, and heat maps of small blocks;
- :mod:`~masq.analysis.compare`: FIM versus MaSQ per tensor (section 5.4: maxima; beyond it:
  ratio of means, rank correlation, top-q overlap, the share of cancelling gradients);
- :mod:`~masq.analysis.sweep`: the λ sweep, a grid over λ from 1 to 1e12 per importance;
- :mod:`~masq.analysis.settle`: Table 1, settled (the campaign, its extension in λ, the
  confirmation of the seed-0 winners on fresh seeds, inflation);
- :mod:`~masq.analysis.paired`: its paired t-tests over the confirmation seeds (MaSQ against
  FIM; EWC against no EWC with ε2 tuned alike);
- :mod:`~masq.analysis.common`: provenance and the manifests the report reads.

Each returns tables (DataFrames) and matplotlib figures; ``masq analyze`` writes them.
"""

from masq.analysis.common import provenance, read_manifest, write_manifest
from masq.analysis.compare import (
    MEASURES,
    cancellation_share,
    compare_markdown,
    compare_rows,
    compare_state,
    maxima_figure,
    measures,
    spearman,
    top_overlap,
    top_set,
)
from masq.analysis.compare import write_outputs as compare_outputs
from masq.analysis.diagonality import (
    Diagonality,
    block_statistics,
    diagonality,
    fisher_block,
    heatmap_figure,
    table2_markdown,
)
from masq.analysis.diagonality import write_outputs as diagonality_outputs
from masq.analysis.paired import gain_tests, paired_test, paired_tests
from masq.analysis.settle import (
    CAMPAIGN,
    Campaign,
    confirmation_configs,
    confirmation_values,
    extension_configs,
    extension_plan,
    inflation,
    lam_mean,
    lam_sum,
    next_lambda,
    plane_configs,
    settled_table,
)
from masq.analysis.sweep import (
    lam_grid,
    needed_lambda,
    needed_markdown,
    paper_lams,
    sweep_configs,
    sweep_figure,
    sweep_frame,
    sweep_grid,
    sweep_markdown,
)
from masq.analysis.sweep import write_outputs as sweep_outputs
from masq.fileio import save_png

__all__ = [
    "CAMPAIGN",
    "MEASURES",
    "Campaign",
    "Diagonality",
    "block_statistics",
    "cancellation_share",
    "compare_markdown",
    "compare_outputs",
    "compare_rows",
    "compare_state",
    "confirmation_configs",
    "confirmation_values",
    "diagonality",
    "diagonality_outputs",
    "extension_configs",
    "extension_plan",
    "fisher_block",
    "gain_tests",
    "heatmap_figure",
    "inflation",
    "lam_grid",
    "lam_mean",
    "lam_sum",
    "maxima_figure",
    "measures",
    "needed_lambda",
    "needed_markdown",
    "next_lambda",
    "paired_test",
    "paired_tests",
    "paper_lams",
    "plane_configs",
    "provenance",
    "read_manifest",
    "save_png",
    "settled_table",
    "spearman",
    "sweep_configs",
    "sweep_figure",
    "sweep_frame",
    "sweep_grid",
    "sweep_markdown",
    "sweep_outputs",
    "table2_markdown",
    "top_overlap",
    "top_set",
    "write_manifest",
]
