"""serving/build_image.sh's argument handling (its --dry-run commands) and the Dockerfile's build
context. A real build takes minutes and an engine; docs/SERVING.md ("Docker image") records one."""

from __future__ import annotations

import platform
import re
import shlex
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.image

WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A build context like the repository's, with a stand-in archive (a dry run reads nothing of it)."""
    for name in ("serving/build_image.sh", "Dockerfile", "handlers/requirements-serve.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    (tmp_path / "serving/wheels").mkdir()
    (tmp_path / "model-store").mkdir()
    (tmp_path / "model-store/bookrec.mar").write_bytes(b"")
    return tmp_path


def _script(context: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(context / "serving/build_image.sh"), *args], capture_output=True, text=True, timeout=60
    )


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--engine", "podman"], "--engine must be auto, docker or buildah, not 'podman'"),
        (["--local-base", "sometimes"], "--local-base must be auto, always or never, not 'sometimes'"),
        (["--tag"], "--tag needs a value"),
        (["--python-version", "311"], "--python-version must look like 3.11, not '311'"),
        (["--glibc", "2.x"], "--glibc must look like 2.36, not '2.x'"),
        (["--torch-wheel", "/nonexistent/torch.whl"], "--torch-wheel: no such file '/nonexistent/torch.whl'"),
        (
            ["--engine", "docker", "--dry-run", "--local-base", "always", "--base", "ubuntu:24.04"],
            "cannot make ubuntu:24.04",
        ),
    ],
)
def test_bad_arguments_are_named(context, args, message):
    result = _script(context, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_a_torch_wheel_must_be_named_like_one_and_agree_with_the_version(context, tmp_path):
    odd = tmp_path / "pytorch.whl"
    odd.write_bytes(b"")
    result = _script(context, "--torch-wheel", str(odd))
    assert result.returncode == 2 and "is not named like a torch wheel" in result.stderr
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"")
    result = _script(context, "--torch-wheel", str(wheel), "--torch-version", "2.12.0")
    assert result.returncode == 2
    assert "--torch-version 2.12.0 contradicts the wheel's version 2.13.0+cpu" in result.stderr


def test_without_an_archive_it_says_which_file_to_build(context):
    (context / "model-store/bookrec.mar").unlink()
    result = _script(context, "--engine", "docker", "--dry-run")
    assert result.returncode == 1
    assert "no model-store/bookrec.mar" in result.stderr and "make archive" in result.stderr


