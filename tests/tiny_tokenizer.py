"""A small byte-level BPE tokenizer (GPT-2 style, SmolLM2's layout) made by the tests, so the
generated models need no downloaded model: 3 special tokens, the 256 byte tokens and merges
learned here on the evaluation excerpt in tests/data. Written as a GGUF holding only the
tokenizer keys, the form model_factory and hf_factory copy a tokenizer from."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from gguf import GGUFWriter, TokenType

CORPUS = Path(__file__).resolve().parent.parent / "flashgguf/data/evaluation_head.txt"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
N_MERGES = 200
N_VOCAB = 49152
# ChatML, as SmolLM2's template renders it (without its default system prompt)
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# GPT-2's pre-tokenizer with Python's re (letters approximated by [^\W\d_]); the merges only
# need to be a valid BPE, llama.cpp applies its own "smollm" pre-tokenizer when encoding
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+")


def byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b -> the printable character its token is spelled with."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def train_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word counts: repeatedly merge the most frequent adjacent pair (ties: the
    pair first seen, so the result is deterministic)."""
    sym = byte_symbols()
    counts = Counter(tuple(sym[b] for b in w.encode("utf-8")) for w in _WORDS.findall(text))
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=pairs.__getitem__)  # max keeps the first of equal counts
        merges.append(best)
        joined = best[0] + best[1]
        new: dict[tuple[str, ...], int] = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        words = new
    return merges


def write_tiny_tokenizer(path: Path, n_merges: int = N_MERGES) -> Path:
    merges = train_merges(CORPUS.read_text(encoding="utf-8")[:12_000], n_merges)
    tokens = [*SPECIAL, *byte_symbols()]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:  # two merges can spell the same token
            tokens.append(a + b)
            seen.add(a + b)
    types = [TokenType.CONTROL] * len(SPECIAL) + [TokenType.NORMAL] * (len(tokens) - 3)
    # SmolLM2's vocabulary size: the generated models' random weights after the embedding
    # are the same draws as when they borrowed SmolLM2's tokenizer
    pad = N_VOCAB - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [TokenType.UNUSED] * pad
    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
