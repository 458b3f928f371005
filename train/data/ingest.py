"""Read the Book-Crossing dataset into clean users, books and ratings tables.

Two layouts are in circulation and both are read: the original ``BX-CSV-Dump``
(``;``-separated, latin-1, backslash escapes, bare ``NULL``) and the Kaggle
re-export (``,``-separated UTF-8, standard quoting). Rows are read one by one with
the ``csv`` module so a broken row costs one counted row, never the whole file;
every skipped or altered row is counted in the :class:`IngestReport`. What cannot give a usable
table (a missing column, an empty file, a file in the wrong encoding, no rows kept) is a
:class:`DataError` naming the file.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ftfy
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from model.isbn import normalise_isbn
from model.ranges import AGE_MAX, AGE_MIN, IMPLICIT_RATING, RATING_MAX, YEAR_MAX, YEAR_MIN

LOG = logging.getLogger("bookrec.ingest")

TABLES = ("users", "books", "ratings")
KAGGLE_FILES = {"users": "Users.csv", "books": "Books.csv", "ratings": "Ratings.csv"}
ORIGINAL_FILES = {
    "users": "BX-Users.csv",
    "books": "BX-Books.csv",
    "ratings": "BX-Book-Ratings.csv",
}

# Logical column -> accepted header spellings, compared after _header_key().
COLUMNS = {
    "users": {"user_id": ("userid",), "location": ("location",), "age": ("age",)},
    "books": {
        "isbn": ("isbn",),
        "title": ("booktitle", "title"),
        "author": ("bookauthor", "author"),
        "year": ("yearofpublication", "year"),
        "publisher": ("publisher", "bookpublisher"),
    },
    "ratings": {
        "user_id": ("userid",),
        "isbn": ("isbn",),
        "rating": ("bookrating", "rating"),
    },
}

_CSV_FORMATS = {
    "original": {
        "encoding": "latin-1",
        "dialect": {"delimiter": ";", "quotechar": '"', "escapechar": "\\"},
    },
    # utf-8-sig: Excel-saved copies start with a BOM that would hide the first header.
    "kaggle": {
        "encoding": "utf-8-sig",
        "dialect": {"delimiter": ",", "quotechar": '"'},
    },
}

# Kaggle rows that are not valid UTF-8 are kept with U+FFFD and counted; past this share of a
# file's rows the file is in another encoding and every text in it would be garbled.
MAX_UNDECODABLE_SHARE = 0.01
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes the decoder could not read (surrogateescape)

MAX_INT64 = 2**63 - 1
_MISSING = {"", "null", "nan", "none", "na", "n/a"}
_INT_LIKE = re.compile(r"[+-]?[0-9]+(?:\.0*)?")

# Location parts that carry no information (compared with punctuation removed).
_PLACEHOLDERS = {
    "na",
    "none",
    "null",
    "nil",
    "unknown",
    "nowhere",
    "somewhere",
    "notapplicable",
    "nothing",
    "private",
    "notgiven",
}
_PART_STRIP = " \t\r\n\"'`"

# A lossy step in the dataset's history turned one byte of many double-encoded
# characters into "?" (e.g. "QuerschÃ\x83?Ã\x82Â¼sse"), which ftfy cannot undo.
# The lost byte is always the same (0x83), so restore it before ftfy runs; the
# Kaggle copy has one more encoding layer than the original dump.
_LOSSY_KAGGLE = re.compile("\u00c3\u0083\\?\u00c3\u0082\u00c2([\u00a0-\u00bf])")
_LOSSY_ORIGINAL = re.compile("\u00c3\\?\u00c2([\u00a0-\u00bf])")
# "Ã?Â?" lost both bytes; inside a German word it is nearly always "ß" (C3 9F).
_LOSSY_SZ_KAGGLE = re.compile("(?<=[a-z])\u00c3\u0083\\?\u00c3\u0082\\?")
_LOSSY_SZ_ORIGINAL = re.compile("(?<=[a-z])\u00c3\\?\u00c2\\?")
# What is left after repair when bytes were lost for good: U+FFFD or "Ã?"/"Â?".
_UNREPAIRED = re.compile("\ufffd|[\u00c2\u00c3]\\?")


class DataError(ValueError):
    """The dataset cannot give usable tables; the message names the file and the reason."""


@dataclass
class IngestReport:
    """What the reader saw: rows read, skipped (by reason), repaired and kept."""

    layout: str
    counts: dict[str, int] = field(default_factory=dict)

    def bad_rows(self, table: str | None = None) -> int:
        """Rows skipped as malformed, for one table or all of them."""
        prefixes = [f"{t}.bad." for t in ([table] if table else TABLES)]
        return sum(v for k, v in self.counts.items() if k.startswith(tuple(prefixes)))

    def summary(self) -> str:
        """A readable table of every counter; skipped rows are marked with '!'."""
        width = max((len(k) for k in self.counts), default=10)
        lines = [f"Book-Crossing ingest, layout: {self.layout}"]
        for table in TABLES:
            keys = [k for k in self.counts if k.split(".", 1)[0] == table]
            lines.append(f"  {table} (bad rows: {self.bad_rows(table):,})")
            for key in keys:
                value = self.counts[key]
                mark = "!" if ".bad." in key and value else " "
                lines.append(f"  {mark} {key:<{width}} {value:>12,}")
        lines.append(f"  total bad rows skipped: {self.bad_rows():,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"layout": self.layout, "counts": dict(self.counts)}


@dataclass
class RowTrace:
    """Where ``_read_rows`` is: the line of the row it yielded last, and the rows it skipped as
    (line, reason), so a caller can name each bad row (a catalog update does)."""

    line: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class RawTables:
    """Cleaned Book-Crossing tables (see model.schemas USERS, BOOKS, RATINGS)."""

    users: pd.DataFrame
    books: pd.DataFrame
    ratings: pd.DataFrame
    report: IngestReport
    files: dict[str, Path] = field(default_factory=dict)  # table -> the CSV it was read from


def detect_layout(folder: Path) -> str:
    """'kaggle' or 'original', from the file names in ``folder``; both complete sets is a :class:`DataError`."""
    folder = Path(folder)
    kaggle = _find_files(folder, KAGGLE_FILES)
    original = _find_files(folder, ORIGINAL_FILES)
    if kaggle is not None and original is not None:
        names = ", ".join(p.name for p in [*kaggle.values(), *original.values()])
        raise DataError(f"{folder}: holds both layouts ({names}); keep one set of files there")
    if kaggle is not None:
        return "kaggle"
    if original is not None:
        return "original"
    found = sorted(p.name for p in folder.glob("*.csv")) if folder.is_dir() else []
    seen = f"found {', '.join(found)}" if found else ("no CSV files" if folder.is_dir() else "no such folder")
    raise FileNotFoundError(
        f"No Book-Crossing dataset in {folder}: expected either the Kaggle files "
        f"{', '.join(KAGGLE_FILES.values())} or the original BX-CSV-Dump files "
        f"{', '.join(ORIGINAL_FILES.values())} ({seen})."
    )


def read_bookcrossing(folder: Path, progress: bool = True) -> RawTables:
    """Read and clean the dataset in ``folder``; bad rows are counted and skipped.

    Raises :class:`DataError` when a file cannot be read as its layout says, or when a table keeps
    no rows (a header-only file, every rating naming an unknown book or user).
    """
    folder = Path(folder)
    layout = detect_layout(folder)
    names = KAGGLE_FILES if layout == "kaggle" else ORIGINAL_FILES
    paths = _find_files(folder, names)
    assert paths is not None  # detect_layout just found them
    counts: Counter[str] = Counter()
    for key in ("rows_read", "kept", "duplicates"):
        for table in TABLES:
            counts[f"{table}.{key}"] = 0

    def rows(table: str) -> Iterator[list[str]]:
        return _read_rows(paths[table], layout, table, counts, progress)

    users = _clean_users(rows("users"), counts)
    books = _clean_books(rows("books"), counts)
    ratings = _clean_ratings(rows("ratings"), counts)
    ratings = _drop_unknown(ratings, users, books, counts)

    report = IngestReport(layout=layout, counts=_ordered(counts))
    _log_totals(report)
    _require_rows(paths, report)
    return RawTables(
        users=_users_frame(users),
        books=_books_frame(books),
        ratings=_ratings_frame(ratings),
        report=report,
        files=paths,
    )


def _require_rows(paths: dict[str, Path], report: IngestReport) -> None:
    """Refuse a table left empty: every later step would fail on it, or worse, succeed."""
    c = report.counts
    for table in TABLES:
        if c[f"{table}.kept"]:
            continue
        read = c[f"{table}.rows_read"]
        if not read:
            raise DataError(f"{paths[table]}: no {table} kept: the file has no data rows below its header")
        reasons = [f"{k.split('.bad.', 1)[1]} {v:,}" for k, v in c.items() if k.startswith(f"{table}.bad.") and v]
        if c.get(f"{table}.duplicates"):
            reasons.append(f"duplicates {c[f'{table}.duplicates']:,}")
        if table == "ratings":
            for key, other in (("unknown_isbn", "books"), ("unknown_user", "users")):
                if c.get(f"ratings.{key}"):
                    reasons.append(f"{key} (not in {paths[other].name}) {c[f'ratings.{key}']:,}")
        raise DataError(f"{paths[table]}: no {table} kept of {read:,} rows read ({'; '.join(reasons)})")


# --- files and rows -------------------------------------------------------------


def _find_files(folder: Path, names: dict[str, str]) -> dict[str, Path] | None:
    """The paths of all ``names`` in ``folder`` (file names matched case-insensitively)."""
    if not folder.is_dir():
        return None
    present = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    found = {table: present.get(name.lower()) for table, name in names.items()}
    if any(path is None for path in found.values()):
        return None
    return found  # type: ignore[return-value]


def _header_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.strip().lower())


def _column_indexes(header: list[str], table: str, path: Path, delimiter: str) -> list[int]:
    """Position of each logical column in ``header``, by name, not position."""
    keys = [_header_key(h) for h in header]
    indexes, missing = [], []
    for column, spellings in COLUMNS[table].items():
        hits = [i for i, key in enumerate(keys) if key in spellings]
        if hits:
            indexes.append(hits[0])
        else:
            missing.append(column)
    if missing:
        looked_for = [COLUMNS[table][m][0] for m in missing]
        raise DataError(
            f"{path}: line 1: header {header} lacks column(s) {missing} (looked for {looked_for})"
            + _delimiter_hint(header, table, delimiter)
        )
    return indexes


def _delimiter_hint(header: list[str], table: str, delimiter: str) -> str:
    """Why a header may be one field: the file is separated by another character than its layout's."""
    if len(header) != 1:
        return ""
    for other in (",", ";", "\t", "|"):
        if other != delimiter and len(header[0].split(other)) >= len(COLUMNS[table]):
            return f"; the header looks {other!r}-separated, this layout's files are {delimiter!r}-separated"
    return ""


