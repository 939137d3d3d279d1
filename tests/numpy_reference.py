"""Numpy reference forward passes: slow, float64, independent of llama.cpp and of flashgguf's
converter, exact enough to compare with stock llama.cpp's logits and perplexity.

- gguf_llama_forward: a llama-architecture GGUF as llama.cpp lays it out; records every
  layer's FFN input (the `ffn_norm-L` node of llama.cpp's graph) besides the logits.
- hf_llama_logits, hf_opt_logits: the weights of a Hugging Face checkpoint under their
  transformers names (tests/hf_factory.py writes such checkpoints).

They share RMSNorm, causal attention with grouped KV heads and the FFN activations; they
differ in the rotary embedding: llama.cpp's "normal" rope turns adjacent pairs (the GGUF
converter permuted Q/K to match), transformers' rotate_half turns the two halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flashgguf.format import open_gguf, tensor_array
from flashgguf.quants import dequantize_rows

if TYPE_CHECKING:
    from hf_factory import TinyHF


@dataclass
class LlamaForward:
    ffn_inputs: list[np.ndarray]  # per layer: [n_tokens, n_embd] float32
    logits: np.ndarray  # [n_tokens, n_vocab]


def rms_norm(x: np.ndarray, eps: float, w: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [T, H, hd], k/v [T, Hkv, hd] -> [T, H * hd] (grouped heads share k/v)."""
    n_tok, n_head, hd = q.shape
    group = n_head // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    scores = scores + np.triu(np.full((n_tok, n_tok), -np.inf), 1)
    return np.einsum("hts,shd->thd", _softmax(scores), v).reshape(n_tok, n_head * hd)


def rope_adjacent_pairs(x: np.ndarray, base: float) -> np.ndarray:
    """llama.cpp's rope on x [T, H, hd] at positions 0..T-1: rotate pairs (2i, 2i+1) by
    pos * base^(-2i/hd)."""
    n, _, d = x.shape
    theta = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n, d/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def rope_rotate_half(x: np.ndarray, theta: float) -> np.ndarray:
    """transformers' rotary embedding (rotate_half) on x [T, H, hd] at positions 0..T-1."""
    n_tok, _, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(n_tok)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * cos + rot * sin


def ffn_activation(kind: str, gate: np.ndarray, up: np.ndarray, threshold: float) -> np.ndarray:
    if kind in ("llama", "mistral", "qwen2"):  # SwiGLU
        return gate / (1.0 + np.exp(-gate)) * up
    if kind == "relullama":
        return np.maximum(gate, 0) * up
    if kind == "prosparse":  # FATReLU: below the threshold is zero
        return np.where(gate > threshold, gate, 0) * up
    if kind == "turbosparse":  # dReLU
        return np.maximum(gate, 0) * np.maximum(up, 0)
    raise ValueError(kind)


def gguf_llama_forward(path: Path, tokens: list[int]) -> LlamaForward:
    """Logits and FFN inputs of a llama-architecture GGUF (SwiGLU) on tokens."""
    stream, buf = open_gguf(path)
    f = stream.fields

    def weight(name: str) -> np.ndarray:
        t = stream.tensors[name]
        return dequantize_rows(tensor_array(buf, t), t.ggml_type, t.shape[0]).astype(np.float64)

    n_layer = int(f["llama.block_count"])
    n_head = int(f["llama.attention.head_count"])
    n_head_kv = int(f["llama.attention.head_count_kv"])
    eps = float(f["llama.attention.layer_norm_rms_epsilon"])
    base = float(f.get("llama.rope.freq_base", 10000.0))
    embd = weight("token_embd.weight")
    h = embd[np.asarray(tokens)]
    n = len(tokens)
    head_dim = h.shape[1] // n_head
    ffn_inputs = []
    for i in range(n_layer):
        x = rms_norm(h, eps, weight(f"blk.{i}.attn_norm.weight").reshape(-1))
        q = (x @ weight(f"blk.{i}.attn_q.weight").T).reshape(n, n_head, head_dim)
        k = (x @ weight(f"blk.{i}.attn_k.weight").T).reshape(n, n_head_kv, head_dim)
        v = (x @ weight(f"blk.{i}.attn_v.weight").T).reshape(n, n_head_kv, head_dim)
        o = causal_attention(rope_adjacent_pairs(q, base), rope_adjacent_pairs(k, base), v)
        h = h + o @ weight(f"blk.{i}.attn_output.weight").T
        x = rms_norm(h, eps, weight(f"blk.{i}.ffn_norm.weight").reshape(-1))
        ffn_inputs.append(x.astype(np.float32))
        act = ffn_activation("llama", x @ weight(f"blk.{i}.ffn_gate.weight").T,
                             x @ weight(f"blk.{i}.ffn_up.weight").T, 0.0)
        h = h + act @ weight(f"blk.{i}.ffn_down.weight").T
    h = rms_norm(h, eps, weight("output_norm.weight").reshape(-1))
    out = weight("output.weight") if "output.weight" in stream.tensors else embd
    return LlamaForward(ffn_inputs, (h @ out.T).astype(np.float32))


def hf_llama_logits(spec: TinyHF, w: dict[str, np.ndarray], tokens: list[int],
                    act_kind: str | None = None) -> np.ndarray:
    """Logits [T, n_vocab] of a Llama/Mistral/Bamboo/Qwen2 decoder (HF semantics)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, n_tok = spec.head_dim, len(tokens)
    h = w["model.embed_tokens.weight"][tokens]
    for i in range(spec.n_layer):
        p = f"model.layers.{i}."
        x = rms_norm(h, 1e-6, w[p + "input_layernorm.weight"])
        proj = {}
        for name in "qkv":
            y = x @ w[f"{p}self_attn.{name}_proj.weight"].T
            if f"{p}self_attn.{name}_proj.bias" in w:
                y = y + w[f"{p}self_attn.{name}_proj.bias"]
            proj[name] = y.reshape(n_tok, -1, hd)
        q, k = rope_rotate_half(proj["q"], 10000.0), rope_rotate_half(proj["k"], 10000.0)
        h = h + causal_attention(q, k, proj["v"]) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, 1e-6, w[p + "post_attention_layernorm.weight"])
        act = ffn_activation(act_kind or spec.kind, x @ w[p + "mlp.gate_proj.weight"].T,
                             x @ w[p + "mlp.up_proj.weight"].T, spec.threshold)
        h = h + act @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, 1e-6, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


def hf_opt_logits(spec: TinyHF, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits [T, n_vocab] of a pre-norm OPT decoder (HF's modeling_opt)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    p, hd, n_tok = "model.decoder.", spec.head_dim, len(tokens)

    def ln(x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    # OPTLearnedPositionalEmbedding: position t reads row t + 2
    h = w[p + "embed_tokens.weight"][tokens] + w[p + "embed_positions.weight"][
        np.arange(n_tok) + 2]
    for i in range(spec.n_layer):
        lp = f"{p}layers.{i}."
        x = ln(h, lp + "self_attn_layer_norm")
        q, k, v = (linear(x, f"{lp}self_attn.{n}_proj").reshape(n_tok, -1, hd) for n in "qkv")
        h = h + linear(causal_attention(q, k, v), lp + "self_attn.out_proj")
        x = ln(h, lp + "final_layer_norm")
        h = h + linear(np.maximum(linear(x, lp + "fc1"), 0), lp + "fc2")
    return ln(h, p + "final_layer_norm") @ w[p + "embed_tokens.weight"].T
