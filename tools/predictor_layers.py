#!/usr/bin/env python3
"""Layer-level quality of the calibrated predictor against an oracle, on held-out tokens:

    python tools/predictor_layers.py [--model model.gguf] [--layers 0,10,20,29]
                                     [--density 0.65] [--tokens 4096]

Collects the FFN inputs of `--tokens` tokens of the shipped calibration text from llama.cpp
(as flashgguf-convert --calibrate does), fits each chosen layer's predictor as the converter
would (rank rule, budget cap, last quarter of the tokens held out), and prints the relative
FFN output error ||y - y_kept|| / ||y|| on the held-out tokens when each layer computes only
`--density` of its neurons, chosen by one threshold over the layer's scores:
  oracle    the true contribution |act(g) u| ||down_i||
  plain     the predictor's |act(g_hat)| |u_hat| ||down_i|| (--plain-score)
  expected  the stored default: the expected contribution under the fit's residuals
No PyTorch; the numbers decide how far a low-rank predictor is from what is possible.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashgguf.archs import get_arch  # noqa: E402
from flashgguf.calibrate.collect import CalibrationOptions, collect_ffn_inputs  # noqa: E402
from flashgguf.calibrate.text import read_calibration_text  # noqa: E402
from flashgguf.convert import ConvertOptions  # noqa: E402
from flashgguf.convert.gguf_source import (  # noqa: E402
    _layer_layout,
    _open_source,
    _scalar_int,
    layer_ffn_weights,
)
from flashgguf.convert.predictor_fit import (  # noqa: E402
    PredictorOptions,
    ffn_hidden,
    fit_layer_predictor,
    output_error,
)
from flashgguf.models import smollm2_gguf  # noqa: E402


def error_at(scores: np.ndarray, h: np.ndarray, down: np.ndarray, density: float) -> float:
    """Output error when the top `density` of (token, neuron) scores are computed."""
    return output_error(h, down, scores > np.quantile(scores, 1.0 - density))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source GGUF (default: SmolLM2)")
    p.add_argument("--layers", default="0,10,20,29")
    p.add_argument("--density", type=float, default=0.65)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    src = Path(args.model or smollm2_gguf())
    source = _open_source(src)
    spec = get_arch(str(source.stream.get("general.architecture")))
    n_layer = _scalar_int(source.stream, f"{spec.name}.block_count")
    n_embd = _scalar_int(source.stream, f"{spec.name}.embedding_length")
    n_ff = _scalar_int(source.stream, f"{spec.name}.feed_forward_length")
    opts = ConvertOptions()
    calibration = CalibrationOptions(tokens=args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = collect_ffn_inputs(src, spec, n_layer, n_embd, read_calibration_text(None),
                                    Path(tmp), calibration)
        print(f"{src.name}: {inputs.n_tokens} calibration tokens, {args.density:.0%} of each "
              "layer's neurons computed; relative FFN output error on held-out tokens")
        print("layer  rank  oracle   plain  expected")
        for bid in (int(v) for v in args.layers.split(",")):
            gate, up, down, norm = layer_ffn_weights(source, spec, bid, n_embd, n_ff)
            fit_x, held_x = inputs.split(bid, calibration.held_out)
            h = ffn_hidden(spec.activation, gate, up, held_x)
            errors, rank = [], 0
            for expected in (False, True):
                fitted = fit_layer_predictor(
                    spec.activation, gate, up, down, norm, None,
                    n_ff * _layer_layout(source.stream.tensors, spec, bid, n_embd, opts).stride,
                    PredictorOptions(expected_score=expected), bid, inputs=(fit_x, held_x))
                scores = fitted.float_predictor.scores(spec.activation, held_x)
                errors.append(error_at(scores, h, down, args.density))
                rank = fitted.predictor.rank
            oracle = np.abs(h) * np.linalg.norm(down, axis=0)
            print(f"{bid:>5}  {rank:>4}  {error_at(oracle, h, down, args.density):6.3f}  "
                  f"{errors[0]:6.3f}  {errors[1]:8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
