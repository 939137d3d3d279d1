"""Hugging Face-style checkpoints made by the tests (never committed). Their numpy reference
forward passes (tests/numpy_reference.py: hf_llama_logits, hf_opt_logits) are written from the
published architectures (HF's modeling_llama, modeling_qwen2, modeling_opt and the ProSparse /
TurboSparse model cards), independent of the converter."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import TokenType

from flashgguf.format import GGUFStream, open_gguf, tensor_array
from flashgguf.quants import dequantize_rows

# ---- safetensors writer -------------------------------------------------------------------


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, pos = [], 0
    for name, arr in tensors.items():
        if dtype == "BF16":
            raw = to_bf16_bits(arr).tobytes()
        else:
            raw = np.ascontiguousarray(arr, dtype="<f4" if dtype == "F32" else "<f2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


# ---- tokenizer files from a GGUF's tokenizer keys ------------------------------------------

SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _special(stream: GGUFStream) -> tuple[list[str], list[int], dict[str, Any]]:
    tokens = list(stream.fields["tokenizer.ggml.tokens"])
    types = [int(t) for t in stream.fields["tokenizer.ggml.token_type"]]
    config: dict[str, Any] = {"model_max_length": 8192, "clean_up_tokenization_spaces": False}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                     ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
        tid = stream.get(f"tokenizer.ggml.{key}")
        if tid is not None:
            config[f"{typ}_token"] = tokens[int(tid)]
    for typ in ("bos", "eos"):
        flag = stream.get(f"tokenizer.ggml.add_{typ}_token")
        if flag is not None:
            config[f"add_{typ}_token"] = bool(flag)
    if stream.get("tokenizer.chat_template"):
        config["chat_template"] = stream.get("tokenizer.chat_template")
    return tokens, types, config


def export_tokenizer_json(stream: GGUFStream, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json as SmolLM2 publishes them."""
    tokens, types, config = _special(stream)
    special = [i for i, t in enumerate(types) if t != TokenType.NORMAL]
    tokenizer = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False,
                          "special": types[i] == TokenType.CONTROL} for i in special],
        "normalizer": None,
        "pre_tokenizer": SMOLLM_PRE_TOKENIZER,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in stream.fields["tokenizer.ggml.merges"]]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False),
                                           encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def export_vocab_json(stream: GGUFStream, folder: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json, the slow GPT-2 tokenizer's files."""
    tokens, types, config = _special(stream)
    config["added_tokens_decoder"] = {
        str(i): {"content": tokens[i], "special": True}
        for i, t in enumerate(types) if t == TokenType.CONTROL}
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)},
                                                  ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(stream.fields["tokenizer.ggml.merges"]) + "\n",
        encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


