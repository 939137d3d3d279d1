"""The weight-only predictor of SmolLM2 on real FFN inputs (a numpy forward pass over text),
against what the converter expected from random inputs."""

from __future__ import annotations

import time

import llama_cpp
import numpy as np
import pytest
from conftest import SHARED_BROWN
from test_predictor_fit import MIN_AGREEMENT

from flashgguf.archs import get_arch
from flashgguf.convert import ConvertOptions, convert_gguf
from flashgguf.convert.predictor_fit import needed_neurons
from flashgguf.evaluate import perplexity, teacher_forced_logits, top1_agreement
from flashgguf.format import constants as C
from flashgguf.format import open_flash_file, open_gguf, tensor_array
from flashgguf.predictor import predicted_active
from flashgguf.quants import dequantize_rows
from flashgguf.reference import forward_recording_ffn_inputs

pytestmark = pytest.mark.model
N_TOKENS = 384


@pytest.fixture(scope="module")
def real_text(evaluation_text) -> str:
    # calibration text when it is beside the repo; else the evaluation excerpt, which is
    # fine here: this measures the predictor, nothing is fitted on it
    path = SHARED_BROWN / "calibration.txt"
    return path.read_text(encoding="utf-8") if path.exists() else evaluation_text


def test_numpy_forward_matches_stock_llama_cpp(smollm2_gguf, real_text):
    # the real FFN inputs below come from this forward pass: check it against llama.cpp
    stock = llama_cpp.Llama(str(smollm2_gguf), n_ctx=256, n_batch=256, logits_all=True,
                            verbose=False, n_threads=2)
    tokens = stock.tokenize(real_text.encode("utf-8"), add_bos=True, special=False)[:192]
    want = teacher_forced_logits(stock, tokens)
    stock.close()
    got = forward_recording_ffn_inputs(smollm2_gguf, tokens).logits
    ratio = perplexity(got, tokens) / perplexity(want, tokens)
    assert abs(ratio - 1.0) < 0.02, ratio
    assert top1_agreement(got, want) >= 0.93


def test_predictor_recall_on_real_ffn_inputs(smollm2_gguf, real_text, tmp_path):
    out = tmp_path / "smollm2.flash.gguf"
    t0 = time.perf_counter()
    report = convert_gguf(smollm2_gguf, out, ConvertOptions(progress=False, log=lambda _m: None))
    convert_s = time.perf_counter() - t0
    vocab = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(real_text.encode("utf-8"), add_bos=True, special=False)[:N_TOKENS]
    assert len(tokens) == N_TOKENS
    forward = forward_recording_ffn_inputs(smollm2_gguf, tokens)
    ff = open_flash_file(out)
    spec = get_arch(ff.arch)
    stream, buf = open_gguf(smollm2_gguf)

    def dense(template: str, bid: int) -> np.ndarray:
        t = stream.tensors[template.format(bid=bid)]
        return dequantize_rows(tensor_array(buf, t), t.ggml_type, t.shape[0]).astype(np.float64)

    rows = []
    for layer, fitted in zip(ff.layers, report.predictor, strict=True):
        bid, pred = layer.index, layer.predictor
        x = forward.ffn_inputs[bid]
        down_norm = np.linalg.norm(dense(spec.ffn_down, bid), axis=0)
        need = needed_neurons(ff.activation, dense(spec.ffn_gate, bid), dense(spec.ffn_up, bid),
                              down_norm, x, ff.predictor_keep)[:, layer.order]
        active = predicted_active(pred, ff.activation, x)
        floating = fitted.float_predictor.scores(ff.activation, x)[:, layer.order] > \
            pred.threshold
        rows.append((bid, pred.rank, layer.predictor_recall, float(active[need].mean()),
                     layer.predictor_density, float(active.mean()),
                     float((active == floating).mean())))
    print(f"\nSmolLM2 weight-only predictor: converted in {convert_s:.1f} s; {N_TOKENS} real "
          f"tokens, keep {ff.predictor_keep:.2f}\nlayer rank  recall(random) recall(real)  "
          "density(random) density(real)  stored=float(real)")
    for r in rows:
        print(f"{r[0]:5d} {r[1]:4d}  {r[2]:13.3f} {r[3]:12.3f}  {r[4]:15.3f} {r[5]:13.3f}  "
              f"{r[6]:18.4f}")
    table = np.array(rows)
    print(f"mean  real recall {table[:, 3].mean():.3f} (min {table[:, 3].min():.3f}), "
          f"real density {table[:, 5].mean():.3f}; expected recall {table[:, 2].mean():.3f}")
    # the converter's own estimate holds on inputs like the ones it calibrated on
    assert np.all(np.abs(table[:, 2] - C.DEFAULT_WEIGHT_ONLY_RECALL) < 0.02)
    # storing the predictor in Q8_0 keeps its decisions on real inputs too
    assert table[:, 6].min() >= MIN_AGREEMENT
    # the recall on real text: measured mean 0.992, worst layer 0.973 (30 layers, 384 tokens
    # of the calibration text); a predictor that misses more needed neurons falls below
    assert table[:, 3].mean() >= 0.985, table[:, 3].mean()
    assert table[:, 3].min() >= 0.96, table[:, 3].min()
    assert np.all(table[:, 3] <= 1)
