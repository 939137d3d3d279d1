"""Build the C core as the cffi API-mode module ``flashgguf._native``.

Our own C files are compiled first, with strict warnings (-Wall -Wextra -Werror), into
objects that the cffi-generated wrapper (compiled with the default flags) links with.

Environment switches:
  FLASHGGUF_ARCH=native|none   -march=native (default, like GGML_NATIVE) or the compiler's default
  FLASHGGUF_SCALAR=1           compile only the scalar reference kernels (no SIMD paths)
  FLASHGGUF_SANITIZE=1         AddressSanitizer + UndefinedBehaviorSanitizer build (-O1 -g);
                               run Python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)
  FLASHGGUF_SANITIZE=thread    ThreadSanitizer build (tools/test_tsan.sh)
  FLASHGGUF_OPENMP=0           do not use OpenMP for the runtime's worker threads

Run as a script to build the module in place (``python native/build_ffi.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import cffi

NATIVE_DIR = Path(__file__).resolve().parent
C_SOURCES = ["kernels.c", "kernels_ref.c", "kernels_x86.c", "io.c", "iopool.c", "uring.c",
             "cache.c", "predictor.c", "gate.c", "runtime.c", "hook.c", "capture.c", "error.c",
             "trace.c", "moe.c", "two_stage.c"]
STRICT_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-Wshadow", "-Wstrict-prototypes"]


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _compiles_with(flags: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("int main(void) { return 0; }\n")
        cmd = [*_compiler(), *flags, str(src), "-o", str(Path(tmp) / "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def native_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags shared by our objects and the wrapper."""
    cflags: list[str] = ["-fPIC", "-D_GNU_SOURCE", "-pthread"]
    ldflags: list[str] = ["-pthread"]
    sanitize = os.environ.get("FLASHGGUF_SANITIZE")
    if sanitize in ("1", "thread"):
        san = (["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
               if sanitize == "1" else ["-fsanitize=thread"]) + ["-fno-omit-frame-pointer"]
        cflags += [*san, "-O1", "-g"]
        ldflags += san
    else:
        cflags += ["-O3"]
    if os.environ.get("FLASHGGUF_ARCH", "native") == "native" and _compiles_with(["-march=native"]):
        cflags.append("-march=native")
    if os.environ.get("FLASHGGUF_SCALAR") == "1":
        cflags.append("-DFG_FORCE_SCALAR")
    if os.environ.get("FLASHGGUF_OPENMP", "1") == "1":
        if _compiles_with(["-fopenmp"]):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        else:
            print("flashgguf: compiler has no OpenMP; the FFN runs on one thread", file=sys.stderr)
    return cflags, ldflags


def compile_objects(cflags: list[str], out_dir: Path) -> list[str]:
    objects = []
    for name in C_SOURCES:
        obj = out_dir / (Path(name).stem + ".o")
        cmd = [*_compiler(), *STRICT_FLAGS, *cflags, "-I", str(NATIVE_DIR), "-c",
               str(NATIVE_DIR / name), "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"flashgguf: compiling native/{name} failed:\n{' '.join(cmd)}\n{result.stderr}"
                "\nA C11 compiler is required (set CC to choose one; FLASHGGUF_ARCH=none "
                "drops -march=native)."
            )
        objects.append(str(obj))
    return objects


_INT_DEFINE = re.compile(r"#define\s+(FG_\w+)\s+-?[0-9]+\b")


def cdef_from_header(header: str) -> str:
    """cffi's declarations are the public header itself, so that there is one list of the
    API: preprocessor lines go (the C++ guard with what it encloses), and each integer
    #define becomes "#define NAME ...", its value read from the compiled header."""
    lines, in_cplusplus = [], False
    for line in header.splitlines():
        stripped = line.strip()
        if stripped.startswith("#ifdef __cplusplus"):
            in_cplusplus = True
        elif in_cplusplus:
            in_cplusplus = not stripped.startswith("#endif")
        elif stripped.startswith("#"):
            define = _INT_DEFINE.match(stripped)
            if define:
                lines.append(f"#define {define.group(1)} ...")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def make_builder() -> cffi.FFI:
    cflags, ldflags = native_flags()
    obj_dir = Path(tempfile.mkdtemp(prefix="flashgguf-native-"))
    objects = compile_objects(cflags, obj_dir)
    builder = cffi.FFI()
    builder.cdef(cdef_from_header((NATIVE_DIR / "flashgguf.h").read_text()))
    builder.set_source(
        "flashgguf._native",
        '#include "flashgguf.h"\n',
        include_dirs=[str(NATIVE_DIR)],
        extra_objects=objects,
        extra_compile_args=[f for f in cflags if f != "-D_GNU_SOURCE"],
        extra_link_args=ldflags,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    # In-place build: writes flashgguf/_native.*.so beside the Python sources.
    ffibuilder.compile(tmpdir=str(NATIVE_DIR.parent), verbose=False)
