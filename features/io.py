"""Atomic file writes shared by every stage, and the lock one writer of a folder holds.

Stage: shared. In: a table or bytes and a destination path. Out: the file, written to a temporary
sibling and renamed into place, so a killed run leaves the previous good file readable.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import polars as pl


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()
"""Read once, at import: reading it means setting it, which other threads would see."""


def staging_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new hidden folder in ``parent`` to build an output in before renaming it into place, with
    the permissions a plain ``mkdir`` gives (``tempfile.mkdtemp`` gives ``0700``, so a published
    version or landing zone would be readable by its writer alone)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    folder.chmod(0o777 & ~_UMASK)
    return folder


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``, else it is removed.
    The file gets the permissions a plain ``open`` gives (``tempfile.mkstemp`` gives ``0600``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` as Parquet, replacing any previous file only once complete."""
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return path


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path``, replacing any previous file only once complete."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return path


def link_file_atomic(source: Path, path: Path) -> Path:
    """Make ``path`` hold the file ``source``: a hard link (no copy) where both share a file system,
    else a copy, in either case put in place by one rename, so a reader sees the old or the new file.

    Every writer here replaces files (never rewrites them in place), so the two names sharing one
    file is safe: a later write to either gives that name a new file.
    """
    with atomic_target(path) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError as exc:
            # Another file system (EXDEV), or one without hard links (EPERM, ENOTSUP): copy instead.
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            shutil.copyfile(source, tmp)
    return path


def sink_parquet_atomic(frame: pl.LazyFrame, path: Path, schema: pa.Schema, chunk_size: int = 100_000,
                        use_dictionary: bool | list[str] = True, write_statistics: bool | list[str] = True) -> Path:
    """Stream a polars query into ``path`` as Parquet with the Arrow ``schema``, atomically.

    The query runs on polars' streaming engine and is written batch by batch (cast to ``schema``,
    so the file has exactly the contract's types), so memory stays bounded by the batch size, not
    by the size of the table. ``use_dictionary`` and ``write_statistics`` are Parquet's encoding
    choices (all columns, none, or the named ones), as in :class:`pyarrow.parquet.ParquetWriter`.
    """
    with (
        atomic_target(path) as tmp,
        pq.ParquetWriter(tmp, schema, use_dictionary=use_dictionary, write_statistics=write_statistics) as writer,
    ):
        for batch in frame.select(schema.names).collect_batches(chunk_size=chunk_size, engine="streaming"):
            writer.write_table(batch.to_arrow().cast(schema))
    return path


def restore_retired_dir(target: Path) -> None:
    """Put back the folder a crash inside :func:`replace_dir` left aside, if ``target`` is missing."""
    retired = target.with_name(f".{target.name}.retired")
    if not target.exists() and retired.is_dir():
        retired.rename(target)


def replace_dir(staging: Path, target: Path) -> Path:
    """Move a completed ``staging`` folder to ``target``, replacing what was there.

    The old folder is renamed aside (``.<name>.retired``) and removed only once the new one is in
    place. A crash between the two renames leaves no ``target``, but the old folder whole under the
    hidden name: the next replacement puts it back first (:func:`restore_retired_dir`), so that what
    it replaces is the last good folder.
    """
    restore_retired_dir(target)
    retired = target.with_name(f".{target.name}.retired")
    # Renamed once more before it is deleted: a crash while deleting must not leave a replaced folder
    # under the name restore_retired_dir puts back.
    deleting = target.with_name(f".{target.name}.deleting")
    shutil.rmtree(deleting, ignore_errors=True)
    if target.exists():
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        staging.rename(target)
        retired.rename(deleting)
        shutil.rmtree(deleting)
    else:
        staging.rename(target)
    return target


def take_pid_lock(handle: BinaryIO, wait_seconds: float = 0.0) -> str | None:
    """Take an exclusive ``flock`` on the open lock file ``handle`` and write this process's id in
    it; None once held. While another process holds it after ``wait_seconds``, that process's id
    as its file says (``unknown`` when blank), and nothing is taken: the caller words the refusal.

    The operating system releases the lock when its holder exits, killed or not; so once it is
    held, whatever a holder left half-done was left by one that died.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                return handle.read(64).decode(errors="replace").strip() or "unknown"
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return None
