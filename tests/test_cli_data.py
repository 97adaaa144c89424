"""``masq data fetch`` / ``masq data info`` through :func:`masq.cli.main` (synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masq.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_fetch_from_data_dir_then_info_from_cache(data_fake, data_offline, tmp_path, capsys):
    directory = data_fake().write(tmp_path / "idx", gz=True)
    status, out, err = _run(capsys, "data", "fetch", "--data-dir", str(directory), "--quiet")
    assert status == 0 and err == ""
    assert out.startswith("mnist: 200 train / 5,000 val / 200 test from data dir ")
    assert str(data_offline / "mnist.npz") in out

    status, out, _ = _run(capsys, "data", "info")
    assert status == 0
    assert f"source    cache {data_offline / 'mnist.npz'}" in out
    assert "sha256    " in out
    header = next(line for line in out.splitlines() if line.startswith("split"))
    assert header.split() == ["split", "size", "|", *map(str, range(10))]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "|" in line}
    assert rows["val"][1] == "5000" and rows["train"][1] == "200" and rows["test"][1] == "200"
    assert sum(map(int, rows["val"][3:])) == 5000


def test_info_json(data_fake, tmp_path, capsys):
    directory = data_fake().write(tmp_path / "idx")
    status, out, _ = _run(capsys, "data", "info", "--data-dir", str(directory), "--json")
    assert status == 0
    facts = json.loads(out)
    assert facts["sizes"] == {"train": 200, "val": 5000, "test": 200}
    assert len(facts["sha256"]) == 64


def test_fetch_all(data_fake, tmp_path, capsys):
    data_fake("mnist", seed=1).write(tmp_path / "root" / "mnist")
    data_fake("fashion-mnist", seed=2).write(tmp_path / "root" / "fashion-mnist")
    root = str(tmp_path / "root")
    status, out, _ = _run(
        capsys, "data", "fetch", "--dataset", "all", "--data-dir", root, "--quiet"
    )
    assert status == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["mnist", "fashion-mnist"]
    status, out, _ = _run(capsys, "data", "info", "--dataset", "all", "--json")
    assert status == 0
    assert [facts["dataset"] for facts in json.loads(out)] == ["mnist", "fashion-mnist"]


def test_no_source_is_one_line_and_status_2(data_fake, capsys):
    data_fake()
    status, out, err = _run(capsys, "data", "fetch", "--quiet")
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("masq: error: no source of mnist could be used (data dir: not given;")
    assert "--data-dir DIR" in err and "MASQ_DATA_DIR" in err and "Traceback" not in err


def test_missing_data_dir_is_one_line(data_fake, tmp_path, capsys):
    data_fake()
    status, _, err = _run(capsys, "data", "info", "--data-dir", str(tmp_path / "nowhere"))
    assert status == 2
    assert err == f"masq: error: --data-dir: {tmp_path / 'nowhere'} is not a directory; " + (
        "give the directory that holds the four mnist IDX files "
        "(or a sub-directory named after the dataset)\n"
    )


def test_corrupted_file_is_one_line_naming_it(data_fake, tmp_path, capsys):
    directory = data_fake().write(tmp_path / "idx")
    bad = directory / "train-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    status, _, err = _run(capsys, "data", "fetch", "--data-dir", str(directory), "--quiet")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"masq: error: {bad}: IDX size mismatch (truncated")


@pytest.mark.parametrize(
    "argv",
    [["data", "--help"], ["data", "fetch", "--help"], ["data", "info", "--help"]],
)
def test_every_subcommand_has_help(argv: list[str], capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: masq {' '.join(argv[:-1])}")
    if len(argv) == 3:
        assert "--dataset {mnist,fashion-mnist,all}" in out and "--data-dir DIR" in out


def test_bare_data_prints_help(capsys):
    status, out, _ = _run(capsys, "data")
    assert status == 0 and "fetch" in out and "info" in out


def test_unknown_dataset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["data", "fetch", "--dataset", "cifar"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'cifar'" in capsys.readouterr().err


def test_cache_dir_is_only_what_fetch_wrote(data_fake, data_offline: Path, tmp_path, capsys):
    directory = data_fake().write(tmp_path / "idx")
    assert _run(capsys, "data", "fetch", "--data-dir", str(directory), "--quiet")[0] == 0
    assert sorted(p.name for p in data_offline.iterdir()) == ["mnist.json", "mnist.npz"]
