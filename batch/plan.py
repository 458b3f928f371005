"""The batch job's plan: the command line parsed, checked and resolved once, before any work.

``plan_job(argv)`` parses the flags (``batch/options.py``), finds the model, checks that the catalog
fits it, reads the id lists, sizes the shards and user blocks, names the run and its temp folder
and checks the output; everything after that (``batch/pipeline.py``) reads the frozen ``JobPlan``.
Every problem found on the way is a ``BatchUsageError`` naming the flag.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from batch import io, schemas
from batch.context import JobSpec, catalog_ids, read_features
from batch.model_source import ModelError, model_dims, resolve
from batch.options import BatchUsageError, JobOptions, RunnerOptions, parse
from batch.transforms import UserBlock, plan_blocks
from model import layout
from model.artifacts import ModelFolder
from model.isbn import normalise_isbn

PAIRS_PER_BLOCK = 1 << 20  # ~1M pairs: a block's scores + record batch stay around 20-30 MB
# Top-k blocks hold k rows per user and score the book set in bounded slices (model/recommend.py),
# so their size need not shrink with the catalog: 512 users amortise each pass over the book vectors
# (4 users per block at 262k books read 134 MB of vectors per 4 users: 3.6x slower per user).
TOPK_BLOCK_USERS = 512


@dataclass(frozen=True, eq=False)  # blocks hold numpy arrays: a plan is itself, not equal to another
class JobPlan:
    """Everything the job runs from: the checked flags, what the workers get, and what the driver
    resolved from the inputs (users in their blocks, the size of the book set, the runner's flags)."""

    options: JobOptions  # the command line, as checked
    spec: JobSpec  # the workers' part: absolute paths, run id, temp folder, shards, block size, scoring
    blocks: tuple[UserBlock, ...]  # the requested users, in blocks per shard
    n_users: int  # users requested (ids de-duplicated, --max-users applied)
    n_books: int  # books requested (before the workers drop unscorable ones)
    beam_flags: tuple[str, ...]  # the runner's flags, plus the Dask partitions (one per shard)
    log_file: Path | None  # where Beam's chatter goes; None with --verbose
    ranking_stage: bool  # top-k lists ordered by the model's ranking stage (False: the retrieval blend, or --mode all)

    @property
    def runner(self) -> RunnerOptions:
        return self.options.runner

    def pipeline_options(self) -> PipelineOptions:
        """Beam's options for this run, a fresh object (the runner may fill in a Dask scheduler address)."""
        return PipelineOptions(list(self.beam_flags))

    def ranked_by(self) -> str:
        """Which path put the rows in order, in words (``_SUCCESS`` says it to a reader of the output)."""
        if self.spec.mode == "all":
            return f"none: every pair, rated by {layout.MODEL_FILES[self.spec.variant]}"
        if self.spec.mode == "similar":
            return "similar books: the item graph, the book vectors and the author fused by rank (model/similar.py)"
        if self.ranking_stage:
            return "the ranking stage: the learned ranker ordered the candidates (towers, item graph, authors)"
        return "no ranking stage: retrieval logit blended with the predicted rating"

    def summary(self) -> dict[str, Any]:
        """The ``_SUCCESS`` summary's skeleton (the commit adds the counts)."""
        spec = self.spec
        return {
            "mode": spec.mode,
            "k": spec.k if spec.mode != "all" else None,
            "exclude_rated": spec.exclude_rated,
            "model": spec.model,
            "model_file": layout.MODEL_FILES[spec.variant],
            "variant": spec.variant,
            "ranking_stage": self.ranking_stage,
            "ranked_by": self.ranked_by(),
            "users_requested": self.n_users,
            "books_requested": self.n_books,
            "shards": spec.num_shards,
            "files": [io.shard_name(i, spec.num_shards) for i in range(spec.num_shards)],
            "compression": spec.compression,
            "runner": self.runner.name,
            "run_id": spec.run_id,
            "schema": str(schemas.output_schema(spec.mode)),
        }


def plan_job(argv: list[str] | None = None) -> JobPlan:
    """The plan of the command line ``argv``; ``BatchUsageError`` on a bad flag or input."""
    options = parse(argv)
    try:
        folder = resolve(options.model, options.variant)
    except ModelError as err:
        raise BatchUsageError(str(err)) from None
    _check_dims(folder, options)

    if options.user_features:
        user_ids = [int(u) for u in _feature_ids(options.user_features, "user_id", pa.int64())]
    else:
        user_ids = catalog_ids(folder, "user")
    if options.users:
        user_ids = read_id_list(options.users, "--users")
    user_ids = list(dict.fromkeys(user_ids))
    if options.max_users:
        user_ids = user_ids[: options.max_users]
    books = tuple(dict.fromkeys(read_id_list(options.books, "--books"))) if options.books else None
    if books is not None:
        n_books = len(books)
    elif options.book_features:
        n_books = len(_feature_ids(options.book_features, "isbn", pa.string()))
    else:
        n_books = len(catalog_ids(folder, "book"))
    if options.mode == "similar":
        # The queries are books: their positions in the --books list (or the catalog) travel through
        # the blocks as ids, and the workers turn them back into ISBNs.
        user_ids = list(range(n_books))

    runner = options.runner
    num_shards = options.num_shards or max(1, min(max(len(user_ids), 1), 4 * runner.workers if runner.local else 32))
    if options.block_users:
        block_users = options.block_users
    elif options.mode in ("topk", "similar"):
        block_users = TOPK_BLOCK_USERS
    else:
        block_users = max(1, PAIRS_PER_BLOCK // max(n_books, 1))
    run_id = io.new_run_id()
    try:
        output = io.output_folder(options.output)
        io.check_output(output)
    except io.OutputError as err:
        raise BatchUsageError(str(err)) from None
    # Workers start in folders of their own (a Dask worker, a Flink task manager): every path
    # they open is made absolute here, against the folder the command was run in.
    spec = JobSpec(
        model=io.absolute(options.model),
        output=output,
        temp_dir=io.temp_dir_for(output, run_id),
        run_id=run_id,
        mode=options.mode,
        k=options.k,
        exclude_rated=options.exclude_rated,
        variant=options.variant,
        books=books,
        user_features=None if options.user_features is None else io.absolute(options.user_features),
        book_features=None if options.book_features is None else io.absolute(options.book_features),
        num_shards=num_shards,
        block_users=block_users,
        compression=options.compression,
        device=options.device,
        precision=options.precision,
        kernel=options.kernel,
        threads=runner.threads,
    )
    return JobPlan(
        options=options,
        spec=spec,
        blocks=tuple(plan_blocks(user_ids, num_shards, block_users)),
        n_users=len(user_ids),
        n_books=n_books,
        beam_flags=_beam_flags(runner, num_shards),
        log_file=None if options.verbose else _log_file(spec.temp_dir, run_id),
        ranking_stage=options.mode == "topk" and ModelFolder(folder).ranks(),
    )


def _beam_flags(runner: RunnerOptions, num_shards: int) -> tuple[str, ...]:
    """The runner's flags; on Dask, one bag partition per shard unless the flags say otherwise
    (Dask bags default to 128 elements per partition: one partition, one worker, here)."""
    if runner.name != "DaskRunner":
        return runner.flags
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = PipelineOptions(list(runner.flags)).view_as(DaskOptions)
    if dask.npartitions or dask.partition_size:
        return runner.flags
    return (*runner.flags, f"--dask_npartitions={num_shards}")


def _log_file(temp_dir: str, run_id: str) -> Path:
    """``_batch.log`` in the run's temp folder, which becomes the output (a local temp file for a
    remote output)."""
    if io.is_local(temp_dir):
        return Path(temp_dir) / io.RUN_LOG
    return Path(tempfile.gettempdir()) / f"bookrec-batch-{run_id}.log"


def _feature_ids(path: str, column: str, id_type: pa.DataType) -> list:
    """Ids of an external features file, or ``BatchUsageError`` when it is not one or has no rows."""
    flag = "--user-features" if column == "user_id" else "--book-features"
    try:
        ids = read_features(path, column, id_type)[0].tolist()
    except Exception as err:
        what = f"a Parquet file with {column!r} and 'features' columns"
        raise BatchUsageError(f"{flag} {path}: not {what} ({err})") from None
    if not ids:
        raise BatchUsageError(f"{flag} {path}: no rows (an empty features file scores nothing)")
    return ids


def _check_dims(folder: Path, options: JobOptions) -> None:
    """The catalog's feature widths must be what the model takes (a whole-catalog mismatch is a
    wrong --model, not a bad row)."""
    from model.features import FeatureSpec

    user_dim, book_dim = model_dims(ModelFolder(folder).load_rating_model(options.variant))
    spec = FeatureSpec.load(folder / layout.catalog_path(layout.SPEC_FILE))
    if not options.user_features and spec.user_dim != user_dim:
        raise BatchUsageError(f"--model {options.model}: catalog user features ({spec.user_dim}) != model ({user_dim})")
    if not options.book_features and spec.book_dim != book_dim:
        raise BatchUsageError(f"--model {options.model}: catalog book features ({spec.book_dim}) != model ({book_dim})")


# The column of each id list's ids (in a Parquet file; a text file's optional header).
ID_COLUMNS = {"--users": "user_id", "--books": "isbn"}
INT64_MAX = (1 << 63) - 1


def read_id_list(path: str, flag: str) -> list:
    """The ids of an id list (``--users``: ints, ``--books``: ISBNs as training spells them) from a
    Parquet file (column ``user_id`` / ``isbn``) or a text file (one per line; blank lines and a header
    equal to the column name skipped). Raises ``BatchUsageError`` naming the flag, the file and the
    first bad row or line: an unreadable file, a column of the wrong type, a bad or out-of-range id,
    or no ids at all."""
    column = ID_COLUMNS[flag]
    where = f"{flag} {path}"
    try:
        data = io.read_bytes(path)
    except OSError as err:
        raise BatchUsageError(f"{where}: cannot read it ({err.strerror or err})") from None
    if data[:4] == b"PAR1":
        ids = _parquet_ids(data, column, where)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BatchUsageError(f"{where}: neither Parquet nor UTF-8 text (byte {err.start})") from None
        ids = []
        for n, line in enumerate(text.splitlines(), 1):
            token = line.strip().split(",")[0].strip()
            if not token or (n == 1 and token == column):
                continue
            ids.append(_id(token, column, f"{where} line {n}"))
    ids = [i for i in ids if i != ""]  # an ISBN that normalises to nothing is a blank line
    if not ids:
        raise BatchUsageError(f"{where}: no {column} values in the file (an empty id list scores nothing)")
    return ids


def _parquet_ids(data: bytes, column: str, where: str) -> list:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise BatchUsageError(f"{where}: not a readable Parquet file ({err})") from None
    if column not in table.column_names:
        raise BatchUsageError(f"{where}: Parquet file without a {column!r} column")
    kind = table.schema.field(column).type
    wanted = pa.types.is_integer if column == "user_id" else pa.types.is_string
    if not (wanted(kind) or (column == "isbn" and pa.types.is_large_string(kind))):
        expected = "integers" if column == "user_id" else "strings"
        raise BatchUsageError(f"{where}: column {column!r} holds {kind}, not {expected}")
    return [_id(v, column, f"{where} row {n}") for n, v in enumerate(table[column].to_pylist())]


def _id(value: str | int | None, column: str, where: str) -> int | str:
    """One id as the job uses it; ``BatchUsageError`` naming ``where`` when it is not one."""
    if value is None:
        raise BatchUsageError(f"{where}: null {column}")
    if column == "isbn":
        return normalise_isbn(value)
    try:
        user = int(value)
    except ValueError:
        raise BatchUsageError(f"{where}: {value!r} is not a valid {column}") from None
    if not -INT64_MAX - 1 <= user <= INT64_MAX:
        raise BatchUsageError(f"{where}: {value} is out of range for a {column} (a 64-bit integer)")
    return user
