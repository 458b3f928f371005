"""The catalog-update protocols (``train/evaluation/updates.py``, ``bench/bench_update_quality.py``):
a run trained with ``split.hold_out_cold_books`` never holds the cold-test books, an update adds
them back, and both protocols judge the versions on the trained-in run's readers.

The held-out run is the session's tiny run's config and data with the flag set, trained by the real
command line; the protocol runs on both, as EVALUATION.md's "Catalog updates" does on the shared data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.bench_update_quality import main as quality_main
from model.artifacts import ModelFolder
from train.config import load_config
from train.data.tables import cold_test_books, load_tables
from train.evaluation.updates import fresh_readers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def held_out_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("held-out")
    cfg = load_config(tiny_run.parent / "tiny.yaml", [f"run_dir={root / 'run'}", "split.hold_out_cold_books=true"])
    cfg.save(root / "held-out.yaml")
    cmd = [sys.executable, "-m", "train", "run", "--config", str(root / "held-out.yaml"), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "run"


def test_the_held_out_run_never_holds_the_cold_test_books(tiny_run: Path, held_out_run: Path) -> None:
    ratings = load_tables(held_out_run)[2]
    assert ratings.equals(load_tables(tiny_run)[2])  # the same split: the data step is untouched
    cold = cold_test_books(ratings)
    assert len(cold)
    held, trained_in = ModelFolder(held_out_run).load_catalog(), ModelFolder(tiny_run).load_catalog()
    assert not set(cold) & set(held.book_index)
    assert set(cold) <= set(trained_in.book_index)
    assert len(held.books) == len(trained_in.books) - len(cold)
    # readers keep their rows, so both models are judged on the same catalog users
    assert held.users["user_id"].tolist() == trained_in.users["user_id"].tolist()
    evaluation = json.loads((held_out_run / "evaluation.json").read_text())
    assert all("cold_book" not in splits for splits in evaluation["results"].values())


def test_the_protocols_add_the_books_and_the_reads_back(tiny_run: Path, held_out_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    argv = ["--trained-in", str(tiny_run), "--held-out", str(held_out_run), "--work", str(tmp_path), "--out", str(out)]
    quality_main(argv)
    report = json.loads(out.read_text())
    ratings = load_tables(tiny_run)[2]

    books = report["held_out_books"]
    assert books["books_added"] == books["update_counts"]["new_books"] == len(cold_test_books(ratings))
    cold = books["cold-book"]
    assert cold["trained_in"]["users"] == cold["added_by_update"]["users"] > 0
    assert cold["trained_in"]["cold_books"] == cold["added_by_update"]["cold_books"] == books["books_added"]
    assert 0 <= cold["added_by_update"]["recall@10"] <= 1
    assert cold["difference"] == pytest.approx(
        cold["added_by_update"]["recall@10"] - cold["trained_in"]["recall@10"], abs=1e-5
    )
    # the control: the same rows through an update of the trained-in run rank exactly as training's
    # own catalog rows did, so a difference above is the other training's, not the update's
    assert cold["control_difference"] == 0
    assert cold["trained_in_updated_with_the_same_rows"]["users"] == cold["trained_in"]["users"]
    updated = ModelFolder(tmp_path / "held-out-updated").load_catalog()
    assert set(cold_test_books(ratings)) <= set(updated.book_index)

    reads = report["fresh_reads"]
    assert reads["ratings_added"] == int((ratings["split"] == "val").sum())
    assert reads["readers"] == len(fresh_readers(ratings)) == reads["stale"]["users"] == reads["updated"]["users"]
    # the update put the validation reads into the readers' histories (and out of their lists)
    assert reads["updated"]["mean_history"] > reads["stale"]["mean_history"]
    assert np.isfinite(reads["updated"]["recall@10"])


def test_the_protocol_refuses_runs_the_wrong_way_round(tiny_run: Path, held_out_run: Path) -> None:
    with pytest.raises(SystemExit, match="hold_out_cold_books"):
        quality_main(["--trained-in", str(held_out_run), "--held-out", str(tiny_run)])
