"""The request sample the handler writes and the drift check that reads it (``python -m serving.drift``).

Traffic is answered by the real engine on the tiny archive and written by the handler's own
``DriftSampler``; the check runs as the real command line against the tiny run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from handlers import serving_metrics
from handlers.drift_sample import DriftSampler, default_path
from handlers.engine import BookrecEngine
from tests.conftest import REPO

RAW_KEYS = {"ts", "action", "user_known", "age", "country"}


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> BookrecEngine:
    return BookrecEngine(model_dir)


def held_out_requests(run_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """One request per held-out rating (a random 60% of them), as the evaluation served it:
    cold-start users as new users (location, age), cold-start books as new books (title, author,
    year, publisher); every fifth a recommend request for that user."""
    data = run_dir / "data"
    ratings = pq.read_table(data / "ratings.parquet").to_pandas()
    users = pq.read_table(data / "users.parquet").to_pandas().set_index("user_id")
    books = pq.read_table(data / "books.parquet").to_pandas().set_index("isbn")
    held = ratings[ratings["split"].isin(["val", "test", "cold_user", "cold_book", "cold_both"])]
    bodies = []
    for n, row in enumerate(held.sample(frac=0.6, random_state=seed).itertuples()):
        if row.split in ("cold_user", "cold_both"):
            u = users.loc[row.user_id]
            user = {k: u[k] for k in ("city", "country") if isinstance(u[k], str) and u[k]}
            if not pd.isna(u["age"]):
                user["age"] = int(u["age"])
            user = user or {"country": None}
        else:
            user = {"user_id": int(row.user_id)}
        if n % 5 == 4:
            bodies.append({"action": "recommend", "user": user, "k": 5})
            continue
        if row.split in ("cold_book", "cold_both"):
            b = books.loc[row.isbn]
            book = {"title": b["title"], "author": b["author"] if isinstance(b["author"], str) else None}
            if not pd.isna(b["year"]):
                book["year"] = int(b["year"])
        else:
            book = row.isbn
        bodies.append({"action": "rate", "user": user, "books": [book]})
    return bodies


def serve(engine: BookrecEngine, sampler: DriftSampler, bodies: list[Any], batch: int = 32) -> list:
    results = []
    for start in range(0, len(bodies), batch):
        part = bodies[start : start + batch]
        answered = engine.run(part)
        sampler.record(part, answered)
        results += answered
    return results


def drift_cli(run: Path, log: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serving.drift", "--run", str(run), "--requests", str(log), "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_traffic_like_the_held_out_data_passes(tiny_run: Path, engine: BookrecEngine, tmp_path: Path) -> None:
    sampler = DriftSampler(tmp_path / "logs" / "drift-sample.w9000.jsonl", engine.catalog.users)
    bodies = held_out_requests(tiny_run)
    results = serve(engine, sampler, bodies)
    assert all(status == 200 for status, _ in results)
    proc = drift_cli(tiny_run, tmp_path / "logs", tmp_path / "report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "drift.json").read_text())
    assert report["n_requests"] == len(bodies) and report["drifted"] == []
    names = [f["name"] for f in report["features"]]
    assert names[:4] == ["user age", "user country", "new-user share", "new-book share"]
    assert "book text embedding PC1" in names and "predicted rating (rate)" in names
    assert all(f["psi"] is not None and f["psi"] < 0.25 for f in report["features"]), report["features"]
    assert (tmp_path / "report" / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "no drift" in (tmp_path / "report" / "drift.md").read_text()


def test_shifted_traffic_fails_naming_the_features(tiny_run: Path, engine: BookrecEngine, tmp_path: Path) -> None:
    """All users new, from a country the data never had, aged 90 or more."""
    sampler = DriftSampler(tmp_path / "drift-sample.jsonl", engine.catalog.users)
    isbns = engine.catalog.books["isbn"].tolist()
    rng = np.random.default_rng(1)
    bodies = [
        {
            "action": "rate",
            "user": {"city": "poseidonis", "country": "atlantis", "age": int(rng.integers(90, 101))},
            "books": [isbns[int(i)] for i in rng.integers(0, len(isbns), 2)],
        }
        for _ in range(300)
    ]
    serve(engine, sampler, bodies)
    proc = drift_cli(tiny_run, tmp_path / "drift-sample.jsonl", tmp_path / "report")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    drifted = json.loads((tmp_path / "report" / "drift.json").read_text())["drifted"]
    assert {"user age", "user country", "new-user share"} <= set(drifted)
    assert "drift: user age, user country, new-user share" in proc.stderr
    assert "**DRIFT** in: user age" in (tmp_path / "report" / "drift.md").read_text()


def _leaves(record: object) -> set:
    """Every scalar value in a parsed JSON record, however deeply nested."""
    if isinstance(record, dict):
        return set().union(*(_leaves(v) for v in record.values()))
    if isinstance(record, list):
        return set().union(*(_leaves(v) for v in record))
    return {record}


def test_sample_holds_features_not_bodies_and_rotates(engine: BookrecEngine, tmp_path: Path) -> None:
    isbn = engine.catalog.books["isbn"].iat[0]
    user_id = int(engine.catalog.users["user_id"].iat[0])
    secret = "221b baker street"
    bodies = [
        {"action": "rate", "user": {"city": secret, "country": "UK ", "age": 40}, "books": [isbn, {"title": "T"}]},
        {"action": "recommend", "user": {"user_id": user_id}, "k": 3},
        {"action": "rate", "user": {"user_id": user_id}, "books": ["no-such-isbn"]},  # 404: not sampled
    ]
    path = tmp_path / "s.jsonl"
    sampler = DriftSampler(path, engine.catalog.users)
    assert sampler.record(bodies, engine.run(bodies)) == 2
    text = path.read_text()
    assert secret not in text
    first, second = (json.loads(line) for line in text.splitlines())
    # the id is checked among the values, not the text: a timestamp may contain its digits
    assert "user_id" not in first and "user_id" not in second
    ids = {v for v in _leaves(first) | _leaves(second) if type(v) is int or isinstance(v, str)}
    assert user_id not in ids and str(user_id) not in ids
    assert set(first) == RAW_KEYS | {"books", "new_books", "isbns", "new_book_texts", "ratings"}
    assert first["country"] == "uk" and first["new_books"] == 1 and first["isbns"] == [isbn]
    assert set(second) == RAW_KEYS | {"scores"} and second["user_known"] and len(second["scores"]) == 3
    with_ids = DriftSampler(tmp_path / "ids.jsonl", engine.catalog.users, user_ids=True)
    with_ids.record(bodies[1:2], engine.run(bodies[1:2]))
    assert json.loads((tmp_path / "ids.jsonl").read_text())["user_id"] == user_id

    small = DriftSampler(tmp_path / "r" / "s.jsonl", engine.catalog.users, max_bytes=2000, backups=2)
    for _ in range(40):
        small.record(bodies[:1], engine.run(bodies[:1]))
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == ["s.jsonl", "s.jsonl.1", "s.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in (tmp_path / "r").iterdir())


def test_sample_location_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_path({}) is None  # in-process (tests, benchmark): off unless asked
    assert default_path({"BOOKREC_DRIFT_LOG": "off"}) is None
    path = default_path({"BOOKREC_DRIFT_LOG": str(tmp_path / "x.jsonl")})
    assert path.parent == tmp_path and path.name.startswith("x.p") and path.suffix == ".jsonl"
    monkeypatch.setattr(sys, "argv", ["model_service_worker.py", "--sock-name", "/tmp/.ts.sock.9001"])
    assert default_path({"LOG_LOCATION": str(tmp_path)}) == tmp_path / "drift-sample.w9001.jsonl"
    assert default_path({"PWD": str(tmp_path)}) == tmp_path / "logs" / "drift-sample.w9001.jsonl"


def test_drift_check_rejects_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    proc = drift_cli(tiny_run, tmp_path / "missing.jsonl", tmp_path / "out")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    (tmp_path / "junk.jsonl").write_text("not json\n{}\n")
    proc = drift_cli(tiny_run, tmp_path / "junk.jsonl", tmp_path / "out")
    assert proc.returncode == 2 and "no request samples" in proc.stderr
    proc = drift_cli(tmp_path, tmp_path / "junk.jsonl", tmp_path / "out")
    assert proc.returncode == 2 and "not a complete training run" in proc.stderr


def test_metrics_tally_of_a_batch(engine: BookrecEngine) -> None:
    isbns = engine.catalog.books["isbn"].tolist()
    user_id = int(engine.catalog.users["user_id"].iat[0])
    bodies = [
        {"action": "rate", "user": {"user_id": user_id}, "books": [isbns[0], {"title": "New"}, isbns[1]]},
        {"action": "rate", "user": {"country": "spain"}, "books": [isbns[2]]},
        {"action": "recommend", "user": {"user_id": user_id}, "k": 4},
        {"action": "rate", "user": {"user_id": user_id}, "books": [isbns[0], {"title": "x", "year": "1999"}]},
        {"action": "recommend", "user": {"user_id": -12345}},
        b"not json",
    ]
    results = engine.run(bodies)
    counts = serving_metrics.tally(bodies, results)

    def get(name: str, **labels: str) -> float:
        return counts.get((name, tuple(sorted(labels.items()))), 0)

    assert get("bookrec_requests", action="rate") == 3 and get("bookrec_requests", action="recommend") == 2
    assert get("bookrec_requests", action="invalid") == 1
    assert (
        get("bookrec_users", action="rate", user="known") == 1 and get("bookrec_users", action="rate", user="new") == 1
    )
    assert get("bookrec_users", action="recommend", user="known") == 1
    assert get("bookrec_books", book="known") == 3 and get("bookrec_books", book="new") == 1
    assert get("bookrec_errors", status="400", field="books[].year") == 1
    assert get("bookrec_errors", status="404", field="user.user_id") == 1
    assert get("bookrec_errors", status="400", field="body") == 1
    rate_values = [p["rating"] for s, b in results[:2] for p in b["predictions"]]
    bins = sum(
        v for (name, labels), v in counts.items() if name == "bookrec_predicted_rating" and ("action", "rate") in labels
    )
    assert bins == len(rate_values) == 4
    assert get("bookrec_predicted_rating_sum", action="rate") == pytest.approx(sum(rate_values))
    assert get("bookrec_predicted_rating_sum", action="recommend") == pytest.approx(
        sum(r["score"] for r in results[2][1]["recommendations"])
    )
    assert serving_metrics.rating_bin(10.0) == "9" and serving_metrics.rating_bin(1.0) == "1"
    assert serving_metrics.rating_bin(7.99) == "7"


def test_no_request_adds_a_metrics_series(engine: BookrecEngine) -> None:
    """Field names and list positions are the client's to choose; the labels come from a fixed set,
    so a hundred rounds of new names give the series ten rounds gave."""
    isbn = engine.catalog.books["isbn"].iat[0]
    user = {"user_id": int(engine.catalog.users["user_id"].iat[0])}

    def bodies(n: int) -> list[Any]:
        return [
            {"action": "recommend", "user": user, f"zz_{n}": 1},
            {"action": "rate", "user": {**user, f"zz_{n}": 1}, "books": [isbn]},
            {"action": "rate", "user": user, "books": [isbn] * (n % 50) + [{"isbn": isbn, f"zz_{n}": 1}]},
            {"action": "rate", "user": user, "books": [isbn] * (n % 50) + [f"no-such-{n}"]},
            {"action": f"zz_{n}", "user": user},
        ]

    def series(rounds: int) -> set[serving_metrics.Key]:
        sent = [body for n in range(rounds) for body in bodies(n)]
        return set(serving_metrics.tally(sent, engine.run(sent)))

    few, many = series(10), series(100)
    assert many == few
    fields = {dict(labels)["field"] for name, labels in many if name == serving_metrics.ERRORS}
    assert fields == {serving_metrics.UNKNOWN_FIELD, "books[]", "action"}
    assert fields <= serving_metrics.error_fields()
    documented = (REPO / "docs" / "MONITORING.md").read_text()
    assert all(f"`{field}`" in documented for field in serving_metrics.error_fields())
