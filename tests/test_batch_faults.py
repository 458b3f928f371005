"""Batch output under faults: an output the job may not write, and a disk that fills mid-job.

Both must end with a clear error naming the path, the previous output whole (its files and its
``_SUCCESS`` untouched), no ``_SUCCESS`` of the failed run, and no temp folder left but the one
named in the error (holding only the runner's log). The tests run as root, which permissions do not
stop, so the faults are ones root meets too: a file where a folder should be, a read-only mount,
and a small tmpfs that fills.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch import io
from batch.__main__ import main

pytestmark = pytest.mark.beam

IN_MEMORY = "--direct_running_mode=in_memory"


def batch(tiny_run: Path, output: Path, *flags: str) -> int:
    return main(["--model", str(tiny_run), "--output", str(output), "--no-progress", IN_MEMORY, *flags])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def run_id(output: Path) -> str:
    return json.loads((output / io.SUCCESS).read_text())["run_id"]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """``mount(size)``: a fresh tmpfs of ``size`` at a new folder; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_file_where_the_output_folder_should_be(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """``--output`` under a regular file: refused up front (exit 2) naming the path; nothing written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    assert batch(tiny_run, blocker / "out") == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "Not a directory" in err, err
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_read_only_output_keeps_the_previous_output(tiny_run: Path, tmpfs, capsys) -> None:
    """A previous output on a filesystem that is now read-only (root cannot write it either): the
    rerun is refused up front naming the path, and the previous output is untouched."""
    mount = tmpfs("4m")
    out = mount / "scores"
    assert batch(tiny_run, out, "--max-users", "20") == 0
    before, previous = snapshot(mount), run_id(out)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    capsys.readouterr()

    assert batch(tiny_run, out) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(mount) in err, err
    assert snapshot(mount) == before and run_id(out) == previous


def test_disk_full_mid_job_keeps_the_previous_output(tiny_run: Path, tmpfs, capsys) -> None:
    """A tmpfs that holds a small previous output but not the new one (every user, uncompressed):
    the write fails mid-job; the error names the file and says the previous output is unchanged;
    no ``_SUCCESS`` of the failed run, and its temp folder holds only the log the error names."""
    mount = tmpfs("192k")
    out = mount / "scores"
    flags = ("--num-shards", "2", "--compression", "none")
    assert batch(tiny_run, out, "--max-users", "10", *flags) == 0
    before, previous = snapshot(out), run_id(out)
    capsys.readouterr()

    assert batch(tiny_run, out, *flags) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err, err
    written = re.search(r"cannot write (\S+): No space left on device", err)
    assert written and written.group(1).startswith(str(mount / ".scores.tmp-")), err
    assert f"the previous output {out} is unchanged" in err
    assert snapshot(out) == before and run_id(out) == previous

    left = [p for p in mount.iterdir() if p.name != "scores"]
    assert all(f"the runner's log: {p / io.RUN_LOG}" in err for p in left), err
    assert all(sorted(f.name for f in p.iterdir()) == [io.RUN_LOG] for p in left)
    assert not [p for p in mount.rglob(io.SUCCESS) if p.parent != out]
