"""Every C source compiles warning-free (-Werror) under each documented build switch: without
OpenMP (FLASHGGUF_OPENMP=0), with the scalar reference only (FLASHGGUF_SCALAR=1), without
-march=native (FLASHGGUF_ARCH=none: no AVX2, so no x86 SIMD file) and with AVX-512, which
this machine may not have. Compile only: the default build is what every other test runs."""

from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"


def _build_constants() -> dict[str, list[str]]:
    """STRICT_FLAGS and C_SOURCES as native/build_ffi.py has them (read, not imported:
    importing it builds the core)."""
    tree = ast.parse((NATIVE / "build_ffi.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                node.targets[0].id in ("STRICT_FLAGS", "C_SOURCES"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


VARIANTS = {
    "no-openmp": ["-O2", "-march=native"],
    "openmp": ["-O2", "-march=native", "-fopenmp"],
    "scalar": ["-O2", "-march=native", "-fopenmp", "-DFG_FORCE_SCALAR"],
    "no-avx2": ["-O2", "-fopenmp"],
    "avx512": ["-O2", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512vnni"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_source_compiles(variant, tmp_path):
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler {cc[0]}")
    consts = _build_constants()
    assert consts["C_SOURCES"] and sorted(consts["C_SOURCES"]) == sorted(
        p.name for p in NATIVE.glob("*.c")), "build_ffi.C_SOURCES lists every native/*.c"
    for name in consts["C_SOURCES"]:
        cmd = [*cc, *consts["STRICT_FLAGS"], "-D_GNU_SOURCE", *VARIANTS[variant],
               "-I", str(NATIVE), "-c", str(NATIVE / name), "-o", str(tmp_path / "x.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{name} ({variant}):\n{done.stderr}"
