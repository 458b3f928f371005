"""An update folder for the tiny run's catalog (tests of ``python -m train update`` and the swap):
two new books, one changed, a new reader, new ratings, one withdrawn book, and one bad row of each
kind the update must count, skip and name."""

from __future__ import annotations

import csv
from pathlib import Path

NEW_BOOKS = ("1111111111", "2222222222")
NEW_USER = 900001
BAD_ROWS = 7  # below: 1 users, 2 books, 3 ratings, 1 withdrawn


def write_update(folder: Path, books: list[list], known_user: int, withdrawn: str) -> Path:
    """``books``: two catalog rows [isbn, title, author, year, publisher] (the first gets a new
    title, the second's author writes the first new book)."""
    folder.mkdir(parents=True, exist_ok=True)
    changed, other = books
    rows = {
        "Books.csv": [
            ["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"],
            [NEW_BOOKS[0], "A Second Helping", other[2], "2005", other[4]],
            [NEW_BOOKS[1], "Stars Over Nowhere", "Zed Newauthor", "2004", "New House Press"],
            ["", "No Isbn Here", "Someone", "2001", "X"],  # bad: empty ISBN (line 4)
            [changed[0], f"{changed[1]} (Revised)", changed[2], "2003", changed[4]],
            ["3333333333", "Broken", "a", "b", "c", "d"],  # bad: 6 fields (line 6)
        ],
        "Users.csv": [
            ["User-ID", "Location", "Age"],
            [str(NEW_USER), "lyon, rhone, france", "40"],
            ["abc", "x, y, z", "3"],  # bad: user id (line 3)
        ],
        "Ratings.csv": [
            ["User-ID", "ISBN", "Book-Rating"],
            [str(NEW_USER), NEW_BOOKS[0], "9"],
            [str(NEW_USER), other[0], "8"],
            [str(known_user), NEW_BOOKS[1], "7"],
            ["555555", NEW_BOOKS[0], "5"],  # bad: unknown user
            [str(NEW_USER), "9999999999", "4"],  # bad: unknown ISBN
            [str(known_user), NEW_BOOKS[0], "11"],  # bad: rating out of range (line 7)
        ],
    }
    for name, table in rows.items():
        with (folder / name).open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows(table)
    (folder / "withdrawn.txt").write_text(f"{withdrawn}\n# out of print\n0000000000\n")  # bad: unknown (line 3)
    return folder
