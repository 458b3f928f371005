"""The model folder's layout: every file name of a training run folder and of a ``.mar``, once.

A run folder and an unpacked ``bookrec.mar`` share one layout (the archive copies what serving and
batch need), so these names are the contract between training, the archive, the handler and the
batch job. ``model/artifacts.py`` reads and checks folders laid out this way.
"""

from __future__ import annotations

# The rating MLP, one file per variant; "scripted" is the one that ships.
MODEL_FILES = {
    "fp32": "model_fp32.pt",
    "pruned": "model_pruned.pt",
    "int8": "model_int8.pt",
    "scripted": "model_scripted.pt",
}
SHIPPED_VARIANT = "scripted"

# The retrieval towers (TorchScript), their rerank settings (candidates, blend, precision), and one
# unit vector per catalog book.
RETRIEVAL_FILE = "retrieval_scripted.pt"
RETRIEVAL_SETTINGS = "retrieval_settings.json"
BOOK_VECTORS = "book_vectors.npy"

# The ranking stage (optional: a run without the ranking step serves the towers' order): the
# RP3beta item-item graph over catalog rows, the learned ranker (TorchScript) and its settings
# (whether it is on, how many candidates each extra source adds).
ITEM_GRAPH = "item_graph.npz"
RANKER_FILE = "ranker_scripted.pt"
RANKING_SETTINGS = "ranking_settings.json"
RANKING_FILES = (ITEM_GRAPH, RANKER_FILE, RANKING_SETTINGS)

# The approximate nearest-neighbour index over the book vectors (optional: catalogs below the
# threshold, ``model/book_index.py``, are searched exhaustively) and its settings.
BOOK_INDEX = "book_index.faiss"
BOOK_INDEX_SETTINGS = "book_index.json"
INDEX_FILES = (BOOK_INDEX, BOOK_INDEX_SETTINGS)

# The text encoder (weights, tokenizer, encoder.json) and its own description. The worker embeds with
# the TorchScript trace of the BERT model and its pooling and with the ``tokenizers`` tokenizer, so it
# never imports transformers (the other files are training's and an older model's way back in).
ENCODER_DIR = "encoder"
ENCODER_META = "encoder.json"
ENCODER_CONFIG = "config.json"
ENCODER_SCRIPTED = "encoder_scripted.pt"
ENCODER_TOKENIZER = "tokenizer.json"

# Known books and users with their text embeddings, the training history and the feature spec.
CATALOG_DIR = "catalog"
BOOKS_FILE = "books.parquet"
USERS_FILE = "users.parquet"
HISTORY_FILE = "history.parquet"
SPEC_FILE = "feature_spec.json"
CATALOG_FILES = (BOOKS_FILE, USERS_FILE, HISTORY_FILE, SPEC_FILE)
# Optional: the ISBNs of catalog books withdrawn by a catalog update (out of print), never recommended.
WITHDRAWN_FILE = "withdrawn.json"
# Optional, both or neither (folders written before them have neither): every catalog book's and
# user's feature vector, float32 in catalog row order, as ``Catalog.from_tables`` computes them.
# A worker maps them instead of computing them from the training history at every start.
BOOK_FEATURES_FILE = "book_features.npy"
USER_FEATURES_FILE = "user_features.npy"
FEATURE_FILES = (BOOK_FEATURES_FILE, USER_FEATURES_FILE)

# Every file the model needs with its size and SHA-256, and the stages it has (``model/manifest.py``):
# written by training, copied into the archive, verified before a model is served or scored.
MANIFEST_FILE = "manifest.json"

# Run folder only: what the run was made from and what it measured (the model folder reads none of
# these; the settings serving needs are files of their own above).
CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
# Which config (hash) and code each step last ran with (``train/run_record.py``).
STEPS_RECORD = "steps.json"
FINGERPRINT_FILE = "fingerprint.json"
FEATURES_REPORT = "features.json"
TRAIN_REPORT = "train.json"
COMPRESSION_REPORT = "compression.json"
RETRIEVAL_REPORT = "retrieval.json"
RANKING_REPORT = "ranking.json"
EVALUATION_REPORT = "evaluation.json"
EVALUATION_TABLE = "evaluation.md"
TIMINGS_FILE = "timings.json"
METRICS_LOG = "metrics.jsonl"
LEARNING_CURVE = "learning_curve.png"

# Run folder only: the distilled student (when encoder.name is "distilled") and its report; the
# shipped encoder is the copy under ENCODER_DIR.
DISTILL_DIR = "distill"
DISTILL_STUDENT = "student"
DISTILL_REPORT = "distill.json"

# Run folder only: the cleaned, split input tables (not shipped).
DATA_DIR = "data"
DATA_USERS = "users.parquet"
DATA_BOOKS = "books.parquet"
DATA_RATINGS = "ratings.parquet"
INGEST_REPORT = "ingest_report.json"

# Version folder only: what a catalog update (``python -m train update``) was built from and did.
UPDATE_RECORD = "update.json"

# Archive only: what ``serving/archive.py`` adds (the .mar's own manifest is TorchServe's).
METADATA_FILE = "metadata.json"
MODEL_CONFIG = "model-config.yaml"


def catalog_path(name: str) -> str:
    """A catalog file's path relative to the folder root."""
    return f"{CATALOG_DIR}/{name}"


def catalog_feature_paths() -> tuple[str, ...]:
    """The catalog's feature files, relative to the model folder."""
    return tuple(catalog_path(name) for name in FEATURE_FILES)


def encoder_path(name: str) -> str:
    """An encoder file's path relative to the folder root."""
    return f"{ENCODER_DIR}/{name}"


# What scoring needs in any model folder (run folder or .mar), besides the rating model variant.
SCORING_FILES = (RETRIEVAL_FILE, RETRIEVAL_SETTINGS, BOOK_VECTORS, *(catalog_path(f) for f in CATALOG_FILES))
# What serving needs on top: new users and books are embedded with the run's own encoder.
SERVING_FILES = (encoder_path(ENCODER_META), encoder_path(ENCODER_CONFIG))
