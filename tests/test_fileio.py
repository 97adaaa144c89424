from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from masq.fileio import atomic_write


def test_writes_text_and_bytes_readable_by_all(tmp_path: Path) -> None:
    text = atomic_write(tmp_path / "sub" / "a.json", "λ = 1/ε2\n")
    assert text.read_text(encoding="utf-8") == "λ = 1/ε2\n"
    raw = atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert raw.read_bytes() == b"\x00\xff"
    assert stat.S_IMODE(raw.stat().st_mode) == 0o644


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_interrupt_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    target = tmp_path / "record.json"
    atomic_write(target, "old")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, fails, interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new and half-written " * 1000)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
