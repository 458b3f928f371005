"""Write a small synthetic Book-Crossing dataset, in either layout, for tests and demos.

Ratings follow a known model, so a recommender trained on the sample can beat the
global mean::

    rating = clip(round(7 + user_bias + book_bias + affinity + noise), 1, 10)

where ``affinity`` depends on the user's country and age group and the book's
genre; a share of interactions (``implicit_share``, 20% by default; 62% in the
real dump) are implicit zeros.

Who rates what is skewed the way Book-Crossing is: users and books are drawn with
Zipf-like weights ``(rank + offset) ** -exponent`` (``USER_SKEW``, ``BOOK_SKEW``),
so a few readers rate thousands of books, most rate one, and a few books are read
by hundreds. At the full dump's shape (278,858 users, 271,379 books, 1,149,780
ratings, 62% implicit) restricted, like the shared 230k-rating copy, to explicit
ratings of books with at least 3 of them, the per-user Gini is 0.685 (copy: 0.678)
and the per-book Gini 0.488 (copy: 0.498); 165k users rate anything (the dump:
105k, so the generator has more one-off readers); see
``bench/bench_scale.py --compare``. Text varies like the dump's too: about one
author per 2.7 books and one publisher per 17, each with a genre, and one town per
five users, so almost every book and many users have their own text.

With ``malformed=True`` the files also carry every kind of problem the real dump has
(broken rows, duplicates, mojibake, placeholder locations, impossible ages and years). ``write_sample``
returns the counters that :func:`train.data.ingest.read_bookcrossing` must report.

Planted rows use fixed ids (users 1..9, the ``PLANTED_*`` ISBNs) so tests can look
them up; generated users have ids from 100 up.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import Counter
from pathlib import Path

GENRES = {
    "fantasy": (
        ["The Dragon", "The Wizard", "The Silver", "The Hidden", "The Last"],
        ["Queen", "Crown", "Kingdom", "Sword", "Throne"],
        ["Elena Thorn", "Marcus Vale", "Ivy Carrow"],
        ["Dragonfly Press", "Tor Books"],
    ),
    "mystery": (
        ["Murder at", "Death in", "The Case of", "Secrets of", "Shadows over"],
        ["Midnight", "the Manor", "Blackwood Hall", "the Harbour", "the Vicarage"],
        ["Agatha Moss", "Henry Fell", "Dora Quill"],
        ["Crime Club", "Bantam"],
    ),
    "romance": (
        ["A Summer", "Love in", "The Bride of", "Kisses in", "Forever in"],
        ["Paris", "Tuscany", "the Highlands", "Moonlight", "Spring"],
        ["Rose Ashby", "Clara Bell", "Sophie Lane"],
        ["Harlequin", "Avon"],
    ),
    "science fiction": (
        ["The Stars of", "Empire of", "Signal from", "The Machines of", "Voyage to"],
        ["Andromeda", "Mars", "the Void", "Orion", "Tomorrow"],
        ["Isaac Brandt", "Nora Kepler", "Leo Starling"],
        ["Ace", "Orbit"],
    ),
    "history": (
        ["The Fall of", "A History of", "The Rise of", "Letters from", "The War for"],
        ["Rome", "the Empire", "Byzantium", "the Republic", "Carthage"],
        ["Edward Gibbs", "Mary Beard-Stone", "Simon Hale"],
        ["Penguin", "Oxford University Press"],
    ),
    "cooking": (
        ["Simple", "The Joy of", "Everyday", "Slow", "Modern"],
        ["Baking", "Soups", "Italian Cooking", "Vegetables", "Desserts"],
        ["Julia Child-Hart", "Nigel Pepper", "Alice Waters-Ford"],
        ["Ten Speed Press", "Clarkson Potter"],
    ),
    "thriller": (
        ["The Silent", "Code", "The Final", "Deadly", "The Bourne"],
        ["Witness", "Red", "Protocol", "Target", "Conspiracy"],
        ["Jack Reacher-Stone", "Lee Child-Marsh", "Tom Clancy-Reed"],
        ["Dell", "Pocket Books"],
    ),
    "children": (
        ["The Little", "Where the", "The Very Hungry", "Goodnight", "The Cat in"],
        ["Prince", "Wild Things Are", "Caterpillar", "Moon", "Hat"],
        ["Roald Dale", "Beatrix Potts", "Eric Carle-Bright"],
        ["Puffin", "Scholastic"],
    ),
}

PLACES = {
    "usa": [("new york", "new york"), ("austin", "texas"), ("seattle", "washington")],
    "canada": [("toronto", "ontario"), ("montreal", "quebec")],
    "united kingdom": [("london", "england"), ("edinburgh", "scotland")],
    "germany": [("köln", "nordrhein-westfalen"), ("berlin", "berlin")],
    "spain": [("madrid", "madrid"), ("sevilla", "andalucía")],
    "australia": [("sydney", "new south wales"), ("melbourne", "victoria")],
}
AGE_GROUPS = ((5, 24), (25, 44), (45, 80))

# Zipf-like popularity (exponent, rank offset) of users and books, fitted to the shared copy.
USER_SKEW = (1.0, 2.0)
BOOK_SKEW = (0.8, 20.0)
# The dump's ratios: books per author, books per publisher, users per distinct town.
BOOKS_PER_AUTHOR = 2.7
BOOKS_PER_PUBLISHER = 17
USERS_PER_TOWN = 5

# Parts of generated names (authors, publishers, towns, title words).
FIRST_NAMES = (
    "Anna Ben Carla David Emma Frank Grace Hugo Iris James Karen Liam Maria Noah Olga Paul Quinn Rita "
    "Sam Tara Uma Victor Wendy Xavier Yara Zoe Alan Beth Colin Diana Eric Fiona George Helen Ian Julia "
    "Kevin Laura Martin Nina"
).split()
LAST_NAMES = (
    "Adams Baker Clark Dixon Evans Foster Grant Hughes Irving Jones Keller Lewis Morgan Nolan Owens "
    "Parker Quincy Reyes Shaw Turner Upton Vance Walsh Young Zimmer Archer Bishop Carver Doyle Ellis "
    "Fisher Gray Hayes Ingram Jensen Knight Lowe Mason Nash Oliver Price Reed Stone Tate Usher Vaughn "
    "Webb York Brandt Crane Drake Frost Hale Kerr Lane Marsh Pike Rowe Sloan Thorne"
).split()
NAME_SUFFIXES = ("", " Jr.", " III")
PUBLISHER_WORDS = (
    "Blue Red Golden Silver Green Black White Northern Southern Eastern Western Royal Little Grand Old "
    "New Bright Quiet Open Bold Heron Oak River Stone Harbor Lantern Raven Willow Falcon Maple Cedar "
    "Pine Fox Owl Bridge Tower Garden Valley Meadow Summit"
).split()
PUBLISHER_KINDS = ("Press", "Books", "Publishing", "House", "Editions", "Media", "& Sons", "Library")
TITLE_WORDS = (
    "Dark Lost Secret Broken Golden Silent Hidden Burning Frozen Wild Sweet Bitter Endless Forgotten "
    "Distant Crimson Hollow Quiet Stolen Shattered Twelfth Second Final Little Long Cold Bright Deep "
    "Empty Falling Rising Winter Summer Autumn Spring Midnight Morning Evening Northern Southern"
).split()
TOWN_PARTS = (
    (
        "ash",
        "bel",
        "cor",
        "dun",
        "el",
        "fair",
        "glen",
        "hol",
        "kings",
        "lin",
        "mar",
        "new",
        "oak",
        "port",
        "red",
        "stan",
        "thorn",
        "wood",
        "west",
        "brook",
    ),
    ("ford", "ton", "ville", "field", "burg", "dale", "mouth", "wick", "ham", "bury", "stead", "haven"),
)

USERS_HEADER = ["User-ID", "Location", "Age"]
BOOKS_HEADER = ["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication", "Publisher"]
IMAGE_HEADER = ["Image-URL-S", "Image-URL-M", "Image-URL-L"]
RATINGS_HEADER = ["User-ID", "ISBN", "Book-Rating"]
FILES = {
    "kaggle": ("Users.csv", "Books.csv", "Ratings.csv"),
    "original": ("BX-Users.csv", "BX-Books.csv", "BX-Book-Ratings.csv"),
}

# Fixed ISBNs of the planted books (valid ISBN-10 check digits).
PLANTED_MOJIBAKE = "0000000019"  # title "CafÃ© Stories", author "JosÃ© Saramago"
PLANTED_ENTITY = "0000000027"  # title "Salt &amp; Pepper", year 0
PLANTED_QUOTE = "0000000035"  # title 'The "Lost" Garden', year 2050
PLANTED_NEWLINE = "0000000043"  # title with a line break / runs of spaces, no year
PLANTED_LOWER_X = "000000006X"  # written with a lower-case x in Books
PLANTED_CURLY = "0000000078"  # title "Don’t Panic" (cp1252 quote)
PLANTED_BAD_YEAR = "0000000086"  # year "abc"
UNKNOWN_ISBN = "0000000094"  # rated, never described
UNKNOWN_USER = 99  # rates, has no user row
SHORT_ROW_ISBN = "0000000108"  # a books row with too few fields
PLANTED_ISBNS = (
    PLANTED_MOJIBAKE,
    PLANTED_ENTITY,
    PLANTED_QUOTE,
    PLANTED_NEWLINE,
    PLANTED_LOWER_X,
    PLANTED_CURLY,
    PLANTED_BAD_YEAR,
    UNKNOWN_ISBN,
    SHORT_ROW_ISBN,
)


def write_sample(
    folder: Path,
    layout: str = "kaggle",
    n_users: int = 300,
    n_books: int = 200,
    n_ratings: int = 4000,
    seed: int = 0,
    malformed: bool = True,
    image_urls: bool | None = None,
    implicit_share: float = 0.2,
) -> dict[str, int]:
    """Write users, books and ratings files; return the counts a reader must report.

    ``image_urls`` adds the three image-URL columns to the books file; by default
    the original layout has them and the Kaggle layout does not. ``implicit_share``
    is the share of ratings that are implicit zeros.
    """
    if not 0.0 <= implicit_share <= 1.0:
        raise ValueError(f"implicit_share must be within 0..1, got {implicit_share}")
    if layout not in FILES:
        raise ValueError(f"layout must be 'kaggle' or 'original', not {layout!r}")
    if n_ratings > n_users * n_books:
        raise ValueError("n_ratings exceeds the number of distinct user-book pairs")
    rng = random.Random(seed)
    expected: Counter[str] = Counter()
    kaggle = layout == "kaggle"

    users, user_groups = _regular_users(rng, n_users, kaggle, expected)
    books, book_genres = _regular_books(rng, n_books)
    ratings = _regular_ratings(rng, users, user_groups, books, book_genres, n_ratings, implicit_share)
    expected["users.kept"] += len(users)
    expected["books.kept"] += len(books)
    _tally_ratings(ratings, expected)
    if malformed:
        users += _planted_users(kaggle, expected)
        books += _planted_books(kaggle, expected)
        ratings += _planted_ratings(expected)

    with_images = (not kaggle) if image_urls is None else image_urls
    books_header = BOOKS_HEADER + (IMAGE_HEADER if with_images else [])
    if with_images:
        books = [_with_images(row) for row in books]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write = write_kaggle if kaggle else _write_original
    for name, header, rows, table in zip(
        FILES[layout],
        (USERS_HEADER, books_header, RATINGS_HEADER),
        (users, books, ratings),
        ("users", "books", "ratings"),
        strict=False,
    ):
        write(folder / name, header, rows)
        expected[f"{table}.rows_read"] += len(rows)
        line_breaks = sum(str(v).count("\n") for row in rows for v in row if v)
        expected[f"{table}.lines_read"] += 1 + len(rows) + line_breaks
    return dict(sorted(expected.items()))


# --- regular rows ---------------------------------------------------------------

Row = list  # fields as written: str, or None for NULL / empty


def _isbn10(rng: random.Random, taken: set[str]) -> str:
    while True:
        digits = [rng.randrange(10) for _ in range(9)]
        check = (11 - sum((10 - i) * d for i, d in enumerate(digits)) % 11) % 11
        isbn = "".join(map(str, digits)) + ("X" if check == 10 else str(check))
        if isbn not in taken:
            taken.add(isbn)
            return isbn


def _regular_users(
    rng: random.Random, n: int, kaggle: bool, expected: Counter[str]
) -> tuple[list[Row], dict[int, tuple[str, int]]]:
    users: list[Row] = []
    groups: dict[int, tuple[str, int]] = {}
    places = _places(rng, max(1, n // USERS_PER_TOWN))
    weights = _zipf_weights(len(places), 1.0, 2.0)
    for user_id in sorted(rng.sample(range(100, 100 + 5 * n), n)):
        country, city, region = rng.choices(places, cum_weights=weights)[0]
        if rng.random() < 0.1:
            region = "n/a"  # the dump's most common placeholder
        group = rng.randrange(len(AGE_GROUPS))
        age: int | None = rng.randint(*AGE_GROUPS[group])
        if rng.random() < 0.25:
            age = None  # unknown age; the group still shapes the ratings
            expected["users.age_missing"] += 1
        users.append([str(user_id), f"{city}, {region}, {country}", _age(age, kaggle)])
        groups[user_id] = (country, group)
    return users, groups


def _zipf_weights(n: int, exponent: float, offset: float) -> list[float]:
    """Cumulative weights ``(rank + offset) ** -exponent`` of ranks 1..n (for ``rng.choices``)."""
    total, out = 0.0, []
    for rank in range(1, n + 1):
        total += (rank + offset) ** -exponent
        out.append(total)
    return out


def _unique_names(rng: random.Random, n: int, parts: list[tuple[str, ...]], join) -> list[str]:
    """``n`` distinct names built by ``join`` from one choice of each of ``parts``."""
    sizes = [len(p) for p in parts]
    total = 1
    for size in sizes:
        total *= size
    names = []
    for code in rng.sample(range(total), min(n, total)):
        picked = []
        for part, size in zip(parts, sizes, strict=True):
            code, i = divmod(code, size)
            picked.append(part[i])
        names.append(join(*picked))
    return names


def _places(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """(country, city, region) of ``n`` towns: the named cities first, then generated towns."""
    places = [(c, city, region) for c, cities in PLACES.items() for city, region in cities]
    regions = {c: [r for _, r in cities] for c, cities in PLACES.items()}
    towns = _unique_names(
        rng, max(0, n - len(places)), [*TOWN_PARTS, ("", "s", " hill", " bay")], lambda a, b, c: a + b + c
    )
    for name in towns:
        country = rng.choice(list(PLACES))
        places.append((country, name, rng.choice(regions[country])))
    return places


def _genre_pools(rng: random.Random, n_books: int) -> dict[str, tuple[list[str], list[float], list[str], list[float]]]:
    """Authors and publishers of every genre (the named ones first, the most read) with cumulative
    Zipf weights, in the dump's numbers per book."""
    genres = list(GENRES)
    n_authors = max(0, round(n_books / BOOKS_PER_AUTHOR) - sum(len(g[2]) for g in GENRES.values()))
    n_publishers = max(0, round(n_books / BOOKS_PER_PUBLISHER) - sum(len(g[3]) for g in GENRES.values()))
    authors = _unique_names(
        rng,
        n_authors,
        [FIRST_NAMES, [chr(c) for c in range(65, 91)], LAST_NAMES, NAME_SUFFIXES],
        lambda f, i, last, suffix: f"{f} {i}. {last}{suffix}",
    )
    publishers = _unique_names(
        rng, n_publishers, [PUBLISHER_WORDS, PUBLISHER_WORDS, PUBLISHER_KINDS], lambda a, b, k: f"{a} {b} {k}"
    )
    pools = {}
    for n, genre in enumerate(genres):
        _, _, named_authors, named_publishers = GENRES[genre]
        a = [*named_authors, *authors[n :: len(genres)]]
        p = [*named_publishers, *publishers[n :: len(genres)]]
        pools[genre] = (a, _zipf_weights(len(a), 1.0, 1.0), p, _zipf_weights(len(p), 1.0, 1.0))
    return pools


