"""Hugging Face tokenizer files -> llama.cpp's tokenizer keys.

Three sources, tried in this order:
  tokenizer.json (byte-level BPE)   -> tokenizer.ggml.model "gpt2" with merges and the
                                       pre-tokenizer name llama.cpp knows it by;
  vocab.json + merges.txt (GPT-2/OPT) -> "gpt2", pre-tokenizer "gpt-2";
  tokenizer.model (SentencePiece)   -> "llama" (needs the sentencepiece package).
Special token ids, add_bos/add_eos and the chat template come from tokenizer_config.json
(and config.json) through gguf.SpecialVocab.

llama.cpp's converter names the pre-tokenizer by hashing how the Hugging Face `tokenizers`
library splits a fixed test string; flashgguf does not depend on that library, so it reads
the pre-tokenizer spec in tokenizer.json and maps the layouts it knows (each one a regex
llama.cpp implements) to their names. Any other layout is refused: a wrong pre-tokenizer
would tokenize silently differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, GGUFWriter, SpecialVocab, TokenType

from ...errors import FormatError, UnsupportedError

GPT2_REGEX = ("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|"
              "\\s+")
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
               "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# Normalized pre-tokenizer layouts (see _signature) -> llama.cpp's tokenizer.ggml.pre.
_BYTE_LEVEL_REGEX = ("ByteLevel", False, True)  # ByteLevel with its built-in GPT-2 regex
_BYTE_LEVEL_ONLY = ("ByteLevel", False, False)
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (_BYTE_LEVEL_REGEX,): "gpt-2",
    (("Digits", True), _BYTE_LEVEL_REGEX): "smollm",  # SmolLM / SmolLM2
    (("Split", LLAMA3_REGEX, "Isolated", False), _BYTE_LEVEL_ONLY): "llama-bpe",  # Llama 3
    (("Split", QWEN2_REGEX, "Isolated", False), _BYTE_LEVEL_ONLY): "qwen2",  # Qwen2
}


@dataclass(frozen=True)
class Vocabulary:
    model: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    source: str  # file it came from, for the log


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """value when it is of kind (a JSON object, list, string or integer), else a FormatError
    naming what it is: every part of a tokenizer file is checked before it is used."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise FormatError(f"{what} is {type(value).__name__} {value!r:.40}, a {names} is needed")
    return value


def _signature(pre: dict[str, Any] | None, where: str) -> tuple[tuple[Any, ...], ...]:
    if pre is None:
        raise UnsupportedError(f"{where}: a byte-level BPE without a pre-tokenizer is unsupported")
    pre = _expect(pre, dict, f"{where}: pre_tokenizer")
    items = _expect(pre.get("pretokenizers", []), list, f"{where}: pretokenizers") \
        if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items:
        p = _expect(p, dict, f"{where}: a pre-tokenizer")
        kind = p.get("type")
        if kind == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("add_prefix_space", False)),
                        bool(p.get("use_regex", True))))
        elif kind == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits", False))))
        elif kind == "Split":
            pattern = _expect(p.get("pattern", {}), dict, f"{where}: a Split pattern")
            sig.append(("Split", pattern.get("Regex", pattern.get("String")), p.get("behavior"),
                        bool(p.get("invert", False))))
        else:
            sig.append((str(kind),))
    return tuple(sig)


