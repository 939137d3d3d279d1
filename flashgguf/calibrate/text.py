"""Calibration text: the user's file or the excerpt shipped with the package."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CalibrationError

# Brown corpus categories A-J (never the evaluation categories K-R); see data/README.md.
DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def read_calibration_text(path: str | os.PathLike[str] | None = None) -> str:
    """The text at path (UTF-8), or the shipped calibration text when path is None."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION_TEXT
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration text {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 4]
        raise CalibrationError(f"calibration text {path} is not UTF-8 (byte {exc.start}: "
                               f"{bad!r}); convert it, e.g. iconv -t UTF-8") from None
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty")
    return text
