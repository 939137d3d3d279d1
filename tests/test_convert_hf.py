"""flashgguf-convert on Hugging Face safetensors checkpoints: tiny seeded checkpoints of each
supported layout against numpy reference forward passes, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hf_factory import TinyHF, llama_forward, opt_forward, write_tiny_checkpoint

from flashgguf import Llama
from flashgguf.convert import ConvertOptions, convert_hf
from flashgguf.evaluate import teacher_forced_logits, top1_agreement
from flashgguf.format import open_flash_file

TEXT = ("The old man looked at the sea and thought about the long day ahead of him, "
        "the boat, the line and the fish that would come.")
KW = dict(n_ctx=128, n_batch=64, n_ubatch=64, logits_all=True, verbose=False, n_threads=2)
QUIET = ConvertOptions(progress=False, log=lambda _m: None)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, smollm2_gguf):
    """Factory: TinyHF -> (checkpoint folder, its weights), cached per spec."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[TinyHF, tuple[Path, dict]] = {}

    def make(spec: TinyHF) -> tuple[Path, dict]:
        if spec not in made:
            folder = root / f"{spec.kind}-{len(made)}"
            made[spec] = folder, write_tiny_checkpoint(folder, spec, smollm2_gguf)
        return made[spec]

    return make


@pytest.mark.native
@pytest.mark.parametrize("kind,activation", [
    ("relullama", "relu"), ("prosparse", "fatrelu"), ("turbosparse", "drelu"),
    ("qwen2", "silu"), ("opt", "relu"),
])
def test_tiny_checkpoint_matches_reference(tiny_hf, tmp_path, kind, activation):
    spec = TinyHF(kind=kind)
    folder, weights = tiny_hf(spec)
    out = tmp_path / "tiny.flash.gguf"
    convert_hf(folder, out, QUIET)
    flash = open_flash_file(out)
    assert flash.activation == activation
    assert flash.arch == {"opt": "gpt2", "qwen2": "qwen2"}.get(kind, "llama")
    if kind == "prosparse":
        assert flash.activation_threshold == pytest.approx(spec.threshold)

    llm = Llama(str(out), flash_offload=True, **KW)
    tokens = llm.tokenize(TEXT.encode(), add_bos=False)[:24]
    got = teacher_forced_logits(llm, tokens)
    # flashgguf's runtime computed every FFN (the hook found this architecture's nodes)
    assert llm.flash_stats()["neurons_computed"] == len(tokens) * spec.n_ff * spec.n_layer
    llm.close()
    forward = opt_forward if kind == "opt" else llama_forward
    want = forward(spec, weights, tokens)
    # trunk in F16, gate/up bundles F16, down columns Q8_0, activations quantized to F16/Q8_0
    print(f"{kind}: relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 0.02, rel_err(got, want)
    assert top1_agreement(got, want) >= 0.9
    if kind in ("prosparse", "turbosparse"):
        # the test can tell the activation apart: plain ReLU would be far off
        wrong = llama_forward(spec, weights, tokens, act_kind="relullama")
        assert rel_err(got, wrong) > 5 * rel_err(got, want)