def _age(age: int | None, kaggle: bool) -> str | None:
    if age is None:
        return None
    return f"{age}.0" if kaggle else str(age)  # the Kaggle export wrote floats


def _regular_books(rng: random.Random, n: int) -> tuple[list[Row], dict[str, str]]:
    taken = set(PLANTED_ISBNS)
    books: list[Row] = []
    genres: dict[str, str] = {}
    pools = _genre_pools(rng, n)
    for _ in range(n):
        genre = rng.choice(list(GENRES))
        starts, ends, _, _ = GENRES[genre]
        authors, author_weights, publishers, publisher_weights = pools[genre]
        isbn = _isbn10(rng, taken)
        middle = f"{rng.choice(TITLE_WORDS)} " if rng.random() < 0.6 else ""
        title = f"{rng.choice(starts)} {middle}{rng.choice(ends)}"
        year = str(rng.randint(1950, 2004))
        author = rng.choices(authors, cum_weights=author_weights)[0]
        books.append([isbn, title, author, year, rng.choices(publishers, cum_weights=publisher_weights)[0]])
        genres[isbn] = genre
    return books, genres


def _regular_ratings(
    rng: random.Random,
    users: list[Row],
    user_groups: dict[int, tuple[str, int]],
    books: list[Row],
    book_genres: dict[str, str],
    n: int,
    implicit_share: float = 0.2,
) -> list[Row]:
    genres = list(GENRES)
    country_affinity = {(c, g): rng.uniform(-1.5, 1.5) for c in PLACES for g in genres}
    age_affinity = {(a, g): rng.uniform(-1.0, 1.0) for a in range(3) for g in genres}
    user_bias = {int(u[0]): rng.gauss(0, 1) for u in users}
    book_bias = {b[0]: rng.gauss(0, 1) for b in books}
    pairs = _skewed_pairs(rng, sorted(user_bias), [b[0] for b in books], n)
    ratings: list[Row] = []
    for user_id, isbn in sorted(pairs):
        country, age_group = user_groups[user_id]
        genre = book_genres[isbn]
        score = (
            7.0
            + user_bias[user_id]
            + book_bias[isbn]
            + country_affinity[country, genre]
            + age_affinity[age_group, genre]
            + rng.gauss(0, 0.8)
        )
        rating = 0 if rng.random() < implicit_share else min(10, max(1, round(score)))
        ratings.append([str(user_id), isbn, str(rating)])
    rng.shuffle(ratings)
    return ratings


