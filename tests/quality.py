"""Stock llama.cpp on a GGUF against flashgguf on a flash GGUF, on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from flashgguf import Llama
from flashgguf.evaluate import evaluation_tokens, perplexity, teacher_forced_logits, top1_agreement

N_EVAL_TOKENS = 1000  # the first tokens of the evaluation text
EVAL_KW = dict(n_ctx=1024, n_batch=512, logits_all=True, verbose=False, n_threads=2)


@dataclass(frozen=True)
class Comparison:
    tokens: list[int]  # stock llama.cpp's tokens of the text
    flash_tokens: list[int]  # flashgguf's
    ppl_stock: float
    ppl_flash: float
    agreement: float  # teacher-forced top-1

    @property
    def ratio(self) -> float:
        return self.ppl_flash / self.ppl_stock


def compare_with_stock(stock_gguf: Path, flash_gguf: Path, text: str, n_tokens: int,
                       **kw) -> Comparison:
    stock = llama_cpp.Llama(str(stock_gguf), **kw)
    tokens = evaluation_tokens(stock, text, n_tokens)
    want = teacher_forced_logits(stock, tokens)
    stock.close()
    flash = Llama(str(flash_gguf), flash_offload=True, **kw)
    flash_tokens = evaluation_tokens(flash, text, n_tokens)
    got = teacher_forced_logits(flash, tokens)
    flash.close()
    return Comparison(tokens, flash_tokens, perplexity(want, tokens), perplexity(got, tokens),
                      top1_agreement(got, want))


def check_matches_stock(stock_gguf: Path, flash_gguf: Path, text: str, label: str,
                        max_ratio_change: float, min_agreement: float) -> Comparison:
    """Compare on the first N_EVAL_TOKENS tokens of text: both tokenize it alike, the
    perplexity ratio flash / stock is within 1 +- max_ratio_change and teacher-forced top-1
    agreement is at least min_agreement."""
    c = compare_with_stock(stock_gguf, flash_gguf, text, N_EVAL_TOKENS, **EVAL_KW)
    assert len(c.tokens) == N_EVAL_TOKENS
    assert c.flash_tokens == c.tokens
    print(f"\n{label}, first {N_EVAL_TOKENS} tokens of the evaluation text: perplexity stock "
          f"{c.ppl_stock:.3f}, flash {c.ppl_flash:.3f} (ratio {c.ratio:.4f}); "
          f"top-1 agreement {c.agreement:.4f}")
    assert abs(c.ratio - 1.0) <= max_ratio_change, c.ratio
    assert c.agreement >= min_agreement, c.agreement
    return c
