"""A run's record is written by the steps that make it: config.yaml changes section by section as
the step owning a section reruns, steps.json names the config and code of each step, and a step run
alone with another config for what earlier steps made is refused (``train/run_record.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from model import layout
from train.__main__ import main
from train.config import load_config
from train.run_record import OWNS, config_sha256
from train.steps import STEPS, run_step

from .conftest import REPO


def test_each_step_owns_the_sections_dvc_tracks_as_its_params() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(OWNS) == list(STEPS)
    for step, sections in OWNS.items():
        assert set(stages[step]["params"][0]["${config}"]) == set(sections), step


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def _record(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in (layout.CONFIG_FILE, layout.VERSIONS_FILE, layout.STEPS_RECORD)}


def test_a_step_with_another_config_for_what_earlier_steps_made_is_refused(run: Path, capsys) -> None:
    """``python -m train evaluate --run-dir RUN`` with no config (the defaults: another encoder and
    MLP than the run's) is one line naming the keys and values that differ, exit 2, the record as it
    was; with the run's config it is not refused."""
    before = _record(run)
    assert main(["evaluate", "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run} was made with other values"), err
    assert "data.sample_users" not in err  # only the first three keys, in order, and a count
    assert "data.source" in err and "more" in err
    assert f"--config {run / layout.CONFIG_FILE}" in err and "rerun from `python -m train data`" in err
    assert _record(run) == before
    refused = main(
        ["evaluate", "--config", str(run / layout.CONFIG_FILE), "--run-dir", str(run), "--set=model.hidden=[8]"]
    )
    assert refused == 2 and "model.hidden [32, 16] (this config: [8])" in capsys.readouterr().err
    assert _record(run) == before


def test_a_step_rewrites_only_the_sections_it_owns_and_records_its_config_and_code(run: Path) -> None:
    """The distill step (a no-op for this random-init encoder) run with its own and a later step's
    section changed: config.yaml takes its own, keeps the later step's (evaluate made the reports with
    that), and steps.json records the whole config it ran with and the code."""
    saved = load_config(run / layout.CONFIG_FILE)
    cfg = load_config(
        run / layout.CONFIG_FILE, [f"run_dir={run}", "distill.epochs=7", f"eval.ndcg_k={saved.eval.ndcg_k + 1}"]
    )
    before = json.loads((run / layout.STEPS_RECORD).read_text())
    run_step("distill", cfg, progress=False)
    after = load_config(run / layout.CONFIG_FILE)
    assert after.distill.epochs == 7 and after.eval.ndcg_k == saved.eval.ndcg_k
    assert after.model == saved.model and after.encoder == saved.encoder
    record = json.loads((run / layout.STEPS_RECORD).read_text())
    assert list(record) == list(OWNS)
    assert record["distill"]["config_sha256"] == config_sha256(cfg) != before["distill"]["config_sha256"]
    assert record["distill"]["model_files"] is True and record["evaluate"]["model_files"] is False
    assert {name: entry for name, entry in record.items() if name != "distill"} == {
        name: entry for name, entry in before.items() if name != "distill"
    }
    assert before["evaluate"]["config_sha256"] == config_sha256(saved)  # run_all's one config
