"""Stock llama.cpp on a GGUF against flashgguf on a flash GGUF, on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from flashgguf import Llama
from flashgguf.evaluate import evaluation_tokens, perplexity, teacher_forced_logits, top1_agreement


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
