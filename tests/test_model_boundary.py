"""``model/`` holds what a TorchServe worker and the batch job load, and nothing else: every module of
it is reached from ``handlers/`` or ``batch/``, so the feature-code hash of a run (``model/*.py``)
moves with the code that computes features and scores, never with training-only code."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import model.text
import train.config
import train.evaluation.topk
from model.artifacts import feature_code_sha256

from .conftest import REPO
from .imports import import_edges, module_files


def import_closure(root: Path, entry_points: tuple[str, ...] = ("handlers", "batch")) -> set[str]:
    """The modules of ``root/model`` that the code under ``entry_points`` loads, directly or through
    other modules of ``model/``."""
    edges = import_edges(module_files(root))
    todo = {t for name, targets in edges.items() if name.split(".")[0] in entry_points for t in targets}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name.startswith("model.") and name not in seen:
            seen.add(name)
            todo |= edges[name]
    return {name.removeprefix("model.") for name in seen}


def test_model_holds_only_what_the_worker_and_the_batch_job_load() -> None:
    modules = {path.stem for path in (REPO / "model").glob("*.py") if path.name != "__init__.py"}
    loaded = import_closure(REPO)
    assert not modules - loaded, f"model/ modules neither the worker nor the batch job loads: {modules - loaded}"
    assert loaded == modules


def test_the_closure_follows_imports_through_model_and_into_functions(tmp_path: Path) -> None:
    for folder, name, text in [
        ("handlers", "entry.py", "def load():\n    from model.a import f\n"),
        ("batch", "job.py", "import model.c\n"),
        ("model", "a.py", "from model import b\n"),
        ("model", "b.py", "import numpy\n"),
        ("model", "c.py", ""),
        ("model", "training_only.py", "from model import a\n"),
    ]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(text)
    assert import_closure(tmp_path) == {"a", "b", "c"}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected one {old!r}"
    path.write_text(text.replace(old, new))


def test_the_feature_code_hash_moves_with_model_code_only(tmp_path: Path) -> None:
    """A changed default of the training config or a changed evaluation module leaves the hash of a
    copied checkout as it was; a changed text rule of ``model/`` changes it. The files are found
    through the objects, so a config moved back into ``model/`` would fail here."""
    for folder in ("model", "train"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))

    def copied(module) -> Path:
        return tmp_path / Path(inspect.getsourcefile(module)).relative_to(REPO)

    before = feature_code_sha256(tmp_path / "model")
    assert before == feature_code_sha256(REPO / "model")
    _edit(copied(train.config), "    ndcg_k: int = 10\n", "    ndcg_k: int = 20\n")
    _edit(copied(train.evaluation.topk), "import hashlib\n", "import hashlib  # edited\n")
    assert feature_code_sha256(tmp_path / "model") == before
    _edit(copied(model.text), "def book_text(", "def book_text(  # edited\n")
    assert feature_code_sha256(tmp_path / "model") != before
