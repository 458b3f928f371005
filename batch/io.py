"""Output files of the batch job: shard writers, the commit that swaps a finished run into place.

Layout of a finished output folder (local or any Beam filesystem, e.g. ``gs://``)::

    part-00000-of-00008.parquet ...  scored rows, one file per shard
    _dead_letters.parquet            users/books that could not be scored, with the reason
    _SUCCESS                         JSON summary, written last: the output is complete

A run writes everything into a temporary sibling folder (``.NAME.tmp-RUNID``) and only then
replaces the output: locally by two directory renames, elsewhere by deleting the old marker and
files before moving the new ones in and writing the marker last. Readers that wait for
``_SUCCESS`` never see a mix of two runs; names starting with ``_`` or ``.`` are skipped by
Arrow/Spark dataset readers. A write that fails mid-job (a full disk) raises ``WriteError`` naming
the file; the output is not touched before the commit.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from batch import schemas

log = logging.getLogger("bookrec.batch")

SUCCESS = "_SUCCESS"
DEAD_LETTERS = "_dead_letters.parquet"
RUN_LOG = "_batch.log"  # the runner's own log lines (batch/console.py), kept with the output
PROGRESS = "_progress"
COMPRESSIONS = ("zstd", "snappy", "lz4", "gzip", "none")
# Files a finished output may contain; anything else in an existing folder means it is not ours.
OWNED = re.compile(r"^(part-\d{5}-of-\d{5}\.parquet|_SUCCESS|_dead_letters\.parquet|_batch\.log)$")
# Coalesce small (top-k) batches into row groups of at least this many rows.
MIN_ROW_GROUP = 1 << 17


class OutputError(ValueError):
    """The output location cannot be used (unwritable, or holds something that is not ours)."""


class WriteError(RuntimeError):
    """Writing a file of the run failed mid-job (disk full, permissions): names the file.

    Raised on the workers; the driver finds it in the runner's error (``failure_reason``)."""


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def absolute(path: str) -> str:
    """A local path made absolute against this process's folder (workers start elsewhere); a
    remote URI (``gs://``, ``s3://``, ...) unchanged."""
    if not is_local(path):
        return path
    return os.path.abspath(_local(path))


def _write_failed(path: str, err: Exception) -> WriteError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if "No space left" in str(err):  # pyarrow's OSError carries errno 28 in its text only
        reason = "No space left on device"
    return WriteError(f"cannot write {path}: {reason}")


def failure_reason(err: BaseException, kinds: tuple[type[Exception], ...] = (WriteError,)) -> str | None:
    """The message of the exception of one of ``kinds`` behind a runner's failure: the exception
    itself (Dask re-raises the workers' exceptions), or its text inside the error the runner
    raised (Beam's portable runners carry the worker's traceback as text)."""
    found = next((str(e) for e in _chain(err) if isinstance(e, kinds)), None)
    if found is None:
        names = "|".join(k.__name__ for k in kinds)
        matches = re.findall(rf"\b(?:{names}): (.+)$", str(err), re.MULTILINE)
        found = matches[-1] if matches else None
    # Beam appends the step to the message: "... [while running 'ScoreCatalog/...']".
    return None if found is None else re.sub(r"( \[while running '[^']*'\])+$", "", found.strip())


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _local(path: str) -> Path:
    return Path(path[len("file://") :] if path.startswith("file://") else path)


def read_bytes(path: str) -> bytes:
    """The whole content of a small file (an id list), local or on any Beam filesystem."""
    if is_local(path):
        return _local(path).read_bytes()
    with FileSystems.open(path) as fh:
        return fh.read()


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(base) else FileSystems.join(base, *parts)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def temp_dir_for(output: str, run_id: str) -> str:
    """The run's private sibling folder of ``output``."""
    output = output.rstrip("/")
    if is_local(output):
        path = _local(output).absolute()
        return str(path.parent / f".{path.name}.tmp-{run_id}")
    parent, name = FileSystems.split(output)
    return FileSystems.join(parent, f".{name}.tmp-{run_id}")


