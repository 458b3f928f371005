"""``python -m train update``: a new model version from the tiny run and an update folder, without
retraining; the source untouched, the version verified, bad rows counted and named, withdrawn books
never recommended, and a failed update writing nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import layout
from model.artifacts import ModelFolder
from model.manifest import file_sha256
from tests.update_inputs import BAD_ROWS, NEW_BOOKS, NEW_USER, write_update
from train.update.build import build_version

REPO = Path(__file__).resolve().parents[1]


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def top_lists(loaded, k: int = 20) -> np.ndarray:
    """Every known reader's top-k catalog rows, read books left out."""
    catalog = loaded.catalog
    users = list(range(len(catalog.users)))
    history = [catalog.rated_by(u) for u in users]
    return loaded.recommender.recommend(catalog.user_feats, history, k, exclude=history).rows.numpy()


def update_for(run: Path, folder: Path) -> tuple[Path, dict]:
    """The update folder for ``run``'s catalog, withdrawing the book most often first in its lists."""
    source = ModelFolder(run).load()
    books = source.catalog.books
    first = top_lists(source)[:, 0]
    withdrawn = str(books["isbn"].iat[int(np.bincount(first[first >= 0]).argmax())])
    known_user = int(source.catalog.history["user_id"].value_counts().index[0])
    picks = [books.iloc[i].tolist() for i in (0, 1)]
    write_update(folder, picks, known_user, withdrawn)
    return folder, {"withdrawn": withdrawn, "known_user": known_user, "changed": picks[0][0], "source": source}


@pytest.fixture(scope="module")
def updated(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("update")
    before = tree_hashes(tiny_run)
    folder, info = update_for(tiny_run, root / "input")
    record = build_version(tiny_run, folder, root / "v2")
    return {**info, "record": record, "out": root / "v2", "before": before, "run": tiny_run}


def test_the_source_is_untouched_and_the_version_verifies(updated: dict) -> None:
    assert tree_hashes(updated["run"]) == updated["before"]
    out = updated["out"]
    ModelFolder(out).verify(serving=True)
    record = json.loads((out / layout.UPDATE_RECORD).read_text())
    assert record["version"] == "2.0"
    assert record["source"]["manifest_sha256"] == file_sha256(updated["run"] / layout.MANIFEST_FILE)
    assert set(record["inputs"]) == {"books", "users", "ratings", "withdrawn"}
    assert all(len(entry["sha256"]) == 64 for entry in record["inputs"].values())
    assert layout.catalog_path(layout.WITHDRAWN_FILE) in json.loads((out / layout.MANIFEST_FILE).read_text())["files"]


def test_bad_rows_are_counted_skipped_and_named(updated: dict) -> None:
    record = updated["record"]
    assert record["bad_rows"] == BAD_ROWS
    named = "\n".join(record["rejected"])
    for where in (
        "Books.csv:4: empty_isbn",
        "Books.csv:6: wrong_field_count",
        "Users.csv:3: bad_user_id",
        "Ratings.csv:7: rating_out_of_range",
        "user 555555, ISBN 1111111111: unknown_user",
        "ISBN 9999999999: unknown_isbn",
        "withdrawn.txt:3: unknown_isbn",
    ):
        assert where in named, where
    counts = record["counts"]
    assert (counts["new_books"], counts["changed_books"], counts["new_users"]) == (2, 1, 1)
    assert (counts["new_ratings"], counts["newly_withdrawn"]) == (3, 1)


def test_new_books_users_and_ratings_reach_the_model(updated: dict) -> None:
    source = updated["source"]
    new = ModelFolder(updated["out"]).load()
    catalog, n_old = new.catalog, len(source.catalog.books)
    assert catalog.books["isbn"].tolist()[:n_old] == source.catalog.books["isbn"].tolist()  # rows kept
    assert catalog.books["isbn"].tolist()[n_old:] == list(NEW_BOOKS)
    changed = catalog.book_index[updated["changed"]]
    assert catalog.books["title"].iat[changed].endswith("(Revised)")
    assert not torch.equal(catalog.book_emb[changed], source.catalog.book_emb[changed])  # re-embedded
    reader = catalog.user_index[NEW_USER]
    assert sorted(catalog.books["isbn"].iloc[catalog.rated_by(reader)]) == sorted(
        [NEW_BOOKS[0], source.catalog.books["isbn"].iat[1]]
    )
    known = updated["known_user"]
    row = catalog.user_index[known]
    assert NEW_BOOKS[1] in catalog.books["isbn"].iloc[catalog.rated_by(row)].tolist()
    assert not torch.equal(catalog.user_feats[row], source.catalog.user_feats[source.catalog.user_index[known]])
    # the new books have tower vectors and rating projections, and the item graph covers them
    assert new.recommender.n_books == n_old + 2 == new.scorer.n_books
    graph = ModelFolder(updated["out"]).item_graph()
    assert graph.n_books == n_old + 2 and graph.weights[catalog.book_index[NEW_BOOKS[1]]].nnz > 0
    assert updated["record"]["item_graph"]["rebuilt"]
    lists = top_lists(new, k=len(catalog.books))  # every book a reader has not read, ranked
    assert np.isin(n_old, lists) and np.isin(n_old + 1, lists)


def test_withdrawn_books_are_never_recommended(updated: dict) -> None:
    source, new = updated["source"], ModelFolder(updated["out"]).load()
    row = source.catalog.book_index[updated["withdrawn"]]
    assert (top_lists(source)[:, 0] == row).sum() > 0  # it led lists before
    assert not np.isin(row, top_lists(new, k=len(new.catalog.books)))
    assert new.catalog.withdrawn.tolist() == [row]


def test_one_new_book_leaves_the_known_books_as_they_were(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Books.csv").write_text(
        "ISBN,Book-Title,Book-Author,Year-Of-Publication,Publisher\n4444444444,Lone Arrival,Nobody Known,2004,Q\n"
    )
    record = build_version(tiny_run, tmp_path / "in", tmp_path / "v2", version="1.1")
    assert record["item_graph"] == {
        "rebuilt": False,
        "books": record["counts"]["books"],
        "edges": record["item_graph"]["edges"],
    }
    old, new = ModelFolder(tiny_run), ModelFolder(tmp_path / "v2")
    n = len(old.load_catalog().books)
    np.testing.assert_array_equal(new.book_vectors()[:n], old.book_vectors())
    assert (old.item_graph().weights != new.item_graph().weights[:n, :n]).nnz == 0


def run_update(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", "update", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_bad_input_file_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Books.csv").write_text("Title,Author\nA,B\n")  # no ISBN column
    proc = run_update("--model", str(tiny_run), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "v2"))
    assert proc.returncode == 2 and "lacks column(s) ['isbn'" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no version, no staging folder left