# ---- SmolLM2 GGUF -> Llama checkpoint ----------------------------------------------------

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows -> HF's rotate-half rows (inverse of the converter's)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def export_llama_gguf(gguf_path: Path, folder: Path, dtype: str = "BF16") -> dict[str, Any]:
    """A llama-architecture GGUF as a Hugging Face checkpoint (dequantized weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    stream, buf = open_gguf(gguf_path)
    f = stream.fields
    n_head = int(f["llama.attention.head_count"])
    n_head_kv = int(f["llama.attention.head_count_kv"])
    tensors: dict[str, np.ndarray] = {}
    for t in stream.tensors.values():
        raw = tensor_array(buf, t)
        data = dequantize_rows(raw, t.ggml_type, t.shape[0]).reshape(t.shape[::-1])
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = data
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = data
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = data
        else:
            _, bid, rest = t.name.split(".", 2)
            if rest == "attn_q.weight":
                data = unpermute_qk(data, n_head)
            elif rest == "attn_k.weight":
                data = unpermute_qk(data, n_head_kv)
            tensors[f"model.layers.{bid}.{_LAYER_NAMES[rest]}"] = data
    write_safetensors(folder / "model.safetensors", tensors, dtype)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(f["llama.embedding_length"]),
        "intermediate_size": int(f["llama.feed_forward_length"]),
        "num_hidden_layers": int(f["llama.block_count"]),
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "rms_norm_eps": float(f["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(f["llama.rope.freq_base"]),
        "max_position_embeddings": int(f["llama.context_length"]),
        "vocab_size": len(f["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in stream.tensors,
        "hidden_act": "silu", "rope_scaling": None, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    export_tokenizer_json(stream, folder)
    return config


# ---- tiny seeded checkpoints ---------------------------------------------------------------


@dataclass(frozen=True)
class TinyHF:
    # "llama", "mistral" (silu), "relullama", "prosparse", "turbosparse", "qwen2", "opt"
    kind: str
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 256
    threshold: float = 0.25  # ProSparse's hidden_act_param
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def tiny_config(spec: TinyHF, n_vocab: int) -> dict[str, Any]:
    if spec.kind == "opt":
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt",
                "hidden_size": spec.n_embd, "ffn_dim": spec.n_ff,
                "num_hidden_layers": spec.n_layer, "num_attention_heads": spec.n_head,
                "max_position_embeddings": spec.n_ctx, "vocab_size": n_vocab,
                "do_layer_norm_before": True, "word_embed_proj_dim": spec.n_embd,
                "activation_function": "relu", "enable_bias": True,
                "layer_norm_elementwise_affine": True, "bos_token_id": 2, "eos_token_id": 2,
                "pad_token_id": 1}
    arch, act = {
        "llama": ("LlamaForCausalLM", "silu"),
        "mistral": ("MistralForCausalLM", "silu"),
        "relullama": ("LlamaForCausalLM", "relu"),
        "prosparse": ("LlamaForCausalLM", "fatrelu"),
        "turbosparse": ("BambooForCausalLM", "relu"),
        "qwen2": ("Qwen2ForCausalLM", "silu"),
    }[spec.kind]
    config = {"architectures": [arch], "hidden_size": spec.n_embd,
              "intermediate_size": spec.n_ff, "num_hidden_layers": spec.n_layer,
              "num_attention_heads": spec.n_head, "num_key_value_heads": spec.n_head_kv,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": spec.n_ctx, "vocab_size": n_vocab,
              "hidden_act": act, "tie_word_embeddings": spec.kind == "qwen2",
              "rope_scaling": None}
    if spec.kind == "prosparse":
        config["hidden_act_param"] = spec.threshold
    if spec.kind == "mistral":
        config["sliding_window"] = 4096  # wider than any test prompt
    return config


def tiny_weights(spec: TinyHF, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    d, f = spec.n_embd, spec.n_ff

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n: int, base: float = 0.0, scale: float = 0.1) -> np.ndarray:
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    if spec.kind == "opt":
        p = "model.decoder."
        w[p + "embed_tokens.weight"] = vec(n_vocab * d, scale=1.0).reshape(n_vocab, d)
        w[p + "embed_positions.weight"] = vec((spec.n_ctx + 2) * d, scale=0.5).reshape(-1, d)
        w[p + "final_layer_norm.weight"] = vec(d, 1.0)
        w[p + "final_layer_norm.bias"] = vec(d)
        for i in range(spec.n_layer):
            lp = f"{p}layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                w[f"{lp}self_attn.{name}.weight"] = mat(d, d)
                w[f"{lp}self_attn.{name}.bias"] = vec(d)
            for name in ("self_attn_layer_norm", "final_layer_norm"):
                w[f"{lp}{name}.weight"] = vec(d, 1.0)
                w[f"{lp}{name}.bias"] = vec(d)
            w[f"{lp}fc1.weight"], w[f"{lp}fc1.bias"] = mat(f, d), vec(f)
            w[f"{lp}fc2.weight"], w[f"{lp}fc2.bias"] = mat(d, f), vec(d)
        return w
    hd, kv = spec.head_dim, spec.n_head_kv
    w["model.embed_tokens.weight"] = vec(n_vocab * d, scale=1.0).reshape(n_vocab, d)
    w["model.norm.weight"] = vec(d, 1.0)
    if spec.kind != "qwen2":
        w["lm_head.weight"] = mat(n_vocab, d)
    for i in range(spec.n_layer):
        lp = f"model.layers.{i}."
        w[lp + "input_layernorm.weight"] = vec(d, 1.0)
        w[lp + "post_attention_layernorm.weight"] = vec(d, 1.0)
        w[lp + "self_attn.q_proj.weight"] = mat(spec.n_head * hd, d)
        w[lp + "self_attn.k_proj.weight"] = mat(kv * hd, d)
        w[lp + "self_attn.v_proj.weight"] = mat(kv * hd, d)
        w[lp + "self_attn.o_proj.weight"] = mat(d, spec.n_head * hd)
        if spec.kind == "qwen2":
            w[lp + "self_attn.q_proj.bias"] = vec(spec.n_head * hd, scale=0.5)
            w[lp + "self_attn.k_proj.bias"] = vec(kv * hd, scale=0.5)
            w[lp + "self_attn.v_proj.bias"] = vec(kv * hd, scale=0.5)
        w[lp + "mlp.gate_proj.weight"] = mat(f, d)
        w[lp + "mlp.up_proj.weight"] = mat(f, d)
        w[lp + "mlp.down_proj.weight"] = mat(d, f)
    return w


def write_tiny_checkpoint(folder: Path, spec: TinyHF, tokenizer_gguf: Path,
                          dtype: str = "F32") -> dict[str, np.ndarray]:
    """A tiny seeded checkpoint in folder; returns its weights (as stored, float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    stream, _ = open_gguf(tokenizer_gguf)
    n_vocab = len(stream.fields["tokenizer.ggml.tokens"])
    weights = tiny_weights(spec, n_vocab)
    write_safetensors(folder / "model.safetensors", weights, dtype)
    (folder / "config.json").write_text(json.dumps(tiny_config(spec, n_vocab)), encoding="utf-8")
    if spec.kind == "opt":
        export_vocab_json(stream, folder)
    else:
        export_tokenizer_json(stream, folder)
    return weights
