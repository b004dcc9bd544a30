"""Atomic writes and links: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from features.io import link_file_atomic


def test_link_file_atomic_links_and_replaces(tmp_path: Path) -> None:
    source = tmp_path / "batch.parquet"
    source.write_bytes(b"new")
    target = tmp_path / "warehouse" / "table.parquet"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link_file_atomic(source, target)
    assert target.samefile(source)
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]


def test_link_file_atomic_copies_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(src: str, dst: str) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    source = tmp_path / "batch.parquet"
    source.write_bytes(b"new")
    target = tmp_path / "table.parquet"
    link_file_atomic(source, target)
    assert target.read_bytes() == b"new"
    assert not target.samefile(source)


def test_link_file_atomic_raises_other_errors_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        link_file_atomic(tmp_path / "missing.parquet", target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
