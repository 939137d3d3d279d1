"""What an architecture module hands the safetensors converter: llama.cpp keys and tensors.

An architecture module reads config.json and the checkpoint's tensor index (names, shapes;
no data) and returns an HFModel: the llama.cpp architecture, its hyper-parameter keys, and
every output tensor with its llama.cpp name, shape and a loader that produces its data on
demand (as the checkpoint stores it). Shapes are checked here, before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ...errors import FormatError
from ..safetensors import Checkpoint

# How the converter stores an output tensor.
KIND_MATRIX = "matrix"  # 2-D weight: --outtype
KIND_FLOAT = "float"  # norms, biases: F32
KIND_FFN_GATE = "ffn_gate"  # FFN weights: the bundle types (the flash converter bundles them)
KIND_FFN_UP = "ffn_up"
KIND_FFN_DOWN = "ffn_down"


@dataclass(frozen=True)
class OutTensor:
    name: str  # llama.cpp tensor name
    shape: tuple[int, ...]  # numpy order
    kind: str
    # the data of `shape` as the checkpoint stores it (see Checkpoint.raw: float32, float16
    # or bfloat16 bits); the writer widens it a block of rows at a time
    load: Callable[[], np.ndarray]


@dataclass
class HFModel:
    gguf_arch: str  # llama.cpp's general.architecture
    keys: list[tuple[str, Any, GGUFValueType]]
    tensors: list[OutTensor]
    vocab_size: int  # rows of the token embedding
    activation: str  # flashgguf.ffn.activation of the FFN
    activation_threshold: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the converter should tell the user


class TensorSource:
    """The checkpoint's tensors as an architecture module takes them: each name at most
    once, each shape checked, and nothing left over at the end."""

    def __init__(self, ckpt: Checkpoint, arch: str) -> None:
        self.ckpt = ckpt
        self.arch = arch
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.ckpt

    def take(self, name: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        entry = self.ckpt.tensors.get(name)
        if entry is None:
            raise FormatError(f"{self.arch} checkpoint: tensor {name!r} is missing")
        if entry.shape != shape:
            raise FormatError(
                f"{self.arch} checkpoint: tensor {name!r} has shape {list(entry.shape)}, "
                f"config.json implies {list(shape)}"
            )
        self.used.add(name)
        return lambda: self.ckpt.raw(name)

    def ignore(self, names: Iterable[str]) -> None:
        self.used.update(names)

    def check_all_used(self) -> None:
        left = sorted(set(self.ckpt.tensors) - self.used)
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise FormatError(
                f"{self.arch} checkpoint: unexpected tensors {left[:5]}{more} (a different "
                "architecture than config.json names?)"
            )


def config_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
        raise FormatError(f"config.json: {key} is {value!r}, a positive integer below 2^31 is "
                          "needed")
    return value


def config_float(config: dict[str, Any], key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
            or abs(value) > float(np.finfo(np.float32).max):  # GGUF stores it as float32
        raise FormatError(f"config.json: {key} is {value!r}, a float32 number is needed")
    return float(value)

