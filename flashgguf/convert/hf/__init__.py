"""Hugging Face architectures the safetensors converter knows: one module each, which
registers its classes in flashgguf/archs.py's registry when imported here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...archs import get_hf_class
from . import llama, opt, qwen2  # noqa: F401 (they register their classes)
from .base import HFModel, TensorSource

Builder = Callable[[str, dict[str, Any], TensorSource], HFModel]


def hf_architecture(config: dict[str, Any]) -> tuple[str, Builder]:
    entry = get_hf_class(config.get("architectures") or [])
    return entry.name, entry.build


__all__ = ["HFModel", "TensorSource", "hf_architecture"]
