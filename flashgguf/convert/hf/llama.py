"""Llama-family checkpoints (Llama, Mistral, ReluLLaMA, ProSparse, TurboSparse/Bamboo, and
Qwen2 through qwen2.py) as llama.cpp's `llama` / `qwen2` architectures.

The FFN activation comes from config.json, since llama.cpp's graph always applies SiLU and
flashgguf computes the FFN itself:
  hidden_act "silu"                            -> silu
  hidden_act "relu"                            -> relu      (ReluLLaMA)
  hidden_act "fatrelu", hidden_act_param t     -> fatrelu t (ProSparse: x if x > t else 0)
  BambooForCausalLM with hidden_act "relu"     -> drelu     (TurboSparse-Mistral, Bamboo:
                                                             relu(gate x) * relu(up x))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ...archs import register_hf_class
from ...errors import FormatError, UnsupportedError
from .base import (
    KIND_FFN_DOWN,
    KIND_FFN_GATE,
    KIND_FFN_UP,
    KIND_FLOAT,
    KIND_MATRIX,
    HFModel,
    OutTensor,
    TensorSource,
    config_float,
    config_int,
)

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32

# HF hidden_act -> flashgguf activation, for the plain Llama/Mistral architectures.
_ACTIVATIONS = {"silu": "silu", "relu": "relu", "fatrelu": "fatrelu"}

# Per-layer names: HF suffix after "model.layers.N." -> llama.cpp name after "blk.N."
_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj"}


@dataclass(frozen=True)
class LlamaLayout:
    gguf_arch: str  # "llama" or "qwen2"
    # llama.cpp's llama graph applies RoPE to interleaved pairs, HF's Llama to halves: the
    # q/k rows are permuted to match (qwen2's graph uses the halves layout: no permutation).
    permute_qk: bool
    qkv_bias: bool  # q/k/v biases always present (qwen2)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _activation(arch_name: str, config: dict[str, Any]) -> tuple[str, float]:
    act = config.get("hidden_act", "silu")
    if arch_name == "BambooForCausalLM":
        if act != "relu":
            raise UnsupportedError(f"{arch_name} with hidden_act {act!r}: only relu (dReLU) is "
                                   "supported")
        return "drelu", 0.0
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise UnsupportedError(f"{arch_name}: hidden_act {act!r} is not supported (supported: "
                               f"{', '.join(_ACTIVATIONS)})")
    threshold = config_float(config, "hidden_act_param", 0.0) if act == "fatrelu" else 0.0
    return _ACTIVATIONS[act], threshold


def build(arch_name: str, config: dict[str, Any], src: TensorSource,
          layout: LlamaLayout) -> HFModel:
    a = layout.gguf_arch
    n_embd = config_int(config, "hidden_size")
    n_ff = config_int(config, "intermediate_size")
    n_layer = config_int(config, "num_hidden_layers")
    n_head = config_int(config, "num_attention_heads")
    n_head_kv = config_int(config, "num_key_value_heads", n_head)
    n_vocab = config_int(config, "vocab_size")
    head_dim = config_int(config, "head_dim") if config.get("head_dim") else n_embd // n_head
    if not isinstance(head_dim, int) or head_dim % 2 or n_head % n_head_kv:
        raise FormatError(f"config.json: head_dim {head_dim!r} / heads {n_head}/{n_head_kv} "
                          "do not describe a valid attention layout")
    if config.get("rope_scaling"):
        raise UnsupportedError(f"{arch_name}: rope_scaling {config['rope_scaling']!r} is not "
                               "supported")
    activation, threshold = _activation(arch_name, config)

    keys: list[tuple[str, Any, GGUFValueType]] = [
        (f"{a}.context_length", config_int(config, "max_position_embeddings", 2048), U32),
        (f"{a}.embedding_length", n_embd, U32),
        (f"{a}.block_count", n_layer, U32),
        (f"{a}.feed_forward_length", n_ff, U32),
        (f"{a}.attention.head_count", n_head, U32),
        (f"{a}.attention.head_count_kv", n_head_kv, U32),
        (f"{a}.attention.layer_norm_rms_epsilon", config_float(config, "rms_norm_eps", 1e-6), F32),
        (f"{a}.rope.freq_base", config_float(config, "rope_theta", 10000.0), F32),
        (f"{a}.rope.dimension_count", head_dim, U32),
        (f"{a}.vocab_size", n_vocab, U32),
    ]
    if head_dim != n_embd // n_head:
        keys += [(f"{a}.attention.key_length", head_dim, U32),
                 (f"{a}.attention.value_length", head_dim, U32)]

    tensors: list[OutTensor] = []

    def add(name: str, hf: str, shape: tuple[int, ...], kind: str,
            transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        load = src.take(hf, shape)
        if transform is not None:
            load = _then(load, transform)
        tensors.append(OutTensor(name, shape, kind, load))

    add("token_embd.weight", "model.embed_tokens.weight", (n_vocab, n_embd), KIND_MATRIX)
    add("output_norm.weight", "model.norm.weight", (n_embd,), KIND_FLOAT)
    tied = bool(config.get("tie_word_embeddings", False))
    if src.has("lm_head.weight") and not tied:
        add("output.weight", "lm_head.weight", (n_vocab, n_embd), KIND_MATRIX)
    elif not tied:
        raise FormatError(f"{arch_name} checkpoint: lm_head.weight is missing and "
                          "tie_word_embeddings is false")
    else:
        src.ignore(["lm_head.weight"])  # some checkpoints store the tied copy too

    q_rows, kv_rows = n_head * head_dim, n_head_kv * head_dim
    attn_bias = layout.qkv_bias or bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    perm_q = (lambda w: permute_qk(w, n_head)) if layout.permute_qk else None
    perm_k = (lambda w: permute_qk(w, n_head_kv)) if layout.permute_qk else None
    for i in range(n_layer):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        add(blk + "attn_norm.weight", hf + "input_layernorm.weight", (n_embd,), KIND_FLOAT)
        add(blk + "attn_q.weight", hf + _ATTN["q"] + ".weight", (q_rows, n_embd), KIND_MATRIX,
            perm_q)
        add(blk + "attn_k.weight", hf + _ATTN["k"] + ".weight", (kv_rows, n_embd), KIND_MATRIX,
            perm_k)
        add(blk + "attn_v.weight", hf + _ATTN["v"] + ".weight", (kv_rows, n_embd), KIND_MATRIX)
        add(blk + "attn_output.weight", hf + _ATTN["o"] + ".weight", (n_embd, q_rows),
            KIND_MATRIX)
        if attn_bias:
            add(blk + "attn_q.bias", hf + _ATTN["q"] + ".bias", (q_rows,), KIND_FLOAT, perm_q)
            add(blk + "attn_k.bias", hf + _ATTN["k"] + ".bias", (kv_rows,), KIND_FLOAT, perm_k)
            add(blk + "attn_v.bias", hf + _ATTN["v"] + ".bias", (kv_rows,), KIND_FLOAT)
            if src.has(hf + _ATTN["o"] + ".bias"):
                add(blk + "attn_output.bias", hf + _ATTN["o"] + ".bias", (n_embd,), KIND_FLOAT)
        add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (n_embd,),
            KIND_FLOAT)
        add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (n_ff, n_embd), KIND_FFN_GATE)
        add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (n_ff, n_embd), KIND_FFN_UP)
        add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (n_embd, n_ff), KIND_FFN_DOWN)
        if mlp_bias:
            for part, n in (("gate", n_ff), ("up", n_ff), ("down", n_embd)):
                add(f"{blk}ffn_{part}.bias", f"{hf}mlp.{part}_proj.bias", (n,), KIND_FLOAT)
        src.ignore([hf + "self_attn.rotary_emb.inv_freq"])

    notes = []
    if arch_name == "BambooForCausalLM":
        # TurboSparse ships its own activity predictors inside the MLP; flashgguf's
        # calibration fits its own, so they are left out.
        extra = sorted(n for n in src.ckpt.tensors if n not in src.used and ".mlp." in n)
        src.ignore(extra)
        if extra:
            notes.append(f"left out {len(extra)} predictor tensors shipped in the checkpoint")
    src.check_all_used()
    return HFModel(a, keys, tensors, n_vocab, activation, threshold, notes)


def _then(load: Callable[[], np.ndarray],
          transform: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
    return lambda: transform(load())


LLAMA = LlamaLayout("llama", permute_qk=True, qkv_bias=False)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "BambooForCausalLM")


def build_llama(arch_name: str, config: dict[str, Any], src: TensorSource) -> HFModel:
    return build(arch_name, config, src, LLAMA)


for _name in ARCHITECTURES:
    register_hf_class(_name, LLAMA.gguf_arch, build_llama)
