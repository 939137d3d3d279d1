"""The flash GGUF format (DESIGN.md section 3): the one place that knows the file.

constants: every key, name and version of the format; gguf_stream: a strict reader of a GGUF
at any offset of a file; reader: opens and validates a flash GGUF; output: output files that
never end half-written.
"""

from . import constants
from .gguf_stream import (
    GGUFStream,
    TensorInfo,
    map_file,
    open_gguf,
    read_gguf,
    release_pages,
    tensor_array,
    tensor_nbytes,
)
from .output import atomic_output, scratch_file
from .reader import BundleLayout, FlashFile, LayerInfo, is_flash_gguf, open_flash_file

__all__ = [
    "BundleLayout",
    "FlashFile",
    "GGUFStream",
    "LayerInfo",
    "TensorInfo",
    "atomic_output",
    "constants",
    "is_flash_gguf",
    "map_file",
    "open_flash_file",
    "open_gguf",
    "read_gguf",
    "release_pages",
    "scratch_file",
    "tensor_array",
    "tensor_nbytes",
]