def test_a_corrupt_source_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "run"
    shutil.copytree(tiny_run, source, ignore=shutil.ignore_patterns("data", "distill"))
    vectors = source / layout.BOOK_VECTORS
    raw = bytearray(vectors.read_bytes())
    raw[-1] ^= 0xFF
    vectors.write_bytes(bytes(raw))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "withdrawn.txt").write_text("0999999990\n")
    proc = run_update("--model", str(source), "--input", str(tmp_path / "in"), "--out", str(tmp_path / "v2"))
    assert proc.returncode == 2 and "book_vectors.npy: SHA-256 differs" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "run"]


def test_a_known_readers_new_ratings_count_as_an_update_would_count_them(tiny_run: Path, tmp_path: Path) -> None:
    """A ``user_id`` request carrying the reader's ratings since the version was built: the features
    are the ones an update joining those ratings gives the reader, and the books are treated as read."""
    from handlers.engine import BookrecEngine

    engine = BookrecEngine(tiny_run)
    catalog = engine.catalog
    user = int(catalog.history["user_id"].value_counts().index[0])
    row = catalog.user_index[user]
    read = catalog.rated_by(row)
    explicit = read[catalog.rated_values[catalog.rated_bounds[row] : catalog.rated_bounds[row + 1]] > 0]
    unread = [i for i in range(len(catalog.books)) if i not in set(read)][:2]
    picks = [*unread, int(explicit[0])]  # two new reads and one book rated again
    isbns = [str(catalog.books["isbn"].iat[i]) for i in picks]
    ratings = [{"isbn": isbn, "rating": value} for isbn, value in zip(isbns, (9, 2, 1), strict=True)]

    (tmp_path / "in").mkdir()
    lines = "".join(f"{user},{r['isbn']},{r['rating']}\n" for r in ratings)
    (tmp_path / "in" / "Ratings.csv").write_text("User-ID,ISBN,Book-Rating\n" + lines)
    build_version(tiny_run, tmp_path / "in", tmp_path / "v2")
    updated = ModelFolder(tmp_path / "v2").load_catalog()
    asked = catalog.known_user_features([row], torch.zeros(3, dtype=torch.long), isbns, torch.tensor([9.0, 2.0, 1.0]))
    torch.testing.assert_close(asked[0], updated.user_feats[updated.user_index[user]])
    assert not torch.allclose(asked[0], catalog.user_feats[row])

    [(status, answer)] = engine.run([{"action": "recommend", "user": {"user_id": user, "ratings": ratings}, "k": 50}])
    assert status == 200 and answer["user"] == {"user_id": user, "known": True, "ratings_used": 3}
    assert not set(isbns) & {item["isbn"] for item in answer["recommendations"]}


def test_new_books_are_embedded_as_the_worker_embeds_them(updated: dict) -> None:
    """The update embeds with the serving form of the encoder (``load_serving_encoder``, what a
    worker embeds a new book's text with), which gives training's vectors within float rounding."""
    from model.encoder import has_scripted, load_saved_encoder, load_serving_encoder
    from model.text import book_texts

    folder = ModelFolder(updated["out"])
    encoder_dir = folder / layout.ENCODER_DIR
    assert has_scripted(encoder_dir)
    catalog = folder.load_catalog()
    rows = [catalog.book_index[isbn] for isbn in (*NEW_BOOKS, updated["changed"])]
    texts = book_texts(catalog.books.iloc[rows])
    stored = catalog.book_emb[rows].numpy()
    np.testing.assert_allclose(stored, load_serving_encoder(encoder_dir).embed(texts), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stored, load_saved_encoder(encoder_dir).embed(texts), atol=1e-5, rtol=0)
