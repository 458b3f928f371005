"""The training command line end to end on the generated sample (the ``tiny_run`` fixture runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from model import schemas
from train.config import load_config

from .conftest import REPO, tiny_config


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


def test_run_folder_has_everything_needed_to_reproduce_it(tiny_run):
    cfg = load_config(tiny_run / "config.yaml")
    assert cfg.model.hidden == [32, 16] and cfg.split.seed == 42
    fingerprint = json.loads((tiny_run / "fingerprint.json").read_text())
    assert set(fingerprint["files"]) == {"Books.csv", "Users.csv", "Ratings.csv"}
    assert all(len(f["sha256"]) == 64 for f in fingerprint["files"].values())
    assert fingerprint["tables"]["ratings"]["rows"] > 3000
    versions = json.loads((tiny_run / "versions.json").read_text())
    assert versions["torch"].startswith("2.13") and "machine" in versions
    features = json.loads((tiny_run / "features.json").read_text())
    assert features["encoder"].startswith("random-init:seed=0,vocab=wordpiece-")


def test_data_tables_follow_the_schemas(tiny_run):
    for name, schema in (("users", schemas.USERS), ("books", schemas.BOOKS), ("ratings", schemas.RATINGS_SPLIT)):
        assert pq.read_schema(tiny_run / "data" / f"{name}.parquet").remove_metadata() == schema
    report = json.loads((tiny_run / "data" / "ingest_report.json").read_text())
    assert report["layout"] == "kaggle"
    assert sum(v for k, v in report["counts"].items() if ".bad." in k) > 0  # the sample's planted bad rows


def test_training_log_curve_and_compression_report(tiny_run):
    epochs = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in epochs].count("train") >= 2
    assert all({"epoch", "train_rmse", "val_rmse", "seconds"} <= set(e) for e in epochs)
    assert (tiny_run / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tiny_run / "compression.json").read_text())
    assert set(report["variants"]) == {"fp32", "pruned", "int8", "scripted"}
    assert report["variants"]["pruned"]["shapes"]["user_in"][0] == 24  # 32 units, 25% pruned
    assert report["shipped"]["val_rmse_loss_vs_fp32"] <= 0.01
    for variant in report["variants"].values():
        assert variant["bytes"] > 0 and variant["latency_ms"]["p50"] > 0
        assert {"val", "test", "cold_book", "cold_user"} <= set(variant)


def test_evaluation_table(tiny_run):
    result = json.loads((tiny_run / "evaluation.json").read_text())
    rows = result["results"]
    assert {"global mean", "user+item bias", "MLP fp32", "MLP pruned", "MLP pruned+int8"} <= set(rows)
    assert "MLP TorchScript (shipped)" in rows
    assert any(name.startswith("Surprise SVD") for name in rows)
    for metrics in rows.values():
        assert set(metrics) == {"test", "cold_book", "cold_user"}
        assert 0 < metrics["test"]["rmse"] < 5 and 0 < metrics["test"]["ndcg"] <= 1
    # the model learned something: better than predicting the global mean on warm test
    assert rows["MLP fp32"]["test"]["rmse"] < rows["global mean"]["test"]["rmse"]
    table = (tiny_run / "evaluation.md").read_text()
    assert "| MLP fp32 |" in table
    assert table.startswith(f"Data: {tiny_run.parent / 'csv'}.\n")  # named data, not the stand-in sample
    assert result["meta"]["encoder"].startswith("random-init")


@pytest.mark.training  # a `python -m train` process of its own
def test_a_step_on_a_folder_without_its_inputs_names_the_step_to_run_first(tmp_path):
    """``python -m train evaluate`` with no config, in a fresh checkout: one line, exit 2, no folder made."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "train", "evaluate"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: runs/latest has no ") and "`python -m train data`" in proc.stderr
    assert list(tmp_path.iterdir()) == []
    helped = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert "the default run folder is runs/latest" in " ".join(helped.stdout.split())


