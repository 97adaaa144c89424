"""Split MNIST in five tasks in the three scenarios: no consolidation, EWC with the FIM, MAS
and L2, one seed, a small network; λ chosen per scenario and method on the validation sets.

Settings (after van de Ven & Tolias 2019's split MNIST, shortened): 784-400-400-10 MLP
(2-way head in the domain scenario), Adam at 1e-3 in every phase, B = 128, 1,000 iterations
per task, λ in {1, 1e2, 1e4, 1e6}. Each (scenario, method) keeps the λ whose run is best on
the union of the validation sets at the end; the table shows its test accuracy averaged
over the five tasks after the last one (ACC), and its λ. The runs go through a resumable
results directory (re-running skips stored runs).

Run: .venv/bin/python examples/split_mnist_scenarios.py [RESULTS_DIR] [--workers N]
"""

from __future__ import annotations

import argparse

from masq import grid
from masq.analysis.common import markdown
from masq.consolidation import method_label
from masq.store import load

LAMS = (1.0, 1e2, 1e4, 1e6)
MEASURES = ("none", "fisher", "mas", "l2")
SCENARIOS = ("class", "task", "domain")
VAL_UNION = "val:" + "∪".join(f"D{i}" for i in range(1, 6))


def the_grid() -> grid.Grid:
    """The runs of the table (λ = 0 once per scenario: the no-consolidation row)."""
    return grid.Grid(
        slt=("D2-2-2-2-2",),
        scenario=SCENARIOS,
        hidden=((400, 400),),
        lr1=(1e-3,),
        lr2=(1e-3,),
        batch_size=(128,),
        iters1=(1000,),
        iters2=(1000,),
        eval_every=(250,),
        eval_val=(True,),
        importance=MEASURES,
        lam=(0.0, *LAMS),
    )


def table(results: str) -> list[dict[str, object]]:
    """Per scenario and method, the run with the best final validation union: its test ACC %
    (the five tasks' test accuracy after the last one, averaged), forgetting % and λ."""
    df = load(results)
    df = df[df["slt"] == "D2-2-2-2-2"]
    df = df.assign(method=[method_label(r) for r in df.to_dict("records")])
    rows = []
    for (scenario, method), runs in df.groupby(["scenario", "method"], sort=False):
        pick = runs.loc[runs[f"last.{VAL_UNION}"].idxmax()]
        rows.append(
            {
                "scenario": scenario,
                "method": method,
                "lam": f"{pick['lam']:g}",
                "acc": f"{100 * pick['average_accuracy']:.2f}",
                "forgetting": f"{100 * pick['forgetting']:.2f}",
                "runs": str(len(runs)),
            }
        )
    order = {m: i for i, m in enumerate(("no EWC", "EWC+FIM", "MAS", "L2"))}
    return sorted(rows, key=lambda r: (SCENARIOS.index(r["scenario"]), order.get(r["method"], 9)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="results/split_mnist_scenarios")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    configs = grid.expand(the_grid())
    summary = grid.execute(configs, args.results, workers=args.workers)
    print(f"{summary.done} runs now, {summary.skipped} stored before, {len(summary.failed)} failed")
    columns = [("scenario", "scenario"), ("method", "method"), ("lam", "λ (chosen on val)"),
               ("acc", "ACC %"), ("forgetting", "forgetting %"), ("runs", "λ values")]  # fmt: skip
    print(markdown(table(args.results), columns))


if __name__ == "__main__":
    main()
