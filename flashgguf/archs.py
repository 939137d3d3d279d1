"""Per-architecture facts: the one registry. One table entry per llama.cpp architecture
flashgguf runs, and the Hugging Face checkpoint classes that convert to one of them.

Nothing architecture-specific lives anywhere else: the converter and the runtime ask this
registry for node names, the FFN's activation and its tensor names. It lives here, beside
the runtime, rather than in the converter, so that the runtime and flashgguf/format import
no converter code: each flashgguf/convert/hf module registers its builder for the HF classes
it reads (register_hf_class), against an architecture of this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedError
from .format import constants as C


@dataclass(frozen=True)
class MoESpec:
    """An architecture's mixture-of-experts block as llama.cpp builds it (build_moe_ffn): the
    routed experts' tensors, the key that gives their width, and the graph node holding
    their weighted sum (before any shared expert and the residual are added). The router
    and shared experts stay in the trunk: llama.cpp computes them and the routing."""

    width_key: str  # "<arch>.<width_key>": the expert width llama.cpp reads
    gate: str = "blk.{bid}.ffn_gate_exps.weight"
    up: str = "blk.{bid}.ffn_up_exps.weight"
    down: str = "blk.{bid}.ffn_down_exps.weight"
    router: str = "blk.{bid}.ffn_gate_inp.weight"
    input_node: str = "ffn_norm"
    output_node: str = "ffn_moe_out"
    logits_node: str = "ffn_moe_logits"  # the router's output, F32 [n_expert x tokens]

    def expert_tensors(self, bid: int) -> dict[str, str]:
        """Layer bid's routed expert tensor names -> their part (C.PART_*)."""
        return {self.gate.format(bid=bid): C.PART_GATE, self.up.format(bid=bid): C.PART_UP,
                self.down.format(bid=bid): C.PART_DOWN}


@dataclass(frozen=True)
class ArchSpec:
    name: str  # llama.cpp's general.architecture
    activation: str  # what llama.cpp's graph applies (flashgguf.ffn.activation)
    gated: bool = True  # h = act(gate x) * (up x); else h = act(up x)
    # Graph nodes around the FFN (llama.cpp names them "<node>-<layer>"); checked by
    # tests/test_hook.py on a generated model of each architecture.
    ffn_input_node: str = "ffn_norm"
    ffn_output_node: str = "ffn_out"
    ffn_gate: str = "blk.{bid}.ffn_gate.weight"
    ffn_up: str = "blk.{bid}.ffn_up.weight"
    ffn_down: str = "blk.{bid}.ffn_down.weight"
    ffn_gate_bias: str = "blk.{bid}.ffn_gate.bias"
    ffn_up_bias: str = "blk.{bid}.ffn_up.bias"
    ffn_down_bias: str = "blk.{bid}.ffn_down.bias"
    # RMSNorm weight applied to the FFN input: the weight-only predictor models the input
    # as this weight times a unit-RMS vector.
    ffn_norm: str = "blk.{bid}.ffn_norm.weight"
    # its mixture-of-experts block, for files whose <arch>.expert_count is > 0 (llama:
    # Mixtral); None: experts are not supported in this architecture
    moe: MoESpec | None = None
    dense: bool = True  # False: llama.cpp builds only MoE layers for it (no dense FFN files)

    def ffn_tensor_parts(self, bid: int) -> dict[str, str]:
        """Layer bid's llama.cpp FFN tensor names (weights and biases) -> their bundle part."""
        names = [(self.ffn_up, C.PART_UP), (self.ffn_down, C.PART_DOWN),
                 (self.ffn_up_bias, C.PART_UP), (self.ffn_down_bias, C.PART_DOWN)]
        if self.gated:
            names += [(self.ffn_gate, C.PART_GATE), (self.ffn_gate_bias, C.PART_GATE)]
        return {template.format(bid=bid): part for template, part in names}


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        # Llama 2/3, Mistral, SmolLM; with experts, Mixtral (their width is n_ff)
        ArchSpec("llama", activation="silu", moe=MoESpec("feed_forward_length")),
        ArchSpec("qwen2", activation="silu"),
        # GPT-2 (and OPT written as gpt2 by the safetensors converter): one LayerNorm'd FFN,
        # up -> act -> down with biases; build_ffn's nodes between ffn_norm and ffn_out.
        ArchSpec("gpt2", activation="gelu", gated=False),
        # Gemma 3 text: GeGLU (ggml_geglu, tanh GELU); its post-FFN norm (ffn_post_norm-L)
        # follows ffn_out-L in the graph, so llama.cpp applies it to our result.
        ArchSpec("gemma3", activation="gelu"),
        # Mixtures of experts: softmax routing computed by llama.cpp (qwen3moe and Mixtral
        # renormalize the top-k weights, qwen2moe and olmoe do not: the callback takes the
        # final weights from the graph); qwen2moe's gated shared expert stays in the trunk.
        ArchSpec("qwen3moe", activation="silu", moe=MoESpec("expert_feed_forward_length"),
                 dense=False),
        ArchSpec("qwen2moe", activation="silu", moe=MoESpec("expert_feed_forward_length"),
                 dense=False),
        ArchSpec("olmoe", activation="silu", moe=MoESpec("feed_forward_length"), dense=False),
    )
}


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        supported = ", ".join(sorted(ARCHS))
        raise UnsupportedError(
            f"architecture {name!r} is not supported (supported: {supported})"
        ) from None


@dataclass(frozen=True)
class HFClass:
    name: str  # config.json's architectures entry
    arch: ArchSpec  # the llama.cpp architecture its checkpoints convert to
    # the converter's builder (flashgguf/convert/hf: config, tensors -> HFModel), typed there
    build: Callable[..., Any]


HF_CLASSES: dict[str, HFClass] = {}


def register_hf_class(name: str, arch: str, build: Callable[..., Any]) -> None:
    """Called by a flashgguf/convert/hf module for each HF class it converts."""
    if name in HF_CLASSES:
        raise UnsupportedError(f"Hugging Face class {name!r} is registered twice")
    HF_CLASSES[name] = HFClass(name, get_arch(arch), build)


def get_hf_class(names: object) -> HFClass:
    """The entry of config.json's `architectures` (a list of one registered class)."""
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str) \
            or names[0] not in HF_CLASSES:
        raise UnsupportedError(
            f"config.json: architectures {names!r} is not supported (supported: "
            f"{', '.join(sorted(HF_CLASSES))})"
        )
    return HF_CLASSES[names[0]]
