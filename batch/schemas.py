"""Explicit Arrow schemas of everything the batch job writes.

``isbn`` is declared ``string``. In all-pairs mode the writer receives it as
``dictionary<int32, string>`` over the book set (no per-row string copies or hashing) and does not
store its Arrow schema in the file, so readers get exactly the declared schema while the Parquet
column is dictionary-encoded either way.
"""

from __future__ import annotations

import pyarrow as pa

USER_ID = pa.field("user_id", pa.int64(), nullable=False)
ISBN = pa.field("isbn", pa.string(), nullable=False)
SCORE = pa.field("score", pa.float32(), nullable=False)
RANK = pa.field("rank", pa.int32(), nullable=False)
# The two-stage rerank score the top-k is ordered by (retrieval logit + blend x predicted rating).
RELEVANCE = pa.field("relevance", pa.float32(), nullable=False)

# Why each top-k book is there (model/reasons.py): the sources that listed it ("towers", "graph",
# "author"), the history book behind a graph candidate (null: none), the history books by its author.
SOURCES = pa.field("sources", pa.list_(pa.string()), nullable=False)
BECAUSE_GRAPH = pa.field("because_graph", pa.string(), nullable=True)
BECAUSE_AUTHOR = pa.field("because_author", pa.list_(pa.string()), nullable=False)
# --mode similar: per query book (isbn), its similar books in rank order, fused score, sources.
SIMILAR_ISBN = pa.field("similar_isbn", pa.string(), nullable=False)

ALL_PAIRS = pa.schema([USER_ID, ISBN, SCORE])
TOP_K = pa.schema([USER_ID, RANK, ISBN, SCORE, RELEVANCE, SOURCES, BECAUSE_GRAPH, BECAUSE_AUTHOR])
SIMILAR = pa.schema([ISBN, RANK, SIMILAR_ISBN, SCORE, SOURCES])

DEAD_LETTERS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # "user" | "book"
        pa.field("id", pa.string(), nullable=False),  # user_id or isbn as given
        pa.field("reason", pa.string(), nullable=False),
    ]
)

ISBN_DICT_TYPE = pa.dictionary(pa.int32(), pa.string())


def output_schema(mode: str) -> pa.Schema:
    """The schema readers see for ``mode`` ("all", "topk" or "similar")."""
    return {"all": ALL_PAIRS, "topk": TOP_K, "similar": SIMILAR}[mode]


def writer_schema(mode: str) -> pa.Schema:
    """What the Parquet writer is fed. All-pairs: ``isbn`` dictionary-typed (every row group holds
    the whole book set anyway). Top-k: plain strings, so a row group stores only the ISBNs it uses."""
    schema = output_schema(mode)
    if mode != "all":
        return schema
    i = schema.get_field_index("isbn")
    return schema.set(i, pa.field("isbn", ISBN_DICT_TYPE, nullable=False))