def _skewed_pairs(rng: random.Random, user_ids: list[int], isbns: list[str], n: int) -> set[tuple[int, str]]:
    """``n`` distinct (user, book) pairs, users and books drawn by Zipf weights over a random
    popularity order. Draws that repeat a pair are redrawn; once the heavy users and books are
    saturated (a sample that asks for most of the pairs there are), the rest is drawn uniformly."""
    users, books = user_ids[:], isbns[:]
    rng.shuffle(users)
    rng.shuffle(books)
    user_w, book_w = _zipf_weights(len(users), *USER_SKEW), _zipf_weights(len(books), *BOOK_SKEW)
    pairs: set[tuple[int, str]] = set()
    for _ in range(20):
        missing = n - len(pairs)
        if missing <= 0:
            break
        drawn = zip(
            rng.choices(users, cum_weights=user_w, k=missing),
            rng.choices(books, cum_weights=book_w, k=missing),
            strict=True,
        )
        before = len(pairs)
        pairs.update(drawn)
        if len(pairs) - before < missing // 4:
            break  # mostly repeats: skew cannot place the rest
    while len(pairs) < n:
        pairs.add((rng.choice(user_ids), rng.choice(isbns)))
    return pairs


def _tally_ratings(ratings: list[Row], expected: Counter[str]) -> None:
    for row in ratings:
        key = "ratings.implicit" if row[2] == "0" else "ratings.explicit"
        expected[key] += 1
        expected["ratings.kept"] += 1


