"""Numpy forward passes of Hugging Face checkpoints under their transformers names
(tests/hf_factory.py writes such checkpoints): slow, float64, independent of llama.cpp and
of flashgguf's converter. A GGUF's own forward pass is flashgguf.reference's, whose RMSNorm
rope and attention these share: transformers' rotate_half is the NEOX rope (pairs i, i + d/2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from flashgguf.reference import causal_attention, rms_norm, rope

if TYPE_CHECKING:
    from hf_factory import TinyHF


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


def hf_llama_logits(spec: TinyHF, w: dict[str, np.ndarray], tokens: list[int],
                    act_kind: str | None = None) -> np.ndarray:
    """Logits [T, n_vocab] of a Llama/Mistral/Bamboo/Qwen2 decoder (HF semantics)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, n_tok = spec.head_dim, len(tokens)
    h = w["model.embed_tokens.weight"][tokens]
    for i in range(spec.n_layer):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], 1e-6)
        proj = {}
        for name in "qkv":
            y = x @ w[f"{p}self_attn.{name}_proj.weight"].T
            if f"{p}self_attn.{name}_proj.bias" in w:
                y = y + w[f"{p}self_attn.{name}_proj.bias"]
            proj[name] = y.reshape(n_tok, -1, hd)
        q, k = rope(proj["q"], 10000.0, neox=True), rope(proj["k"], 10000.0, neox=True)
        h = h + causal_attention(q, k, proj["v"]) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], 1e-6)
        act = ffn_activation(act_kind or spec.kind, x @ w[p + "mlp.gate_proj.weight"].T,
                             x @ w[p + "mlp.up_proj.weight"].T, spec.threshold)
        h = h + act @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], 1e-6)
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
