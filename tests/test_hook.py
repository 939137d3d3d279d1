"""The graph-node facts of flashgguf/archs.py, read from llama.cpp's own graph of a generated
model of each architecture: the eval callback relies on them."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp import _ggml
from model_factory import TinyModel

from flashgguf.archs import ARCHS

# gemma3 with six layers: its sliding-window layers and its global one (layer 5)
SPECS = {"llama": TinyModel(), "qwen2": TinyModel(arch="qwen2"),
         "gemma3": TinyModel(arch="gemma3", n_layer=6, head_dim=32)}

_ggml.libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.libggml.ggml_get_name.restype = ctypes.c_char_p


def graph_node_names(path: Path, n_tokens: int) -> list[str]:
    """Names of the nodes llama.cpp's scheduler offers the eval callback, in graph order,
    for one batch of n_tokens tokens."""
    names: list[str] = []

    def record(tensor: int, ask: bool, _user_data: int) -> bool:
        if ask:
            names.append(_ggml.libggml.ggml_get_name(tensor).decode())
        return not ask  # observe nothing: every node is offered once, in order

    callback = llama_cpp.ggml_backend_sched_eval_callback(record)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                 llama_cpp.llama_model_default_params())
    assert model
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads = 64, 16, 16, 1
    params.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    try:
        tokens = (llama_cpp.llama_token * n_tokens)(*range(100, 100 + n_tokens))
        assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n_tokens)) == 0
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return names


def tiny_opt_as_gpt2(folder: Path, tokenizer_gguf: Path) -> tuple[Path, int]:
    """gpt2 models reach flashgguf as OPT checkpoints: the safetensors converter's plain
    llama.cpp GGUF of a tiny OPT, and its layer count."""
    from hf_factory import TinyHF, write_tiny_checkpoint

    from flashgguf.convert.gguf_source import ConvertOptions
    from flashgguf.convert.hf import TensorSource, hf_architecture
    from flashgguf.convert.hf_source import OUTTYPES, read_config, write_llama_cpp_gguf
    from flashgguf.convert.safetensors import open_checkpoint

    spec = TinyHF("opt")
    write_tiny_checkpoint(folder, spec, tokenizer_gguf)
    ckpt = open_checkpoint(folder)
    try:
        config = read_config(folder)
        arch_name, build = hf_architecture(config)
        model = build(arch_name, config, TensorSource(ckpt, arch_name))
        path = folder / "opt.gguf"
        write_llama_cpp_gguf(path, model, ckpt, OUTTYPES["f16"],
                             ConvertOptions(progress=False, log=lambda _m: None))
    finally:
        ckpt.close()
    return path, spec.n_layer


@pytest.mark.parametrize("arch", sorted(a for a, spec in ARCHS.items() if spec.dense))
def test_ffn_nodes_bracket_the_ffn(tiny_models, tiny_tokenizer_gguf, tmp_path, arch):
    arch_spec = ARCHS[arch]
    if arch == "gpt2":
        path, n_layer = tiny_opt_as_gpt2(tmp_path / "opt", tiny_tokenizer_gguf)
    else:
        path, n_layer = tiny_models(SPECS[arch]), SPECS[arch].n_layer
    names = graph_node_names(path, n_tokens=5)
    for layer in range(n_layer):
        inp, out = f"{arch_spec.ffn_input_node}-{layer}", f"{arch_spec.ffn_output_node}-{layer}"
        assert names.count(inp) == 1, (inp, names)
        i = names.index(inp)
        assert out in names[i + 1:] and out not in names[:i], (layer, names)
        # between them only the FFN itself (gate/up/activation/down nodes of this layer):
        # the hook's result replaces exactly what llama.cpp's FFN computed
        between = names[i + 1:names.index(out, i + 1)]
        assert all(re.fullmatch(rf"ffn_\w+-{layer}", n) for n in between), between
