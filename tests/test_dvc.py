"""The DVC pipeline (dvc.yaml) from a fresh clone: repro, a second repro that does nothing, and a
param change that reruns only what depends on it. Skipped where dvc is not installed (it is an
optional extra). The clone's pipeline points at a tiny generated config instead of the demo one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_config
from train.data.sample import write_sample

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
pytestmark = [
    pytest.mark.training,
    pytest.mark.skipif(DVC is None, reason="dvc not installed (pip install '.[dvc]')"),
]


def dvc(clone: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run([DVC, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=900)


def test_repro_twice_from_a_fresh_clone(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run(["git", "checkout", "-q", head.stdout.strip()], cwd=clone, check=True)
    shutil.copy(REPO / "dvc.yaml", clone / "dvc.yaml")  # the pipeline under test, committed or not
    write_sample(tmp_path / "csv", layout="kaggle", n_users=150, n_books=100, n_ratings=2000, seed=2)
    cfg = tiny_config(Path("runs/tiny"), tmp_path / "csv", tmp_path / "cache")
    cfg.train.epochs = 2
    cfg.save(clone / "tiny.yaml")
    spec = yaml.safe_load((clone / "dvc.yaml").read_text())
    spec["vars"] = [{"config": "tiny.yaml", "run": "runs/tiny", "store": "model-store"}]
    (clone / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    first = dvc(clone, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("data", "features", "train", "compress", "evaluate", "archive"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (clone / "model-store" / "bookrec.mar").is_file()
    assert (clone / "runs" / "tiny" / "evaluation.json").is_file()

    second = dvc(clone, "repro")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    cfg.train.lr = 0.002
    cfg.save(clone / "tiny.yaml")
    status = dvc(clone, "status")
    assert status.returncode == 0, status.stderr
    changed = {line.strip().rstrip(":") for line in status.stdout.splitlines() if line and not line.startswith("\t")}
    assert "train" in changed and "data" not in changed and "features" not in changed