# --- planted problems -----------------------------------------------------------


def _planted_users(kaggle: bool, expected: Counter[str]) -> list[Row]:
    newline = "new\nyork" if kaggle else "new york"
    rows: list[tuple[Row, tuple[str, ...]]] = [
        (["1", 'aarhus, "n/a", denmark', "0"], ("kept", "age_out_of_range")),
        (["2", "london, , united kingdom", "150"], ("kept", "age_out_of_range")),
        (["3", f"{newline}, new york, usa", None], ("kept", "age_missing")),
        (["4", "n/a, n/a, n/a", ""], ("kept", "age_missing")),
        (
            ["5", "mÃ¼nchen, bayern, germany", "abc"],
            ("kept", "repaired.location", "soft.age_unparseable"),
        ),
        (["6", "st. john's, newfoundland, nl, canada", _age(34, kaggle)], ("kept",)),
        (["7", "tokyo", _age(29, kaggle)], ("kept",)),
        (["7", "osaka, japan", _age(30, kaggle)], ("duplicates",)),
        (["abc", "paris, france", "20"], ("bad.bad_user_id",)),
        (["8", "berlin, germany"], ("bad.wrong_field_count",)),
        (["9", "xxx, ?, -", None], ("kept", "age_missing")),
    ]
    return _tally(rows, "users", expected)