def _unterminated(path: Path) -> bool:
    """Whether the file's last line lacks a line break: a file cut short ends that way."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) not in (b"\n", b"\r")


def _lines(f: Iterable[str], last: list[str]) -> Iterator[str]:
    """The lines of ``f``; a final line without a line break is also put in ``last``."""
    for line in f:
        if not line.endswith(("\n", "\r")):
            last.append(line)
        yield line


def _read_rows(
    path: Path, layout: str, table: str, counts: Counter[str], progress: bool, trace: RowTrace | None = None
) -> Iterator[list[str]]:
    """Yield each data row as the logical columns of ``table``, counting bad ones.

    Rows with the wrong number of fields or that the csv module rejects are
    counted and skipped, and so is a last line without a line break (a file cut
    short: "...,10" stored as "...,1"). ``lines_read`` next to ``rows_read``
    shows quoted fields that span line breaks. Rows with bytes the encoding
    cannot read keep U+FFFD in their place and are counted; past
    ``MAX_UNDECODABLE_SHARE`` of the rows the file is a :class:`DataError`.
    """
    fmt = _CSV_FORMATS[layout]
    # latin-1 reads every byte; the others keep undecodable bytes as surrogates to count them.
    checked = fmt["encoding"] != "latin-1"
    try:
        cut = _unterminated(path)
        f = open(path, encoding=fmt["encoding"], errors="surrogateescape", newline="")
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err.strerror or err}") from err
    with f:
        last: list[str] = []
        reader = csv.reader(_lines(f, last) if cut else f, **fmt["dialect"])
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file, expected a header row")
        indexes = _column_indexes(header, table, path, fmt["dialect"]["delimiter"])
        width = len(header)
        identity = indexes == list(range(len(indexes))) and width == len(indexes)
        n_rows = n_wrong = n_csv_error = n_blank = n_cut = n_undecodable = 0
        first_undecodable = 0
        bar = tqdm(desc=f"{table} ({path.name})", unit=" rows", disable=not progress)
        try:
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error:
                    n_rows += 1
                    n_csv_error += 1
                    if trace is not None:
                        trace.skipped.append((reader.line_num, "csv_error"))
                    continue
                if not row:  # blank line, not a record
                    n_blank += 1
                    continue
                n_rows += 1
                if n_rows % 4096 == 0:
                    bar.update(4096)
                if last:
                    n_cut += 1
                    LOG.warning(
                        "%s: line %d, the last, has no line break (a file cut short?): skipped %r",
                        path,
                        reader.line_num,
                        last[0],
                    )
                    if trace is not None:
                        trace.skipped.append((reader.line_num, "unterminated_last_line"))
                    continue
                if checked and _undecodable(row):
                    n_undecodable += 1
                    first_undecodable = first_undecodable or reader.line_num
                    # the same U+FFFD as decoding with errors="replace"
                    row = [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in row]
                if len(row) != width:
                    n_wrong += 1
                    if trace is not None:
                        trace.skipped.append((reader.line_num, f"wrong_field_count ({len(row)}, not {width})"))
                    continue
                if trace is not None:
                    trace.line = reader.line_num
                yield row if identity else [row[i] for i in indexes]
        finally:
            bar.update(n_rows % 4096)
            bar.close()
            counts[f"{table}.rows_read"] += n_rows
            counts[f"{table}.lines_read"] += reader.line_num
            _add_nonzero(counts, f"{table}.bad.wrong_field_count", n_wrong)
            _add_nonzero(counts, f"{table}.bad.csv_error", n_csv_error)
            _add_nonzero(counts, f"{table}.bad.unterminated_last_line", n_cut)
            _add_nonzero(counts, f"{table}.soft.undecodable_rows", n_undecodable)
            _add_nonzero(counts, f"{table}.blank_lines", n_blank)
        if n_undecodable:
            _check_decoding(path, fmt["encoding"], n_undecodable, n_rows, first_undecodable)


def _undecodable(row: list[str]) -> bool:
    text = "".join(row)
    return not text.isascii() and _ESCAPED.search(text) is not None


def _check_decoding(path: Path, encoding: str, n_bad: int, n_rows: int, first_line: int) -> None:
    """A few undecodable rows are a warning; more than ``MAX_UNDECODABLE_SHARE`` is the wrong encoding."""
    name = "UTF-8" if encoding.startswith("utf-8") else encoding
    what = f"{n_bad:,} of {n_rows:,} rows are not valid {name} (first at line {first_line})"
    if n_bad > MAX_UNDECODABLE_SHARE * n_rows:
        raise DataError(
            f"{path}: {what}: this layout's files must be {name}; convert it first, "
            f"e.g. iconv -f cp1252 -t utf-8 {path.name} > {path.stem}.utf8.csv"
        )
    LOG.warning("%s: %s; kept with U+FFFD in place of the unreadable bytes", path, what)


def _add_nonzero(counts: Counter[str], key: str, value: int) -> None:
    if value:
        counts[key] += value


# --- field parsers --------------------------------------------------------------


def _to_int(text: str) -> int | None:
    """An integer from '12', ' 12 ', '12.0'; None for anything else."""
    if text.isdigit() and text.isascii():
        return int(text)
    text = text.strip()
    if _INT_LIKE.fullmatch(text):
        return int(text.split(".", 1)[0])
    return None


def _is_missing(text: str) -> bool:
    return text.strip().lower() in _MISSING


def _user_id(text: str) -> int | None:
    value = _to_int(text)
    if value is None or value < 0 or value > MAX_INT64:
        return None
    return value


def _fix_lossy(text: str) -> str:
    if "\u00c3" not in text:
        return text
    text = _LOSSY_KAGGLE.sub("\u00c3\u0083\u00c2\\1", text)
    text = _LOSSY_SZ_KAGGLE.sub("\u00c3\u0083\u00c2\u009f", text)
    text = _LOSSY_ORIGINAL.sub("\u00c3\\1", text)
    return _LOSSY_SZ_ORIGINAL.sub("\u00c3\u009f", text)


@functools.lru_cache(maxsize=65536)
def _repair(text: str) -> str:
    """Undo mojibake and HTML entities; only reached by non-ASCII or '&...;' text."""
    return ftfy.fix_text(_fix_lossy(text))


def _needs_repair(text: str) -> bool:
    return not text.isascii() or ("&" in text and ";" in text)


def _repair_counted(text: str, table: str, name: str, counts: Counter[str]) -> str:
    """``text`` repaired when it needs it, counting repairs and leftovers."""
    if not _needs_repair(text):
        return text
    fixed = _repair(text)
    if fixed != text:
        counts[f"{table}.repaired.{name}"] += 1
    if _UNREPAIRED.search(fixed):
        counts[f"{table}.soft.unrepairable_{name}"] += 1
    return fixed


def _clean_text(text: str, name: str, counts: Counter[str]) -> str | None:
    """Repaired, whitespace-collapsed book text; None when empty."""
    text = " ".join(_repair_counted(text, "books", name, counts).split())
    return text or None


# --- users ----------------------------------------------------------------------

UserRow = tuple[int, str | None, str | None, str | None, int | None]


def _clean_users(rows: Iterator[list[str]], counts: Counter[str]) -> list[UserRow]:
    out: list[UserRow] = []
    seen: set[int] = set()
    locations: dict[str, tuple[str | None, str | None, str | None]] = {}
    for raw_id, location, raw_age in rows:
        user_id = _user_id(raw_id)
        if user_id is None:
            counts["users.bad.bad_user_id"] += 1
            continue
        if user_id in seen:
            counts["users.duplicates"] += 1
            continue
        seen.add(user_id)
        place = locations.get(location)
        if place is None:
            place = locations[location] = _split_location(location)
        if _needs_repair(location):  # cheap to repeat: _repair is cached
            _repair_counted(location, "users", "location", counts)
        out.append((user_id, *place, _age(raw_age, counts)))
    counts["users.kept"] += len(out)
    return out


def _split_location(location: str) -> tuple[str | None, str | None, str | None]:
    """(city, region, country) from 'city, region[, more], country'."""
    if _needs_repair(location):
        location = _repair(location)
    parts = location.split(",")
    city = _location_part(parts[0])
    country = _location_part(parts[-1]) if len(parts) >= 2 else None
    middle = [_location_part(p) for p in parts[1:-1]]
    region = ", ".join(p for p in middle if p) or None
    return city, region, country


def _location_part(part: str) -> str | None:
    part = " ".join(part.split()).strip(_PART_STRIP).lower()
    key = "".join(ch for ch in part if ch.isalnum())
    if not key or key in _PLACEHOLDERS or set(key) == {"x"}:
        return None
    return part


def _age(text: str, counts: Counter[str]) -> int | None:
    if _is_missing(text):
        counts["users.age_missing"] += 1
        return None
    age = _to_int(text)
    if age is None:
        counts["users.soft.age_unparseable"] += 1
        return None
    if not AGE_MIN <= age <= AGE_MAX:
        counts["users.age_out_of_range"] += 1
        return None
    return age


# --- books ----------------------------------------------------------------------

BookRow = tuple[str, str | None, str | None, int | None, str | None]


def _clean_books(rows: Iterator[list[str]], counts: Counter[str]) -> list[BookRow]:
    out: list[BookRow] = []
    seen: set[str] = set()
    for raw_isbn, title, author, raw_year, publisher in rows:
        isbn = normalise_isbn(raw_isbn)
        if not isbn:
            counts["books.bad.empty_isbn"] += 1
            continue
        if isbn != raw_isbn:
            counts["books.isbn_normalised"] += 1
        if isbn in seen:
            counts["books.duplicates"] += 1
            continue
        seen.add(isbn)
        out.append(
            (
                isbn,
                _clean_text(title, "title", counts),
                _clean_text(author, "author", counts),
                _year(raw_year, counts),
                _clean_text(publisher, "publisher", counts),
            )
        )
    counts["books.kept"] += len(out)
    return out


def _year(text: str, counts: Counter[str]) -> int | None:
    if _is_missing(text):
        counts["books.year_missing"] += 1
        return None
    year = _to_int(text)
    if year is None:
        counts["books.soft.year_unparseable"] += 1
        return None
    if not YEAR_MIN <= year <= YEAR_MAX:  # 0 is the dump's "unknown"
        counts["books.year_out_of_range"] += 1
        return None
    return year


# --- ratings --------------------------------------------------------------------


def _clean_ratings(rows: Iterator[list[str]], counts: Counter[str]) -> dict[tuple[int, str], int]:
    """(user_id, isbn) -> rating, duplicates resolved (explicit beats 0, last wins)."""
    pairs: dict[tuple[int, str], int] = {}
    for raw_user, raw_isbn, raw_rating in rows:
        user_id = _user_id(raw_user)
        if user_id is None:
            counts["ratings.bad.bad_user_id"] += 1
            continue
        isbn = normalise_isbn(raw_isbn)
        if not isbn:
            counts["ratings.bad.empty_isbn"] += 1
            continue
        rating = _rating(raw_rating, counts)
        if rating is None:
            continue
        if isbn != raw_isbn:
            counts["ratings.isbn_normalised"] += 1
        key = (user_id, isbn)
        if key in pairs:
            counts["ratings.duplicates"] += 1
            if rating == 0:  # an implicit 0 never overrides what we have
                continue
        pairs[key] = rating
    return pairs


def _rating(text: str, counts: Counter[str]) -> int | None:
    if not text.strip():
        counts["ratings.bad.rating_missing"] += 1
        return None
    rating = _to_int(text)
    if rating is None:
        counts["ratings.bad.rating_not_integer"] += 1
        return None
    if not IMPLICIT_RATING <= rating <= RATING_MAX:
        counts["ratings.bad.rating_out_of_range"] += 1
        return None
    return rating


def _drop_unknown(
    pairs: dict[tuple[int, str], int],
    users: list[UserRow],
    books: list[BookRow],
    counts: Counter[str],
) -> list[tuple[int, str, int]]:
    """Keep ratings whose user and book both have a record; count the others."""
    user_ids = {u[0] for u in users}
    isbns = {b[0] for b in books}
    kept: list[tuple[int, str, int]] = []
    for (user_id, isbn), rating in pairs.items():
        unknown_isbn = isbn not in isbns
        unknown_user = user_id not in user_ids
        if unknown_isbn or unknown_user:
            counts["ratings.unknown_isbn"] += unknown_isbn
            counts["ratings.unknown_user"] += unknown_user
            counts["ratings.dropped_unknown"] += 1
            continue
        kept.append((user_id, isbn, rating))
    implicit = sum(1 for r in kept if r[2] == 0)
    counts["ratings.kept"] += len(kept)
    counts["ratings.explicit"] += len(kept) - implicit
    counts["ratings.implicit"] += implicit
    return kept


# --- frames and report ----------------------------------------------------------


def _text_column(values: list) -> pd.Series:
    # object dtype keeps None for missing values (pandas 3 would infer str + NaN).
    return pd.Series(values, dtype=object)


def _users_frame(rows: list[UserRow]) -> pd.DataFrame:
    ids, cities, regions, countries, ages = _columns(rows, 5)
    return pd.DataFrame(
        {
            "user_id": np.array(ids, dtype=np.int64),
            "city": _text_column(cities),
            "region": _text_column(regions),
            "country": _text_column(countries),
            "age": pd.array(ages, dtype="Int16"),
        }
    )


def _books_frame(rows: list[BookRow]) -> pd.DataFrame:
    isbns, titles, authors, years, publishers = _columns(rows, 5)
    return pd.DataFrame(
        {
            "isbn": _text_column(isbns),
            "title": _text_column(titles),
            "author": _text_column(authors),
            "year": pd.array(years, dtype="Int16"),
            "publisher": _text_column(publishers),
        }
    )


def _ratings_frame(rows: list[tuple[int, str, int]]) -> pd.DataFrame:
    user_ids, isbns, ratings = _columns(rows, 3)
    return pd.DataFrame(
        {
            "user_id": np.array(user_ids, dtype=np.int64),
            "isbn": _text_column(isbns),
            "rating": np.array(ratings, dtype=np.int8),
        }
    )


def _columns(rows: list[tuple], width: int) -> list[list]:
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=False)]


def _ordered(counts: Counter[str]) -> dict[str, int]:
    """Counters grouped by table, in the order a reader follows the data."""
    order = {t: i for i, t in enumerate(TABLES)}
    return {k: counts[k] for k in sorted(counts, key=lambda k: (order.get(k.split(".")[0], 9), k))}


def _log_totals(report: IngestReport) -> None:
    c = report.counts
    bad = {t: report.bad_rows(t) for t in TABLES}
    message = (
        "Book-Crossing (%s): skipped %d bad rows (users %d, books %d, ratings %d), "
        "%d duplicates, %d ratings with unknown book/user; kept %d users, %d books, "
        "%d ratings (%d explicit, %d implicit)"
    )
    args = (
        report.layout,
        sum(bad.values()),
        bad["users"],
        bad["books"],
        bad["ratings"],
        sum(c.get(f"{t}.duplicates", 0) for t in TABLES),
        c.get("ratings.dropped_unknown", 0),
        c["users.kept"],
        c["books.kept"],
        c["ratings.kept"],
        c.get("ratings.explicit", 0),
        c.get("ratings.implicit", 0),
    )
    level = logging.WARNING if sum(bad.values()) else logging.INFO
    LOG.log(level, message, *args)
