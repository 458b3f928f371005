"""The Beam transforms of the batch job.

    Create blocks of user ids -> GroupByKey(shard) -> ScoreShards -> Flatten(+ CheckBooks) -> CommitOutput

Elements are blocks of user ids, never pairs: a worker scores each block against the whole book set
with matrix operations (``ScoringContext``, loaded once per worker process through ``Shared``) and
streams the rows as Arrow record batches straight into the shard's Parquet file. Every stage has a
single output and the commit depends on all of them, which keeps the graph runnable on runners with
a partial Beam model (the DaskRunner translation, see docs/BATCH.md).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from batch import io
from batch.context import DeadLetter, JobSpec, ScoringContext, WorkerStats

log = logging.getLogger("bookrec.batch")
NAMESPACE = "bookrec.batch"


@dataclass(frozen=True)
class UserBlock:
    """A block of requested user ids, part of one output shard."""

    shard: int
    index: int
    user_ids: np.ndarray  # int64


@dataclass
class ShardResult:
    """What scoring one shard produced: its attempt file and counts."""

    shard: int
    path: str
    rows: int
    users: int
    dead: list[DeadLetter] = field(default_factory=list)
    stats: WorkerStats | None = None


@dataclass
class BookCheck:
    """The book set's dead letters, and the counts of the worker that checked it."""

    dead: list[DeadLetter]
    stats: WorkerStats


def plan_blocks(user_ids: list[int], num_shards: int, block_users: int) -> list[UserBlock]:
    """Contiguous user ranges per shard, cut into blocks; an empty shard still gets one (empty)
    block, so every shard writes a file."""
    ids = np.asarray(user_ids, np.int64)
    blocks = []
    for shard, part in enumerate(np.array_split(ids, num_shards)):
        starts = range(0, len(part), block_users) if len(part) else [0]
        for n, start in enumerate(starts):
            blocks.append(UserBlock(shard, n, part[start : start + block_users]))
    return blocks


def _count(kind: str, dead: Iterable[DeadLetter]) -> None:
    for _, _, reason in dead:
        Metrics.counter(NAMESPACE, f"bad_{kind}s_{reason.split(':')[0]}").inc()


class _WithContext(beam.DoFn):
    """A DoFn holding the worker's shared ``ScoringContext`` (loaded once per process)."""

    def __init__(self, spec: JobSpec, shared: Shared):
        self.spec = spec
        self.shared = shared
        self.ctx: ScoringContext | None = None

    def setup(self) -> None:
        from model.book_index import set_threads

        # Parallelism comes from the workers and the scorer's own threads; torch's (and the book
        # index's faiss) intra-op pool on top of that only oversubscribes the cores.
        set_threads(1)
        self.ctx = self.shared.acquire(lambda: ScoringContext.load(self.spec), tag=self.spec.tag())


class ScoreShardFn(_WithContext):
    """Scores every block of one shard and writes the shard's Parquet file."""

    def __init__(self, spec: JobSpec, shared: Shared):
        super().__init__(spec, shared)
        self.users = Metrics.counter(NAMESPACE, "users_scored")
        self.rows = Metrics.counter(NAMESPACE, "rows_written")
        self.seconds = Metrics.distribution(NAMESPACE, "shard_ms")

    def process(self, element: tuple[int, Iterable[UserBlock]]) -> Iterator[ShardResult]:
        shard, blocks = element
        start = time.perf_counter()
        ctx = self.ctx
        # A unique name per attempt: a retried bundle never overwrites a file the commit may pick.
        path = io.join(self.spec.temp_dir, f"attempt-{shard:05d}-{uuid.uuid4().hex[:8]}.parquet")
        writer = io.ShardWriter(path, ctx.schema, self.spec.compression)
        users, dead = 0, []
        try:
            for block in sorted(blocks, key=lambda b: b.index):
                ids, rows, bad = ctx.resolve_users(block.user_ids)
                dead += bad
                _count("user", bad)
                if len(ids):
                    writer.write(ctx.score_block(ids, rows))
                    users += len(ids)
            writer.close()
        except Exception:
            writer.abort()
            io.delete_file(path)
            raise
        self.users.inc(users)
        self.rows.inc(writer.rows)
        self.seconds.update(int(1000 * (time.perf_counter() - start)))
        io.mark_progress(self.spec.temp_dir, shard)
        yield ShardResult(shard, path, writer.rows, users, dead, ctx.worker_stats())


class BookDeadLettersFn(_WithContext):
    """The book set's dead letters (unknown ISBNs, unusable feature rows), reported once."""

    def process(self, element: object) -> Iterator[BookCheck]:
        _count("book", self.ctx.book_dead)
        Metrics.counter(NAMESPACE, "books_in_set").inc(self.ctx.n_books)
        yield BookCheck(list(self.ctx.book_dead), self.ctx.worker_stats())


