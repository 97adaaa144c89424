"""Tables and figures from results: :mod:`~masq.report.tables` (the paper's Table 1 for runs
of any T), :mod:`~masq.report.settled` (Table 1, settled), :mod:`~masq.report.consistency`
(the paper's §5.2), :mod:`~masq.report.figures` (curves over the phases, accuracy-matrix
heat maps), :mod:`~masq.report.imm` (IMM's α sweeps), :mod:`~masq.report.runs` (the tables
and files of ``masq run``, ``compare`` and ``imm``) and :mod:`~masq.report.html`
(``masq report``: one HTML page and its Markdown twin)."""

from masq.report.consistency import consistency_figures, consistency_plan, consistency_summary
from masq.report.html import Report, build_report
from masq.report.tables import (
    CONFIG_FIELDS,
    GROUPABLE,
    aggregate,
    load_table,
    select,
    table1,
    to_markdown,
    write_table,
)

__all__ = [
    "CONFIG_FIELDS",
    "GROUPABLE",
    "Report",
    "aggregate",
    "build_report",
    "consistency_figures",
    "consistency_plan",
    "consistency_summary",
    "load_table",
    "select",
    "table1",
    "to_markdown",
    "write_table",
]