def shard_name(shard: int, num_shards: int) -> str:
    return f"part-{shard:05d}-of-{num_shards:05d}.parquet"


def _list(folder: str) -> list[str]:
    """Full paths of the files under ``folder`` (recursive; empty when it does not exist)."""
    if is_local(folder):
        root = _local(folder)
        return [str(p) for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    pattern = FileSystems.join(folder, "**")
    return [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]


def _exists(path: str) -> bool:
    return _local(path).exists() if is_local(path) else FileSystems.exists(path)


def output_folder(given: str) -> str:
    """``--output`` as the job uses it: absolute, without a trailing slash. ``OutputError`` for a
    filesystem or bucket root, which has no parent to hold the run's temp folder and cannot be
    replaced whole."""
    if is_local(given):
        path = absolute(given)  # normalised: no trailing slash, "/" stays "/"
        root = Path(path).parent == Path(path)
    else:
        path = given.rstrip("/")
        root = "/" not in path.split("://", 1)[-1]  # gs://bucket: the bucket itself
    if root:
        raise OutputError(f"--output {given}: a filesystem root cannot be the output; name a folder inside it")
    return path


def check_output(output: str) -> None:
    """Fail unless ``output`` is absent, empty, or a previous output of this job (what a rerun replaces)."""
    if is_local(output):
        path = _local(output)
        if path.exists() and not path.is_dir():
            raise OutputError(f"--output {output} exists and is a file, not a folder")
        names = [p.name + ("/" if p.is_dir() else "") for p in path.iterdir()] if path.is_dir() else []
    else:
        prefix = output.rstrip("/") + "/"
        names = [p[len(prefix) :] for p in _list(output)]
    foreign = [n for n in names if not OWNED.match(n)]
    if foreign:
        raise OutputError(
            f"refusing to replace --output {output}: it holds {foreign[0]!r}, which this job did not write "
            "(point --output at a new or previous batch output folder)"
        )


def _lock_path(temp_dir: str) -> Path:
    """The lock file a live run holds beside its (local) temp folder: ``.NAME.tmp-RUNID.lock``."""
    return Path(f"{_local(temp_dir)}.lock")


def _try_lock(path: Path) -> IO[str] | None:
    """``path`` opened (created if need be) and locked exclusively; None when another process holds it."""
    fh = open(path, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def prepare_temp_dir(temp_dir: str) -> IO[str] | None:
    """Create the run's temp folder and prove it is writable (fail fast, before any work). A local
    one is claimed first by a lock held until ``release_temp_dir``, so that a later run can tell a
    live run's temp folder from one a killed run left (``remove_stale_temp_dirs``); returns the lock."""
    probe = join(temp_dir, ".probe")
    lock = None
    try:
        if is_local(temp_dir):
            if not _local(temp_dir).parent.exists():  # (a file there: the lock says "Not a directory")
                _local(temp_dir).parent.mkdir(parents=True)
            lock = _try_lock(_lock_path(temp_dir))  # before the folder: no live run's folder is ever unlocked
            _local(temp_dir).mkdir(parents=True, exist_ok=False)
            _local(probe).write_bytes(b"ok")
            _local(probe).unlink()
            _local(join(temp_dir, PROGRESS)).mkdir()  # object stores need no folder
        else:
            with FileSystems.create(probe) as fh:
                fh.write(b"ok")
            FileSystems.delete([probe])
    except Exception as err:
        release_temp_dir(temp_dir, lock)
        raise OutputError(f"cannot write next to --output ({temp_dir}): {err}") from err
    return lock


def release_temp_dir(temp_dir: str, lock: IO[str] | None) -> None:
    """Drop the run's claim on its temp folder (whatever is left of the folder is then stale)."""
    if lock is not None:
        _lock_path(temp_dir).unlink(missing_ok=True)
        lock.close()


def remove_stale_temp_dirs(output: str) -> list[str]:
    """Delete the temp folders (and locks) of earlier runs into ``output`` whose driver is gone
    (killed, or failed and keeping its log); a running job's is locked and left alone. Returns the
    folders removed. Local outputs only: an object store has no lock to tell a live run by."""
    if not is_local(output):
        return []
    path = _local(output)
    prefix = f".{path.name}.tmp-"
    try:
        names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    removed = []
    for name in names:
        folder = path.parent / name.removesuffix(".lock")
        if name.endswith(".lock") and folder.name in names:
            continue  # seen with its folder
        try:
            lock = _try_lock(_lock_path(str(folder)))
        except OSError as err:  # a read-only folder, say: the run that fails on it will say so
            log.debug("cannot check %s: %s", folder, err)
            continue
        if lock is None:
            continue  # a live run
        try:
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        finally:
            release_temp_dir(str(folder), lock)
    return removed


def delete_file(path: str) -> None:
    """Best-effort delete of one file."""
    try:
        if is_local(path):
            _local(path).unlink(missing_ok=True)
        elif FileSystems.exists(path):
            FileSystems.delete([path])
    except Exception as err:
        log.warning("could not remove %s: %s", path, err)


def remove_tree(folder: str) -> None:
    """Best-effort recursive delete."""
    try:
        if is_local(folder):
            shutil.rmtree(_local(folder), ignore_errors=True)
        else:
            files = _list(folder)
            if files:
                FileSystems.delete(files)
    except Exception as err:  # cleanup must not mask the real outcome
        log.warning("could not remove %s: %s", folder, err)


class ShardWriter:
    """Streams Arrow record batches of one shard into one Parquet file.

    Dictionary encoding only where values repeat (ids, ISBNs, ranks: scores are ~unique floats, and
    hashing them costs more than it saves); min/max statistics on ``user_id`` only, so readers can
    skip row groups by user without paying for string statistics on every page.
    """

    def __init__(self, path: str, schema: pa.Schema, compression: str):
        self.path = path
        self.schema = schema
        try:
            # Local files go through Arrow's own file I/O; other filesystems through Beam's.
            self._sink = None if is_local(path) else FileSystems.create(path)
            self._writer = pq.ParquetWriter(
                str(_local(path)) if self._sink is None else self._sink,
                schema,
                compression=None if compression == "none" else compression,
                use_dictionary=[n for n in ("user_id", "rank", "isbn") if n in schema.names],
                write_statistics=["user_id"],
                store_schema=False,
            )
        except OSError as err:
            raise _write_failed(path, err) from err
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        try:
            if batch.num_rows >= MIN_ROW_GROUP and not self._pending:
                self._writer.write_batch(batch)
                return
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            if self._pending_rows >= MIN_ROW_GROUP:
                self._flush()
        except OSError as err:
            raise _write_failed(self.path, err) from err

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema))
            self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        try:
            self._flush()
            self._writer.close()
            if self._sink is not None:
                self._sink.close()
        except OSError as err:
            raise _write_failed(self.path, err) from err

    def abort(self) -> None:
        try:
            self._writer.close()
            if self._sink is not None:
                self._sink.close()
        except Exception:  # the original error matters, not this one
            pass


