"""The text each book and user turns into before the encoder sees it.

Training, serving and batch scoring all call these two functions, so a book or a user
gets the same text, hence the same embedding, everywhere.
"""

from __future__ import annotations

import math
import re
from typing import Any

UNKNOWN = "unknown"
USER_TEXT_PREFIX = "reader from "  # every user text starts so


def _clean(value: Any) -> str | None:
    """None for missing values (None, NaN, pandas NA, blank), else the stripped string."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        text = str(value).strip()
    except TypeError:  # pandas.NA refuses bool() but not str(); keep the guard for odd types
        return None
    if text in ("", "<NA>", "nan", "None"):
        return None
    return " ".join(text.split())


def book_text(title: Any, author: Any, year: Any, publisher: Any) -> str:
    """One line describing a book: title, author, year, publisher (unknown parts say so)."""
    year_text = _clean(year)
    if year_text is not None and year_text.endswith(".0"):
        year_text = year_text[:-2]
    return (
        f"{_clean(title) or UNKNOWN} by {_clean(author) or UNKNOWN}, "
        f"{year_text or UNKNOWN}, {_clean(publisher) or UNKNOWN}"
    )


def user_text(city: Any, region: Any, country: Any, age: Any) -> str:
    """One line describing a user: location from city to country, and age."""
    place = ", ".join(p for p in (_clean(city), _clean(region), _clean(country)) if p) or UNKNOWN
    age_text = _clean(age)
    if age_text is not None and age_text.endswith(".0"):
        age_text = age_text[:-2]
    return f"{USER_TEXT_PREFIX}{place}, age {age_text or UNKNOWN}"


def book_texts(books: Any) -> list[str]:
    """``book_text`` of every row of a frame with title, author, year, publisher columns."""
    return [book_text(*row) for row in books[["title", "author", "year", "publisher"]].itertuples(index=False)]


def user_texts(users: Any) -> list[str]:
    """``user_text`` of every row of a frame with city, region, country, age columns."""
    return [user_text(*row) for row in users[["city", "region", "country", "age"]].itertuples(index=False)]


_NON_WORD = re.compile(r"[\W_]+")


def group_key(value: Any) -> str | None:
    """Normalised author or publisher name used to pool ratings across books (None if missing)."""
    text = _clean(value)
    if text is None:
        return None
    key = _NON_WORD.sub(" ", text.lower()).strip()
    return key or None
