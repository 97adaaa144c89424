"""A newcomer's first hour (issue 27): how to call masq, no preset unless asked, defaults that
suit the command, the same flags in run and grid, the paper cited (not a missing file), the
demo's output usable by table and report, a baseline in the quickstart, labels from what each
measure reads, --consolidation none, --lr, the λ used, --quiet, a fast --help and a lean core.

CLI cases run ``masq`` in a subprocess: the real console script where the error comes before
any data, ``masq.cli.main`` on tiny synthetic data where a run trains.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

import masq.data
from masq.cli import COMMANDS, build_parser, experiment_cmd, main
from masq.cli.grid_cmd import grid_from_args
from masq.cli.options import BUILT_IN
from masq.config import RunConfig
from masq.report import build_report
from masq.report.tables import group_cell
from tests.synthetic import learnable_dataset

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCRIPT = Path(sys.executable).with_name("masq")
MASQ = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "masq"]
DOI = "doi:10.1007/978-3-030-30484-3_39"
TINY = ["--hidden", "8", "--iters", "10", "--eval-every", "5", "--masq-batch", "50",
        "--batch-size", "20", "--device", "cpu", "--threads", "1"]  # fmt: skip


def section(text: str, heading: str) -> str:
    """The Markdown section under ``heading`` (a "## " heading) up to the next one."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def masq_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real ``masq argv`` in a subprocess (its output captured)."""
    return subprocess.run([*MASQ, *argv], capture_output=True, text=True, cwd=ROOT, check=False)


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2 and one line on stderr, "masq: error: ...", holding every needle."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err)
    assert err.startswith("masq: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "ambiguous" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_config(*argv: str) -> RunConfig:
    """The RunConfig ``masq run argv`` would run."""
    return experiment_cmd.config_from_args(build_parser().parse_args(["run", *argv]))


def grid_of(*argv: str) -> Any:
    return grid_from_args(build_parser().parse_args(["grid", *argv]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of ``masq compare --csv`` (what ``make demo`` writes), on tiny
    synthetic data."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masq.data, "load", lambda *a, **k: ds)
        assert main(["compare", *TINY, "--quiet", "--csv", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- how to call it


def test_readme_and_make_say_how_to_call_masq() -> None:
    quickstart = section(README, "Quickstart")
    assert ".venv/bin/masq" in quickstart and "source .venv/bin/activate" in quickstart
    if shutil.which("make") is None:
        pytest.skip("no make here")
    done = subprocess.run(["make", "-n", "install"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ".venv/bin/masq" in done.stdout and "source .venv/bin/activate" in done.stdout


# ----------------------------------------------------------------------------- grid presets


def test_grid_applies_no_preset_unless_asked(demo: Path, tmp_path: Path) -> None:
    from masq import grid

    assert len(grid.expand(grid_of("--slt", "D2-2-2-2-2"))) == 1  # was 576 (the paper's)
    assert len(grid.expand(grid_of("--preset", "paper", "--slt", "D2-2-2-2-2"))) == 576
    # the report's hint for the accuracy matrices is a small grid, not the paper's
    parts = {p.id: p for p in build_report([demo], tmp_path / "page").parts}
    hint = parts["matrices"].missing.split("  (")[0]
    argv = shlex.split(hint)
    assert argv[:2] == ["masq", "grid"]
    configs = grid.expand(grid_of(*argv[2:]))
    assert len(configs) == 2 and all(c.n_tasks == 5 for c in configs)
    (empty,) = [p for p in build_report([], tmp_path / "empty").parts if p.id == "table1"]
    assert "--preset paper" in empty.missing and "--dry-run" in empty.missing


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("slt", "lr2"),
    [("D5-5", 1e-5), ("D9-1", 1e-4), ("DP10-10", 1e-5), ("D2-2-2-2-2", 1e-3), ("DP10-10-10", 1e-3)],
)
def test_default_lr2_suits_the_slt(slt: str, lr2: float) -> None:
    config = run_config("--slt", slt)
    assert config.lr2 == lr2 and config.lam == pytest.approx(1 / lr2)
    assert run_config("--slt", "D2-2-2-2-2", "--lr1", "5e-4").lr2 == 5e-4  # ε2 = lr1
    assert RunConfig().lr2 == 1e-5  # the library's default (and every stored id) unchanged


def test_lr2_help_states_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lr1 for any other SLT" in text and "D9-1 1e-4" in text and "run id" in text


def test_the_last_task_near_chance_is_a_warning() -> None:
    config = run_config("--slt", "D5-5", "--iters", "10")
    assert experiment_cmd.chance_level(config) == (0.1, 10)  # one shared 10-way head
    message = experiment_cmd.near_chance(config, {"D2": 0.02})
    assert message and "D2 ends at 2.0 %" in message and "--lr2" in message
    assert experiment_cmd.near_chance(config, {"D2": 0.9}) is None
    task = run_config("--slt", "D2-2-2-2-2", "--scenario", "task")
    assert experiment_cmd.chance_level(task) == (0.5, 2)
    assert experiment_cmd.near_chance(task, {"D5": 0.7}) is not None  # below 1.5 x 50 %
    one = run_config("--slt", "D9-1", "--scenario", "task")  # one class: nothing to choose
    assert experiment_cmd.near_chance(one, {"D2": 0.0}) is None
    domain = run_config("--slt", "D2-2-2-2-2", "--scenario", "domain")
    assert experiment_cmd.chance_level(domain) == (0.5, 2)


# ----------------------------------------------------------------------------- run and grid flags


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in sub.choices[command]._actions for s in a.option_strings}


def test_run_and_grid_take_iters_and_lr() -> None:
    assert {"--iters", "--lr"} <= _flags("run") & _flags("grid") & _flags("compare")
    g = grid_of("--iters", "7", "--lr", "2e-3")
    assert (g.iters1, g.iters2, g.lr1, g.lr2) == ((7,), (7,), (2e-3,), (2e-3,))
    g = grid_of("--iters", "7", "--iters1", "5", "--lr", "2e-3", "--lr2", "1e-4", "1e-5")
    assert (g.iters1, g.iters2, g.lr1, g.lr2) == ((5,), (7,), (2e-3,), (1e-4, 1e-5))
    c = run_config("--lr", "1e-3")
    assert (c.lr1, c.lr2, c.lam) == (1e-3, 1e-3, 1000.0)
    c = run_config("--lr", "1e-3", "--lr2", "1e-4")
    assert (c.lr1, c.lr2) == (1e-3, 1e-4)


def test_grid_iters_is_a_flag_not_an_ambiguity() -> None:
    one_line_error(masq_cli("grid", "--iters", "0", "--dry-run"), "iters1")
    one_line_error(masq_cli("run", "--lr", "-1"), "lr1")


def test_consolidation_none_is_the_baseline() -> None:
    c = run_config("--consolidation", "none")
    assert (c.consolidation, c.importance, c.lam) == ("ewc", "none", 0.0)
    one_line_error(masq_cli("run", "--consolidation", "none", "--importance", "fisher"),
                   "--importance none")  # fmt: skip
    one_line_error(masq_cli("grid", "--consolidation", "none", "--dry-run"), "--importance none")
    for command in ("run", "grid"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
    # (the help of both says so: HELP_NOTES)


def test_consolidation_help_names_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "grid"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "the baseline without consolidation is --importance none" in text, command


RUN_SNIPPET = """
import sys
sys.path.insert(0, {root!r})
import masq.data
from tests.synthetic import learnable_dataset
ds = learnable_dataset(300, 50, 100)
masq.data.load = lambda *a, **k: ds
from masq.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_quiet_run_prints_the_lambda_one_line_per_phase_and_warns(tmp_path: Path) -> None:
    argv = ["run", "--slt", "D4-3-3", "--lr2", "1e-6", *TINY, "--quiet", "--out", str(tmp_path)]
    code = RUN_SNIPPET.format(root=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    err = [line for line in done.stderr.splitlines() if "Warning" not in line]
    assert "\r" not in done.stderr
    assert err[0].startswith("D4-3-3, hidden 8, EWC+MaSQ (mean), λ 1e+06 (1 / lr2: --lam not")
    phases = [line for line in err if line.startswith("train D")]
    assert [p.split(":")[0].split(" (")[0] for p in phases] == ["train D1", "train D2", "train D3"]
    assert all("10/10" in p for p in phases)
    assert any(line.startswith("masq: warning: the last task D3 ends at") for line in err)
    assert "λ=1e+06 (1 / lr2: --lam not given)" in done.stdout
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_a_quiet_imm_prints_one_line_per_phase(tmp_path: Path) -> None:
    argv = ["imm", "--slt", "D4-3-3", "--lr2", "1e-3", *TINY, "--alpha-step", "0.5", "--quiet",
            "--importance", "fisher", "--out", str(tmp_path)]  # fmt: skip
    code = RUN_SNIPPET.format(root=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    phases = [line for line in done.stderr.splitlines() if line.startswith("train D")]
    assert [p.split(":")[0].split(" (")[0] for p in phases] == ["train D1", "train D2", "train D3"]
    assert all("10/10" in p for p in phases)
    assert len(list(tmp_path.glob("*.json"))) == 2


# ----------------------------------------------------------------------------- the paper


def test_readme_help_and_report_cite_the_paper(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "PAPER.md" not in README and DOI in README and "Gepperth" in README
    for name, _, _ in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "PAPER.md" not in capsys.readouterr().out, name
    report = build_report([demo], tmp_path / "page")
    for path in (report.html, report.markdown):
        text = path.read_text(encoding="utf-8")
        assert DOI in text and "Gepperth" in text and "PAPER.md" not in text, path


# ----------------------------------------------------------------------------- make demo


def test_the_demo_writes_curves_and_a_results_dir(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    (line,) = [x for x in makefile.splitlines() if "masq compare" in x and "results/demo" in x]
    assert "--csv" in line
    assert (demo / "curves.csv").is_file() and "curves as CSV" in section(README, "Quickstart")
    assert main(["table", "--results", str(demo), "--out", str(tmp_path)]) == 0
    assert "| D5-5 |" in capsys.readouterr().out
    assert main(["report", "--results", str(demo), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


# ----------------------------------------------------------------------------- quickstart


def test_quickstart_prints_the_baseline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = learnable_dataset(n_train=300, n_val=50, n_test=100)
    monkeypatch.setattr(masq.data, "load", lambda *a, **k: ds)
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(iters=20)
    assert list(rows) == ["no EWC (λ = 0)", "EWC+FIM (λ = 10000)"]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "no EWC (λ = 0)" in printed[0] and "EWC+FIM" in printed[1]


# ----------------------------------------------------------------------------- labels


def test_group_labels_follow_what_each_measure_reads(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert group_cell({"importance": "fisher", "scale": "mean"}, "scale") == "—"
    assert group_cell({"importance": "masq", "scale": "sum"}, "scale") == "sum"
    assert group_cell({"importance": "none", "scale": "mean"}, "scale") == "—"
    assert group_cell({"scale": "mean"}, "scale") == "mean"  # measure unknown: as stored
    argv = ["table", "--results", str(demo), "--out", str(tmp_path), "--group-by"]
    assert main([*argv, "importance", "scale"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| D5-5 |")]
    assert rows and not [r for r in rows if r.startswith("| D5-5 | fisher | mean |")]
    assert [r for r in rows if r.startswith("| D5-5 | fisher | — |")]


# ----------------------------------------------------------------------------- start-up


def test_help_loads_no_heavy_module() -> None:
    light = ["", *dict.fromkeys(name for name, _, _ in COMMANDS)]  # every command's help
    code = f"""
import contextlib, io, sys
from masq.cli import main
for command in {light!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([command, "--help"] if command else ["--help"])
        except SystemExit:
            pass
heavy = sorted(m for m in ("torch", "pandas", "matplotlib", "ray") if m in sys.modules)
sys.exit(" ".join(heavy) or None)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # the heavy modules it imported


def test_the_command_table_matches_the_modules() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    registered = [(a.dest, a.help) for a in sub._choices_actions]
    assert registered == [(name, text) for name, _, text in COMMANDS]
    from masq.consolidation import method_names
    from masq.importance import measure_names

    assert BUILT_IN == {"measure": measure_names(), "method": method_names()}


# ----------------------------------------------------------------------------- a lean core


def test_the_core_install_needs_no_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = " ".join(project["dependencies"])
    for extra in ("ray", "tensorboard", "pytest", "ruff", "hypothesis"):
        assert not re.search(rf"\b{extra}\b", core), extra
    assert {"ray", "tensorboard", "dev"} <= set(project["optional-dependencies"])
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo: \$\(STAMP\)$", makefile, re.M)
    assert re.search(r"^test: \$\(DEV_STAMP\)$", makefile, re.M)
    core_recipe = makefile.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet -e .\n" in core_recipe + "\n" and "[dev]" not in core_recipe
    code = (
        "import sys, masq.cli, masq.grid, masq.report, masq.protocol, masq.cli.grid_cmd, "
        "masq.cli.experiment_cmd, masq.cli.report_cmd; "
        "sys.exit(' '.join(m for m in ('ray', 'tensorboard') if m in sys.modules) or None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_citation_file_is_valid_and_names_this_version() -> None:
    """CITATION.cff parses, is of CFF 1.2.0, names masq's version and cites the paper's DOI
    (the same DOI as the BibTeX entry of docs/paper.md and the README's link)."""
    yaml = pytest.importorskip("yaml")
    import masq

    root = Path(__file__).resolve().parents[1]
    cff = yaml.safe_load((root / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert str(cff["version"]) == masq.__version__
    (paper,) = cff["references"]
    assert paper["doi"] == "10.1007/978-3-030-30484-3_39"
    assert f"doi       = {{{paper['doi']}}}" in (root / "docs" / "paper.md").read_text("utf-8")
    assert f"https://doi.org/{paper['doi']}" in (root / "README.md").read_text(encoding="utf-8")