def test_rerunning_features_reuses_the_embedding_cache(tiny_run, tmp_path):
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "again")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert _cli("data", "--config", str(tmp_path / "c.yaml"), "--quiet").returncode == 0
    out = _cli("features", "--config", str(tmp_path / "c.yaml"), "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "again" / "features.json").read_text())
    assert summary["book_embedding"]["unique_new"] == 0 and summary["user_embedding"]["unique_new"] == 0


@pytest.mark.training  # a `python -m train` process of its own
def test_bad_config_and_missing_data_fail_with_a_clear_message(tmp_path):
    out = _cli("train", "--set", "train.epochz=1")
    assert out.returncode == 2 and "unknown config key(s) in 'train': epochz" in out.stderr
    env = {k: v for k, v in os.environ.items() if k != "BOOKREC_DATA"}
    out = _cli(
        "data",
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "data.url=http://127.0.0.1:9/none.zip",
        "--set",
        f"data.download_dir={tmp_path / 'dl'}",
        env=env,
    )
    assert out.returncode == 2
    assert "BOOKREC_DATA" in out.stderr and "Traceback" not in out.stderr


def test_fine_tuning_the_encoder_rewrites_encoder_and_catalog(tiny_run, tmp_path):
    import shutil

    import numpy as np

    from model.catalog import Catalog
    from train.rating.step import step_train
    from train.run_context import RunContext

    run = tmp_path / "ft"
    shutil.copytree(tiny_run, run)
    cfg = load_config(
        run / "config.yaml",
        [f"run_dir={run}", "train.fine_tune_encoder=true", "train.fine_tune_steps=3", "train.fine_tune_batch_size=32"],
    )
    before = Catalog.load(run).book_emb.numpy()
    summary = step_train(RunContext(cfg, run), progress=False)
    assert summary["fine_tune"]["steps"] == 3
    features = json.loads((run / "features.json").read_text())
    assert features["encoder"].endswith("+fine-tuned:3x32")
    assert json.loads((run / "encoder" / "encoder.json").read_text())["source"] == features["encoder"]
    after = Catalog.load(run).book_emb.numpy()
    assert before.shape == after.shape and not np.allclose(before, after)
    assert summary["best_val_rmse"] < 5


def test_fine_tuning_uses_the_configured_optimizer(tiny_run):
    """The same two fine-tuning steps with AdamW and with SGD move the encoder differently."""

    import torch

    from model.catalog import Catalog
    from model.encoder import load_saved_encoder
    from train.rating.dataset import build_training_data
    from train.rating.finetune import fine_tune
    from train.rating.step import new_model

    cfg = load_config(tiny_run / "config.yaml", ["train.fine_tune_steps=2", "train.fine_tune_batch_size=16"])
    catalog = Catalog.load(tiny_run)
    ratings = pq.read_table(tiny_run / "data" / "ratings.parquet").to_pandas()
    data = build_training_data(catalog, ratings, cfg.split.folds, cfg.split.seed)
    start = [p.detach().clone() for p in load_saved_encoder(tiny_run / "encoder").model.parameters()]
    moved = {}
    for name, optimizer in (("adamw", "AdamW"), ("sgd", "SGD")):
        encoder = load_saved_encoder(tiny_run / "encoder")
        model = new_model(cfg, catalog.spec)
        model.set_standardisation(data.user_table, data.book_table)
        summary = fine_tune(encoder, model, catalog, data, cfg.train.replace(optimizer=name), False)
        assert summary["optimizer"] == optimizer
        moved[name] = [p.detach() - s for p, s in zip(encoder.model.parameters(), start, strict=True)]
    assert any(d.abs().max() > 0 for d in moved["sgd"]), "SGD must update the encoder"
    assert any(not torch.equal(a, b) for a, b in zip(moved["adamw"], moved["sgd"], strict=True))


def _figures(payload: dict, skip: tuple[str, ...] = ("seconds", "machine")) -> dict:
    """Every figure of a JSON report by its path, timings and the machine left out."""
    out = {}
    for key, value in payload.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in _figures(value, skip).items()})
        elif isinstance(value, list):
            out.update(
                {f"{key}[{i}]/{k}": v for i, item in enumerate(value) for k, v in _figures({"": item}, skip).items()}
            )
        else:
            out[key] = value
    return out


@pytest.mark.training
def test_run_all_hands_over_in_memory_and_a_step_alone_reads_the_folder(tmp_path):
    """``run_all`` builds the training tensors once for the four steps that use them and reads
    nothing back that an earlier step wrote (but the fp32 checkpoint, which the compress step starts
    from); the evaluate step alone, from the folder, computes the same figures."""
    from train.data.sample import write_sample
    from train.run_context import RunContext
    from train.steps import STEPS, run_all

    write_sample(tmp_path / "csv", layout="kaggle", n_users=150, n_books=100, n_ratings=2000, seed=2)
    cfg = tiny_config(tmp_path / "run", tmp_path / "csv", tmp_path / "cache")
    cfg.train.epochs = 2
    run = RunContext(cfg, tmp_path / "run")
    run_all(cfg, progress=False, run=run)
    assert dict(run.folder.made) == {"training_data": 1, "rating:fp32": 1}
    handed_over = json.loads((tmp_path / "run" / "evaluation.json").read_text())

    alone = RunContext(cfg, tmp_path / "run")
    STEPS["evaluate"](alone, False)
    read = {
        "tables",
        "catalog",
        "training_data",
        "towers",
        "book_vectors",
        "retrieval_settings",
        "item_graph",
        "ranker",
    }
    assert read | {f"rating:{v}" for v in ("fp32", "pruned", "int8", "scripted")} <= set(alone.folder.made)
    from_folder = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert _figures(from_folder) == _figures(handed_over)
