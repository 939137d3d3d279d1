"""The flash GGUF format (DESIGN.md section 3): the one place that knows the file.

constants: every key, name and version of the format; gguf_stream / gguf_writer: a strict
reader and a writer of a GGUF at any offset of a file; reader: opens and validates a flash
GGUF; writer: writes one from plain records; output: output files that never end
half-written.
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
from .moe import ExpertLayout, MoEFlashFile, MoEPayloadRecord
from .output import atomic_output, scratch_file
from .reader import (
    BundleLayout,
    FlashFile,
    LayerInfo,
    is_flash_gguf,
    open_any_flash_file,
    open_flash_file,
)
from .writer import (
    CalibrationRecord,
    FlashWriter,
    PayloadLayer,
    PayloadRecord,
    PredictorRecord,
    SourceKey,
    TrunkRecord,
    TrunkTensor,
)

__all__ = [
    "BundleLayout",
    "CalibrationRecord",
    "ExpertLayout",
    "FlashFile",
    "FlashWriter",
    "GGUFStream",
    "LayerInfo",
    "MoEFlashFile",
    "MoEPayloadRecord",
    "PayloadLayer",
    "PayloadRecord",
    "PredictorRecord",
    "SourceKey",
    "TensorInfo",
    "TrunkRecord",
    "TrunkTensor",
    "atomic_output",
    "constants",
    "is_flash_gguf",
    "map_file",
    "open_any_flash_file",
    "open_flash_file",
    "open_gguf",
    "read_gguf",
    "release_pages",
    "scratch_file",
    "tensor_array",
    "tensor_nbytes",
]
