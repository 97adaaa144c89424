"""A measure of your own on the command line and in a grid's spawned workers (masq.plugins,
``masq --plugin MODULE``, ``MASQ_PLUGINS``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masq import plugins
from masq import tasks as masq_tasks
from masq.cli import split_plugins
from masq.config import RunConfig
from masq.errors import ConfigError
from masq.streams import stream_seed
from tests.synthetic import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import torch
from masq import importance


def twice(model, data, ctx):
    """F_k = 2 for every parameter: easy to check in the record."""
    return {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}


importance.register_measure(importance.Measure("twice-test", label="twice", compute=twice))
'''

CHILD = """
import sys
sys.path.insert(0, {root!r})
import masq.cli.grid_cmd as grid_cmd
from tests.test_plugins import synthetic_tasks
grid_cmd.tasks_fn = lambda data_dir: synthetic_tasks
from masq.cli import main
sys.exit(main({argv!r}))
"""


def synthetic_tasks(config: RunConfig) -> list[masq_tasks.Task]:
    """The tasks of ``config`` on a tiny synthetic dataset (importable by spawned workers)."""
    data = synthetic_dataset(300, 60, 100)
    return masq_tasks.make(config.slt, dataset=data, seed=stream_seed(config.seed, "tasks"))


def test_leading_plugin_options_are_split_off() -> None:
    argv = ["--plugin", "a", "--plugin=b", "grid", "--lam", "1"]
    assert split_plugins(argv) == (["a", "b"], ["grid", "--lam", "1"])
    assert split_plugins(["grid", "--plugin", "a"]) == ([], ["grid", "--plugin", "a"])
    assert plugins.plugin_names(" a, ,b ") == ["a", "b"] and plugins.plugin_names(None) == []


def test_plugins_load_once_into_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugins.ENV, "")  # restored (unset) afterwards, whatever load_plugins sets
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plug_a.py").write_text("LOADED = True\n", encoding="utf-8")
    assert plugins.load_plugins(["plug_a", "plug_a"]) == ["plug_a"]
    assert os.environ[plugins.ENV] == "plug_a"
    assert plugins.load_from_env() == ["plug_a"]


def test_a_plugin_that_cannot_load_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugins.ENV, "")  # restored (unset) afterwards, whatever load_plugins sets
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        plugins.load_plugins(["no_such_plugin_module"])
    assert "cannot be imported" in str(err.value) and "PYTHONPATH" in str(err.value)
    (tmp_path / "plug_boom.py").write_text("raise ValueError('boom')\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"plug_boom.*ValueError: boom") as err:
        plugins.load_plugins(["plug_boom"])
    assert "\n" not in str(err.value)
    assert os.environ[plugins.ENV] == ""


def _grid(tmp_path: Path, *top: str) -> subprocess.CompletedProcess[str]:
    argv = [*top, "grid", "--preset", "none", "--slt", "D5-5", "--hidden", "8", "--iters1", "10",
            "--iters2", "10", "--eval-every", "5", "--batch-size", "20", "--masq-batch", "50",
            "--importance", "twice-test", "--lam", "10", "100", "--results",
            str(tmp_path / "res"), "--workers", "2", "--threads", "1", "--stack", "1",
            "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != plugins.ENV}
    return subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_a_grid_of_two_workers_runs_a_measure_of_a_plugin(tmp_path: Path) -> None:
    """Without the plugin the measure is unknown (one line); with ``--plugin`` both runs are
    computed by the spawned workers, which imported the module themselves."""
    (tmp_path / "twiceplug.py").write_text(PLUGIN, encoding="utf-8")
    unknown = _grid(tmp_path)
    assert unknown.returncode == 2 and "twice-test" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr
    done = _grid(tmp_path, "--plugin", "twiceplug")
    assert done.returncode == 0, done.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*.json")]
    assert sorted(r["result"]["config"]["lam"] for r in records) == [10.0, 100.0]
    assert all(r["result"]["config"]["importance"] == "twice-test" for r in records)
    assert not list((tmp_path / "res" / "errors").glob("*.json"))
