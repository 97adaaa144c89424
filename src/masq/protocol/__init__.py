"""The continual-learning protocol for T tasks: :mod:`~masq.protocol.run` (stages),
:mod:`~masq.protocol.phases` (the one phase loop and ``run``), :mod:`~masq.protocol.result`
(records, accuracy matrix, ACC/BWT/forgetting, best/last), :mod:`~masq.protocol.batched`
(stacked re-training of the later phases), :mod:`~masq.protocol.compare` (``masq compare``)."""

from masq.protocol.batched import continue_stacked, stackable
from masq.protocol.compare import COMPARE_METHODS, compare, compare_configs
from masq.protocol.phases import continue_run, continue_runs, run
from masq.protocol.result import (
    Result,
    accuracy_matrix,
    best_and_last,
    build_result,
    load_weights,
    result_from_v1,
    transfer_metrics,
)
from masq.protocol.run import (
    D1State,
    build_model,
    check_same_d1,
    compute_importance,
    eval_sets,
    importance_of,
    make_tasks,
    train_first,
)
from masq.streams import STREAMS, batches_stream, labels_stream, stream_seed

__all__ = [
    "COMPARE_METHODS",
    "STREAMS",
    "D1State",
    "Result",
    "accuracy_matrix",
    "batches_stream",
    "best_and_last",
    "build_model",
    "build_result",
    "check_same_d1",
    "compare",
    "compare_configs",
    "compute_importance",
    "continue_run",
    "continue_runs",
    "continue_stacked",
    "eval_sets",
    "importance_of",
    "labels_stream",
    "load_weights",
    "make_tasks",
    "result_from_v1",
    "run",
    "stackable",
    "stream_seed",
    "train_first",
    "transfer_metrics",
]
