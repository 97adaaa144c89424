"""The headline comparison (``masq compare``): one task-1 state, every later phase run four
ways: no EWC, EWC+FIM, EWC+MaSQ (mean) and EWC+MaSQ (sum)."""

from __future__ import annotations

from typing import Any

from masq.config import RunConfig
from masq.consolidation import get_method
from masq.errors import ConfigError
from masq.protocol.phases import continue_run
from masq.protocol.result import Result
from masq.protocol.run import compute_importance, make_tasks, train_first
from masq.runtime import resolve_device

# The four ways of `masq compare`: key -> changes to the base config.
COMPARE_METHODS: dict[str, dict[str, Any]] = {
    "none": {"importance": "none", "lam": 0.0},
    "fisher": {"importance": "fisher"},
    "masq-mean": {"importance": "masq", "scale": "mean"},
    "masq-sum": {"importance": "masq", "scale": "sum"},
}


def check_comparable(config: RunConfig) -> None:
    """A one-line ConfigError naming the command to use when ``config``'s method has no EWC
    penalty (IMM merges after training, joint trains on every task's data): the four runs of
    :func:`compare` differ only in that penalty."""
    method = get_method(config.consolidation)
    if "lam" not in method.fields:
        command = (
            "masq imm" if method.record_key == "imm" else f"masq run --consolidation {method.name}"
        )
        raise ConfigError(
            f"masq compare compares EWC penalties (none, FIM, MaSQ mean and sum); --consolidation "
            f"{method.name} has none ({method.description}): run `{command}` instead"
        )


def compare_configs(base: RunConfig) -> dict[str, RunConfig]:
    """{method key: config}: ``base`` with each of :data:`COMPARE_METHODS`' changes (a method
    without an EWC penalty: :func:`check_comparable`)."""
    check_comparable(base)
    return {key: base.with_(**changes).validate() for key, changes in COMPARE_METHODS.items()}


def compare(
    base: RunConfig, *, progress: bool = False, data_dir: str | None = None
) -> dict[str, Result]:
    """Train task 1 once, compute FIM and MaSQ (both scales) from that one state and run the
    later phases from it four ways: {method key: Result}."""
    configs = compare_configs(base.validate())
    resolve_device(base.device)
    tasks = make_tasks(base, data_dir=data_dir)
    d1 = train_first(base, tasks, progress=progress)
    results: dict[str, Result] = {}
    for key, config in configs.items():
        importance, seconds = compute_importance(config, d1, tasks)
        results[key] = continue_run(config, d1, importance, tasks, seconds, progress=progress)
    return results
