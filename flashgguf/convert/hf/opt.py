"""OPT checkpoints (pre-norm: do_layer_norm_before=true) as llama.cpp's `gpt2` architecture.

llama.cpp has no OPT graph, but a pre-norm OPT decoder is GPT-2's computation:
  - learned positions: OPT looks up row pos + 2 of embed_positions (its offset of 2), GPT-2
    row pos; position_embd is embed_positions without its first two rows;
  - q/k/v with biases, fused into attn_qkv (rows q, then k, then v, as llama.cpp splits it);
    both scale q k^T by 1/sqrt(head_dim);
  - LayerNorms with biases before attention, before the FFN and at the end;
  - FFN up -> act -> down with biases: GPT-2's graph applies GELU there, but flashgguf
    computes the FFN itself with OPT's ReLU;
  - output head tied to the token embedding (lm_head, when stored, is the same matrix).
opt-350m's post-norm layout with its 512-wide embedding projection is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFValueType

from ...archs import register_hf_class
from ...errors import UnsupportedError
from ..safetensors import widen
from .base import (
    KIND_FFN_DOWN,
    KIND_FFN_UP,
    KIND_FLOAT,
    KIND_MATRIX,
    HFModel,
    OutTensor,
    TensorSource,
    config_int,
)

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
ARCHITECTURES = ("OPTForCausalLM",)
GGUF_ARCH = "gpt2"  # llama.cpp has no OPT graph: see above
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding's offset
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which OPT uses


def build_opt(arch_name: str, config: dict[str, Any], src: TensorSource) -> HFModel:
    n_embd = config_int(config, "hidden_size")
    if not config.get("do_layer_norm_before", True) or \
            config.get("word_embed_proj_dim", n_embd) != n_embd:
        raise UnsupportedError(
            f"{arch_name}: the post-norm layout with an embedding projection (opt-350m: "
            "do_layer_norm_before=false, word_embed_proj_dim != hidden_size) is unsupported; "
            "the pre-norm OPT models are"
        )
    if config.get("activation_function", "relu") != "relu":
        raise UnsupportedError(f"{arch_name}: activation_function "
                               f"{config.get('activation_function')!r} is unsupported (relu is)")
    if not config.get("enable_bias", True) or \
            not config.get("layer_norm_elementwise_affine", True) or \
            config.get("_remove_final_layer_norm", False):
        raise UnsupportedError(f"{arch_name}: OPT without biases, affine LayerNorms or the "
                               "final LayerNorm is unsupported")
    n_ff = config_int(config, "ffn_dim")
    n_layer = config_int(config, "num_hidden_layers")
    n_head = config_int(config, "num_attention_heads")
    n_vocab = config_int(config, "vocab_size")
    n_ctx = config_int(config, "max_position_embeddings")
    a = GGUF_ARCH
    keys: list[tuple[str, Any, GGUFValueType]] = [
        (f"{a}.context_length", n_ctx, U32),
        (f"{a}.embedding_length", n_embd, U32),
        (f"{a}.block_count", n_layer, U32),
        (f"{a}.feed_forward_length", n_ff, U32),
        (f"{a}.attention.head_count", n_head, U32),
        (f"{a}.attention.layer_norm_epsilon", LAYER_NORM_EPS, F32),
        (f"{a}.vocab_size", n_vocab, U32),
    ]
    # checkpoints saved from OPTForCausalLM say "model.decoder.", from OPTModel "decoder."
    pre = "model.decoder." if src.has("model.decoder.embed_tokens.weight") else "decoder."
    tensors: list[OutTensor] = []

    def add(name: str, hf: str, shape: tuple[int, ...], kind: str) -> None:
        tensors.append(OutTensor(name, shape, kind, src.take(pre + hf, shape)))

    add("token_embd.weight", "embed_tokens.weight", (n_vocab, n_embd), KIND_MATRIX)
    positions = src.take(pre + "embed_positions.weight", (n_ctx + POSITION_OFFSET, n_embd))
    tensors.append(OutTensor("position_embd.weight", (n_ctx, n_embd), KIND_MATRIX,
                             lambda: positions()[POSITION_OFFSET:]))
    add("output_norm.weight", "final_layer_norm.weight", (n_embd,), KIND_FLOAT)
    add("output_norm.bias", "final_layer_norm.bias", (n_embd,), KIND_FLOAT)
    # lm_head is tied to embed_tokens (OPTForCausalLM ties them): the token embedding serves
    src.ignore(["lm_head.weight"])

    for i in range(n_layer):
        hf, blk = f"layers.{i}.", f"blk.{i}."

        for name, hf_name in (("attn_norm", "self_attn_layer_norm"),
                              ("ffn_norm", "final_layer_norm")):
            for part in ("weight", "bias"):
                add(f"{blk}{name}.{part}", f"{hf}{hf_name}.{part}", (n_embd,), KIND_FLOAT)
        for part, shape, kind in (("weight", (n_embd, n_embd), KIND_MATRIX),
                                  ("bias", (n_embd,), KIND_FLOAT)):
            qkv = [src.take(f"{pre}{hf}self_attn.{p}_proj.{part}", shape) for p in "qkv"]
            tensors.append(OutTensor(
                f"{blk}attn_qkv.{part}", (3 * n_embd, *shape[1:]), kind,
                # widened: the three may be stored in different dtypes
                lambda qkv=qkv: np.concatenate([widen(load()) for load in qkv], axis=0)))
        for name, hf_name, rows, cols, kind in (
                ("attn_output", "self_attn.out_proj", n_embd, n_embd, KIND_MATRIX),
                ("ffn_up", "fc1", n_ff, n_embd, KIND_FFN_UP),
                ("ffn_down", "fc2", n_embd, n_ff, KIND_FFN_DOWN)):
            add(f"{blk}{name}.weight", f"{hf}{hf_name}.weight", (rows, cols), kind)
            add(f"{blk}{name}.bias", f"{hf}{hf_name}.bias", (rows,), KIND_FLOAT)
    src.check_all_used()
    return HFModel(a, keys, tensors, n_vocab, "relu")


for _name in ARCHITECTURES:
    register_hf_class(_name, GGUF_ARCH, build_opt)
