#!/usr/bin/env python3
"""Quality of flashgguf (flash_offload=True, dense) against stock llama.cpp on any GGUF:
perplexity and teacher-forced top-1 agreement on the first tokens of the evaluation text.

    python tools/quality.py [--model model.gguf] [--tokens 1000] [--text evaluation.txt]
                            [--bundle-type auto|<type>] [--down-type auto,q8_0,...]
                            [--threads 2] [--n-batch 512]

--n-batch 1 evaluates token by token (as decode computes), both sides.
--stock-floor also runs stock llama.cpp with its weight repacking off (pure mmap, other
matmul kernels): its agreement with stock as shipped is the floor that kernel rounding alone
sets on top-1 agreement.

The model is converted into a temporary file, once per --down-type (a comma-separated list:
the candidates compared against one stock run); one result line per conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import llama_cpp  # noqa: E402

from flashgguf import Llama  # noqa: E402
from flashgguf.convert import ConvertOptions, convert_gguf  # noqa: E402
from flashgguf.evaluate import (  # noqa: E402
    evaluation_tokens,
    perplexity,
    teacher_forced_logits,
    top1_agreement,
)
from flashgguf.models import smollm2_gguf  # noqa: E402

SHARED_EVALUATION = REPO.parent / "shared" / "data" / "brown" / "evaluation.txt"
EVALUATION_HEAD = REPO / "tests" / "data" / "brown" / "evaluation_head.txt"


@contextlib.contextmanager
def no_weight_repacking():
    """llama_cpp.Llama made inside loads with use_extra_bufts=False: llama.cpp's CPU backend
    then keeps its weights as the file stores them (no CPU_REPACK copies, other kernels)."""
    original = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source GGUF (default: SmolLM2)")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--text", type=Path, default=None,
                   help="text to score (default: the shared evaluation.txt, else its excerpt)")
    p.add_argument("--bundle-type", default="auto", help="flashgguf-convert --bundle-type")
    p.add_argument("--down-type", default="auto",
                   help="flashgguf-convert --down-type; several, comma-separated, to compare "
                   "(empty: no conversion, with --stock-floor)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-batch", type=int, default=512, help="tokens per llama.cpp batch")
    p.add_argument("--stock-floor", action="store_true",
                   help="also compare stock with repacking off against stock as shipped")
    args = p.parse_args()
    src = Path(args.model or smollm2_gguf())
    text_path = args.text or (SHARED_EVALUATION if SHARED_EVALUATION.exists() else EVALUATION_HEAD)
    text = text_path.read_text(encoding="utf-8")
    kw = dict(n_ctx=args.tokens, n_batch=args.n_batch, n_ubatch=args.n_batch, logits_all=True,
              verbose=False,
              n_threads=args.threads, n_threads_batch=args.threads)

    stock = llama_cpp.Llama(str(src), **kw)
    tokens = evaluation_tokens(stock, text, args.tokens)
    want = teacher_forced_logits(stock, tokens)
    stock.close()
    print(f"model {src.name}, first {len(tokens)} tokens of {text_path.name}; stock perplexity "
          f"{perplexity(want, tokens):.3f}")
    if args.stock_floor:
        with no_weight_repacking():
            plain = llama_cpp.Llama(str(src), **kw)
        got = teacher_forced_logits(plain, tokens)
        plain.close()
        print(f"stock without repacking: perplexity {perplexity(got, tokens):.3f} (ratio "
              f"{perplexity(got, tokens) / perplexity(want, tokens):.4f}); top-1 agreement "
              f"{top1_agreement(got, want):.4f}")
    # beside a model given by path (it may be big); the packaged SmolLM2 in the system's tmp
    for down_type in filter(None, args.down_type.split(",")):
        with tempfile.TemporaryDirectory(dir=src.parent if args.model else None) as tmp:
            flash_path = Path(tmp) / "quality.flash.gguf"
            report = convert_gguf(src, flash_path, ConvertOptions(
                bundle_type=args.bundle_type, down_type=down_type, predictor=None,
                progress=False, log=lambda _msg: None))
            flash = Llama(str(flash_path), flash_offload=True, **kw)
            if evaluation_tokens(flash, text, args.tokens) != tokens:
                print("error: the flash GGUF tokenizes the text differently", file=sys.stderr)
                return 1
            got = teacher_forced_logits(flash, tokens)
            flash.close()
        ppl_stock, ppl_flash = perplexity(want, tokens), perplexity(got, tokens)
        types = sorted({"/".join(t.name for t in la.types) for la in report.layouts})
        print(f"down {down_type} ({', '.join(types)}; payload {report.payload_nbytes / 2**20:.1f} "
              f"MiB, down error {report.down_rel_error_max:.4f}): perplexity {ppl_flash:.3f} "
              f"(ratio {ppl_flash / ppl_stock:.4f}); top-1 agreement "
              f"{top1_agreement(got, want):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
