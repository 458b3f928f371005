"""Book-Crossing ingest: both layouts, every planted problem, download fallbacks."""

from __future__ import annotations

import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from model.schemas import BOOKS, RATINGS, USERS
from train.data import download, sample
from train.data.download import DatasetUnavailable, download_dataset, resolve_data_dir
from train.data.ingest import RawTables, detect_layout, read_bookcrossing
from train.data.sample import (
    PLANTED_BAD_YEAR,
    PLANTED_CURLY,
    PLANTED_ENTITY,
    PLANTED_LOWER_X,
    PLANTED_MOJIBAKE,
    PLANTED_NEWLINE,
    PLANTED_QUOTE,
    write_sample,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_BX_USERS = SHARED / "data" / "bookcrossing" / "BX-Users.csv"
UNREACHABLE = "http://127.0.0.1:9/x.zip"
LAYOUTS = ("kaggle", "original")


@pytest.fixture(scope="module", params=LAYOUTS)
def planted(request, tmp_path_factory) -> tuple[RawTables, dict[str, int]]:
    folder = tmp_path_factory.mktemp(request.param)
    expected = write_sample(folder, layout=request.param)
    return read_bookcrossing(folder, progress=False), expected


def _by(frame: pd.DataFrame, column: str, value) -> dict:
    rows = frame[frame[column] == value]
    assert len(rows) == 1, f"{column}={value!r}: {len(rows)} rows"
    return {k: (None if pd.isna(v) else v) for k, v in rows.iloc[0].items()}


# --- counts ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("image_urls", [None, True, False])
def test_counts_match_the_generator(tmp_path: Path, layout: str, image_urls) -> None:
    expected = write_sample(tmp_path, layout=layout, image_urls=image_urls)
    counts = read_bookcrossing(tmp_path, progress=False).report.counts
    assert {k: counts.get(k, 0) for k in expected} == expected
    unexpected = {k: v for k, v in counts.items() if v and k not in expected}
    assert unexpected == {}


def test_planted_counts_are_exact(planted) -> None:
    raw, _ = planted
    c = raw.report.counts
    for table in ("users", "books"):
        assert c[f"{table}.bad.wrong_field_count"] == 1
    assert c["users.bad.bad_user_id"] == 1
    assert c["books.bad.empty_isbn"] == 1
    for reason in (
        "wrong_field_count",
        "bad_user_id",
        "rating_out_of_range",
        "rating_not_integer",
        "rating_missing",
        "empty_isbn",
    ):
        assert c[f"ratings.bad.{reason}"] == 1, reason
    assert raw.report.bad_rows() == 10
    assert (c["users.duplicates"], c["books.duplicates"], c["ratings.duplicates"]) == (
        1,
        1,
        3,
    )
    assert (c["ratings.unknown_isbn"], c["ratings.unknown_user"]) == (1, 2)
    assert (len(raw.users), len(raw.books), len(raw.ratings)) == (308, 207, 4009)


def test_every_row_is_accounted_for(planted) -> None:
    raw, _ = planted
    c = raw.report.counts
    for table in ("users", "books", "ratings"):
        dropped = raw.report.bad_rows(table) + c[f"{table}.duplicates"]
        dropped += c.get(f"{table}.dropped_unknown", 0)
        assert c[f"{table}.rows_read"] == dropped + c[f"{table}.kept"]
    assert c["ratings.kept"] == c["ratings.explicit"] + c["ratings.implicit"]
    assert c["ratings.implicit"] == int((raw.ratings.rating == 0).sum())


def test_clean_sample_has_no_problems(tmp_path: Path) -> None:
    expected = write_sample(tmp_path, layout="original", malformed=False)
    raw = read_bookcrossing(tmp_path, progress=False)
    assert raw.report.bad_rows() == 0
    assert (len(raw.users), len(raw.books), len(raw.ratings)) == (300, 200, 4000)
    assert raw.report.counts["users.age_missing"] == expected["users.age_missing"]


# --- tables ---------------------------------------------------------------------


def test_frames_match_the_arrow_schemas(planted) -> None:
    raw, _ = planted
    for frame, schema in (
        (raw.users, USERS),
        (raw.books, BOOKS),
        (raw.ratings, RATINGS),
    ):
        assert list(frame.columns) == schema.names
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        assert table.schema.equals(schema)
    assert str(raw.users.age.dtype) == "Int16"
    assert str(raw.books.year.dtype) == "Int16"
    assert raw.ratings.rating.dtype == np.int8
    assert raw.ratings.user_id.dtype == np.int64


def test_duplicate_ratings_prefer_explicit_then_last(planted) -> None:
    raw, _ = planted
    r = raw.ratings.set_index(["user_id", "isbn"]).rating
    assert not r.index.duplicated().any()
    assert r[(2, PLANTED_MOJIBAKE)] == 8  # explicit 8, then implicit 0
    assert r[(3, PLANTED_ENTITY)] == 9  # explicit 3, then explicit 9
    assert r[(4, PLANTED_QUOTE)] == 6  # implicit 0, then explicit 6
    assert r[(6, PLANTED_NEWLINE)] == 0  # a lone implicit 0 is kept


def test_unknown_isbn_and_user_are_dropped(planted) -> None:
    raw, _ = planted
    assert raw.ratings.isbn.isin(raw.books.isbn).all()
    assert raw.ratings.user_id.isin(raw.users.user_id).all()
    assert sample.UNKNOWN_ISBN not in set(raw.ratings.isbn)
    assert sample.UNKNOWN_USER not in set(raw.ratings.user_id)


def test_isbn_upper_casing_joins(planted) -> None:
    raw, _ = planted
    assert _by(raw.books, "isbn", PLANTED_LOWER_X)["title"] == "The Last Crown"
    rated = raw.ratings[raw.ratings.isbn == PLANTED_LOWER_X]
    assert sorted(rated.user_id) == [1, 2]
    assert raw.report.counts["ratings.isbn_normalised"] == 1


def test_text_is_repaired(planted) -> None:
    raw, _ = planted
    book = _by(raw.books, "isbn", PLANTED_MOJIBAKE)
    assert (book["title"], book["author"]) == ("Café Stories", "José Saramago")
    assert _by(raw.books, "isbn", PLANTED_ENTITY)["title"] == "Salt & Pepper"
    assert _by(raw.books, "isbn", PLANTED_QUOTE)["title"] == 'The "Lost" Garden'
    assert _by(raw.books, "isbn", PLANTED_NEWLINE)["title"] == "The Dragon Queen Returns"
    assert _by(raw.books, "isbn", PLANTED_CURLY)["title"] == "Don't Panic"
    c = raw.report.counts
    assert (c["books.repaired.title"], c["books.repaired.author"]) == (3, 1)


def test_years_are_cleaned(planted) -> None:
    raw, _ = planted
    for isbn in (PLANTED_ENTITY, PLANTED_QUOTE, PLANTED_NEWLINE, PLANTED_BAD_YEAR):
        assert _by(raw.books, "isbn", isbn)["year"] is None  # 0, 2050, "", "abc"
    assert _by(raw.books, "isbn", PLANTED_MOJIBAKE)["year"] == 1998
    c = raw.report.counts
    assert (c["books.year_out_of_range"], c["books.year_missing"]) == (2, 1)
    assert c["books.soft.year_unparseable"] == 1
    assert raw.books.year.isna().sum() == 4


@pytest.mark.parametrize(
    ("user_id", "city", "region", "country", "age"),
    [
        (1, "aarhus", None, "denmark", None),  # "n/a" region in quotes, age 0
        (2, "london", None, "united kingdom", None),  # empty region, age 150
        (3, "new york", "new york", "usa", None),  # line break inside the city
        (4, None, None, None, None),  # n/a everywhere, empty age
        (5, "münchen", "bayern", "germany", None),  # mojibake, age "abc"
        (6, "st. john's", "newfoundland, nl", "canada", 34),
        (7, "tokyo", None, None, 29),  # first of two rows with id 7
        (9, None, None, None, None),  # xxx, ?, -
    ],
)
def test_users_are_cleaned(planted, user_id, city, region, country, age) -> None:
    raw, _ = planted
    user = _by(raw.users, "user_id", user_id)
    assert (user["city"], user["region"], user["country"], user["age"]) == (
        city,
        region,
        country,
        age,
    )


def test_user_age_counts(planted) -> None:
    raw, expected = planted
    c = raw.report.counts
    assert c["users.age_out_of_range"] == 2
    assert c["users.soft.age_unparseable"] == 1
    assert c["users.age_missing"] == expected["users.age_missing"] >= 3
    unknown = c["users.age_missing"] + c["users.age_out_of_range"] + 1
    assert raw.users.age.isna().sum() == unknown
    assert raw.users.age.dropna().between(5, 100).all()
    assert c["users.repaired.location"] == 1  # "köln", "andalucía" stay as they are


def test_sample_is_learnable(planted) -> None:
    raw, _ = planted
    explicit = raw.ratings[raw.ratings.rating > 0]
    train = explicit.sample(frac=0.8, random_state=0)
    test = explicit.drop(train.index)
    mean = train.rating.mean()
    user = (train.rating - mean).groupby(train.user_id).sum() / (train.groupby("user_id").size() + 3)
    book = (train.rating - mean).groupby(train.isbn).sum() / (train.groupby("isbn").size() + 3)
    pred = mean + test.user_id.map(user).fillna(0) + test.isbn.map(book).fillna(0)
    rmse_mean = np.sqrt(((test.rating - mean) ** 2).mean())
    rmse_bias = np.sqrt(((test.rating - pred) ** 2).mean())
    assert rmse_bias < 0.85 * rmse_mean
    assert 0.15 < (raw.ratings.rating == 0).mean() < 0.25


# --- reader robustness ----------------------------------------------------------


def _write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.write_bytes(text.encode(encoding))


def test_kaggle_headers_match_by_name(tmp_path: Path) -> None:
    _write(tmp_path / "Users.csv", 'age,LOCATION,user_id\n34.0,"a, b, c",1\n,x,2\n')
    _write(
        tmp_path / "Books.csv",
        "book_title,isbn,publisher,year-of-publication,book-author,extra\nT,0000000019,P,1999,A,z\n",
    )
    _write(tmp_path / "Ratings.csv", "Book-Rating,ISBN,User-ID\n7,0000000019,1\n")
    raw = read_bookcrossing(tmp_path, progress=False)
    assert raw.users.to_dict("records")[0] == {
        "user_id": 1,
        "city": "a",
        "region": "b",
        "country": "c",
        "age": 34,
    }
    assert _by(raw.books, "isbn", "0000000019") == {
        "isbn": "0000000019",
        "title": "T",
        "author": "A",
        "year": 1999,
        "publisher": "P",
    }
    assert raw.ratings.to_dict("records") == [{"user_id": 1, "isbn": "0000000019", "rating": 7}]


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    write_sample(tmp_path, n_users=5, n_books=5, n_ratings=5, malformed=False)
    _write(tmp_path / "Ratings.csv", "User-ID,ISBN\n1,0000000019\n")
    with pytest.raises(ValueError, match=r"Ratings.csv.*rating"):
        read_bookcrossing(tmp_path, progress=False)


def test_broken_original_rows_are_counted(tmp_path: Path) -> None:
    write_sample(tmp_path, "original", n_users=5, n_books=5, n_ratings=5, malformed=False)
    users = (tmp_path / "BX-Users.csv").read_text(encoding="latin-1").splitlines()
    user_id = users[1].split(";")[0]
    books = (tmp_path / "BX-Books.csv").read_text(encoding="latin-1").splitlines()
    isbn = books[1].split(";")[0]
    lines = [
        '"User-ID";"ISBN";"Book-Rating"',
        f'{user_id};{isbn};"5"',
        f'{user_id};"{isbn[1:-1]}\\";"5"',  # the escape eats the closing quote
        "",
        f'{user_id};{isbn};"5";"extra"',
        f'"not a number";{isbn};"5"',
    ]
    _write(tmp_path / "BX-Book-Ratings.csv", "\r\n".join(lines) + "\r\n", "latin-1")
    raw = read_bookcrossing(tmp_path, progress=False)
    c = raw.report.counts
    assert c["ratings.rows_read"] == 4
    assert c["ratings.blank_lines"] == 1
    assert c["ratings.bad.wrong_field_count"] == 2
    assert c["ratings.bad.bad_user_id"] == 1
    assert len(raw.ratings) == 1


def test_warning_is_logged(tmp_path: Path, caplog) -> None:
    write_sample(tmp_path, n_users=20, n_books=20, n_ratings=50)
    with caplog.at_level(logging.WARNING, logger="bookrec.ingest"):
        read_bookcrossing(tmp_path, progress=False)
    assert "skipped 10 bad rows (users 2, books 2, ratings 6)" in caplog.text


def test_report_summary_and_dict(planted) -> None:
    raw, _ = planted
    summary = raw.report.summary()
    assert f"layout: {raw.report.layout}" in summary
    assert "! ratings.bad.rating_out_of_range" in summary
    assert "total bad rows skipped: 10" in summary
    as_dict = json.loads(json.dumps(raw.report.to_dict()))
    assert as_dict["counts"]["ratings.duplicates"] == 3


# --- layout detection -----------------------------------------------------------


def test_detect_layout(tmp_path: Path) -> None:
    write_sample(tmp_path / "k", "kaggle", n_users=5, n_books=5, n_ratings=5)
    write_sample(tmp_path / "o", "original", n_users=5, n_books=5, n_ratings=5)
    assert detect_layout(tmp_path / "k") == "kaggle"
    assert detect_layout(tmp_path / "o") == "original"
    (tmp_path / "k" / "BX-Users.csv").write_bytes((tmp_path / "o" / "BX-Users.csv").read_bytes())
    assert detect_layout(tmp_path / "k") == "kaggle"  # like the shared folder


def test_detect_layout_error_names_both_file_sets(tmp_path: Path) -> None:
    (tmp_path / "Books.csv").write_text("ISBN\n")
    with pytest.raises(FileNotFoundError) as error:
        detect_layout(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    for name in ("Books.csv", "Users.csv", "Ratings.csv", "BX-Books.csv"):
        assert name in message
    assert "BX-Users.csv" in message and "BX-Book-Ratings.csv" in message


# --- generator CLI --------------------------------------------------------------


def test_sample_cli(tmp_path: Path, capsys) -> None:
    sample.main([str(tmp_path), "--layout", "original", "--users", "20", "--clean"])
    assert detect_layout(tmp_path) == "original"
    expected = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert expected["users.kept"] == 20
    raw = read_bookcrossing(tmp_path, progress=False)
    assert len(raw.users) == 20


# --- download -------------------------------------------------------------------


def test_download_unreachable_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DatasetUnavailable) as error:
        download_dataset(UNREACHABLE, tmp_path, timeout=5)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert UNREACHABLE in message and "BOOKREC_DATA" in message
    assert "refused" in message.lower()
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_extracts_zip(tmp_path: Path) -> None:
    write_sample(tmp_path / "src", "original", n_users=5, n_books=5, n_ratings=5)
    archive = tmp_path / "BX-CSV-Dump.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for csv_file in (tmp_path / "src").iterdir():
            zf.write(csv_file, f"BX-CSV-Dump/{csv_file.name}")
    folder = download_dataset(archive.as_uri(), tmp_path / "raw")
    assert folder == tmp_path / "raw" / "BX-CSV-Dump"
    assert detect_layout(folder) == "original"


def test_resolve_prefers_source_then_env(tmp_path: Path, monkeypatch) -> None:
    write_sample(tmp_path / "env", n_users=5, n_books=5, n_ratings=5)
    write_sample(tmp_path / "src", "original", n_users=5, n_books=5, n_ratings=5)
    monkeypatch.setenv("BOOKREC_DATA", str(tmp_path / "env"))
    dest = tmp_path / "raw"
    assert resolve_data_dir(None, UNREACHABLE, dest) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "src"), UNREACHABLE, dest) == tmp_path / "src"
    with pytest.raises(DatasetUnavailable, match="source folder"):
        resolve_data_dir(str(tmp_path / "nothing"), UNREACHABLE, dest)


