"""Convert a mixture-of-experts GGUF into a flash GGUF (format version 5).

Each layer's routed experts become bundles of their own gate, up and down bytes, copied
from the source's expert tensors without re-quantization: an expert's slice of a ggml
[.., .., n_expert] tensor is contiguous. The trunk keeps everything else, router and shared
experts included, and gives the routed expert tensors a dummy width of one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..archs import ARCHS, ArchSpec
from ..calibrate.collect import ExpertChoices, count_expert_choices
from ..errors import FormatError, UnsupportedError
from ..expert_cache import PIN_SHARES, recommend_pinned_share, top_tenth_share
from ..format import (
    CalibrationRecord,
    ExpertLayout,
    FlashWriter,
    MoEPayloadRecord,
    SourceKey,
    TrunkRecord,
    TrunkTensor,
    atomic_output,
)
from ..format import constants as C
from ..format.moe import EXPERT_TYPES

if TYPE_CHECKING:
    from .gguf_source import ConvertOptions, ConvertReport, _Source


def expert_count(stream_fields: dict, arch: str) -> int:
    """The source's <arch>.expert_count (0 for dense models)."""
    value = stream_fields.get(f"{arch}.expert_count", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _expert_tensor(source: _Source, name: str, shape: tuple[int, int, int]):
    t = source.stream.tensors.get(name)
    if t is None:
        raise FormatError(f"source tensor {name!r} is missing")
    if t.shape != shape:
        raise FormatError(f"source tensor {name!r} has shape {list(t.shape)}, expected "
                          f"{list(shape)} (n_embd, expert width and expert count from the "
                          "source's keys)")
    if t.ggml_type not in EXPERT_TYPES:
        raise UnsupportedError(f"source tensor {name!r} is {t.ggml_type.name}; expert "
                               f"matrices must be one of "
                               f"{', '.join(sorted(q.name for q in EXPERT_TYPES))}")
    return t


def convert_moe(source: _Source, spec: ArchSpec, src: Path, out: Path, opts: ConvertOptions,
                source_sha256: str, t_start: float,
                calibration_text: str | None) -> ConvertReport:
    """The MoE branch of convert_gguf (options and paths already checked there). With
    calibration (opts.calibration and its text), llama.cpp runs the source on the text and
    each layer's routing frequencies are stored: the runtime pins the most used experts."""
    from .gguf_source import ConvertReport, _scalar_int

    stream = source.stream
    moe = spec.moe
    if moe is None:
        supported = ", ".join(sorted(a for a, s in ARCHS.items() if s.moe is not None))
        raise UnsupportedError(f"{src}: {spec.name} with experts is not supported (MoE "
                               f"architectures: {supported})")
    if opts.gate_resident or opts.activation is not None:
        raise UnsupportedError(f"{src}: a mixture of experts is routed by its own router: "
                               "--gate-resident and --activation do not apply")
    name = spec.name
    n_layer = _scalar_int(stream, f"{name}.block_count")
    n_embd = _scalar_int(stream, f"{name}.embedding_length")
    n_expert = _scalar_int(stream, f"{name}.expert_count")
    n_used = _scalar_int(stream, f"{name}.expert_used_count")
    width_key = f"{name}.{moe.width_key}"
    n_ff_exp = _scalar_int(stream, width_key)
    if not 0 < n_used <= n_expert <= C.MAX_EXPERTS:
        raise FormatError(f"{src}: {n_used} experts used per token of {n_expert} (llama.cpp "
                          f"runs at most {C.MAX_EXPERTS})")

    layouts, parts = [], []
    for bid in range(n_layer):
        gate = _expert_tensor(source, moe.gate.format(bid=bid), (n_embd, n_ff_exp, n_expert))
        up = _expert_tensor(source, moe.up.format(bid=bid), (n_embd, n_ff_exp, n_expert))
        down = _expert_tensor(source, moe.down.format(bid=bid), (n_ff_exp, n_embd, n_expert))
        router = stream.tensors.get(moe.router.format(bid=bid))
        if router is None or router.shape != (n_embd, n_expert):
            got = "missing" if router is None else f"{list(router.shape)}"
            raise FormatError(f"{src}: router {moe.router.format(bid=bid)!r} is {got}, "
                              f"expected [{n_embd}, {n_expert}]")
        layouts.append(ExpertLayout.pack((gate.ggml_type, up.ggml_type, down.ggml_type),
                                         n_embd, n_ff_exp))
        parts.append((gate, up, down))
    opts.log(f"flashgguf-convert: {opts.source_name or src.name}: {name}, {n_layer} layers, "
             f"n_embd {n_embd}, {n_expert} experts ({n_used} per token) of width {n_ff_exp}; "
             f"expert bundles {layouts[0].stride / 2**20:.2f} MiB "
             f"({'/'.join(t.name for t in layouts[0].types)})")

    frequency, calibration, pinned_share = None, None, 0.0
    if opts.calibration is not None:
        assert calibration_text is not None
        t0 = time.perf_counter()
        choices = count_expert_choices(src, moe, n_layer, n_expert, n_used, calibration_text,
                                       opts.calibration)
        frequency = choices.frequency
        calibration = CalibrationRecord(choices.n_tokens, choices.text_sha256)
        opts.log(f"flashgguf-convert: calibration: routing of {choices.n_tokens} tokens from "
                 f"llama.cpp in {time.perf_counter() - t0:.1f} s; the most used tenth of a "
                 f"layer's experts takes {np.median(top_tenth_share(frequency)):.2f} of its "
                 "choices "
                 f"(median over layers; uniform routing: 0.10)")
        t0 = time.perf_counter()
        n_held = max(1, int(round(choices.n_tokens * opts.calibration.held_out)))
        fit = ExpertChoices.frequency_of(choices.chosen[:-n_held], n_expert)
        pinned_share, table = recommend_pinned_share(fit, choices.chosen[-n_held:], n_expert)
        gains = "; ".join(
            f"cache {row['cache_share']:g}: CLOCK {row['clock']:.3f}, pinned "
            + "/".join(f"{row[f'pinned_{p:g}']:.3f}" for p in PIN_SHARES) for row in table)
        opts.log(f"flashgguf-convert: pinning by frequency on {n_held} held-out tokens, hit "
                 f"rates with {'/'.join(f'{p:g}' for p in PIN_SHARES)} of the cache pinned: "
                 f"{gains}; default pinned share {pinned_share:g} "
                 f"({time.perf_counter() - t0:.1f} s)")

    expert_parts = {n: p for bid in range(n_layer) for n, p in moe.expert_tensors(bid).items()}
    keys = tuple(SourceKey(k, v, stream.value_types[k], stream.array_types.get(k))
                 for k, v in stream.fields.items())
    tensors = tuple(TrunkTensor(t.name, t.shape, t.ggml_type, expert_parts.get(t.name))
                    for t in stream.tensors.values())
    alignment = stream.alignment if C.KEY_ALIGNMENT in stream.fields else None
    trunk = TrunkRecord(name, keys, tensors, alignment, ffn_width_key=width_key,
                        dummy_width=C.DUMMY_EXPERT_WIDTH)
    payload = MoEPayloadRecord(name, n_embd, n_ff_exp, n_expert, n_used, spec.activation,
                               tuple(layouts), opts.source_name or src.name, source_sha256,
                               frequency, calibration, pinned_share)
    with atomic_output(out) as final_tmp:
        with FlashWriter(final_tmp, trunk, payload) as writer:
            while (t := writer.next_trunk_tensor) is not None:
                info = stream.tensors[t.name]
                writer.write_trunk_tensor(source.data(info))
                source.release(info)
            for bid, (layout, tensors3) in enumerate(zip(layouts, parts, strict=True)):
                bundles = np.zeros((n_expert, layout.stride), dtype=np.uint8)
                for t, offset in zip(tensors3, layout.offsets, strict=True):
                    raw = np.frombuffer(source.buf[t.offset:t.offset + t.nbytes], np.uint8)
                    per_expert = raw.reshape(n_expert, -1)
                    bundles[:, offset:offset + per_expert.shape[1]] = per_expert
                    source.release(t)
                writer.write_experts(bid, bundles)
            writer.finish()
        trunk_nbytes, payload_nbytes = writer.trunk_nbytes, writer.payload_nbytes
    source_nbytes = sum(t.nbytes for tensors3 in parts for t in tensors3)
    report = ConvertReport(out, name, n_layer, n_embd, n_ff_exp, (), trunk_nbytes,
                           payload_nbytes, 0.0, None, seconds=time.perf_counter() - t_start,
                           source_ffn_nbytes=source_nbytes)
    opts.log(f"flashgguf-convert: wrote {out} (trunk {trunk_nbytes / 2**20:.1f} MiB, experts "
             f"{payload_nbytes / 2**20:.1f} MiB = "
             f"{payload_nbytes / max(source_nbytes, 1):.3f}x the source's expert tensors); "
             f"done in {report.seconds:.1f} s")
    return report
