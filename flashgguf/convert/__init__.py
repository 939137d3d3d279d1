"""flashgguf-convert: turn a GGUF model into a flash GGUF (trunk + bundled FFN payload)."""

from .gguf_source import ConvertOptions, convert_gguf

__all__ = ["ConvertOptions", "convert_gguf"]
