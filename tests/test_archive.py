"""The record archive (masq.archive, `masq export` / `masq import`): a deterministic gzip
JSON Lines copy of a store's records that restores them byte for byte."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from masq import archive, store
from masq.cli import main
from masq.errors import ConfigError
from masq.store import Store
from tests.test_settle import add_run


def filled(root: Path) -> list[str]:
    st = Store(root)
    ids = [
        add_run(st, lr2=1e-4, lam=10.0, best=0.8, last=0.6),
        add_run(st, lr2=1e-3, lam=0.0, best=0.5, last=0.4),
        add_run(st, lr2=1e-4, lam=1e3, importance="masq", init="tf", seed=2, best=0.7, last=0.65),
    ]
    return sorted(ids)


def test_round_trip_is_byte_identical_and_deterministic(tmp_path: Path) -> None:
    ids = filled(tmp_path / "a")
    first = tmp_path / "records.jsonl.gz"
    assert archive.export_records(tmp_path / "a", first) == 3
    blob = first.read_bytes()
    assert blob[4:8] == b"\0\0\0\0"  # gzip mtime 0
    lines = gzip.decompress(blob).decode("utf-8").splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ids  # sorted by run id
    done = archive.import_records(first, tmp_path / "b")
    assert (done.written, done.skipped) == (3, 0)
    for rid in ids:
        original = (tmp_path / "a" / "runs" / f"{rid}.json").read_bytes()
        assert (tmp_path / "b" / "runs" / f"{rid}.json").read_bytes() == original
    assert (tmp_path / "b" / "meta.json").exists()
    assert store.load(tmp_path / "b").equals(store.load(tmp_path / "a"))
    again = tmp_path / "again.jsonl.gz"
    archive.export_records(tmp_path / "b", again)
    assert again.read_bytes() == blob
    done = archive.import_records(first, tmp_path / "b")  # idempotent
    assert (done.written, done.skipped) == (0, 3)


def test_import_skips_stored_runs_and_adds_the_others(tmp_path: Path) -> None:
    ids = filled(tmp_path / "a")
    path = tmp_path / "r.jsonl.gz"
    archive.export_records(tmp_path / "a", path)
    st = Store(tmp_path / "b")
    add_run(st, lr2=1e-4, lam=10.0, best=0.8, last=0.6)
    done = archive.import_records(path, tmp_path / "b")
    assert (done.written, done.skipped) == (2, 1)
    assert Store(tmp_path / "b").stored_ids() == set(ids)


def test_damaged_gzip_is_one_line_naming_the_file(tmp_path: Path) -> None:
    filled(tmp_path / "a")
    path = tmp_path / "r.jsonl.gz"
    archive.export_records(tmp_path / "a", path)
    path.write_bytes(path.read_bytes()[:-30])  # truncated
    with pytest.raises(ConfigError) as err:
        archive.import_records(path, tmp_path / "b")
    message = str(err.value)
    assert str(path) in message and "damaged" in message and "\n" not in message
    assert not (tmp_path / "b" / "runs").exists()  # nothing written


def test_an_invalid_record_line_writes_nothing(tmp_path: Path) -> None:
    filled(tmp_path / "a")
    path = tmp_path / "r.jsonl.gz"
    archive.export_records(tmp_path / "a", path)
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    record = json.loads(lines[2])
    record["result"]["config"]["lr2"] = 0.5  # no longer the config of its run id
    lines[2] = json.dumps(record, ensure_ascii=False)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))
    with pytest.raises(ConfigError, match="line 3"):
        archive.import_records(path, tmp_path / "b")
    assert not (tmp_path / "b" / "runs").exists()
    path.write_bytes(gzip.compress(b"not json\n", mtime=0))
    with pytest.raises(ConfigError, match="line 1 is not a JSON object"):
        archive.import_records(path, tmp_path / "b")


def test_export_leaves_out_invalid_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = filled(tmp_path / "a")
    bad = tmp_path / "a" / "runs" / f"{ids[0]}.json"
    bad.write_text("{", encoding="utf-8")
    assert archive.export_records(tmp_path / "a", tmp_path / "r.jsonl.gz") == 2
    assert "left out of the archive" in capsys.readouterr().err
    assert bad.exists()  # export moves nothing


def test_cli_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path / "a")
    path = tmp_path / "r.jsonl.gz"
    assert main(["export", "--results", str(tmp_path / "a"), "--to", str(path)]) == 0
    assert main(["import", "--from", str(path), "--results", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "3 record(s) of" in out and "3 record(s) imported" in out
    assert main(["import", "--from", str(tmp_path / "none.gz"), "--results", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
