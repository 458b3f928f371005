"""Explicit Arrow schemas of every table the project writes."""

from __future__ import annotations

import pyarrow as pa

USERS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("city", pa.string()),
        pa.field("region", pa.string()),
        pa.field("country", pa.string()),
        pa.field("age", pa.int16()),
    ]
)

BOOKS = pa.schema(
    [
        pa.field("isbn", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("author", pa.string()),
        pa.field("year", pa.int16()),
        pa.field("publisher", pa.string()),
    ]
)

# rating 0 is an implicit interaction, 1..10 explicit.
RATINGS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("isbn", pa.string(), nullable=False),
        pa.field("rating", pa.int8(), nullable=False),
    ]
)

SPLITS = ("train", "val", "test", "cold_book", "cold_user", "cold_both", "implicit")

RATINGS_SPLIT = RATINGS.append(pa.field("split", pa.string(), nullable=False))

EMBEDDINGS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)
