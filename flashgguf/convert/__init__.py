"""flashgguf-convert: turn a GGUF model or a safetensors checkpoint into a flash GGUF
(trunk + bundled FFN payload)."""

from .gguf_source import ConvertOptions, convert_gguf
from .hf_source import convert_hf

__all__ = ["ConvertOptions", "convert_gguf", "convert_hf"]
