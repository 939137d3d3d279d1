"""Quality measures shared by tests and benchmarks: teacher-forced logits, perplexity, top-1."""

from __future__ import annotations

import numpy as np


def teacher_forced_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), n_vocab] of a Llama made with logits_all=True, from one eval."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood [n-1] of each of tokens[1:] given the logits at [0, n-1)."""
    lp = log_softmax(logits[:-1].astype(np.float64))
    target = np.asarray(tokens[1:])
    return -lp[np.arange(len(target)), target]


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp(mean NLL) of tokens[1:] given the logits at positions [0, n-1)."""
    return float(np.exp(token_nll(logits, tokens).mean()))


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    return float((logits_a.argmax(axis=-1) == logits_b.argmax(axis=-1)).mean())


def evaluation_tokens(llm, text: str, n_tokens: int) -> list[int]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    return tokens[:n_tokens]