def _write_bytes(path: str, data: bytes) -> None:
    try:
        if is_local(path):
            _local(path).write_bytes(data)
        else:
            with FileSystems.create(path) as fh:
                fh.write(data)
    except OSError as err:
        raise _write_failed(path, err) from err


def write_dead_letters(path: str, rows: Iterable[tuple[str, str, str]]) -> int:
    """``_dead_letters.parquet`` (always written, possibly empty, so readers need no special case)."""
    rows = list(rows)
    table = pa.Table.from_arrays(
        [pa.array([r[i] for r in rows], pa.string()) for i in range(3)], schema=schemas.DEAD_LETTERS
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _write_bytes(path, sink.getvalue().to_pybytes())
    return len(rows)


def mark_progress(temp_dir: str, shard: int) -> None:
    """An empty file per finished shard; the driver counts them for its progress bar."""
    try:
        _write_bytes(join(temp_dir, PROGRESS, f"shard-{shard:05d}"), b"")
    except Exception as err:  # progress is cosmetic
        log.debug("progress marker failed: %s", err)


def progress_count(temp_dir: str) -> int:
    try:
        folder = join(temp_dir, PROGRESS)
        if is_local(folder):
            path = _local(folder)
            return sum(1 for _ in path.iterdir()) if path.is_dir() else 0
        return len(_list(folder))
    except Exception:
        return 0


def commit(
    temp_dir: str,
    output: str,
    shard_files: dict[int, str],
    num_shards: int,
    dead_letters: list[tuple[str, str, str]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Name the shard files, write dead letters and ``_SUCCESS``, then replace ``output`` whole.

    ``shard_files`` maps shard -> the attempt file that the runner committed; other attempt files
    (retried bundles) are deleted. Returns the summary written to ``_SUCCESS``.
    """
    missing = sorted(set(range(num_shards)) - set(shard_files))
    if missing:
        raise RuntimeError(f"shards {missing[:5]} produced no file; not committing {output}")
    sources = [shard_files[i] for i in range(num_shards)]
    targets = [join(temp_dir, shard_name(i, num_shards)) for i in range(num_shards)]
    if is_local(temp_dir):
        for src, dst in zip(sources, targets, strict=True):
            os.replace(src, dst)
    else:
        FileSystems.rename(sources, targets)
    keep = {*targets, join(temp_dir, RUN_LOG)}
    stray = [p for p in _list(temp_dir) if p not in keep]
    if stray:  # attempt files of retried bundles, progress markers
        if is_local(temp_dir):
            for p in stray:
                _local(p).unlink(missing_ok=True)
            shutil.rmtree(_local(join(temp_dir, PROGRESS)), ignore_errors=True)
        else:
            FileSystems.delete(stray)
    summary = {**summary, "dead_letters": len(dead_letters)}
    write_dead_letters(join(temp_dir, DEAD_LETTERS), dead_letters)
    marker = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    if is_local(output):
        _write_bytes(join(temp_dir, SUCCESS), marker)
        _swap_local(_local(temp_dir), _local(output))
    else:
        _swap_remote(temp_dir, output, [*targets, join(temp_dir, DEAD_LETTERS)], marker)
    return summary


def _swap_local(temp: Path, output: Path) -> None:
    """Two renames on one filesystem: the old folder moves aside, the new one takes its name."""
    output = output.absolute()
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{new_run_id()}"
        os.rename(output, old)
    os.rename(temp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap_remote(temp_dir: str, output: str, files: list[str], marker: bytes) -> None:
    """Object stores have no folder rename: drop the old marker first (the output is now
    incomplete), then every old file, move the new files in, and write the marker last."""
    old_marker = join(output, SUCCESS)
    if _exists(old_marker):
        FileSystems.delete([old_marker])
    old = _list(output)
    if old:
        FileSystems.delete(old)
    names = [FileSystems.split(f)[1] for f in files]
    FileSystems.rename(files, [join(output, n) for n in names])
    _write_bytes(old_marker, marker)
    remove_tree(temp_dir)


def read_summary(output: str) -> dict[str, Any] | None:
    """The ``_SUCCESS`` summary of a finished output, or None when there is none."""
    path = join(output, SUCCESS)
    try:
        if is_local(path):
            return json.loads(_local(path).read_text()) if _local(path).is_file() else None
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as fh:
            return json.loads(fh.read().decode())
    except (OSError, ValueError):
        return None
