"""The flash_* settings of flashgguf-server: llama_cpp.server's own settings, extended.

Each field is a keyword argument of flashgguf.Llama, with the same name and default, so
the command line (--flash_dram_budget 32MiB), a config file's model entries and the
environment (FLASH_DRAM_BUDGET) all set them the way they set llama_cpp.server's options.
"""

from __future__ import annotations

from typing import Any, Optional

from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings
from pydantic import Field

from ..format import is_flash_gguf
from ..options import (
    DEFAULT_COALESCE_GAP,
    DEFAULT_DOWN_KEEP,
    DEFAULT_EXPERT_PREFETCH,
    DEFAULT_GATE_CACHE_BONUS,
    DEFAULT_GATE_KEEP,
    DEFAULT_GATE_PER_LAYER,
    DEFAULT_IO,
    DEFAULT_PINNED_SHARE,
    DEFAULT_WINDOW,
    MODES,
    budget_argument,
)


class FlashModelSettings(ModelSettings):
    """A model as llama_cpp.server loads it, plus how flashgguf runs a flash GGUF."""

    # Optional[...] rather than X | None: llama_cpp.server's argument parser reads the
    # typing.Union form to find each option's type.
    flash_offload: Optional[bool] = Field(  # noqa: UP045
        default=None,
        description="Keep the FFN on flash and read the rows each token needs. Default: on "
        "for a flash GGUF (made by flashgguf-convert); a plain GGUF runs as stock llama.cpp.")
    flash_dram_budget: Optional[str] = Field(  # noqa: UP045
        default=None,
        description="DRAM for the FFN payload: bytes, a size ('32MiB', '1.5GiB') or a "
        "fraction of the payload ('0.5'). Default: all resident when it fits in 0.8 of the RAM "
        "available at load, else that share.")
    flash_mode: Optional[str] = Field(  # noqa: UP045
        default=None,
        description=f"Row selection, one of {', '.join(MODES)}. Default: gate for files "
        "converted with --gate-resident, else predicted.")
    flash_window: int = Field(
        default=DEFAULT_WINDOW,
        description="Tokens a loaded row is kept without being used before it is the first "
        "to go.")
    flash_gate_keep: float = Field(
        default=DEFAULT_GATE_KEEP,
        description="Gate mode: each token's share of rows computed, by |act(gate)|.")
    flash_gate_cache_bonus: float = Field(
        default=DEFAULT_GATE_CACHE_BONUS,
        description="Gate mode: a row already in DRAM scores (1 + bonus) x |act(gate)|.")
    flash_gate_per_layer: bool = Field(
        default=DEFAULT_GATE_PER_LAYER,
        description="Gate mode: spread flash_gate_keep over the layers by the file's error "
        "curves (files converted with --gate-resident --calibrate).")
    flash_down_keep: Optional[float] = Field(  # noqa: UP045
        default=None,
        description="Gate mode on files converted with --two-stage: each token's share of rows "
        f"whose down rows are read, by |h| x ||down|| once h is exact (default "
        f"{DEFAULT_DOWN_KEEP}).")
    flash_pinned_share: Optional[float] = Field(  # noqa: UP045
        default=None,
        description="Predicted mode: share of each layer's slots pinned to its hottest rows "
        f"(default {DEFAULT_PINNED_SHARE}); mixtures of experts: share of the expert cache "
        "pinned to the most used experts (default: the file's, measured by --calibrate).")
    flash_expert_prefetch: bool = Field(
        default=DEFAULT_EXPERT_PREFETCH,
        description="Mixtures of experts: read each decode token's guessed next-layer "
        "experts while llama.cpp computes that layer's attention.")
    flash_coalesce_gap: str = Field(
        default=str(DEFAULT_COALESCE_GAP),
        description="Misses at most this many rows apart share one read; 'auto': when the "
        "bytes between them cost less than a read.")
    flash_io: str = Field(
        default=DEFAULT_IO, description="Read engine: auto, threads or io_uring.")
    flash_predictor_recall: Optional[float] = Field(  # noqa: UP045
        default=None,
        description="Each layer's predictor threshold for this recall of the needed neurons "
        "(0.5-0.995). Default: the threshold chosen at conversion.")


class FlashSettings(ServerSettings, FlashModelSettings):
    """Everything the command line sets: the server and one model."""


class FlashConfigFileSettings(ConfigFileSettings):
    """A --config_file: llama_cpp.server's format, whose models may set flash_* options."""

    models: list[FlashModelSettings] = Field(default=[], description="Model configs")


def llama_flash_kwargs(settings: ModelSettings) -> dict[str, Any]:
    """The flash_* keyword arguments of flashgguf.Llama for a model's settings (none for a
    plain ModelSettings, which then loads as llama_cpp.server would load it)."""
    if not isinstance(settings, FlashModelSettings):
        return {}
    offload = settings.flash_offload
    if offload is None:
        offload = is_flash_gguf(settings.model)
    gap = settings.flash_coalesce_gap.strip()
    return {
        "flash_offload": offload,
        "flash_dram_budget": (None if settings.flash_dram_budget is None
                              else budget_argument(settings.flash_dram_budget)),
        "flash_mode": settings.flash_mode,
        "flash_window": settings.flash_window,
        "flash_gate_keep": settings.flash_gate_keep,
        "flash_gate_cache_bonus": settings.flash_gate_cache_bonus,
        "flash_gate_per_layer": settings.flash_gate_per_layer,
        "flash_down_keep": settings.flash_down_keep,
        "flash_pinned_share": settings.flash_pinned_share,
        "flash_expert_prefetch": settings.flash_expert_prefetch,
        "flash_coalesce_gap": int(gap) if gap.isdigit() else gap,
        "flash_io": settings.flash_io,
        "flash_predictor_recall": settings.flash_predictor_recall,
    }
