# Sourced by tools/test_sanitized.sh and tools/test_tsan.sh: a scratch copy of the package
# (removed on exit) whose C core is rebuilt with the build switches given as arguments
# (e.g. FLASHGGUF_SANITIZE=1); sets repo, venv and work, and leaves the shell in work.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FLASHGGUF_VENV:-$repo/.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$repo/flashgguf" "$repo/native" "$repo/tests" "$repo/tools" "$repo/pyproject.toml" \
    "$repo/README.md" "$work/"  # tests read README.md and load tools/selection.py
find "$work/flashgguf" \( -name '*.so' -o -name '*.o' -o -name '_native.c' \) -delete
(cd "$work" && env "$@" "$venv/bin/python" native/build_ffi.py)
cd "$work"
