"""Qwen2 checkpoints as llama.cpp's `qwen2` architecture: the Llama layout with q/k/v biases
and the rotate-half RoPE that llama.cpp's qwen2 graph uses as well (no q/k permutation)."""

from __future__ import annotations

from typing import Any

from ...archs import register_hf_class
from .base import HFModel, TensorSource
from .llama import LlamaLayout, build

QWEN2 = LlamaLayout("qwen2", permute_qk=False, qkv_bias=True)
ARCHITECTURES = ("Qwen2ForCausalLM",)


def build_qwen2(arch_name: str, config: dict[str, Any], src: TensorSource) -> HFModel:
    return build(arch_name, config, src, QWEN2)


for _name in ARCHITECTURES:
    register_hf_class(_name, QWEN2.gguf_arch, build_qwen2)
