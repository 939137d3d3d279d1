"""Hugging Face architectures the safetensors converter knows: one module each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import UnsupportedError
from . import llama, opt, qwen2
from .base import HFModel, TensorSource

Builder = Callable[[str, dict[str, Any], TensorSource], HFModel]

ARCHITECTURES: dict[str, Builder] = {
    **{name: llama.build_llama for name in llama.ARCHITECTURES},
    **{name: qwen2.build_qwen2 for name in qwen2.ARCHITECTURES},
    **{name: opt.build_opt for name in opt.ARCHITECTURES},
}


def hf_architecture(config: dict[str, Any]) -> tuple[str, Builder]:
    names = config.get("architectures") or []
    if not isinstance(names, list) or len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedError(
            f"config.json: architectures {names!r} is not supported (supported: "
            f"{', '.join(sorted(ARCHITECTURES))})"
        )
    return names[0], ARCHITECTURES[names[0]]


__all__ = ["ARCHITECTURES", "HFModel", "TensorSource", "hf_architecture"]
