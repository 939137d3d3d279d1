"""Run numpy's LAPACK calls on one OpenBLAS thread for a while.

The predictor fit's eigendecomposition (576 x 576 for SmolLM2) is a chain of small BLAS-2
calls; OpenBLAS threads each one, and on a busy machine (more runnable threads than cores)
every hand-off waits for a time slice: measured here under load 10 on 2 cores, eigh took
19.5 s threaded and 0.19 s on one thread. The thread count is process-wide state, so it is
restored on exit. Where the OpenBLAS numpy loaded cannot be found (another BLAS, another
OS) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

# (get, set) symbol pairs: numpy's wheels bundle scipy-openblas (64-bit ints); a system
# OpenBLAS has the plain names
_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads"))


def _openblas() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                get, put = getattr(lib, get_name), getattr(lib, set_name)
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    funcs = _openblas()
    if funcs is None:
        yield
        return
    get, put = funcs
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)
