"""The files quantpipe ships: the bundled calibration text, the eval text and the offline lm-eval tasks. They live in
calibration/ and evals/ of a source checkout and in quantpipe/_data/ of an installed package (pyproject.toml
copies them there); this module is the one place that knows both."""

from __future__ import annotations

from pathlib import Path

from quantpipe.errors import QuantpipeError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"


def _bases(kind: str) -> tuple[Path, Path]:
    return PROJECT_ROOT / kind, PACKAGE_DATA / kind


def data_path(kind: str, name: str) -> Path:
    """A file the project ships in calibration/ or evals/ (source checkout or installed package data)."""
    for base in _bases(kind):
        if (base / name).is_file():
            return base / name
    raise QuantpipeError(f"bundled file {kind}/{name} is missing from this installation")


def data_dir(kind: str, name: str) -> Path:
    """A folder the project ships (e.g. evals/lm_eval)."""
    for base in _bases(kind):
        if (base / name).is_dir():
            return base / name
    raise QuantpipeError(f"the bundled folder {kind}/{name} is missing from this installation")


def eval_text() -> Path:
    return data_path("evals", "eval-text.txt")


def calibration_text() -> Path:
    return data_path("calibration", "default.txt")
