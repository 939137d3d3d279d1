"""Output files that never end half-written: temp files beside the target, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConvertError, FlashGGUFError


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temp path in target's folder; renamed onto target on success, removed on failure."""
    tmp = _temp_path(target.parent, f".{target.name}.", ".partial")
    try:
        with _os_errors_named(f"writing {target}"):
            yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600: give it a normal file's mode
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def scratch_file(folder: Path, suffix: str) -> Iterator[Path]:
    """A temp path removed on exit whatever happens."""
    tmp = _temp_path(folder, ".flashgguf-", suffix)
    try:
        with _os_errors_named(f"writing a scratch file in {folder}"):
            yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _os_errors_named(what: str) -> Iterator[None]:
    """An OSError inside (a full or read-only disk, a quota, an I/O error) as a ConvertError
    that says what was being written; flashgguf's own errors pass unchanged."""
    try:
        yield
    except FlashGGUFError:
        raise
    except OSError as exc:
        raise ConvertError(f"{what}: {exc}") from exc


def _temp_path(folder: Path, prefix: str, suffix: str) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as exc:
        raise ConvertError(f"cannot create a file in {folder}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)
