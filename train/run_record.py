"""A run's record of itself, written by the steps that make it.

``config.yaml`` holds, section by section, the values the step that last rebuilt what the section
describes ran with (``OWNS``: each step's sections, dvc.yaml's params of its stage); ``steps.json``
holds, step by step, the hash of the whole config it ran with, the code (git commit, feature-code
hash) and whether it wrote model files, so a run made by several commands names the code of each.
A step run alone whose config has other values in a section an earlier step owns is refused
(``ConfigDiffers``): its result would be recorded against a config that did not make its inputs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from model import layout
from model.artifacts import code_identity
from train.config import Config, load_config
from train.run_folder import machine, versions, write_json

# The config sections each step reads to build what it writes, in the steps' order (dvc.yaml's params).
OWNS: dict[str, tuple[str, ...]] = {
    "data": ("data", "split"),
    "distill": ("encoder", "distill"),
    "features": ("encoder", "model"),
    "train": ("model", "train"),
    "compress": ("compress",),
    "retrieval": ("retrieval",),
    "ranking": ("ranking",),
    "evaluate": ("eval",),
}
# The steps whose files end up in the model (the distilled student becomes its encoder): the archive
# refuses a run any of them made with other model/ code than it ships.
SHIPPED_BY = ("distill", "features", "train", "compress", "retrieval", "ranking")
# Keys that say where a step runs, caches or reports, not what it makes: free to differ between steps.
PLACEMENT = frozenset(
    {
        "run_dir",
        "data.download_dir",
        "encoder.cache_dir",
        "encoder.unpack_dir",
        "distill.cache_dir",
        "train.device",
        "train.threads",
        "train.wandb",
        "train.wandb_project",
        "eval.baseline_cache",
    }
)
_ABSENT = object()


class ConfigDiffers(Exception):
    """A step run alone with other values than the run's earlier steps were made with."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _saved(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.yaml with defaults filled in (as written by an older version: as it stands)."""
    path = run_dir / layout.CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config(path).to_dict()
    except ValueError:
        return yaml.safe_load(path.read_text()) or {}


def upstream(step: str) -> set[str]:
    """The sections earlier steps own and ``step`` does not: what its inputs were made with."""
    earlier = list(OWNS)[: list(OWNS).index(step)]
    return {section for name in earlier for section in OWNS[name]} - set(OWNS[step])


def check_config(step: str, cfg: Config, run_dir: Path) -> None:
    """Raise ``ConfigDiffers`` when ``cfg`` differs from the run's config in a section an earlier step
    owns, naming the keys (a few, with both values), the step to rerun from, and the config to pass."""
    saved = _saved(run_dir)
    if saved is None:
        return
    theirs, mine, sections = _flat(saved), _flat(cfg.to_dict()), upstream(step)
    differs = [
        key
        for key in sorted(set(theirs) | set(mine))
        if key.split(".")[0] in sections and key not in PLACEMENT and theirs.get(key, _ABSENT) != mine.get(key, _ABSENT)
    ]
    if not differs:
        return
    shown = ", ".join(
        f"{k} {theirs.get(k, '(unset)')!r} (this config: {mine.get(k, '(unset)')!r})" for k in differs[:3]
    )
    more = f" and {len(differs) - 3} more" if len(differs) > 3 else ""
    first = next(name for name in OWNS if any(k.split(".")[0] in OWNS[name] for k in differs))
    raise ConfigDiffers(
        f"{run_dir} was made with other values than this config has for what `{step}` reads: {shown}{more}; "
        f"pass --config {run_dir / layout.CONFIG_FILE} (and --set for {', '.join(OWNS[step])}), "
        f"or rerun from `python -m train {first}`"
    )


def config_sha256(cfg: Config) -> str:
    """Hash of everything the config says but where the run folder is."""
    values = {k: v for k, v in cfg.to_dict().items() if k != "run_dir"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def record_step(step: str, cfg: Config, run_dir: Path) -> None:
    """After ``step`` succeeded: its sections (every section in a folder with no config yet) into
    config.yaml, its entry into steps.json, and versions.json (packages, machine, code) when the step
    starts the run (``data``) or none is there yet."""
    saved = _saved(run_dir)
    new = cfg.to_dict()
    if saved is None:
        merged = new
    else:
        merged = {**saved, "run_dir": new["run_dir"], **{s: new[s] for s in OWNS[step]}}
    (run_dir / layout.CONFIG_FILE).write_text(yaml.safe_dump(merged, sort_keys=False))
    path = run_dir / layout.STEPS_RECORD
    record = json.loads(path.read_text()) if path.is_file() else _before_the_record(run_dir)
    code = code_identity()
    if step == "data" or not (run_dir / layout.VERSIONS_FILE).is_file():
        write_json(run_dir / layout.VERSIONS_FILE, {**versions(), "machine": machine(), "code": code})
    record[step] = {
        "config_sha256": config_sha256(cfg),
        "code": code,
        "model_files": step in SHIPPED_BY,
        "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(path, {name: record[name] for name in OWNS if name in record})


def _before_the_record(run_dir: Path) -> dict[str, Any]:
    """The record of a run made before steps.json: each step with the code versions.json names (what
    the archive trusted then), so a rerun step does not leave the others unrecorded."""
    run = json.loads((run_dir / layout.VERSIONS_FILE).read_text()) if (run_dir / layout.VERSIONS_FILE).is_file() else {}
    if "code" not in run:
        return {}
    return {name: {"config_sha256": None, "code": run["code"], "model_files": name in SHIPPED_BY} for name in OWNS}
