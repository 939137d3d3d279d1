"""Mixture-of-experts flash GGUFs (version 5): the expert bundle layout, the payload record
the writer takes, and the validated file the runtime opens.

A MoE payload holds per layer one tensor of expert bundles (constants.TENSOR_EXPERTS); each
bundle is the expert's gate, up and down matrices byte for byte as the source stores them,
so the runtime computes exactly what llama.cpp's mul_mat_id computes from the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError
from . import constants as C
from .gguf_stream import GGUFStream, TensorInfo, tensor_nbytes
from .keys import all_or_none, per_layer

if TYPE_CHECKING:
    from .writer import CalibrationRecord

Q = GGMLQuantizationType
# expert matrix types the C kernels implement (vec_dot + its activation quantizer)
EXPERT_TYPES = frozenset({Q.F32, *C.BUNDLE_TYPES.values()})


@dataclass(frozen=True)
class ExpertLayout:
    """One layer's expert bundle: gate, up, down types and byte offsets, and the stride."""

    types: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType]
    offsets: tuple[int, int, int]
    stride: int

    @staticmethod
    def part_shapes(n_embd: int, n_ff_exp: int) -> tuple[tuple[int, int], ...]:
        """(row length, rows) of gate, up and down in ggml order."""
        return (n_embd, n_ff_exp), (n_embd, n_ff_exp), (n_ff_exp, n_embd)

    @classmethod
    def pack(cls, types: tuple[GGMLQuantizationType, ...], n_embd: int,
             n_ff_exp: int) -> ExpertLayout:
        """Parts back to back at 64-byte offsets; the stride rounded up to the payload
        alignment, so that each expert is one aligned read."""
        offsets, end = [], 0
        for t, (row_len, rows) in zip(types, cls.part_shapes(n_embd, n_ff_exp), strict=True):
            end = -(-end // 64) * 64
            offsets.append(end)
            end += tensor_nbytes(t, (row_len, rows))
        stride = -(-end // C.PAYLOAD_ALIGNMENT) * C.PAYLOAD_ALIGNMENT
        return cls((types[0], types[1], types[2]), (offsets[0], offsets[1], offsets[2]), stride)

    def part_nbytes(self, n_embd: int, n_ff_exp: int) -> tuple[int, ...]:
        return tuple(tensor_nbytes(t, shape) for t, shape in
                     zip(self.types, self.part_shapes(n_embd, n_ff_exp), strict=True))


@dataclass(frozen=True)
class MoEPayloadRecord:
    arch: str
    n_embd: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    activation: str
    layers: tuple[ExpertLayout, ...]
    source_name: str
    source_sha256: str
    # measured routing (float32 [n_layer, n_expert], ExpertChoices.frequency) and the
    # calibration it came from; None without --calibrate
    frequency: np.ndarray | None = None
    calibration: CalibrationRecord | None = None
    pinned_share: float = 0.0  # measured default share of the cache pinned (with frequency)


@dataclass(frozen=True)
class MoELayer:
    index: int
    layout: ExpertLayout
    experts: TensorInfo  # I8 [stride, n_expert]


@dataclass(frozen=True)
class MoEFlashFile:
    path: Path
    file_size: int
    arch: str
    trunk: GGUFStream
    payload: GGUFStream
    n_layer: int
    n_embd: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    activation: str
    layers: tuple[MoELayer, ...]
    # float32 [n_layer, n_expert]: calibrated routing frequency, or None (KEY_MOE_FREQUENCY)
    frequency: np.ndarray | None = None
    # the converter's measured default for flash_pinned_share (KEY_MOE_PINNED_SHARE): 0
    # without frequencies
    pinned_share: float = 0.0

    @property
    def payload_nbytes(self) -> int:
        """Bytes of expert bundles (what the DRAM budget is a share of)."""
        return sum(layer.experts.nbytes for layer in self.layers)

    @property
    def expert_nbytes(self) -> int:
        """The largest expert bundle: one cache slot."""
        return max(layer.layout.stride for layer in self.layers)


def _u32_list(stream: GGUFStream, key: str, what: str, n: int) -> list[int]:
    value = stream.require(key, what)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu" \
            or len(value) != n:
        raise FormatError(f"{what}: key {key!r} must be an array of {n} integers")
    return [int(v) for v in value]


def _positive(stream: GGUFStream, key: str, what: str) -> int:
    value = stream.require(key, what)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(f"{what}: key {key!r} must be a positive integer, got {value!r}")
    return value


def _layer_layout(what: str, raw_types: list[int], offsets: list[int], stride: int,
                  n_embd: int, n_ff_exp: int) -> ExpertLayout:
    types = []
    for part, raw, (row_len, _rows) in zip(C.MOE_PARTS, raw_types,
                                           ExpertLayout.part_shapes(n_embd, n_ff_exp),
                                           strict=True):
        try:
            t = Q(raw)
        except ValueError:
            t = None
        if t not in EXPERT_TYPES:
            raise FormatError(f"{what}: expert {part} has unsupported type {raw}")
        block = GGML_QUANT_SIZES[t][0]
        if row_len % block:
            raise FormatError(f"{what}: expert {part} is {t.name}, whose {block}-value blocks "
                              f"do not divide its rows of {row_len}")
        types.append(t)
    if stride <= 0 or stride % C.PAYLOAD_ALIGNMENT:
        raise FormatError(f"{what}: expert stride {stride} is not a positive multiple of "
                          f"{C.PAYLOAD_ALIGNMENT}")
    layout = ExpertLayout((types[0], types[1], types[2]), (offsets[0], offsets[1], offsets[2]),
                          stride)
    spans = sorted(zip(offsets, layout.part_nbytes(n_embd, n_ff_exp), C.MOE_PARTS,
                       strict=True))
    prev_end = 0
    for start, nbytes, part in spans:
        if start < prev_end or start + nbytes > stride:
            raise FormatError(f"{what}: expert {part} at [{start}, {start + nbytes}) overlaps "
                              f"another part or passes the stride {stride}")
        prev_end = start + nbytes
    return layout


def read_moe_payload(path: Path, size: int, arch: str, trunk: GGUFStream, payload: GGUFStream,
                     version: int) -> MoEFlashFile:
    """Validate a MoE payload against itself and against the trunk llama.cpp will load."""
    what = f"{path.name} (payload)"
    if version < C.MOE_VERSION:
        raise FormatError(f"{what}: mixture-of-experts keys in a version {version} file (they "
                          f"need version {C.MOE_VERSION})")
    n_layer = _positive(payload, C.KEY_BLOCK_COUNT, what)
    n_embd = _positive(payload, C.KEY_EMBEDDING_LENGTH, what)
    n_ff_exp = _positive(payload, C.KEY_FEED_FORWARD_LENGTH, what)
    n_expert = _positive(payload, C.KEY_MOE_EXPERT_COUNT, what)
    n_used = _positive(payload, C.KEY_MOE_EXPERT_USED_COUNT, what)
    if n_used > n_expert or n_expert > C.MAX_EXPERTS:
        raise FormatError(f"{what}: {n_used} experts used per token of {n_expert} (llama.cpp "
                          f"runs at most {C.MAX_EXPERTS})")
    activation = payload.require(C.KEY_ACTIVATION, what)
    if activation not in ("silu", "gelu") or payload.require(C.KEY_GATED, what) is not True:
        raise FormatError(f"{what}: experts must be gated silu or gelu FFNs, got "
                          f"{activation!r}")
    raw_types = _u32_list(payload, C.KEY_MOE_TYPES, what, 3 * n_layer)
    offsets = _u32_list(payload, C.KEY_MOE_OFFSETS, what, 3 * n_layer)
    strides = _u32_list(payload, C.KEY_MOE_STRIDE, what, n_layer)

    # the trunk llama.cpp routes with must agree with the experts stored here
    twhat = f"{path.name} (trunk)"
    for key, want in (("expert_count", n_expert), ("expert_used_count", n_used),
                      ("block_count", n_layer), ("embedding_length", n_embd)):
        got = trunk.get(f"{arch}.{key}")
        if got != want:
            raise FormatError(f"{twhat}: {arch}.{key} is {got!r}, the payload's experts "
                              f"need {want}")
    layers = []
    for bid in range(n_layer):
        lwhat = f"{what} layer {bid}"
        layout = _layer_layout(lwhat, raw_types[3 * bid:3 * bid + 3],
                               offsets[3 * bid:3 * bid + 3], strides[bid], n_embd, n_ff_exp)
        name = C.TENSOR_EXPERTS.format(bid=bid)
        t = payload.tensors.get(name)
        if t is None or t.shape != (layout.stride, n_expert) or t.ggml_type != Q.I8:
            got = "missing" if t is None else f"{t.ggml_type.name} {list(t.shape)}"
            raise FormatError(f"{what}: tensor {name!r} is {got}, expected I8 "
                              f"{[layout.stride, n_expert]}")
        if t.offset % C.PAYLOAD_ALIGNMENT:
            raise FormatError(f"{what}: tensor {name!r} at {t.offset} is not "
                              f"{C.PAYLOAD_ALIGNMENT}-aligned")
        router = trunk.tensors.get(f"blk.{bid}.ffn_gate_inp.weight")
        if router is None or router.shape != (n_embd, n_expert):
            got = "missing" if router is None else str(list(router.shape))
            raise FormatError(f"{twhat}: router blk.{bid}.ffn_gate_inp.weight is {got}, "
                              f"expected [{n_embd}, {n_expert}] for {n_expert} experts")
        layers.append(MoELayer(bid, layout, t))
    frequency, pinned_share = _read_frequency(payload, what, n_layer, n_expert, n_used)
    return MoEFlashFile(path, size, arch, trunk, payload, n_layer, n_embd, n_ff_exp, n_expert,
                        n_used, activation, tuple(layers), frequency, pinned_share)


def _read_frequency(payload: GGUFStream, what: str, n_layer: int, n_expert: int,
                    n_used: int) -> tuple[np.ndarray | None, float]:
    """The optional calibrated routing frequencies (with their calibration keys, each in
    [0, 1], each layer's summing to the experts used per token) and pinned share."""
    keys = (C.KEY_MOE_FREQUENCY, C.KEY_MOE_PINNED_SHARE, C.KEY_CALIBRATION_TOKENS,
            C.KEY_CALIBRATION_TEXT_SHA256)
    if not all_or_none(payload, keys, what):
        return None, 0.0
    share = payload.get(keys[1])
    if not isinstance(share, float) or not 0.0 <= share <= 1.0:
        raise FormatError(f"{what}: key {keys[1]!r} must be a share in [0, 1], got {share!r}")
    values = per_layer(payload, keys[0], what, n_layer * n_expert, "f",
                       count="one per layer and expert")
    assert values is not None
    freq = values.astype(np.float32).reshape(n_layer, n_expert)
    sums = freq.sum(axis=1, dtype=np.float64)
    if np.any((freq < 0.0) | (freq > 1.0)) or np.any(np.abs(sums - n_used) > 1e-3 * n_used):
        raise FormatError(f"{what}: key {keys[0]!r}: each value must be in [0, 1] and each "
                          f"layer's sum to the {n_used} experts used per token")
    return freq, share
