"""Exceptions. FlashGGUFError is the root and is never raised itself."""

from __future__ import annotations


class FlashGGUFError(Exception):
    """Root of every error flashgguf raises."""


class FormatError(FlashGGUFError, ValueError):
    """A file is not a valid (flash) GGUF: names the check that failed."""


class VersionError(FormatError):
    """A flash GGUF written for another format version."""


class NotFlashGGUFError(FormatError):
    """A plain GGUF where a flash GGUF is needed (run flashgguf-convert)."""


class UnsupportedError(FlashGGUFError, ValueError):
    """An architecture, tensor type or option flashgguf does not support."""


class ConvertError(FlashGGUFError):
    """A conversion could not be done (bad input or output path)."""


class NativeError(FlashGGUFError, OSError):
    """The C core reported an error (I/O, memory, shapes seen in the graph)."""


class VersionMismatchError(FlashGGUFError, ImportError):
    """The installed llama-cpp-python is not the version flashgguf is pinned to."""


class CalibrationError(FlashGGUFError, ValueError):
    """Calibration could not be done (empty, too short or unreadable text, ...)."""


class OptionError(FlashGGUFError, ValueError):
    """A flash_* option of flashgguf.Llama (or a FlashOptions field) has a bad value."""


class BudgetError(OptionError):
    """The DRAM budget cannot hold what the chosen mode must keep resident."""


class MissingPredictorError(FlashGGUFError, ValueError):
    """flash_mode="predicted" on a file whose payload stores no predictor."""


class WriterStateError(FlashGGUFError, RuntimeError):
    """A GGUF writer's step was called out of order (a bug in the caller, not in the data)."""


class ConcurrentUseError(FlashGGUFError, RuntimeError):
    """A model was called from a second thread while another thread was using it."""


class ModelClosedError(FlashGGUFError, RuntimeError):
    """A model was used after close() (or while a close() was waiting for its use to end)."""
