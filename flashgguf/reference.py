"""A numpy forward pass of a llama or qwen2 GGUF, with a hook on every layer's FFN.

The reference for what the FFN sees on real text (the `ffn_norm-L` node of llama.cpp's
graph) and for what a neuron-selection policy costs in perplexity, without llama.cpp:
RMSNorm, rotary attention with grouped KV heads (llama.cpp's "normal" rope for llama:
adjacent pairs rotate, the GGUF converter permuted Q/K to match; NEOX for qwen2: halves
rotate), qwen2's Q/K/V biases, SwiGLU. Weights are dequantized once and kept (float32: 4
bytes a weight, about 6 GB for a 1.5B model). Slow but exact enough to compare with stock
llama.cpp's perplexity (tests/test_predictor_smollm2.py, tools/selection.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .archs import get_arch
from .errors import UnsupportedError
from .format import open_gguf, tensor_array
from .format.gguf_stream import GGUFStream
from .quants import dequantize_rows

# rope conventions of llama.cpp (llama_model_rope_type): NEOX rotates (i, i + d/2)
_NEOX_ARCHS = {"qwen2"}
SUPPORTED_ARCHS = ("llama", "qwen2")

# FFN hook: (layer, ffn input rows [n_tokens, n_embd]) -> FFN output rows [n_tokens, n_embd]
FFNHook = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class ReferenceModel:
    """A GGUF's hyperparameters and its tensors, dequantized on first use and kept."""

    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    eps: float
    rope_base: float
    neox: bool
    dtype: type[np.floating]
    stream: GGUFStream = field(repr=False)
    buf: memoryview = field(repr=False)
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def has(self, name: str) -> bool:
        return name in self.stream.tensors

    def weight(self, name: str) -> np.ndarray:
        """Tensor name as [rows, row length] (a vector as [1, n]) in self.dtype."""
        w = self._cache.get(name)
        if w is None:
            t = self.stream.tensors[name]
            w = dequantize_rows(tensor_array(self.buf, t), t.ggml_type, t.shape[0])
            w = self._cache[name] = np.ascontiguousarray(w, dtype=self.dtype)
        return w

    def vector(self, name: str) -> np.ndarray:
        return self.weight(name).reshape(-1)

    def ffn(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate [n_ff, n_embd], up [n_ff, n_embd], down [n_embd, n_ff]) of a layer."""
        spec = get_arch(self.arch)
        return tuple(self.weight(t.format(bid=layer))  # type: ignore[return-value]
                     for t in (spec.ffn_gate, spec.ffn_up, spec.ffn_down))


def load_reference(path: Path, dtype: type[np.floating] = np.float32) -> ReferenceModel:
    stream, buf = open_gguf(Path(path))
    f = stream.fields
    arch = str(f["general.architecture"])
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"the numpy reference forward runs {', '.join(SUPPORTED_ARCHS)}, "
                               f"not {arch!r}")
    return ReferenceModel(
        path=Path(path), arch=arch, n_layer=int(f[f"{arch}.block_count"]),
        n_head=int(f[f"{arch}.attention.head_count"]),
        n_head_kv=int(f[f"{arch}.attention.head_count_kv"]),
        eps=float(f[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_base=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        neox=arch in _NEOX_ARCHS, dtype=dtype, stream=stream, buf=buf)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """x [n_tokens, n_head, head_dim] at positions 0..n-1: rotate pairs by pos * base^(-2i/d);
    the pairs are (2i, 2i+1) (llama.cpp's normal rope) or (i, i + d/2) (NEOX)."""
    n, _, d = x.shape
    theta = np.arange(n)[:, None] * base ** (-np.arange(0, d, 2) / d)  # [n, d/2]
    cos = np.cos(theta)[:, None, :].astype(x.dtype)
    sin = np.sin(theta)[:, None, :].astype(x.dtype)
    first, second = (slice(0, d // 2), slice(d // 2, d)) if neox else \
        (slice(0, d, 2), slice(1, d, 2))
    x0, x1 = x[..., first], x[..., second]
    out = np.empty_like(x)
    out[..., first] = x0 * cos - x1 * sin
    out[..., second] = x0 * sin + x1 * cos
    return out


def silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def dense_ffn(model: ReferenceModel, layer: int, x: np.ndarray) -> np.ndarray:
    gate, up, down = model.ffn(layer)
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def _linear(model: ReferenceModel, x: np.ndarray, name: str) -> np.ndarray:
    y = x @ model.weight(f"{name}.weight").T
    if model.has(f"{name}.bias"):
        y = y + model.vector(f"{name}.bias")
    return y


def _attention(model: ReferenceModel, layer: int, x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    p = f"blk.{layer}"
    q = _linear(model, x, f"{p}.attn_q")
    head_dim = q.shape[1] // model.n_head
    q = rope(q.reshape(n, model.n_head, head_dim), model.rope_base, model.neox)
    k = rope(_linear(model, x, f"{p}.attn_k").reshape(n, model.n_head_kv, head_dim),
             model.rope_base, model.neox)
    v = _linear(model, x, f"{p}.attn_v").reshape(n, model.n_head_kv, head_dim)
    return causal_attention(q, k, v) @ model.weight(f"{p}.attn_output.weight").T


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [n, n_head, hd], k/v [n, n_head_kv, hd] -> [n, n_head * hd], each position seeing
    itself and the ones before (grouped heads share k/v); in q's dtype."""
    n, n_head, head_dim = q.shape
    rep = n_head // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    mask = np.triu(np.full((n, n), -np.inf, dtype=q.dtype), 1)
    att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim).astype(q.dtype) + mask
    att = np.exp(att - att.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", att, v).reshape(n, -1)


def forward(model: ReferenceModel, tokens: list[int], ffn: FFNHook | None = None) -> np.ndarray:
    """Logits [len(tokens), n_vocab] (float32) of one causal window from position 0; ffn
    replaces the dense FFN of every layer (it sees the normed input, returns the output)."""
    embd = model.weight("token_embd.weight")
    h = embd[np.asarray(tokens)]
    for i in range(model.n_layer):
        h = h + _attention(model, i, rms_norm(h, model.vector(f"blk.{i}.attn_norm.weight"),
                                              model.eps))
        x = rms_norm(h, model.vector(f"blk.{i}.ffn_norm.weight"), model.eps)
        h = h + (dense_ffn(model, i, x) if ffn is None else ffn(i, x))
    h = rms_norm(h, model.vector("output_norm.weight"), model.eps)
    out = model.weight("output.weight") if model.has("output.weight") else embd
    return (h @ out.T).astype(np.float32)


@dataclass
class RecordedForward:
    ffn_inputs: list[np.ndarray]  # per layer: [n_tokens, n_embd] float32
    logits: np.ndarray  # [n_tokens, n_vocab]


def forward_recording_ffn_inputs(path: Path, tokens: list[int],
                                 dtype: type[np.floating] = np.float64) -> RecordedForward:
    """Logits and every layer's FFN input (float32) of one window of tokens."""
    model = load_reference(path, dtype)
    inputs: list[np.ndarray] = []

    def record(layer: int, x: np.ndarray) -> np.ndarray:
        inputs.append(x.astype(np.float32))
        return dense_ffn(model, layer, x)

    logits = forward(model, tokens, record)
    return RecordedForward(inputs, logits)
