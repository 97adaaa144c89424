"""benchmarks/chance_marks.py against closed forms: with a negligible published SEM and a spread
so wide that the 1-point condition never binds, a mark is |t| > 2 for Student's t with n − 1
degrees of freedom; with a spread far under a point, never."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scipy import stats

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def chance_of_a_mark() -> Iterator[Callable[..., float]]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("chance_marks").chance_of_a_mark
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("seeds", [3, 5])
def test_a_chance_mark_is_students_t_beyond_two(
    chance_of_a_mark: Callable[..., float], seeds: int
) -> None:
    expected = 2 * stats.t.sf(2.0, seeds - 1)  # 0.184 at 3 seeds, 0.116 at 5
    p = chance_of_a_mark(sd=1000.0, published_sem=1e-9, seeds=seeds, draws=100_000, seed=1)
    assert p == pytest.approx(expected, abs=0.005)


def test_no_mark_below_a_point(chance_of_a_mark: Callable[..., float]) -> None:
    assert chance_of_a_mark(sd=0.2, published_sem=0.05, seeds=3, draws=50_000, seed=1) == 0.0
