from __future__ import annotations

import os
from pathlib import Path

import pytest
from model_factory import TinyModel, write_tiny_model

from flashgguf.errors import FlashGGUFError
from flashgguf.models import smollm2_gguf as smollm2_gguf_path

REPO = Path(__file__).resolve().parent.parent
SHARED_BROWN = REPO.parent / "shared" / "data" / "brown"
EVALUATION_HEAD = REPO / "tests" / "data" / "brown" / "evaluation_head.txt"




@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return smollm2_gguf_path()
    except FlashGGUFError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def evaluation_text() -> str:
    """The evaluation text: the shared file beside the repo, else its excerpt in tests/data."""
    path = SHARED_BROWN / "evaluation.txt"
    return (path if path.exists() else EVALUATION_HEAD).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_gguf):
    """Factory: TinyModel -> path of the generated source GGUF (cached per spec)."""
    folder = tmp_path_factory.mktemp("tiny")
    made: dict[TinyModel, Path] = {}

    def make(spec: TinyModel | None = None) -> Path:
        spec = spec or TinyModel()
        if spec not in made:
            name = f"{spec.arch}-{spec.ffn_type.name}-{len(made)}.gguf"
            made[spec] = write_tiny_model(folder / name, spec, smollm2_gguf)
        return made[spec]

    return make


def pytest_configure(config):
    # tools/test_sanitized.sh runs the suite on an ASan/UBSan build: make sure it is that
    # build that got imported, not the regular one.
    if os.environ.get("FLASHGGUF_EXPECT_SANITIZED"):
        from flashgguf._native import ffi, lib

        info = ffi.string(lib.fg_build_info()).decode()
        if "sanitize=address" not in info:
            raise pytest.UsageError(f"expected the sanitizer build, got {info}")