def test_resolve_lists_what_was_tried(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BOOKREC_DATA", str(tmp_path / "missing"))
    with pytest.raises(DatasetUnavailable) as error:
        resolve_data_dir(None, UNREACHABLE, tmp_path / "raw")
    message = str(error.value)
    assert "$BOOKREC_DATA" in message and str(tmp_path / "missing") in message
    assert UNREACHABLE in message
    monkeypatch.delenv("BOOKREC_DATA")
    with pytest.raises(DatasetUnavailable, match=r"BOOKREC_DATA is not set"):
        resolve_data_dir(None, UNREACHABLE, tmp_path / "raw")


def test_download_cli_exit_code(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("BOOKREC_DATA", raising=False)
    code = download.main(["--url", UNREACHABLE, "--dest", str(tmp_path / "raw")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert UNREACHABLE in err and "Traceback" not in err
    monkeypatch.setenv("BOOKREC_DATA", str(tmp_path))
    write_sample(tmp_path, n_users=5, n_books=5, n_ratings=5)
    assert download.main(["--url", UNREACHABLE]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)


# --- real data ------------------------------------------------------------------


def test_real_bx_users_through_the_original_reader(tmp_path: Path) -> None:
    if not SHARED.is_dir() or not REAL_BX_USERS.is_file():
        pytest.skip("shared Book-Crossing data not present")
    (tmp_path / "BX-Users.csv").symlink_to(REAL_BX_USERS)
    _write(
        tmp_path / "BX-Books.csv",
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";'
        '"Image-URL-S";"Image-URL-M";"Image-URL-L"\r\n'
        '"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";'
        '"Oxford University Press";"s";"m";"l"\r\n',
        "latin-1",
    )
    _write(
        tmp_path / "BX-Book-Ratings.csv",
        '"User-ID";"ISBN";"Book-Rating"\r\n"2";"0195153448";"0"\r\n',
        "latin-1",
    )
    raw = read_bookcrossing(tmp_path, progress=False)
    c = raw.report.counts
    assert raw.report.layout == "original"
    assert len(raw.users) == c["users.rows_read"] == 278_858
    assert raw.report.bad_rows() == 0
    assert c["users.lines_read"] == 278_860  # header + one location with a line break
    assert c["users.age_missing"] == 110_762
    assert c["users.age_out_of_range"] == 1_248
    assert int(raw.users.age.notna().sum()) == 166_848
    assert raw.users.user_id.is_unique and raw.users.user_id.max() == 278_858
    # latin-1 "\xe5rhus, \\"n/a\\", denmark": decoded, unescaped, placeholder dropped
    assert _by(raw.users, "user_id", 268) == {
        "user_id": 268,
        "city": "århus",
        "region": None,
        "country": "denmark",
        "age": None,
    }
    assert _by(raw.users, "user_id", 212_081)["age"] == 31
    kaggle_copy = REAL_BX_USERS.parent
    if detect_layout(kaggle_copy) == "kaggle":  # same users, re-encoded: same table
        kaggle = read_bookcrossing(kaggle_copy, progress=False)
        pd.testing.assert_frame_equal(raw.users, kaggle.users)
    assert raw.ratings.to_dict("records") == [{"user_id": 2, "isbn": "0195153448", "rating": 0}]


def test_oversized_field_is_one_bad_row(tmp_path: Path) -> None:
    write_sample(tmp_path, n_users=5, n_books=5, n_ratings=5, malformed=False)
    with open(tmp_path / "Books.csv", "a", encoding="utf-8") as f:
        f.write(f'0000000019,"{"x" * 200_000}",A,1999,P\r\n0000000027,T,A,1999,P\r\n')
    raw = read_bookcrossing(tmp_path, progress=False)
    assert raw.report.counts["books.bad.csv_error"] == 1
    assert raw.report.counts["books.rows_read"] == 7
    assert "0000000027" in set(raw.books.isbn)