def _planted_books(kaggle: bool, expected: Counter[str]) -> list[Row]:
    spaced = "The Dragon\nQueen  Returns" if kaggle else " The  Dragon Queen Returns "
    mojibake = PLANTED_MOJIBAKE
    rows: list[tuple[Row, tuple[str, ...]]] = [
        (
            [mojibake, "CafÃ© Stories", "JosÃ© Saramago", "1998", "Harvill"],
            ("kept", "repaired.title", "repaired.author"),
        ),
        (
            [
                PLANTED_ENTITY,
                "Salt &amp; Pepper",
                "Nigel Pepper",
                "0",
                "Ten Speed Press",
            ],
            ("kept", "repaired.title", "year_out_of_range"),
        ),
        (
            [PLANTED_QUOTE, 'The "Lost" Garden', "Ivy Carrow", "2050", "Tor Books"],
            ("kept", "year_out_of_range"),
        ),
        (
            [PLANTED_NEWLINE, spaced, "Elena Thorn", "", "Tor Books"],
            ("kept", "year_missing"),
        ),
        (
            [PLANTED_LOWER_X.lower(), "The Last Crown", "Marcus Vale", "2001", "Ace"],
            ("kept", "isbn_normalised"),
        ),
        (
            [
                PLANTED_CURLY,
                "Don\u2019t Panic",
                "Douglas Adams",
                "1988",
                "Pocket Books",
            ],
            ("kept", "repaired.title"),
        ),
        (
            [PLANTED_BAD_YEAR, "Code Red", "Lee Child-Marsh", "abc", "Dell"],
            ("kept", "soft.year_unparseable"),
        ),
        ([mojibake, "Another Title", "Someone", "1999", "Dell"], ("duplicates",)),
        (["", "Ghost Book", "Nobody", "2000", "Dell"], ("bad.empty_isbn",)),
        ([SHORT_ROW_ISBN, "Short Row"], ("bad.wrong_field_count",)),
    ]
    return _tally(rows, "books", expected)


