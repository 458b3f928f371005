"""W&B tracking and the Optuna sweep, with the real wandb package in offline mode.

Offline, wandb writes each run as a transaction log (``run-<id>.wandb``: config, history rows,
summary, artifacts as protobuf records) plus media files; the tests read those files back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, tiny_config
from train.config import load_config
from train.data.sample import write_sample

pytest.importorskip("wandb")
pytest.importorskip("optuna")


def wandb_env(root: Path) -> dict[str, str]:
    """Offline W&B with every folder it writes under ``root``."""
    names = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    dirs = {name: root / name.lower() for name in names}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, **{k: str(v) for k, v in dirs.items()}, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def read_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log (LevelDB-style 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending, chunks = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            chunks.append(pending + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def run_logs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    rows = []
    for rec in of_type(records, "history"):
        rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in rec.item})
    return rows


def run_config(records: list) -> dict:
    [run] = of_type(records, "run")
    return {item.key: json.loads(item.value_json) for item in run.config.update}


@pytest.mark.training
def test_training_run_logs_config_epochs_tables_curve_and_model(tmp_path: Path) -> None:
    """``python -m train run`` with ``train.wandb=true``: one offline W&B run holding it all."""
    write_sample(tmp_path / "csv", layout="kaggle", n_users=150, n_books=100, n_ratings=2000, seed=1)
    cfg = tiny_config(tmp_path / "run", tmp_path / "csv", tmp_path / "cache")
    cfg.train.epochs, cfg.train.wandb, cfg.train.wandb_project = 3, True, "bookrec-test"
    cfg.save(tmp_path / "cfg.yaml")
    env = wandb_env(tmp_path / "wb")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "run", "--config", str(tmp_path / "cfg.yaml"), "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [log] = run_logs(tmp_path / "wb" / "wandb_dir")
    records = read_records(log)

    config = run_config(records)
    assert config["train"]["wandb"] is True and config["model"]["hidden"] == [32, 16]
    assert config["run_dir"] == str(tmp_path / "run")

    rows = history(records)
    epochs = [r for r in rows if "train/val_rmse" in r]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = [r for r in logged if r["stage"] == "train"]
    assert [r["train/epoch"] for r in epochs] == [r["epoch"] for r in want]
    assert [r["train/val_rmse"] for r in epochs] == pytest.approx([r["val_rmse"] for r in want])
    assert any("prune-finetune/val_rmse" in r for r in rows)  # the compression step's recovery epochs
    tables = {key.split("/")[1] for r in rows for key in r if key.startswith("evaluation/")}
    assert {"test", "cold_book", "cold_user"} <= tables
    assert any(key.startswith("learning_curve/") for r in rows for key in r)

    files = log.parent / "files" / "media"
    [table_file] = list((files / "table" / "evaluation").glob("test_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["model", "rmse", "mae"]
    assert "MLP TorchScript (shipped)" in [row[0] for row in table["data"]]
    assert list((files / "images").glob("learning_curve_*.png"))

    [model] = [a for a in of_type(records, "artifact") if a.type == "model"]
    assert model.name == "bookrec-model"
    contents = {c.path: c.size for c in model.manifest.contents}
    assert contents["model_scripted.pt"] == (tmp_path / "run" / "model_scripted.pt").stat().st_size
    assert {"config.yaml", "evaluation.json", "compression.json"} <= set(contents)
    [exit_record] = of_type(records, "exit")
    assert exit_record.exit_code == 0


@pytest.mark.training  # a `python -m train` process of its own
def test_wandb_missing_is_a_clear_error(tmp_path: Path) -> None:
    """With train.wandb on and no wandb importable, the job stops before any work, saying why."""
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "__init__.py").write_text("raise ImportError('wandb blocked for this test')\n")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.wandb=true"])
    cfg.save(tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [sys.executable, "-m", "train", "run", "--config", str(tmp_path / "cfg.yaml"), "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "train.wandb is on but wandb is not installed" in proc.stderr
    assert not (tmp_path / "run" / "data").exists()


@pytest.fixture(scope="module")
def sweep_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the tiny run's data and features, and its config pointing at the copy."""
    root = tmp_path_factory.mktemp("sweep")
    run = root / "run"
    for name in ("data", "catalog", "encoder"):
        shutil.copytree(tiny_run / name, run / name)
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg["run_dir"] = str(run)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    (root / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    return root, run


def test_sweep_reuses_features_and_writes_best_config_plot_and_wandb_trials(sweep_run: tuple[Path, Path]) -> None:
    root, run = sweep_run
    catalog_mtime = (run / "catalog" / "books.parquet").stat().st_mtime_ns
    env = wandb_env(root / "wb")
    cmd = [sys.executable, "-m", "train", "sweep", "--config", str(root / "sweep.yaml"), "--trials", "3"]
    cmd += ["--epochs", "2", "--set", "train.wandb=true", "--set", "train.wandb_project=bookrec-sweep", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing data and features" in proc.stderr
    assert (run / "catalog" / "books.parquet").stat().st_mtime_ns == catalog_mtime  # features not rebuilt

    out = run / "sweep"
    summary = json.loads((out / "sweep.json").read_text())
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == summary["trials"] == 3
    assert trials["val_rmse"].notna().all() and (trials["epochs_run"] <= 2).all()
    given = load_config(root / "sweep.yaml")
    first = trials.loc[trials["trial"] == 0].iloc[0]
    assert first["lr"] == pytest.approx(given.train.lr) and first["hidden"] == str(given.model.hidden)
    assert summary["best"]["val_rmse"] == pytest.approx(trials["val_rmse"].min())
    best = load_config(out / "best_config.yaml")  # a valid config of this project
    best_row = trials.loc[trials["val_rmse"].idxmin()]
    assert best.train.lr == pytest.approx(best_row["lr"]) and str(best.model.hidden) == best_row["hidden"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rank | trial |" in (out / "trials.md").read_text()

    logs = run_logs(root / "wb" / "wandb_dir")
    assert len(logs) == 4  # one run per trial plus the summary run
    configs = [run_config(read_records(path)) for path in logs]
    trial_runs = sorted((c for c in configs if "trial" in c), key=lambda c: c["trial"]["number"])
    assert [c["trial"]["number"] for c in trial_runs] == [0, 1, 2]
    assert [c["train"]["lr"] for c in trial_runs] == pytest.approx(trials.sort_values("trial")["lr"].tolist())
    for path in logs:
        records = read_records(path)
        if "trial" in run_config(records):
            assert any("train/val_rmse" in row for row in history(records))


@pytest.mark.training  # a `python -m train` process of its own
def test_sweep_rejects_bad_trial_counts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train", "sweep", "--trials", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--trials" in proc.stderr
