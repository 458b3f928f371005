"""Config loading and the deterministic splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from train.config import Config, ConfigError, SplitConfig, load_config
from train.data.split import assign_folds, assign_splits


def test_yaml_overrides_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ntrain:\n  lr: 1\nmodel:\n  hidden: [8, 4]\n")
    cfg = load_config(path, ["train.epochs=3", "encoder.random_init=true"])
    assert cfg.run_dir == "runs/x"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.model.hidden == [8, 4]
    assert cfg.encoder.random_init is True
    assert cfg.split.seed == Config().split.seed  # untouched keys keep defaults


def test_config_round_trips_through_the_run_folder(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "data.source=/somewhere"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "unknown config key(s) in 'train': epochz"),
        ("train.epochs=abc", "config key 'train.epochs' must be int"),
        ("train.lr=true", "config key 'train.lr' must be float"),
        ("train=5", "config section 'train' must be a mapping"),
        ("nokey", "must look like section.key=value"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("train.optimizer", "lamb", "must be one of 'adamw', 'adam' or 'sgd', got 'lamb'"),
        ("encoder.pooling", "max", "must be one of 'mean' or 'cls', got 'max'"),
        ("model.hidden", ["a", 2], "[0]' must be int, got 'a'"),
        ("split.val_frac", -3, "must be a fraction in [0, 1), got -3.0"),
        ("train.device", "cuda:0", "must be one of 'auto', 'cpu' or 'cuda'"),
        ("train.lr", 0, "must be > 0"),
        ("train.epochs", 0, "must be > 0"),
        ("train.weight_decay", -0.1, "must be >= 0"),
        ("model.hidden", [], "must list positive layer sizes"),
        ("model.dropout", 1.5, "must be a fraction in [0, 1)"),
        ("compress.prune_amount", 1, "must be a fraction in [0, 1)"),
        ("split.folds", 1, "must be >= 2"),
        ("data.sample_users", 0, "must be > 0"),
        ("eval.ndcg_k", 0, "must be > 0"),
        ("eval.svd_grid", [3], "[0]' must be dict"),
        ("retrieval.negatives", "hard", "must be one of 'in-batch', 'mixed' or 'full', got 'hard'"),
        ("retrieval.temperature", 0, "must be > 0"),
        ("retrieval.id_dropout", 1.0, "must be a fraction in [0, 1)"),
        ("retrieval.blend_grid", [-0.1], "must list weights >= 0"),
        ("eval.cold_user_reveal", -1, "must be >= 0"),
    ],
)
def test_a_bad_value_fails_at_load_naming_its_key(tmp_path, key, value, problem):
    """In the YAML file and as a --set override alike."""
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    expected = re.escape(f"config key '{key}") + ".*" + re.escape(problem)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [f"{key}={json.dumps(value)}"])


def test_split_fractions_must_leave_rows_to_train_on():
    with pytest.raises(ConfigError, match=r"config key 'split\.val_frac' \+ test_frac must be < 1"):
        load_config(None, ["split.val_frac=0.5", "split.test_frac=0.5"])
    assert load_config(None, ["split.val_frac=0.5", "split.test_frac=0.4"]).split.val_frac == 0.5


def test_range_checks_also_guard_configs_built_in_code():
    with pytest.raises(ConfigError, match=r"config key 'val_frac' must be a fraction"):
        SplitConfig(val_frac=-3)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_shipped_configs_load(path, tmp_path):
    cfg = load_config(path)
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def _ratings(n_users=200, n_books=120, n=4000, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(1, n_users, n),
            "isbn": [f"B{i:05d}" for i in rng.integers(0, n_books, n)],
            "rating": rng.integers(0, 11, n).astype(np.int8),
        }
    )
    return frame.drop_duplicates(["user_id", "isbn"]).reset_index(drop=True)


def test_splits_are_deterministic_and_independent_of_row_order():
    ratings = _ratings()
    cfg = SplitConfig(seed=7)
    a = assign_splits(ratings, cfg)
    b = assign_splits(ratings.sample(frac=1.0, random_state=3), cfg)
    pd.testing.assert_frame_equal(a, b)
    c = assign_splits(ratings, SplitConfig(seed=8))
    assert not (a["split"] == c["split"]).all()


def test_split_contents():
    ratings = _ratings()
    out = assign_splits(ratings, SplitConfig(seed=1, cold_book_frac=0.1, cold_user_frac=0.1))
    counts = out["split"].value_counts()
    assert (out.loc[out["rating"] == 0, "split"] == "implicit").all()
    assert not (out.loc[out["split"] != "implicit", "rating"] == 0).any()
    train = out[out["split"] == "train"]
    # cold books and users never appear in training, and every rating of theirs is held out
    for split, column in (("cold_book", "isbn"), ("cold_user", "user_id")):
        held = set(out.loc[out["split"].isin([split, "cold_both"]), column])
        assert held and not held & set(train[column])
    explicit = out[out["rating"] > 0]
    n_books = explicit["isbn"].nunique()
    cold_books = set(explicit.loc[explicit["split"].isin(["cold_book", "cold_both"]), "isbn"])
    assert len(cold_books) == int(np.ceil(0.1 * n_books))
    warm = counts["train"] + counts["val"] + counts["test"]
    assert abs(counts["test"] - 0.1 * warm) <= 1 and abs(counts["val"] - 0.1 * warm) <= 1


def test_folds_are_balanced_and_seeded():
    folds = assign_folds(103, 5, seed=0)
    assert sorted(np.bincount(folds)) == [20, 20, 21, 21, 21]
    assert (folds == assign_folds(103, 5, seed=0)).all()
    assert not (folds == assign_folds(103, 5, seed=1)).all()
