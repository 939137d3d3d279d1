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
the candidates compared against one stock run), or --flash names a converted file; each
conversion runs dense (every bundle resident), or once per --run with those flash_* options
(streaming: perplexity, agreement, and per token the FFN bytes read and neurons computed):

    python tools/quality.py --gate-resident --n-batch 1 \
        --run mode=gate,dram_budget=0.5,gate_keep=0.8 --run mode=hybrid,dram_budget=0.5
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
EVALUATION_HEAD = REPO / "flashgguf" / "data" / "evaluation_head.txt"


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
    p.add_argument("--gate-resident", action="store_true",
                   help="convert with flashgguf-convert --gate-resident")
    p.add_argument("--flash", type=Path, default=None,
                   help="a flash GGUF of the model to evaluate instead of converting")
    p.add_argument("--run", action="append", default=[], metavar="KEY=VALUE,...",
                   help="flash_* options (without the prefix) of one streaming run; repeat "
                   "for several (default: one dense run)")
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
    runs = [_run_options(text) for text in args.run] or [{}]
    if args.flash is not None:
        for options in runs:
            line = _evaluate(args.flash, options, kw, text, tokens, want)
            if line is None:
                return 1
            print(f"{args.flash.name} {_describe(options)}: {line}")
        return 0
    # beside a model given by path (it may be big); the packaged SmolLM2 in the system's tmp
    for down_type in filter(None, args.down_type.split(",")):
        with tempfile.TemporaryDirectory(dir=src.parent if args.model else None) as tmp:
            flash_path = Path(tmp) / "quality.flash.gguf"
            report = convert_gguf(src, flash_path, ConvertOptions(
                bundle_type=args.bundle_type, down_type=down_type, predictor=None,
                gate_resident=args.gate_resident, progress=False, log=lambda _msg: None))
            types = sorted({"/".join(t.name for t in la.types) for la in report.layouts})
            for options in runs:
                line = _evaluate(flash_path, options, kw, text, tokens, want)
                if line is None:
                    return 1
                print(f"down {down_type} ({', '.join(types)}; payload "
                      f"{report.payload_nbytes / 2**20:.1f} MiB, down error "
                      f"{report.down_rel_error_max:.4f}) {_describe(options)}: {line}")
    return 0


def _run_options(text: str) -> dict[str, object]:
    """"mode=gate,dram_budget=0.5" -> {"flash_mode": "gate", "flash_dram_budget": 0.5}."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {text!r}: {item!r} is not KEY=VALUE")
        parsed: object = value
        for kind in (int, float):
            try:
                parsed = kind(value)
                break
            except ValueError:
                pass
        out[f"flash_{key.strip()}"] = parsed
    return out


def _describe(options: dict[str, object]) -> str:
    return ("[" + ", ".join(f"{k.removeprefix('flash_')}={v}" for k, v in options.items()) + "]"
            if options else "[dense]")


def _evaluate(flash_path: Path, options: dict[str, object], kw: dict, text: str,
              tokens: list[int], want) -> str | None:
    """One flash run's perplexity, agreement and per-token reads against stock's logits."""
    flash = Llama(str(flash_path), flash_offload=True, **options, **kw)
    try:
        if evaluation_tokens(flash, text, len(tokens)) != tokens:
            print("error: the flash GGUF tokenizes the text differently", file=sys.stderr)
            return None
        flash.flash_stats(reset=True)
        got = teacher_forced_logits(flash, tokens)
        stats = flash.flash_stats()
        neurons = flash.flash_runtime.flash.n_layer * flash.flash_runtime.flash.n_ff
    finally:
        flash.close()
    ppl_stock, ppl_flash = perplexity(want, tokens), perplexity(got, tokens)
    n = max(int(stats["tokens"]), 1)
    return (f"perplexity {ppl_flash:.3f} (ratio {ppl_flash / ppl_stock:.4f}); top-1 agreement "
            f"{top1_agreement(got, want):.4f}; per token: FFN read "
            f"{stats['bytes_read'] / n / 2**20:.3f} MiB (missed rows "
            f"{stats['bytes_needed'] / n / 2**20:.3f} MiB), neurons computed "
            f"{stats['neurons_computed'] / n / neurons:.3f}")


if __name__ == "__main__":
    sys.exit(main())
