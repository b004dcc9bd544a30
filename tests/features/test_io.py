"""Atomic writes and links: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from features import io
from features.io import (
    link_file_atomic,
    replace_dir,
    restore_retired_dir,
    staging_dir,
    write_bytes_atomic,
    write_parquet_atomic,
)


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


def folder_with(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.txt").write_text(text)
    return path


def test_replace_dir_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = folder_with(tmp_path / "models" / "t", "old")
    replace_dir(folder_with(tmp_path / "models" / ".t.partial", "new"), target)
    assert (target / "model.txt").read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["t"]


def test_replace_dir_puts_back_the_folder_a_crash_left_aside_before_replacing_it(tmp_path: Path) -> None:
    # Killed between its two renames: no target, the old folder whole under its hidden name.
    target = tmp_path / "models" / "t"
    retired = folder_with(tmp_path / "models" / ".t.retired", "old")
    seen: list[str] = []
    real_rename = Path.rename

    def rename(self: Path, to: Path) -> Path:
        if self == target:  # the old folder moving aside again: it is the one that was there
            seen.append((self / "model.txt").read_text())
        return real_rename(self, to)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", rename)
        replace_dir(folder_with(tmp_path / "models" / ".t.partial", "new"), target)
    assert seen == ["old"]
    assert (target / "model.txt").read_text() == "new"
    assert not retired.exists() and [p.name for p in target.parent.iterdir()] == ["t"]


def test_a_replaced_folder_whose_deletion_was_killed_is_never_put_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = folder_with(tmp_path / "models" / "t", "v1")
    real_rmtree = shutil.rmtree

    def killed(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name == ".t.deleting" and Path(path).exists():
            raise KeyboardInterrupt  # killed while deleting the replaced folder
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            replace_dir(folder_with(tmp_path / "models" / ".t.partial", "v2"), target)
    assert (target / "model.txt").read_text() == "v2"
    real_rmtree(target)  # the operator withdraws v2: v1 must not come back
    restore_retired_dir(target)
    assert not target.exists()
    replace_dir(folder_with(tmp_path / "models" / ".t.partial", "v3"), target)
    assert (target / "model.txt").read_text() == "v3"
    assert [p.name for p in target.parent.iterdir()] == ["t"]


def test_outputs_get_the_permissions_of_a_plain_write_not_a_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Temporary files are 0600 and temporary folders 0700: renamed into place as they were, a
    # published version or a table would be readable by its writer alone.
    monkeypatch.setattr(io, "_UMASK", 0o022)  # a usual umask, whatever this machine's
    table = write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "table.parquet")
    data = write_bytes_atomic(b"{}", tmp_path / "summary.json")
    folder = staging_dir(tmp_path, ".version.")
    assert [oct(p.stat().st_mode & 0o777) for p in (table, data, folder)] == ["0o644", "0o644", "0o755"]
    assert folder.parent == tmp_path and folder.name.startswith(".version.")
