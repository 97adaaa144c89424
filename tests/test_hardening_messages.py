"""Issue 27, "tracebacks where a one-line error belongs" and "misleading messages": each case
through the real ``masq`` in a subprocess (one line on stderr, the exit code, nothing lost) or
through the library call a user makes (a one-line ConfigError naming the argument and the fix).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from masq import importance
from masq.config import RunConfig
from masq.consolidation import ewc
from masq.consolidation.penalty import QuadraticPenalty
from masq.errors import ConfigError
from masq.fileio import atomic_write, exclusive_lock
from masq.store import Store
from tests.test_store import _result, write_v1_dir

# ----------------------------------------------------------------------------- helpers


def masq_cli(*argv: object, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """The real ``masq`` with ``argv`` in a fresh interpreter (``prelude``: Python run first,
    e.g. to make every fsync fail as on a full disk)."""
    if prelude:
        code = f"{prelude}\nimport sys\nfrom masq.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "masq"]
    return subprocess.run(
        [*command, *map(str, argv)], capture_output=True, text=True, timeout=300, check=False
    )


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single stderr line of a refused command, after checking its exit status and that no
    traceback was printed."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) by relative path: its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def results_dir(root: Path) -> Path:
    """A results dir holding one valid run record."""
    Store(root).write_result(_result(RunConfig(hidden=(8,))))
    return root


NOT_UTF8 = b"# caf\xe9 au lait\nlam = [1.0]\n"


# ----------------------------------------------------------------------------- not UTF-8


def test_a_grid_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_bytes(NOT_UTF8)
    proc = masq_cli("grid", "--grid", grid_file, "--dry-run", "--results", tmp_path / "res")
    line = one_line(proc)
    assert str(grid_file) in line and "UTF-8" in line
    assert not (tmp_path / "res").exists()


def test_a_preset_that_is_not_utf8_is_one_line() -> None:
    from masq.grid.spec import toml_values

    with pytest.raises(ConfigError, match=r"^preset paper: not UTF-8 text .*save it as UTF-8"):
        toml_values(NOT_UTF8, "preset paper")
    with pytest.raises(ConfigError, match=r"^preset paper: malformed TOML"):
        toml_values(b"lam = [", "preset paper")
    assert toml_values("lam = [1.0]  # café\n".encode(), "x") == {"lam": [1.0]}


def test_a_bench_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    bench = tmp_path / "bench.txt"
    bench.write_bytes(b"| a | b |\n|---|---|\n| \xff | 1 |\n")
    res = results_dir(tmp_path / "res")
    before = snapshot(res)
    proc = masq_cli("report", "--results", res, "--bench", bench, "--out", tmp_path / "report")
    line = one_line(proc)
    assert line.startswith(f"masq: error: --bench {str(bench)!r}") and "UTF-8" in line
    assert snapshot(res) == before and not (tmp_path / "report").exists()


# ----------------------------------------------------------------------------- migrate


def _drop_curve_d2(root: Path) -> Path:
    """Remove ``curve_d2`` from the middle record of a format-1 dir (records before it in
    name order used to be converted before the KeyError); that record's path."""
    path = sorted((root / "runs").glob("*.json"))[3]
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["result"]["curve_d2"]
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def test_migrate_refuses_a_bad_record_and_leaves_the_dir_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "old"
    write_v1_dir(root)
    bad = _drop_curve_d2(root)
    before = snapshot(root)
    line = one_line(masq_cli("migrate", root))
    assert line.startswith(f"masq: error: {bad}: ") and "curve_d2" in line
    assert snapshot(root) == before