def pre_tokenizer_name(tokenizer: dict[str, Any], where: str) -> str:
    normalizer = tokenizer.get("normalizer")
    if normalizer is not None:
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise UnsupportedError(f"{where}: byte-level BPE with a normalizer ({kind!r:.40}) is "
                               "unsupported")
    sig = _signature(tokenizer.get("pre_tokenizer"), where)
    try:
        return PRE_TOKENIZERS[sig]
    except KeyError:
        known = ", ".join(sorted(PRE_TOKENIZERS.values()))
        raise UnsupportedError(
            f"{where}: pre-tokenizer {sig} is not one flashgguf can map to llama.cpp "
            f"(known: {known}); converting it would tokenize differently"
        ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read it as JSON ({exc})") from None


def _special_strings(folder: Path) -> set[str]:
    """Token strings tokenizer_config.json names as special (bos, eos, unk, pad, ...)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return set()
    config = _read_json(path)
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(decoder or {}, dict):
        raise FormatError(f"{path}: not a JSON object with an added_tokens_decoder object")
    out = set()
    for key, value in config.items():
        if key.endswith("_token"):
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str):
                out.add(content)
    for entry in (decoder or {}).values():
        if isinstance(entry, dict) and entry.get("special") and isinstance(entry.get("content"),
                                                                             str):
            out.add(entry["content"])
    return out


def _bpe_vocabulary(vocab: dict[str, int], added: list[dict[str, Any]], folder: Path,
                    n_vocab: int, pre: str, source: str) -> Vocabulary:
    by_id: dict[int, tuple[str, int]] = {}
    specials = _special_strings(folder)
    for text, tid in vocab.items():
        _expect(tid, int, f"{source}: the id of token {text!r:.40}")
        by_id[tid] = (text, TokenType.CONTROL if text in specials else TokenType.NORMAL)
    for entry in added:
        entry = _expect(entry, dict, f"{source}: an added token")
        content = _expect(entry.get("content"), str, f"{source}: an added token's content")
        tid = _expect(entry.get("id"), int, f"{source}: the id of added token {content!r:.40}")
        special = entry.get("special", False) or content in specials
        by_id[tid] = (content, TokenType.CONTROL if special else TokenType.USER_DEFINED)
    if not by_id or min(by_id) < 0 or max(by_id) >= n_vocab:
        raise FormatError(f"{source}: token ids {min(by_id, default=0)}..{max(by_id, default=0)} "
                          f"do not fit the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):  # ids the tokenizer does not use: padding rows of the embedding
        text, ttype = by_id.get(i, (f"[PAD{i}]", TokenType.USER_DEFINED))
        tokens.append(text)
        types.append(int(ttype))
    return Vocabulary("gpt2", pre, tokens, types, None, source)


def _from_tokenizer_json(folder: Path, n_vocab: int) -> Vocabulary:
    path = folder / "tokenizer.json"
    tok = _expect(_read_json(path), dict, str(path))
    model = _expect(tok.get("model") or {}, dict, f"{path}: model")
    if model.get("type") != "BPE" or model.get("byte_fallback", False):
        if (folder / "tokenizer.model").is_file():
            return _from_sentencepiece(folder, n_vocab)
        raise UnsupportedError(f"{path}: a {model.get('type')} tokenizer"
                               f"{' with byte fallback' if model.get('byte_fallback') else ''} "
                               "is unsupported without tokenizer.model (byte-level BPE is)")
    pre = pre_tokenizer_name(tok, str(path))
    return _bpe_vocabulary(_expect(model.get("vocab") or {}, dict, f"{path}: model.vocab"),
                           _expect(tok.get("added_tokens") or [], list, f"{path}: added_tokens"),
                           folder, n_vocab, pre, path.name)


def _from_vocab_json(folder: Path, n_vocab: int) -> Vocabulary:
    vocab = _expect(_read_json(folder / "vocab.json"), dict, str(folder / "vocab.json"))
    added_path = folder / "added_tokens.json"
    added = []
    if added_path.is_file():
        added = [{"id": i, "content": t} for t, i in
                 _expect(_read_json(added_path), dict, str(added_path)).items()]
    # GPT2Tokenizer (slow) splits with GPT-2's regex and no other pre-processing
    return _bpe_vocabulary(vocab, added, folder, n_vocab, "gpt-2", "vocab.json")


def _from_sentencepiece(folder: Path, n_vocab: int) -> Vocabulary:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise UnsupportedError(
            f"{folder / 'tokenizer.model'} is a SentencePiece model: reading it needs the "
            "sentencepiece package (pip install sentencepiece)"
        ) from None
    try:
        spm = gguf.vocab.SentencePieceVocab(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{folder / 'tokenizer.model'}: {exc}") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in spm.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(float(score))
        types.append(int(ttype))
    if len(tokens) > n_vocab:
        raise FormatError(f"tokenizer.model has {len(tokens)} tokens, more than the model's "
                          f"vocab_size {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return Vocabulary("llama", "default", tokens, types, scores, "tokenizer.model")


def read_vocabulary(folder: Path, n_vocab: int) -> Vocabulary:
    if (folder / "tokenizer.json").is_file():
        return _from_tokenizer_json(folder, n_vocab)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _from_vocab_json(folder, n_vocab)
    if (folder / "tokenizer.model").is_file():
        return _from_sentencepiece(folder, n_vocab)
    raise FormatError(f"{folder}: no tokenizer (tokenizer.json, vocab.json + merges.txt or "
                      "tokenizer.model) beside the checkpoint")


def add_tokenizer(w: GGUFWriter, folder: Path, n_vocab: int) -> Vocabulary:
    """Write the tokenizer.* keys of the checkpoint in `folder` to w."""
    vocab = read_vocabulary(folder, n_vocab)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    try:  # gguf-py reads merges, special ids and the chat template: its own parsing
        special = SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
        if vocab.model == "gpt2" and not special.merges:
            raise FormatError(f"{folder}: the byte-level BPE tokenizer has no merges")
        special.add_to_gguf(w, quiet=True)
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{folder}: the tokenizer files' merges, special tokens or chat "
                          f"template cannot be read ({type(exc).__name__}: {exc})") from None
    if vocab.model == "gpt2":
        w.add_key_value("tokenizer.ggml.add_space_prefix", False, GGUFValueType.BOOL)
    return vocab