def _planted_ratings(expected: Counter[str]) -> list[Row]:
    first: list[tuple[Row, tuple[str, ...]]] = [
        (["1", PLANTED_LOWER_X, "7"], ("kept", "explicit")),
        (["2", PLANTED_LOWER_X.lower(), "6"], ("kept", "explicit", "isbn_normalised")),
        (["2", PLANTED_MOJIBAKE, "8"], ("kept", "explicit")),  # then an implicit 0
        (["3", PLANTED_ENTITY, "3"], ("kept", "explicit")),  # then a 9 replaces it
        (["4", PLANTED_QUOTE, "0"], ()),  # then a 6: kept as explicit
        (["5", PLANTED_CURLY, "10"], ("kept", "explicit")),
        (["6", PLANTED_NEWLINE, "0"], ("kept", "implicit")),
        (["7", PLANTED_BAD_YEAR, "5"], ("kept", "explicit")),
        (["9", PLANTED_MOJIBAKE, "4"], ("kept", "explicit")),
        (["5", PLANTED_MOJIBAKE], ("bad.wrong_field_count",)),
        (["abc", PLANTED_MOJIBAKE, "5"], ("bad.bad_user_id",)),
        (["5", PLANTED_ENTITY, "11"], ("bad.rating_out_of_range",)),
        (["5", PLANTED_QUOTE, "abc"], ("bad.rating_not_integer",)),
        (["5", PLANTED_NEWLINE, ""], ("bad.rating_missing",)),
        (["5", "", "5"], ("bad.empty_isbn",)),
        (["5", UNKNOWN_ISBN, "5"], ("unknown_isbn", "dropped_unknown")),
        (
            [str(UNKNOWN_USER), PLANTED_MOJIBAKE, "5"],
            ("unknown_user", "dropped_unknown"),
        ),
        (
            ["8", PLANTED_ENTITY, "7"],
            ("unknown_user", "dropped_unknown"),
        ),  # bad user row
    ]
    again: list[tuple[Row, tuple[str, ...]]] = [
        (["2", PLANTED_MOJIBAKE, "0"], ("duplicates",)),
        (["3", PLANTED_ENTITY, "9"], ("duplicates",)),
        (["4", PLANTED_QUOTE, "6"], ("duplicates", "kept", "explicit")),
    ]
    return _tally(first + again, "ratings", expected)


