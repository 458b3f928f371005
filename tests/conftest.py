"""Shared fixtures: a tiny model trained once per test session on the generated sample."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from train.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_config(run_dir: Path, source: Path, cache: Path) -> Config:
    """A config small enough to train in seconds: sample data, random-init encoder, tiny MLP."""
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"data.source={source}",
            "encoder.random_init=true",
            "encoder.vocab_size=1000",
            f"encoder.cache_dir={cache}",
            f"eval.baseline_cache={cache}/topk-baselines",
            "model.hidden=[32, 16]",
            "split.folds=3",
            "train.epochs=4",
            "train.lr=0.003",
            "train.batch_size=256",
            "train.patience=2",
            "compress.finetune_epochs=1",
            "compress.latency_repeats=3",
            "retrieval.dim=16",
            "retrieval.hidden=32",
            "retrieval.batch_size=256",
            "retrieval.epochs=6",
            "retrieval.val_users=200",
            # The tiny run's 22 report readers cannot tell the ranker from the towers: ship it on,
            # so every test of recommend, batch top-K and evaluation goes through the ranker.
            "ranking.require_gain=false",
            "ranking.latency_repeats=3",
        ],
    )


# Fixtures whose use makes a test one of the slow kinds (see pyproject's markers).
SLOW_FIXTURES = {"tiny_run": "training"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the tiny run (directly or through the store or the unpacked archive built
    from it) needs the training job: mark it so ``-m "not training"`` leaves it out."""
    for item in items:
        for fixture, marker in SLOW_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


# A new arrival: in the books file, rated by nobody: a new edition of the sample's most-read book.
NEW_BOOK = "0999999990"


def add_unrated_book(folder: Path) -> None:
    """Append ``NEW_BOOK`` to a Kaggle-layout books file: the title, author, year and publisher of
    the most-rated book under a new ISBN, so it has content to be recommended by and no rating."""
    with (folder / "Ratings.csv").open(encoding="utf-8", newline="") as fh:
        counts = Counter(row[1] for row in list(csv.reader(fh))[1:])
    with (folder / "Books.csv").open(encoding="utf-8", newline="") as fh:
        books = {row[0]: row for row in list(csv.reader(fh))[1:] if row}
    top = next(isbn for isbn, _ in counts.most_common() if isbn in books)
    with (folder / "Books.csv").open("a", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow([NEW_BOOK, *books[top][1:5]])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run folder (data, catalog, encoder, fp32/pruned/int8/scripted models, evaluation),
    produced by the real command line, ``python -m train run``, on the generated sample."""
    from train.data.sample import write_sample

    root = tmp_path_factory.mktemp("tiny-run")
    write_sample(root / "csv", layout="kaggle", n_users=300, n_books=200, n_ratings=5000, seed=0)
    add_unrated_book(root / "csv")
    tiny_config(root / "run", root / "csv", root / "cache").save(root / "tiny.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "run", "--config", str(root / "tiny.yaml"), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (root / "train.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "run"


# Test archives batch for up to 50 ms so concurrent test requests reliably share a batch.
TEST_BATCH_DELAY_MS = 50


@pytest.fixture(scope="session")
def tiny_store(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding bookrec.mar built from the tiny run."""
    from serving.archive import build_archive

    store = tmp_path_factory.mktemp("model-store")
    build_archive(tiny_run, store, workers=1, batch_size=32, max_batch_delay=TEST_BATCH_DELAY_MS)
    return store


@pytest.fixture(scope="session")
def model_dir(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive unpacked the way TorchServe unpacks it."""
    import zipfile

    folder = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(tiny_store / "bookrec.mar") as zf:
        zf.extractall(folder)
    return folder
