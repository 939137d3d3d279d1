"""A checkpoint whose tokenizer is a SentencePiece tokenizer.model (Llama 2, Mistral,
ReluLLaMA, ProSparse, TurboSparse ship one): a small BPE model trained here, converted, and
llama.cpp's tokenization checked against sentencepiece's.

The text is the docstrings of Python's builtins: English prose with code, digits and
punctuation that every test environment has (this test needs no data files)."""

from __future__ import annotations

import builtins
import inspect
import io
import json
import os
from pathlib import Path

import pytest
from hf_factory import TinyHF, tiny_config, tiny_weights, write_safetensors

from flashgguf import Llama
from flashgguf.convert import ConvertOptions, convert_hf
from flashgguf.format import open_flash_file


def _corpus() -> list[str]:
    docs = (inspect.getdoc(obj) for _, obj in sorted(vars(builtins).items()))
    return [line for doc in docs if doc for line in doc.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def spm():
    try:
        import sentencepiece
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("sentencepiece is not installed (pip install -e .[test])")
        pytest.skip("sentencepiece is not installed")
    return sentencepiece


@pytest.fixture(scope="module")
def spm_checkpoint(spm, tmp_path_factory) -> tuple[Path, object]:
    lines = _corpus()
    model = io.BytesIO()
    # Llama's settings: BPE, byte fallback, digits split, text kept as it is
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    folder = tmp_path_factory.mktemp("spm") / "tiny-spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    spec = TinyHF(kind="relullama")
    n_vocab = processor.vocab_size()
    write_safetensors(folder / "model.safetensors", tiny_weights(spec, n_vocab))
    config = tiny_config(spec, n_vocab) | {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "add_eos_token": False}))
    return folder, processor


@pytest.mark.native
def test_sentencepiece_tokenizer_round_trip(spm_checkpoint, tmp_path):
    folder, processor = spm_checkpoint
    out = tmp_path / "spm.flash.gguf"
    convert_hf(folder, out, ConvertOptions(progress=False, log=lambda _m: None))
    trunk = open_flash_file(out).trunk
    assert trunk.get("tokenizer.ggml.model") == "llama"
    llm = Llama(str(out), vocab_only=True, verbose=False)
    lines = _corpus()
    assert len(lines) > 200
    for text in [*lines, "  two  spaces, digits 12345 and ünïcödé ☃ (byte fallback)"]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False) == processor.encode(text), text
    assert llm.tokenize(b"Hello world")[0] == 1  # add_bos_token from tokenizer_config.json
    llm.close()


def test_missing_sentencepiece_is_a_clear_error(tmp_path, monkeypatch):
    from flashgguf.convert.hf.tokenizer import read_vocabulary
    from flashgguf.errors import UnsupportedError

    (tmp_path / "tokenizer.model").write_bytes(b"\x00" * 16)
    monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)  # import fails
    with pytest.raises(UnsupportedError, match="pip install sentencepiece"):
        read_vocabulary(tmp_path, 100)