class CommitFn(beam.DoFn):
    """Runs once after every shard: names the files, writes dead letters and ``_SUCCESS``, swaps."""

    def __init__(self, spec: JobSpec, summary: dict):
        self.spec = spec
        self.summary = summary

    def process(self, element: tuple[None, Iterable[object]]) -> Iterator[dict]:
        _, items = element
        shard_files: dict[int, str] = {}
        rows = users = 0
        user_dead: list[DeadLetter] = []
        book_dead: list[DeadLetter] = []
        workers: dict[str, dict[str, int]] = {}
        for item in items:
            _tally(workers, item.stats, isinstance(item, ShardResult))
            if isinstance(item, ShardResult):
                if item.shard in shard_files:  # a duplicate attempt; the first one stands
                    continue
                shard_files[item.shard] = item.path
                rows += item.rows
                users += item.users
                user_dead += item.dead
            else:
                book_dead += item.dead
        dead = sorted(book_dead) + user_dead
        summary = {
            **self.summary,
            "rows": rows,
            "users_scored": users,
            "dead_letter_users": len(user_dead),
            "dead_letter_books": len(book_dead),
            "workers": dict(sorted(workers.items())),
            "committed_unix": time.time(),
        }
        yield io.commit(self.spec.temp_dir, self.spec.output, shard_files, self.spec.num_shards, dead, summary)


def _tally(workers: dict[str, dict[str, int]], stats: WorkerStats | None, shard: bool) -> None:
    """Per worker process: shards scored, scoring contexts built and model loads for this run
    (the counts only grow within a process, so the largest one reported is the total)."""
    if stats is None:
        return
    row = workers.setdefault(stats.worker, {"shards": 0, "contexts": 0, "model_loads": 0})
    row["shards"] += int(shard)
    row["contexts"] = max(row["contexts"], stats.contexts)
    row["model_loads"] = max(row["model_loads"], stats.model_loads)


class UserBlocks(beam.PTransform):
    """Blocks of requested user ids grouped by output shard: ``(shard, [UserBlock, ...])``."""

    def __init__(self, blocks: list[UserBlock]):
        super().__init__()
        self.blocks = blocks

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "CreateBlocks" >> beam.Create(self.blocks)
            | "KeyByShard" >> beam.Map(lambda block: (block.shard, block))
            | "GroupByShard" >> beam.GroupByKey()
        )


class ScoreShards(beam.PTransform):
    """``(shard, blocks)`` -> ``ShardResult``: score against the book set, write Parquet."""

    def __init__(self, spec: JobSpec, shared: Shared):
        super().__init__()
        self.spec = spec
        self.shared = shared

    def expand(self, shards: beam.PCollection) -> beam.PCollection:
        return shards | "ScoreAndWrite" >> beam.ParDo(ScoreShardFn(self.spec, self.shared))


class CheckBooks(beam.PTransform):
    """One element: the list of the book set's dead letters."""

    def __init__(self, spec: JobSpec, shared: Shared):
        super().__init__()
        self.spec = spec
        self.shared = shared

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Once" >> beam.Create([None])
            | "BookDeadLetters" >> beam.ParDo(BookDeadLettersFn(self.spec, self.shared))
        )


class CommitOutput(beam.PTransform):
    """Shard results + book dead letters -> the committed output's summary (one element)."""

    def __init__(self, spec: JobSpec, summary: dict):
        super().__init__()
        self.spec = spec
        self.summary = summary

    def expand(self, parts: tuple[beam.PCollection, ...]) -> beam.PCollection:
        return (
            parts
            | "Gather" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda item: (None, item))
            | "Barrier" >> beam.GroupByKey()
            | "Commit" >> beam.ParDo(CommitFn(self.spec, self.summary))
        )


class ScoreCatalog(beam.PTransform):
    """The whole job: blocks of users in, committed Parquet output out (its summary as the element)."""

    def __init__(self, spec: JobSpec, blocks: list[UserBlock], summary: dict):
        super().__init__()
        self.spec = spec
        self.blocks = blocks
        self.summary = summary

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        shared = Shared()  # one handle: both DoFns get the same per-process context
        results = pbegin | "UserBlocks" >> UserBlocks(self.blocks) | "ScoreShards" >> ScoreShards(self.spec, shared)
        books = pbegin | "CheckBooks" >> CheckBooks(self.spec, shared)
        return (results, books) | "CommitOutput" >> CommitOutput(self.spec, self.summary)
