"""flashgguf.reference against stock llama.cpp on generated llama and qwen2 models (rope
conventions, biases), and tools/selection.py's policies at their limits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from model_factory import TinyModel

from flashgguf.evaluate import teacher_forced_logits, top1_agreement
from flashgguf.reference import forward, load_reference

TOOL = Path(__file__).resolve().parent.parent / "tools" / "selection.py"


@pytest.fixture(scope="module")
def selection():
    spec = importlib.util.spec_from_file_location("selection_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _tokens(path: Path, n: int) -> list[int]:
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    text = "The quick brown fox jumps over the lazy dog, and then it sleeps. " * 8
    tokens = vocab.tokenize(text.encode(), add_bos=True, special=False)[:n]
    vocab.close()
    return tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_forward_matches_llama_cpp(tiny_models, arch):
    path = tiny_models(TinyModel(arch=arch, n_embd=128, n_head=4, n_head_kv=2))
    tokens = _tokens(path, 48)
    stock = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                            n_threads=1)
    want = teacher_forced_logits(stock, tokens)
    stock.close()
    got = forward(load_reference(path), tokens)
    # a rope or bias mistake moves later positions' logits by their own scale
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 0.02, err
    assert top1_agreement(got, want) >= 0.95


def test_policies_at_their_limits(tiny_models, selection):
    path = tiny_models(TinyModel(arch="qwen2"))
    model = load_reference(path)
    tokens = _tokens(path, 32)
    stats = selection.calibration_stats(model, [tokens])
    want = forward(model, tokens)
    P = selection.Policy
    for policy in (P("dense"), P("oracle", 1.0), P("two", 1.0, 1.0)):
        tally = selection.Tally()
        got = forward(model, tokens, selection.policy_ffn(model, stats, policy, tally))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        resident = tally.resident / tally.ffn
        assert tally.read / tally.ffn + resident == pytest.approx(1.0)
        assert resident == (pytest.approx(1 / 3) if policy.gate_resident else 0.0)
        assert tally.up_down_reused == pytest.approx(tally.up_down_needed)
    # gate resident at 80%: up and down of 80% of the neurons (Q8_0 everywhere: 1/3 each)
    tally = selection.Tally()
    forward(model, tokens, selection.policy_ffn(model, stats, P("gate", 0.8), tally))
    n_ff = TinyModel().n_ff
    assert tally.read / tally.ffn == pytest.approx(2 / 3 * round(0.8 * n_ff) / n_ff)
    assert selection.split_windows(list(range(10)), 4, -1) == \
        [[0, 1, 2, 3], [-1, 4, 5, 6], [-1, 7, 8, 9]]
