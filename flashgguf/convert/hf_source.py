"""Convert a Hugging Face safetensors checkpoint into a flash GGUF.

Two steps, so that flash GGUF writing stays in one place (gguf_source.convert_gguf):
  1. the checkpoint becomes a standard llama.cpp GGUF in a scratch file beside the output,
     one tensor at a time: trunk matrices at --outtype, norms and biases F32, FFN weights
     already at their bundle types (so they are quantized once, from the original values);
  2. convert_gguf turns that GGUF into the flash GGUF, with the activation config.json names;
then the scratch file is deleted (also when anything fails).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from ..errors import ConvertError, FormatError, UnsupportedError
from ..format import constants as C
from ..format import scratch_file
from ..quants import quantize_rows, row_nbytes
from .gguf_source import ConvertOptions, ConvertReport, convert_gguf
from .hf import HFModel, TensorSource, hf_architecture
from .hf.base import KIND_FFN_DOWN, KIND_FFN_GATE, KIND_FFN_UP, KIND_FLOAT
from .hf.tokenizer import add_tokenizer
from .safetensors import Checkpoint, open_checkpoint, widen

Q = GGMLQuantizationType
OUTTYPES = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
_FILE_TYPES = {Q.F16: 1, Q.Q8_0: 7, Q.Q4_0: 2}  # llama.cpp's general.file_type (LLAMA_FTYPE_*)
_QUANT_CHUNK_VALUES = 1 << 22  # rows quantized per step: bounds the quantizer's temporaries

# gguf's writer logs an endianness line per file; the converter prints its own summary.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)


@dataclasses.dataclass(frozen=True)
class _Planned:
    tensor: Any  # hf.base.OutTensor
    ggml_type: GGMLQuantizationType
    nbytes: int


def default_output(src: Path) -> Path:
    if src.is_dir():
        return src.with_name(src.name + ".flash.gguf")
    stem = src.name.removesuffix(".json").removesuffix(".index").removesuffix(".safetensors")
    return src.with_name(stem + ".flash.gguf")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path} is missing: a safetensors checkpoint needs its config.json "
                           "beside it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return config


def convert_hf(src: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
               opts: ConvertOptions | None = None, outtype: str = "f16") -> ConvertReport:
    opts = opts or ConvertOptions()
    src = Path(src)
    out = Path(out) if out is not None else default_output(src)
    if outtype not in OUTTYPES:
        raise UnsupportedError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if out.exists() and not opts.force:
        raise ConvertError(f"{out} exists; pass --force to overwrite it")
    ckpt = open_checkpoint(src)
    try:
        config = read_config(ckpt.folder)
        arch_name, build = hf_architecture(config)
        model = build(arch_name, config, TensorSource(ckpt, arch_name))
        for note in model.notes:
            opts.log(f"flashgguf-convert: {arch_name}: {note}")
        activation = opts.activation or model.activation
        threshold = model.activation_threshold if opts.activation is None \
            else opts.activation_threshold
        flash_opts = dataclasses.replace(opts, activation=activation,
                                         activation_threshold=threshold,
                                         source_name=opts.source_name or src.name)
        opts.log(f"flashgguf-convert: {src.name}: {arch_name} -> llama.cpp {model.gguf_arch}, "
                 f"FFN activation {activation}"
                 + (f" (threshold {threshold})" if activation in C.THRESHOLD_ACTIVATIONS else ""))
        with scratch_file(out.parent, ".gguf") as scratch:
            write_llama_cpp_gguf(scratch, model, ckpt, OUTTYPES[outtype], opts)
            return convert_gguf(scratch, out, flash_opts)
    finally:
        ckpt.close()


def _tensor_type(kind: str, shape: tuple[int, ...], outtype: GGMLQuantizationType,
                 opts: ConvertOptions) -> GGMLQuantizationType:
    if kind == KIND_FLOAT or len(shape) == 1:
        return Q.F32
    if kind in (KIND_FFN_GATE, KIND_FFN_UP):
        return outtype if opts.bundle_type == C.AUTO_TYPE else C.BUNDLE_TYPES[opts.bundle_type]
    if kind == KIND_FFN_DOWN:
        # auto: Q8_0, a checkpoint's floats re-quantized once (the GGUF step keeps it)
        return Q.Q8_0 if opts.down_type == C.AUTO_TYPE else C.BUNDLE_TYPES[opts.down_type]
    block, _ = GGML_QUANT_SIZES[outtype]
    return outtype if shape[-1] % block == 0 else Q.F16  # rows that are not whole blocks


def _nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return rows * row_nbytes(ggml_type, shape[-1])


def _encode(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Checkpoint data -> ggml_type bytes, a block of rows at a time (bounded temporaries)."""
    rows = raw.reshape(-1, raw.shape[-1])
    if ggml_type in (Q.F32, Q.F16):
        out = np.empty(rows.shape, dtype=np.float32 if ggml_type == Q.F32 else np.float16)
    else:
        out = np.empty((rows.shape[0], row_nbytes(ggml_type, rows.shape[1])), dtype=np.uint8)
    step = max(1, _QUANT_CHUNK_VALUES // rows.shape[1])
    for r in range(0, rows.shape[0], step):
        block = widen(rows[r:r + step])
        out[r:r + step] = block if ggml_type in (Q.F32, Q.F16) else quantize_rows(block,
                                                                                  ggml_type)
    return out


def write_llama_cpp_gguf(path: Path, model: HFModel, ckpt: Checkpoint,
                         outtype: GGMLQuantizationType, opts: ConvertOptions) -> None:
    """The checkpoint as a llama.cpp GGUF, written one tensor at a time."""
    plan = []
    for t in model.tensors:
        ggml_type = _tensor_type(t.kind, t.shape, outtype, opts)
        plan.append(_Planned(t, ggml_type, _nbytes(ggml_type, t.shape)))

    w = GGUFWriter(path, model.gguf_arch)
    w.add_name(ckpt.folder.name)
    w.add_file_type(_FILE_TYPES[outtype])
    for key, value, vtype in model.keys:
        w.add_key_value(key, value, vtype)
    add_tokenizer(w, ckpt.folder, model.vocab_size)
    for p in plan:
        if p.ggml_type in (Q.F32, Q.F16):
            dtype = np.float32 if p.ggml_type == Q.F32 else np.float16
            w.add_tensor_info(p.tensor.name, p.tensor.shape, np.dtype(dtype), p.nbytes)
        else:
            w.add_tensor_info(p.tensor.name, p.tensor.shape, np.dtype(np.float32), p.nbytes,
                              raw_dtype=p.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    steps = plan
    if opts.progress:
        from tqdm import tqdm

        steps = tqdm(plan, desc="writing tensors", unit="tensor")
    for p in steps:
        raw = p.tensor.load()
        if raw.shape != p.tensor.shape:  # an architecture module's loader is wrong
            raise AssertionError(f"{p.tensor.name}: {raw.shape} != {p.tensor.shape}")
        w.write_tensor_data(_encode(raw, p.ggml_type))
        del raw
        ckpt.release()
    w.close()
