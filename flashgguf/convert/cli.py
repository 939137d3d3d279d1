"""Command line: flashgguf-convert model.gguf|model.safetensors|model-dir/ [-o out.flash.gguf]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..calibrate.collect import CalibrationOptions
from ..errors import ConvertError, FlashGGUFError
from ..format import constants as C
from ..interrupt import exit_status, sigterm_unwinds
from .gguf_source import ConvertOptions, convert_gguf
from .hf_source import OUTTYPES, convert_hf
from .predictor_fit import PredictorOptions
from .safetensors import is_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashgguf-convert",
        description="Convert a GGUF model or a Hugging Face safetensors checkpoint to a flash "
        "GGUF: the trunk stays a llama.cpp model, the FFN neurons are bundled for reading "
        "from flash.",
    )
    p.add_argument("model", help="source model: a .gguf, a .safetensors file, a sharded "
                   "model.safetensors.index.json, or a folder holding a checkpoint (config.json "
                   "and tokenizer files beside it)")
    p.add_argument("-o", "--output", help="output path (default: <model>.flash.gguf)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--outtype", choices=list(OUTTYPES),
                   help="safetensors input: type of the trunk's matrices (norms and biases stay "
                   "F32; default f16); a GGUF's trunk is copied as it is")
    p.add_argument("--bundle-type", default=C.AUTO_TYPE,
                   choices=[C.AUTO_TYPE, *C.BUNDLE_TYPES],
                   help="type of the gate/up rows (auto: for a GGUF, per layer, the source's "
                   "rows byte for byte where their type is supported, else the supported type "
                   "closest to their bits per weight from below; for safetensors --outtype)")
    p.add_argument("--down-type", default=C.DEFAULT_DOWN_TYPE,
                   choices=[C.AUTO_TYPE, *C.BUNDLE_TYPES],
                   help="type the down columns are re-quantized to (auto, the default: per "
                   "layer, the source down tensor's type, or the closest from below as for "
                   "--bundle-type; q8_0 for safetensors)")
    p.add_argument("--bundle-align", type=int, default=C.DEFAULT_BUNDLE_ALIGN,
                   help="pad each neuron's bundle row to a multiple of this many bytes")
    p.add_argument("--activation", choices=list(C.ACTIVATIONS),
                   help="FFN activation to run instead of the architecture's (ReLU-fied models; "
                   "safetensors input: instead of the one config.json names)")
    p.add_argument("--activation-threshold", type=float, default=0.0,
                   help="threshold of --activation fatrelu (values at or below it become 0)")
    p.add_argument("--gate-resident", action="store_true",
                   help="gated FFNs: keep each layer's gate matrix apart from the bundles, to "
                   "be held in DRAM so that each token's exact gate picks the rows to read "
                   "(flash_mode='gate', the default for such files)")
    p.add_argument("--two-stage", action="store_true",
                   help="with --gate-resident: store up rows and down rows apart (format "
                   "version 6), so that a down row is read only for the neurons whose exact "
                   "up x act(gate) passes a second cut (flash_down_keep)")
    p.add_argument("--no-predictor", action="store_true",
                   help="store no activity predictor (the runtime then cannot use "
                   "flash_mode='predicted')")
    p.add_argument("--predictor-keep", type=float, default=C.DEFAULT_PREDICTOR_KEEP,
                   help="SiLU/GELU gates: the share of each token's neurons, by contribution, "
                   "the predictor must find (default %(default)s)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the predictor on FFN inputs collected by running the model in "
                   "llama.cpp on calibration text (the text shipped with flashgguf unless "
                   "--calibration-text), and order each layer's neurons hottest first; for "
                   "a mixture of experts: store each expert's routing frequency and the "
                   "pinned share that pays on held-out text")
    p.add_argument("--no-hot-first", dest="hot_first", action="store_false",
                   help="with --calibrate: keep the source order of the neurons (the measured "
                   "frequencies and the calibrated predictor are still stored); for measuring "
                   "what hot-first ordering buys (pinning, read sizes), not for use")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="UTF-8 text to calibrate on (implies --calibrate)")
    p.add_argument("--calibration-tokens", type=int, default=CalibrationOptions.tokens,
                   help="calibration tokens collected per layer (default %(default)s)")
    p.add_argument("--predictor-recall", "--target-recall", type=float, default=None,
                   help="share of those needed neurons the threshold lets through, on held-out "
                   f"calibration tokens (default {C.DEFAULT_PREDICTOR_RECALL}) or random inputs "
                   f"without calibration (default {C.DEFAULT_WEIGHT_ONLY_RECALL}: recall on "
                   "random inputs overstates recall on real text)")
    p.add_argument("--plain-score", action="store_true",
                   help="with --calibrate: store no residuals, so the predictor scores "
                   "|act(g_hat)| |u_hat| instead of the expected contribution; for measuring "
                   "what the expected score buys, not for use")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    with sigterm_unwinds():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    opts = ConvertOptions(
        bundle_type=args.bundle_type,
        down_type=args.down_type,
        bundle_align=args.bundle_align,
        activation=args.activation,
        activation_threshold=args.activation_threshold,
        predictor=None if args.no_predictor else PredictorOptions(
            keep=args.predictor_keep, recall=args.predictor_recall,
            expected_score=not args.plain_score),
        calibration=CalibrationOptions(
            text=None if args.calibration_text is None else Path(args.calibration_text),
            tokens=args.calibration_tokens, hot_first=args.hot_first)
        if args.calibrate or args.calibration_text else None,
        gate_resident=args.gate_resident,
        two_stage=args.two_stage,
        force=args.force,
        progress=not args.quiet and sys.stderr.isatty(),
        log=(lambda _msg: None) if args.quiet else print,
    )
    try:
        if args.plain_score and opts.calibration is None:
            raise ConvertError("--plain-score is for --calibrate: without calibration the "
                               "predictor scores plainly anyway")
        if not args.hot_first and opts.calibration is None:
            raise ConvertError("--no-hot-first is for --calibrate: without calibration the "
                               "neurons keep the source order anyway")
        if is_checkpoint(args.model):
            convert_hf(args.model, args.output, opts, outtype=args.outtype or "f16")
        elif args.outtype is not None:
            raise ConvertError("--outtype is for safetensors input: a GGUF's trunk tensors are "
                               "copied as they are")
        else:
            convert_gguf(args.model, args.output, opts)
    except FlashGGUFError as exc:
        print(f"flashgguf-convert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("flashgguf-convert: interrupted; no output written", file=sys.stderr)
        return exit_status(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
