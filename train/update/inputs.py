"""The input of a catalog update: new or changed books, new users, new ratings, withdrawn ISBNs.

An update folder holds any of the three Book-Crossing files in either layout (``Books.csv``,
``Users.csv``, ``Ratings.csv`` or the ``BX-*.csv`` names; one layout per folder) and, optionally,
``withdrawn.txt`` (one ISBN per line, ``#`` starts a comment). Rows are read and cleaned by
training's own ingestion (``train/data/ingest.py``), so an update keeps training's rules; every row
skipped is counted and named (file, line, reason). A rating must name a book and a user that the
catalog or the update itself holds; the others are skipped, counted and named the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from model.isbn import normalise_isbn
from train.data.ingest import (
    KAGGLE_FILES,
    ORIGINAL_FILES,
    TABLES,
    DataError,
    IngestReport,
    RowTrace,
    _books_frame,
    _clean_books,
    _clean_ratings,
    _clean_users,
    _ordered,
    _ratings_frame,
    _read_rows,
    _users_frame,
)

WITHDRAWN_NAME = "withdrawn.txt"
NAMED_MAX = 200  # bad rows named in the record (all are counted)


@dataclass
class UpdateInputs:
    """The cleaned update tables (empty where the folder has no such file) and what was skipped."""

    books: pd.DataFrame
    users: pd.DataFrame
    ratings: pd.DataFrame
    withdrawn: list[str]
    report: IngestReport
    rejected: list[str] = field(default_factory=list)  # "file:line: reason", the first NAMED_MAX
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        """Rows skipped: malformed, or a rating / withdrawal naming what nobody knows."""
        c = self.report.counts
        return self.report.bad_rows() + c.get("ratings.dropped_unknown", 0) + c.get("withdrawn.unknown_isbn", 0)


def update_files(folder: Path) -> tuple[str, dict[str, Path]]:
    """(layout, table -> CSV) of the Book-Crossing files in ``folder``; a folder mixing layouts is a
    ``DataError``. Any subset of the tables may be present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such update folder")
    present = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    found = {}
    for name, files in (("kaggle", KAGGLE_FILES), ("original", ORIGINAL_FILES)):
        hits = {table: present[f.lower()] for table, f in files.items() if f.lower() in present}
        if hits:
            found[name] = hits
    if len(found) > 1:
        names = sorted(p.name for hits in found.values() for p in hits.values())
        raise DataError(f"{folder}: holds files of both layouts ({', '.join(names)}); keep one set")
    if not found:
        return "kaggle", {}
    return next(iter(found.items()))


def read_update(folder: Path, known_isbns: set[str], known_users: set[int]) -> UpdateInputs:
    """Read and clean the update folder (see the module docstring); ``known_*``: the catalog's."""
    folder = Path(folder)
    layout, paths = update_files(folder)
    withdrawn_path = next((p for p in folder.iterdir() if p.name.lower() == WITHDRAWN_NAME), None)
    if not paths and withdrawn_path is None:
        raise DataError(
            f"{folder}: nothing to update: expected any of {', '.join(KAGGLE_FILES.values())} "
            f"(or {', '.join(ORIGINAL_FILES.values())}) or {WITHDRAWN_NAME}"
        )
    counts: Counter[str] = Counter()
    rejected: list[str] = []

    def rows(table: str) -> Iterator[list[str]]:
        trace = RowTrace()
        inner = _read_rows(paths[table], layout, table, counts, progress=False, trace=trace)
        return _named(inner, trace, counts, table, paths[table].name, rejected)

    users = _clean_users(rows("users"), counts) if "users" in paths else []
    books = _clean_books(rows("books"), counts) if "books" in paths else []
    pairs = _clean_ratings(rows("ratings"), counts) if "ratings" in paths else {}
    isbns = known_isbns | {b[0] for b in books}
    user_ids = known_users | {u[0] for u in users}
    kept = []
    for (user_id, isbn), rating in pairs.items():
        reasons = [
            r for r, bad in (("unknown_isbn", isbn not in isbns), ("unknown_user", user_id not in user_ids)) if bad
        ]
        if reasons:
            counts["ratings.dropped_unknown"] += 1
            for reason in reasons:
                counts[f"ratings.{reason}"] += 1
            _name(rejected, f"{paths['ratings'].name}: user {user_id}, ISBN {isbn}: {' and '.join(reasons)}")
            continue
        kept.append((user_id, isbn, rating))
    counts["ratings.kept"] += len(kept)
    withdrawn = _withdrawn(withdrawn_path, known_isbns, counts, rejected) if withdrawn_path else []
    files = dict(paths) | ({"withdrawn": withdrawn_path} if withdrawn_path else {})
    return UpdateInputs(
        books=_books_frame(books),
        users=_users_frame(users),
        ratings=_ratings_frame(kept),
        withdrawn=withdrawn,
        report=IngestReport(layout=layout, counts=_ordered(counts)),
        rejected=rejected,
        files=files,
    )


def _bad(counts: Counter[str], table: str) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k.startswith(f"{table}.bad.")}


def _name(rejected: list[str], entry: str) -> None:
    if len(rejected) < NAMED_MAX:
        rejected.append(entry)


def _named(
    rows: Iterator[list[str]], trace: RowTrace, counts: Counter[str], table: str, file: str, rejected: list[str]
) -> Iterator[list[str]]:
    """``rows`` as they are, naming every row the reader skipped (``trace``) or the cleaner refused
    (a ``<table>.bad.*`` counter that grew while it held the row)."""
    reported = 0
    for row in rows:
        for line, reason in trace.skipped[reported:]:
            _name(rejected, f"{file}:{line}: {reason}")
        reported = len(trace.skipped)
        line, before = trace.line, _bad(counts, table)
        yield row
        grew = [k.split(".bad.", 1)[1] for k, v in _bad(counts, table).items() if v > before.get(k, 0)]
        if grew:
            _name(rejected, f"{file}:{line}: {', '.join(grew)} {row}")
    for line, reason in trace.skipped[reported:]:
        _name(rejected, f"{file}:{line}: {reason}")


def _withdrawn(path: Path, known: set[str], counts: Counter[str], rejected: list[str]) -> list[str]:
    """The catalog ISBNs listed in ``path``; an ISBN the catalog lacks is skipped and named."""
    out: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read: {err}") from err
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        isbn = normalise_isbn(text)
        counts["withdrawn.rows_read"] += 1
        if not isbn or isbn not in known:
            counts["withdrawn.unknown_isbn"] += 1
            _name(rejected, f"{path.name}:{number}: unknown_isbn {text!r}")
            continue
        if isbn not in out:
            out.append(isbn)
    counts["withdrawn.kept"] += len(out)
    return out


__all__ = ["TABLES", "UpdateInputs", "read_update", "update_files"]