def test_docker_build_with_a_local_torch_wheel_downloads_the_rest_for_the_image(context, tmp_path):
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"")
    result = _script(
        context, "--engine", "docker", "--dry-run", "--local-base", "never", "--torch-wheel", str(wheel), "--", "--pull"
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert [c[:2] for c in commands] == [["docker", "pull"], ["cp", str(wheel)], ["python3", "-m"], ["docker", "build"]]
    download = commands[2]
    assert download[3:5] == ["download", "--dest"] and "--no-index" not in download
    assert f"manylinux_2_36_{platform.machine()}" in download and f"manylinux_2_17_{platform.machine()}" in download
    assert "torch==2.13.0+cpu" in download and "--extra-index-url" not in download
    build = " ".join(commands[3])
    assert "--build-arg TORCH_VERSION=2.13.0+cpu" in build and "--build-arg WHEELS_ONLY=1" in build
    assert "--build-arg BASE_IMAGE=debian:bookworm-slim" in build and "debootstrap" not in result.stdout
    assert build.endswith("--pull -f Dockerfile .")
    assert not list((context / "serving/wheels").iterdir()), "a dry run copies nothing"


def test_buildah_with_a_debootstrapped_base_keeps_the_healthcheck(context):
    result = _script(context, "--engine", "buildah", "--dry-run", "--local-base", "always", "--tag", "t:1")
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    debootstrap = next(c for c in commands if c[0] == "debootstrap")
    assert debootstrap[1:3] == ["--variant=minbase", "bookworm"] and debootstrap[-1] == "http://deb.debian.org/debian"
    assert ["buildah", "commit", "--rm", "CONTAINER", "localhost/bookrec-base:bookworm-slim"] in commands
    build = commands[-1]
    # The OCI image format has no HEALTHCHECK: buildah must write the Docker format.
    assert build[:4] == ["buildah", "bud", "--format", "docker"] and build[4:6] == ["-t", "t:1"]
    assert "BASE_IMAGE=localhost/bookrec-base:bookworm-slim" in build and "WHEELS_ONLY=1" not in build


def test_torch_index_and_version_become_build_args_without_wheels(context):
    index = "https://download.pytorch.org/whl/cu126"
    cuda = "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"
    args = ["--engine", "docker", "--dry-run", "--local-base", "never", "--base", cuda]
    result = _script(context, *args, "--torch-index", index, "--torch-version", "2.13.0")
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert [c[:2] for c in commands] == [["docker", "pull"], ["docker", "build"]], "no debootstrap, no download"
    build = " ".join(commands[-1])
    assert f"--build-arg TORCH_INDEX={index} --build-arg TORCH_VERSION=2.13.0" in build
    assert f"--build-arg BASE_IMAGE={cuda}" in build


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--run-dir is required"),
        (["--run-dir", "runs/x", "--bogus"], "unknown option '--bogus'"),
        (["--run-dir", "runs/x", "--engine", "podman"], "--engine must be auto, docker or buildah, not 'podman'"),
        (["--run-dir", "runs/x", "--timeout", "0"], "--timeout must be a positive number of seconds, not '0'"),
        (["--run-dir"], "--run-dir needs a value"),
    ],
)
def test_run_image_names_bad_arguments(args, message):
    result = subprocess.run(
        ["bash", str(REPO / "serving/run_image.sh"), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_run_image_refuses_a_missing_run_folder(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "serving/run_image.sh"), "--run-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and f"no run folder '{tmp_path / 'none'}'" in result.stderr


def _copy_sources(dockerfile: str) -> list[str]:
    """Context paths of the Dockerfile's COPY instructions (not COPY --from=<stage>)."""
    sources = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_the_build_context_admits_exactly_what_the_dockerfile_copies():
    sources = _copy_sources((REPO / "Dockerfile").read_text())
    assert "model-store/bookrec.mar" in sources and "serving/wheels/" in sources
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]
    assert rules[0] == "*", "everything is excluded first"
    admitted = [r[1:] for r in rules[1:] if r.startswith("!")]
    for source in sources:
        if source.endswith("/"):
            assert any(a.startswith(source) for a in admitted), f".dockerignore admits nothing under {source}"
            assert (REPO / source / "README.md").is_file(), f"{source} must exist in a fresh clone"
        else:
            assert any(fnmatch(source, a) for a in admitted), f".dockerignore excludes {source}"
            assert source.endswith(".mar") or (REPO / source).is_file(), f"{source} is not in the repository"
    for pattern in admitted:
        assert any(fnmatch(pattern, s) or pattern.startswith(s) for s in sources), f"{pattern} is never copied"
    healthcheck = re.search(
        r'^HEALTHCHECK .*?CMD \["python3", "([^"]+)"', (REPO / "Dockerfile").read_text(), re.M | re.S
    )
    assert healthcheck and healthcheck.group(1) == "/home/model-server/healthcheck.py"


# Import name -> distribution name where they differ; "ts" is TorchServe's own package.
DISTRIBUTIONS = {"ts": "torchserve", "yaml": "PyYAML", "pydantic_core": "pydantic", "faiss": "faiss-cpu"}
# Installed by the Dockerfile itself (from TORCH_INDEX), not by the requirements file.
FROM_DOCKERFILE = {"torch"}


def test_serving_requirements_cover_what_the_worker_imports() -> None:
    """Every third-party package that ``handlers/`` and ``model/`` import (what the worker loads) is
    pinned in handlers/requirements-serve.txt, so the image cannot miss one (it once lacked scipy)."""
    import ast
    import sys

    imported = set()
    for pkg in ("handlers", "model"):
        for path in (REPO / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names} - {"handlers", "model"}
    needed = {DISTRIBUTIONS.get(name, name).lower() for name in third_party} - FROM_DOCKERFILE
    lines = (REPO / "handlers/requirements-serve.txt").read_text().splitlines()
    pinned = {re.split(r"[=<>~!\[ ]", line, maxsplit=1)[0].lower() for line in lines if line and line[0].isalnum()}
    assert needed <= pinned, f"imported by the worker but not in requirements-serve.txt: {sorted(needed - pinned)}"


def test_serving_pins_are_versions_pyproject_allows() -> None:
    """pyproject.toml is the source of truth for which versions bookrec supports: every package the
    image pins (and the Dockerfile's TORCH_VERSION) must satisfy its dependency range there, and
    every line pins one exact version."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project)}
    lines = (REPO / "handlers/requirements-serve.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line and line[0].isalnum()]
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert torch_version, "the Dockerfile sets no default TORCH_VERSION"
    pins.append(Requirement(f"torch=={torch_version.group(1)}"))
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", f"requirements-serve.txt must pin {pin.name} exactly, not {pin}"
        name = canonicalize_name(pin.name)
        if name in allowed:
            assert allowed[name].contains(spec.version), f"{pin} is outside pyproject.toml's {name}{allowed[name]}"