def _tally(rows: list[tuple[Row, tuple[str, ...]]], table: str, expected: Counter[str]) -> list[Row]:
    for _, effects in rows:
        for effect in effects:
            expected[f"{table}.{effect}"] += 1
    return [row for row, _ in rows]


# --- writers --------------------------------------------------------------------


def _with_images(row: Row) -> Row:
    if len(row) != len(BOOKS_HEADER):
        return row  # a planted short row stays short
    base = f"http://images.amazon.com/images/P/{row[0]}.01"
    return [*row, f"{base}.THUMBZZZ.jpg", f"{base}.MZZZZZZZ.jpg", f"{base}.LZZZZZZZ.jpg"]


def write_kaggle(path: Path, header: list[str], rows: list[Row]) -> None:
    """One Book-Crossing table in the Kaggle layout (comma-separated, standard quoting; None empty)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)  # standard quoting, CRLF like the Kaggle files
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def _write_original(path: Path, header: list[str], rows: list[Row]) -> None:
    # The dump quotes every field, escapes quotes with a backslash, writes a bare
    # NULL for unknown values and is cp1252 (read back as latin-1).
    def field(value: str | None) -> str:
        if value is None:
            return "NULL"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [";".join(field(v) for v in row) + "\r\n" for row in [header, *rows]]
    with open(path, "w", encoding="cp1252", newline="") as f:
        f.writelines(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layout", choices=sorted(FILES), default="kaggle")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--books", type=int, default=200)
    parser.add_argument("--ratings", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean", action="store_true", help="no planted problems")
    parser.add_argument("--implicit-share", type=float, default=0.2, help="share of implicit zeros (dump: 0.62)")
    args = parser.parse_args(argv)
    expected = write_sample(
        args.out_dir,
        layout=args.layout,
        n_users=args.users,
        n_books=args.books,
        n_ratings=args.ratings,
        seed=args.seed,
        malformed=not args.clean,
        implicit_share=args.implicit_share,
    )
    print(f"wrote a {args.layout} sample to {args.out_dir}; expected counts:")
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
