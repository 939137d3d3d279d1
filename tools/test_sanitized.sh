#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer into a scratch copy of
# the package and run every test that does not need the SmolLM2 model under it: the kernels,
# format loading, the runtime, and the eval callback inside llama.cpp on generated models.
#
#   bash tools/test_sanitized.sh            (after tools/setup_env.sh)
set -euo pipefail
source "$(dirname "$0")/sanitized_copy.sh" FLASHGGUF_SANITIZE=1

cc=${CC:-gcc}
preload="$($cc -print-file-name=libasan.so):$($cc -print-file-name=libubsan.so)"
# python itself is not instrumented: its allocations look like leaks to LeakSanitizer
LD_PRELOAD="$preload" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
FLASHGGUF_EXPECT_SANITIZED=1 \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not model" tests
