"""Small seeded GGUF models made by the tests (never committed): real llama.cpp
architectures with random weights and a tokenizer copied from a GGUF (the tests give
them tiny_tokenizer's generated one). Dense ("llama", "qwen2", "gemma3", ...) and
mixture-of-experts ("qwen3moe", "qwen2moe", "olmoe", and "llama" with experts: Mixtral's
layout) models, in the tensor layout and with the keys stock llama.cpp loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf import quants as gq

from flashgguf.format import open_gguf
from flashgguf.quants import quantize_rows

Q = GGMLQuantizationType


@dataclass(frozen=True)
class TinyModel:
    arch: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 160
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # None: n_embd // n_head (then no key_length/value_length keys)
    ffn_type: GGMLQuantizationType = Q.Q8_0
    # per-layer down types, as K-quant mixes store them (Q4_K_M: Q6_K in some layers); None:
    # ffn_type everywhere
    down_types: tuple[GGMLQuantizationType, ...] | None = None
    attn_type: GGMLQuantizationType = Q.F16
    ffn_biases: bool = False
    seed: int = 0
    # mixture of experts (n_expert > 0): each layer gets a router and stacked experts instead
    # of ffn_gate/up/down. The dense fields above keep their meaning; the MoE ones leave a
    # dense model (n_expert == 0) byte-identical
    n_expert: int = 0
    n_expert_used: int = 0
    # expert width; 0: n_ff. "llama" (Mixtral) and "olmoe" read the expert width from
    # feed_forward_length, so for them it is written there
    n_ff_exp: int = 0
    # qwen2moe's shared expert width (required there: qwen2moe always has one; typed
    # ffn_type for gate/up and like ffn_down for down); 0: none
    n_ff_shexp: int = 0
    # types of ffn_gate_exps, ffn_up_exps, ffn_down_exps; None: ffn_type for all three
    expert_types: tuple[GGMLQuantizationType, GGMLQuantizationType,
                        GGMLQuantizationType] | None = None


MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe", "llama")


def _quantized(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType,
               scale: float) -> tuple[np.ndarray, GGMLQuantizationType]:
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    if qtype == Q.F32:
        return w, qtype
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf.quants cannot write K-quants: ggml does
        return quantize_rows(w.reshape(-1, shape[-1]), qtype).reshape(*shape[:-1], -1), qtype
    return gq.quantize(w, qtype), qtype


def _copy_tokenizer(w: GGUFWriter, tokenizer_gguf: Path) -> int:
    stream, _ = open_gguf(tokenizer_gguf)
    for key, value in stream.fields.items():
        if key.startswith("tokenizer."):
            if hasattr(value, "tolist"):
                value = value.tolist()
            w.add_key_value(key, value, stream.value_types[key], stream.array_types.get(key))
    return len(stream.fields["tokenizer.ggml.tokens"])


def _check_moe(spec: TinyModel) -> None:
    if spec.arch not in MOE_ARCHS:
        raise ValueError(f"no mixture-of-experts layout for {spec.arch!r}")
    if not 0 < spec.n_expert_used <= spec.n_expert:
        raise ValueError("a MoE model needs 0 < n_expert_used <= n_expert")
    if (spec.arch == "qwen2moe") != (spec.n_ff_shexp > 0):
        raise ValueError("n_ff_shexp (a shared expert) is qwen2moe's, and qwen2moe needs it")
    if spec.arch in ("qwen2moe", "olmoe") and (spec.head_dim or spec.n_embd // spec.n_head) \
            * spec.n_head != spec.n_embd:
        raise ValueError(f"{spec.arch} needs n_head * head_dim == n_embd")
    if spec.arch == "olmoe" and spec.n_head_kv != spec.n_head:
        # llama.cpp gives olmoe's attn_k_norm n_embd weights: no grouped-query attention
        raise ValueError("olmoe needs n_head_kv == n_head")


def write_tiny_model(path: Path, spec: TinyModel, tokenizer_gguf: Path) -> Path:
    moe = spec.n_expert > 0
    if moe:
        _check_moe(spec)
    rng = np.random.default_rng(spec.seed)
    w = GGUFWriter(path, spec.arch)
    a = spec.arch
    head_dim = spec.head_dim or spec.n_embd // spec.n_head
    n_ff_exp = spec.n_ff_exp or spec.n_ff
    w.add_uint32(f"{a}.context_length", 2048)
    w.add_uint32(f"{a}.embedding_length", spec.n_embd)
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    # llama (Mixtral) and olmoe take the expert width from feed_forward_length
    ff_len = n_ff_exp if moe and a in ("llama", "olmoe") else spec.n_ff
    w.add_uint32(f"{a}.feed_forward_length", ff_len)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    if spec.head_dim is not None:
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.value_length", head_dim)
    if a == "gemma3":
        # as Gemma 3's converter writes it: local layers see the last 16 tokens (shorter than
        # the test text), every 6th layer is global (llama.cpp's default pattern for gemma3)
        w.add_uint32(f"{a}.attention.sliding_window", 16)
    if moe:
        w.add_uint32(f"{a}.expert_count", spec.n_expert)
        w.add_uint32(f"{a}.expert_used_count", spec.n_expert_used)
        if a in ("qwen3moe", "qwen2moe"):
            w.add_uint32(f"{a}.expert_feed_forward_length", n_ff_exp)
        if a == "qwen2moe":
            w.add_uint32(f"{a}.expert_shared_feed_forward_length", spec.n_ff_shexp)
    w.add_uint32("general.file_type", 1)
    n_vocab = _copy_tokenizer(w, tokenizer_gguf)

    def add(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, scale: float) -> None:
        data, t = _quantized(rng, shape, qtype, scale)
        w.add_tensor(name, data, raw_dtype=None if t in (Q.F32,) else t)

    # Gemma multiplies the embeddings by sqrt(n_embd): keep its residual stream at the scale
    # of the others (else the post-normed FFN would hardly move the logits)
    embd_scale = 1.0 / np.sqrt(spec.n_embd) if a == "gemma3" else 1.0
    add("token_embd.weight", (n_vocab, spec.n_embd), Q.F16, embd_scale)
    w.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    if moe and a in ("qwen2moe", "olmoe"):
        # their llama.cpp loaders require an untied output (no fallback to token_embd)
        add("output.weight", (n_vocab, spec.n_embd), Q.F16, 1.0)
    q_dim = spec.n_head * head_dim
    kv_dim = spec.n_head_kv * head_dim
    s_attn = 1.0 / np.sqrt(spec.n_embd)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    for i in range(spec.n_layer):
        norm(f"blk.{i}.attn_norm.weight", spec.n_embd)
        add(f"blk.{i}.attn_q.weight", (q_dim, spec.n_embd), spec.attn_type, s_attn)
        add(f"blk.{i}.attn_k.weight", (kv_dim, spec.n_embd), spec.attn_type, s_attn)
        add(f"blk.{i}.attn_v.weight", (kv_dim, spec.n_embd), spec.attn_type, s_attn)
        add(f"blk.{i}.attn_output.weight", (spec.n_embd, q_dim), spec.attn_type,
            1.0 / np.sqrt(q_dim))
        if spec.arch == "qwen3moe":
            norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        if spec.arch == "olmoe":  # OLMoE normalizes the whole q and k rows
            norm(f"blk.{i}.attn_q_norm.weight", q_dim)
            norm(f"blk.{i}.attn_k_norm.weight", kv_dim)
        if spec.arch == "gemma3":
            # per-head QK norms, and norms after attention and after the FFN
            norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            norm(f"blk.{i}.attn_k_norm.weight", head_dim)
            norm(f"blk.{i}.post_attention_norm.weight", spec.n_embd)
            norm(f"blk.{i}.post_ffw_norm.weight", spec.n_embd)
        if spec.arch in ("qwen2", "qwen2moe"):
            for name, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                w.add_tensor(f"blk.{i}.{name}.bias",
                             (0.1 * rng.standard_normal(n)).astype(np.float32))
        norm(f"blk.{i}.ffn_norm.weight", spec.n_embd)
        down_type = spec.ffn_type if spec.down_types is None else spec.down_types[i]
        if moe:
            _add_experts(spec, i, add, n_ff_exp, down_type)
            continue
        add(f"blk.{i}.ffn_gate.weight", (spec.n_ff, spec.n_embd), spec.ffn_type, s_attn)
        add(f"blk.{i}.ffn_up.weight", (spec.n_ff, spec.n_embd), spec.ffn_type, s_attn)
        add(f"blk.{i}.ffn_down.weight", (spec.n_embd, spec.n_ff), down_type,
            1.0 / np.sqrt(spec.n_ff))
        if spec.ffn_biases:
            for name, n in (("ffn_gate", spec.n_ff), ("ffn_up", spec.n_ff),
                            ("ffn_down", spec.n_embd)):
                w.add_tensor(f"blk.{i}.{name}.bias",
                             (0.1 * rng.standard_normal(n)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_experts(spec: TinyModel, i: int, add, n_ff_exp: int,
                 down_type: GGMLQuantizationType) -> None:
    """Layer i's MoE FFN: router, stacked experts (numpy (n_expert, rows, cols), ggml
    {cols, rows, n_expert}) and qwen2moe's gated shared expert."""
    e, d = spec.n_expert, spec.n_embd
    s_in = 1.0 / np.sqrt(d)
    # the router sees the RMS-normed stream (entries ~1): logits spread ~1, so routing
    # depends on the token without being one-hot
    add(f"blk.{i}.ffn_gate_inp.weight", (e, d), Q.F32, s_in)
    gate_t, up_t, down_t = spec.expert_types or (spec.ffn_type,) * 3
    add(f"blk.{i}.ffn_gate_exps.weight", (e, n_ff_exp, d), gate_t, s_in)
    add(f"blk.{i}.ffn_up_exps.weight", (e, n_ff_exp, d), up_t, s_in)
    add(f"blk.{i}.ffn_down_exps.weight", (e, d, n_ff_exp), down_t, 1.0 / np.sqrt(n_ff_exp))
    if spec.n_ff_shexp:
        f = spec.n_ff_shexp
        add(f"blk.{i}.ffn_gate_inp_shexp.weight", (d,), Q.F32, s_in)
        add(f"blk.{i}.ffn_gate_shexp.weight", (f, d), spec.ffn_type, s_in)
        add(f"blk.{i}.ffn_up_shexp.weight", (f, d), spec.ffn_type, s_in)
        add(f"blk.{i}.ffn_down_shexp.weight", (d, f), down_type, 1.0 / np.sqrt(f))
