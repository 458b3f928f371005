"""The docs name the training job's steps as the code defines them (``train.steps.STEPS``): the
README's command line and step table, dvc.yaml's stages and docs/DVC.md's stage table and chain."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from train.steps import STEPS

ROOT = Path(__file__).resolve().parents[1]


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1 :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def table_first_column(text: str) -> list[str]:
    """First cells of the first markdown table in ``text`` (header and rule left out)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [row.split("|")[1].strip() for row in rows[2:]]
    return [cell.split()[0].strip("`") for cell in cells]


def test_readme_names_every_step_in_order() -> None:
    part = section((ROOT / "README.md").read_text(), "## The training job")
    command = re.search(r"python -m train \{([^}]*)\}", part)
    assert command is not None
    assert command.group(1).split(",") == ["run", *STEPS]
    assert table_first_column(part) == list(STEPS)


def test_dvc_stages_are_the_steps_then_the_archive() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [*STEPS, "archive"]
    for step in STEPS:
        assert stages[step]["cmd"].startswith(f"python -m train {step} ")
    doc = (ROOT / "docs" / "DVC.md").read_text()
    assert " -> ".join([*STEPS, "archive"]) in doc
    assert table_first_column(doc) == [*STEPS, "archive"]