def test_ctrl_c_at_the_commit_leaves_format_1_and_migrate_finishes_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from masq import migrate

    root, reference = tmp_path / "old", tmp_path / "ref"
    write_v1_dir(root)
    write_v1_dir(reference)
    migrate.migrate(reference)
    before = snapshot(root)

    def interrupted(path: object, data: object) -> Path:
        if Path(str(path)).name == "meta.json":
            raise KeyboardInterrupt  # runs/ swapped, meta.json (the commit) not written
        return atomic_write(path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(migrate, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(root)
    monkeypatch.undo()
    assert {k: v for k, v in snapshot(root).items() if k != ".lock"} == before
    assert migrate.migrate(root) == 6
    assert snapshot(root / "runs") == snapshot(reference / "runs")
    assert snapshot(root).keys() == snapshot(reference).keys()


@pytest.mark.parametrize("converted", [False, True])
def test_a_kill_during_the_swap_is_undone_by_the_next_migrate(
    tmp_path: Path, converted: bool
) -> None:
    from masq import migrate

    root, reference = tmp_path / "old", tmp_path / "ref"
    write_v1_dir(root)
    write_v1_dir(reference)
    migrate.migrate(reference)
    # killed after moving runs/ aside (and, with ``converted``, moving the converted copy in)
    os.rename(root / "runs", root / migrate.MIGRATE_BACKUP)
    if converted:
        (root / "runs").mkdir()
        for name, blob in snapshot(reference / "runs").items():
            (root / "runs" / name).write_bytes(blob)
    with pytest.raises(ConfigError, match="masq migrate"):
        Store(root)  # still format 1: nothing reads the half-done state
    assert migrate.migrate(root) == 6
    assert snapshot(root / "runs") == snapshot(reference / "runs")
    assert snapshot(root).keys() == snapshot(reference).keys()


# ----------------------------------------------------------------------------- --threads


@pytest.mark.parametrize(
    "argv",
    [
        ["grid", "--preset", "none", "--threads", "-4", "--dry-run"],
        ["grid", "--preset", "none", "--threads", "0", "--dry-run"],
        ["analyze", "lambda", "--threads", "0", "--dry-run"],
        ["run", "--threads", "0", "--iters", "1"],
    ],
)
def test_threads_below_one_are_refused(tmp_path: Path, argv: list[str]) -> None:
    where = ["--out", tmp_path / "out"] if argv[0] == "run" else ["--results", tmp_path / "r"]
    line = one_line(masq_cli(*argv, *where))
    assert line == f"masq: error: --threads must be >= 1, got {argv[argv.index('--threads') + 1]}"
    assert not (tmp_path / "r").exists()


def test_resolve_workers_checks_threads() -> None:
    from masq.cli.common import resolve_workers

    assert resolve_workers(2, 3) == (2, 3)
    for bad in (0, -4):
        with pytest.raises(ConfigError, match=f"^--threads must be >= 1, got {bad}$"):
            resolve_workers(2, bad)


# ----------------------------------------------------------------------------- the library


def _model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(10, 4), torch.randint(0, 3, (10,))


LABELLED: dict[str, Callable[..., importance.Importance]] = {
    "fisher": importance.fisher,
    "masq": importance.masq,
}


@pytest.mark.parametrize("measure", sorted(LABELLED))
def test_two_dimensional_labels_are_one_line(measure: str) -> None:
    model, x, y = _model_and_data()
    compute = LABELLED[measure]
    for bad in (y[:, None], nn.functional.one_hot(y, 3), torch.rand(10, 1), torch.rand(10, 3, 1)):
        with pytest.raises(ConfigError, match=r"^y: batch 0 has labels of .*shape") as info:
            compute(model, importance.batches(x, bad, 5))
        assert "\n" not in str(info.value) and "y [B]" in str(info.value)
    soft = nn.functional.one_hot(y, 3).float()
    assert (
        compute(model, importance.batches(x, soft, 5)).keys()
        == dict(model.named_parameters()).keys()
    )


@pytest.mark.parametrize("measure", ["fisher", "masq", "mas"])
def test_a_tensor_where_batches_are_expected_is_one_line(measure: str) -> None:
    model, x, y = _model_and_data()
    compute = getattr(importance, measure)
    for bad, what in ((x, "a Tensor"), ((x, y), "a tuple of tensors"), ([x, y], "a list")):
        with pytest.raises(ConfigError, match=r"importance\.batches\(x, y, batch_size\)") as info:
            compute(model, bad)
        assert str(info.value).startswith(f"batches: got {what}")


def test_cuda_on_a_cpu_only_torch_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from masq.runtime import resolve_device

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, x, y = _model_and_data()
    for name in ("fisher", "masq", "mas"):
        with pytest.raises(ConfigError) as info:
            getattr(importance, name)(model, importance.batches(x, y, 5), device="cuda")
        assert str(info.value) == (
            "device='cuda': CUDA is not available in this torch build; use device='cpu'"
        )
    with pytest.raises(ConfigError, match=r"^device='gpu': not a torch device"):
        importance.masq(model, importance.batches(x, y, 5), device="gpu")
    with pytest.raises(ConfigError, match=r"^device 'cuda': no CUDA GPU is visible here"):
        resolve_device("cuda")  # the CLI's --device: one line already, unchanged


def test_a_dict_where_an_anchor_is_expected_is_one_line() -> None:
    model, x, y = _model_and_data()
    imp = importance.fisher(model, importance.batches(x, y, 5))
    anchor = ewc.anchor(model, imp)
    as_dict = {"params": dict(anchor.params), "importance": dict(anchor.importance)}
    fix = "give masq.consolidation.ewc.anchor(model, importance), not a dict"
    calls = (
        lambda: ewc.penalty(model, as_dict, 1.0),
        lambda: ewc.penalty(model, imp, 1.0),
        lambda: ewc.penalty(model, [anchor, imp], 1.0),
        lambda: QuadraticPenalty(model, imp, 1.0),
    )
    for call in calls:
        with pytest.raises(ConfigError, match=r"^penalty: anchor .*is a dict; ") as info:
            call()
        assert str(info.value).endswith(fix)
    assert float(ewc.penalty(model, [anchor], 1.0).detach()) == 0.0


# ----------------------------------------------------------------------------- messages


def test_lam_max_inf_names_lam_max(tmp_path: Path) -> None:
    proc = masq_cli("analyze", "lambda", "--lam-max", "inf", "--dry-run", "--results", tmp_path)
    line = one_line(proc)
    assert "--lam-max" in line and "--lam-min" not in line


def test_a_busy_results_dir_suggests_no_flag_the_command_lacks(tmp_path: Path) -> None:
    res = results_dir(tmp_path / "res")
    with exclusive_lock(res / ".lock"):
        before = snapshot(res)
        line = one_line(masq_cli("consistency", "--results", res, "--no-progress"))
        assert f"(pid {os.getpid()})" in line
        assert "pass --wait" not in line and "masq grid --wait" in line
        assert snapshot(res) == before


def test_compare_with_imm_names_masq_imm(tmp_path: Path) -> None:
    for method in ("mean-imm", "mode-imm"):
        argv = ["compare", "--consolidation", method, "--iters", "1", "--hidden", "8", "--quiet"]
        line = one_line(masq_cli(*argv, "--out", tmp_path / "out"))
        assert "masq imm" in line and "masq.protocol" not in line and method in line
        assert not (tmp_path / "out").exists()  # refused before anything is written


FULL_DISK = (
    "import errno, os\n"
    "def full(fd):\n"
    "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
    "os.fsync = full"
)


def test_a_full_disk_names_the_path_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "a.json"
    atomic_write(target, "old\n")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):

        def fail(fd: int, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(OSError) as info:
            atomic_write(target, "new\n")
        assert info.value.errno == code and info.value.filename == str(target)
        assert os.strerror(code) in str(info.value) and str(target) in str(info.value)
        assert os.listdir(target.parent) == ["a.json"] and target.read_text() == "old\n"


def test_a_full_disk_in_the_cli_is_one_line_naming_the_path(tmp_path: Path) -> None:
    res = results_dir(tmp_path / "res")
    out = tmp_path / "report"
    line = one_line(masq_cli("report", "--results", res, "--out", out, prelude=FULL_DISK), 1)
    assert os.strerror(errno.ENOSPC) in line and str(out) in line
    archive = tmp_path / "runs.jsonl.gz"
    assert masq_cli("export", "--results", res, "--to", archive).returncode == 0
    target = Store(tmp_path / "new").root
    line = one_line(masq_cli("import", "--from", archive, "--results", target, prelude=FULL_DISK))
    assert os.strerror(errno.ENOSPC) in line and str(target / "runs") in line
    assert not list((target / "runs").glob("*"))


def test_import_takes_the_results_lock(tmp_path: Path) -> None:
    source = results_dir(tmp_path / "src")
    archive = tmp_path / "runs.jsonl.gz"
    assert masq_cli("export", "--results", source, "--to", archive).returncode == 0
    assert len(gzip.decompress(archive.read_bytes()).splitlines()) == 1
    target = Store(tmp_path / "dst").root
    with exclusive_lock(target / ".lock"):
        line = one_line(masq_cli("import", "--from", archive, "--results", target))
        assert str(target / ".lock") in line and f"process {os.getpid()}" in line
        assert not list((target / "runs").glob("*"))
    proc = masq_cli("import", "--from", archive, "--results", target)
    assert proc.returncode == 0 and len(list((target / "runs").glob("*.json"))) == 1


def test_soft_labels_for_another_number_of_classes_are_one_line() -> None:
    from masq import importance
    from masq.errors import ConfigError

    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.softmax(torch.randn(6, 5), 1)
    for measure in (importance.fisher, importance.masq):
        with pytest.raises(ConfigError, match=r"probabilities for 5 classes .* 3 outputs"):
            measure(model, importance.batches(x, y, 3))
