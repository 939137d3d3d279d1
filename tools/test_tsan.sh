#!/usr/bin/env bash
# ThreadSanitizer on the runtime's own threads: build the C core with -fsanitize=thread (and
# without OpenMP, whose uninstrumented libgomp barriers TSan cannot see: the FFN then runs on
# one thread) into a scratch copy of the package, and run the tests that drive the read
# engines (pthread pool and io_uring), the trace, the fault hooks and several models and
# Python threads at once under it. A data race fails the run.
#
#   bash tools/test_tsan.sh            (after tools/setup_env.sh)
set -euo pipefail
source "$(dirname "$0")/sanitized_copy.sh" FLASHGGUF_SANITIZE=thread FLASHGGUF_OPENMP=0

cc=${CC:-gcc}
# python, numpy and llama.cpp are not instrumented: only our objects' accesses are checked
LD_PRELOAD="$($cc -print-file-name=libtsan.so)" \
TSAN_OPTIONS="halt_on_error=1:ignore_noninstrumented_modules=1:report_signal_unsafe=0" \
FLASHGGUF_EXPECT_SANITIZED=thread \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_flash_runtime.py tests/test_concurrency.py tests/test_llama.py tests/test_profile.py \
    tests/test_moe.py tests/test_two_stage.py \
    -k "not sigterm and not bench" "$@"
