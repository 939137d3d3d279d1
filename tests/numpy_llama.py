"""A numpy forward pass of a llama-architecture GGUF that records every layer's FFN input.

The reference for what the FFN sees on real text (the `ffn_norm-L` node of llama.cpp's
graph), without llama.cpp: RMSNorm, rotary attention with grouped KV heads (llama.cpp's
"normal" rope: adjacent pairs rotate; the GGUF converter permuted Q/K to match), SwiGLU.
Slow but exact enough to compare with stock llama.cpp's perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashgguf.format import open_gguf, tensor_array
from flashgguf.quants import dequantize_rows


@dataclass
class LlamaForward:
    ffn_inputs: list[np.ndarray]  # per layer: [n_tokens, n_embd] float32
    logits: np.ndarray  # [n_tokens, n_vocab]


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float) -> np.ndarray:
    """x [n_tokens, n_head, head_dim]: rotate pairs (2i, 2i+1) by pos * base^(-2i/d)."""
    n, _, d = x.shape
    theta = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n, d/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def llama_forward(path: Path, tokens: list[int]) -> LlamaForward:
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
    mask = np.triu(np.full((n, n), -np.inf), 1)
    ffn_inputs = []
    for i in range(n_layer):
        x = _rms_norm(h, weight(f"blk.{i}.attn_norm.weight").reshape(-1), eps)
        q = _rope((x @ weight(f"blk.{i}.attn_q.weight").T).reshape(n, n_head, head_dim), base)
        k = _rope((x @ weight(f"blk.{i}.attn_k.weight").T).reshape(n, n_head_kv, head_dim), base)
        v = (x @ weight(f"blk.{i}.attn_v.weight").T).reshape(n, n_head_kv, head_dim)
        rep = n_head // n_head_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + mask
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(n, -1)
        h = h + o @ weight(f"blk.{i}.attn_output.weight").T
        x = _rms_norm(h, weight(f"blk.{i}.ffn_norm.weight").reshape(-1), eps)
        ffn_inputs.append(x.astype(np.float32))
        g = x @ weight(f"blk.{i}.ffn_gate.weight").T
        u = x @ weight(f"blk.{i}.ffn_up.weight").T
        h = h + (g / (1.0 + np.exp(-g)) * u) @ weight(f"blk.{i}.ffn_down.weight").T
    h = _rms_norm(h, weight("output_norm.weight").reshape(-1), eps)
    out = weight("output.weight") if "output.weight" in stream.tensors else embd
    return LlamaForward(ffn_inputs, (h @ out.T).astype(np.float32))
