"""Kernels of the C core (native/kernels_ref.c, native/kernels_x86.c) against numpy.

Three layers are checked: the scalar reference against llama.cpp's gguf-py numpy code and
float64 numpy arithmetic; the fast (SIMD) entry points against the reference; and the
argument checks of the public entry points.

The K-quants (Q4_K, Q5_K, Q6_K: 256-value super-blocks) have no quantizer in gguf-py or in
the C core: their weights are random raw bytes with sane fp16 scales (every bit pattern of
the packed scales and quants is a valid block); their activations are Q8_K, compared
byte for byte with a numpy port of ggml's quantize_row_q8_K_ref.

Tolerances are derived from float32 rounding bounds: a sum of k float32 terms carries at most
about k * 2**-24 * sum|term| of rounding error, so each check allows a small multiple of that
relative to ``mag`` = sum of |term|s (for Q4_1 the scale and min parts are counted separately,
since d*q and m can cancel). A misplaced block, nibble or lane moves a result by O(1) * mag,
orders of magnitude above these bounds.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from flashgguf._native import ffi, lib
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K, dequantize, quantize

pytestmark = pytest.mark.native

SEED = 20240611
U = 2.0**-24  # float32 unit roundoff

QUANT_TYPES = {
    "Q8_0": lib.FG_TYPE_Q8_0,
    "Q4_0": lib.FG_TYPE_Q4_0,
    "Q4_1": lib.FG_TYPE_Q4_1,
    "Q5_0": lib.FG_TYPE_Q5_0,
    "Q5_1": lib.FG_TYPE_Q5_1,
}
K_TYPES = {"Q4_K": lib.FG_TYPE_Q4_K, "Q5_K": lib.FG_TYPE_Q5_K, "Q6_K": lib.FG_TYPE_Q6_K}
WEIGHT_TYPES = {"F32": lib.FG_TYPE_F32, "F16": lib.FG_TYPE_F16, **QUANT_TYPES}
GGUF_TYPE = {
    lib.FG_TYPE_F32: QT.F32,
    lib.FG_TYPE_F16: QT.F16,
    lib.FG_TYPE_Q8_0: QT.Q8_0,
    lib.FG_TYPE_Q4_0: QT.Q4_0,
    lib.FG_TYPE_Q4_1: QT.Q4_1,
    lib.FG_TYPE_Q5_0: QT.Q5_0,
    lib.FG_TYPE_Q5_1: QT.Q5_1,
    lib.FG_TYPE_Q4_K: QT.Q4_K,
    lib.FG_TYPE_Q5_K: QT.Q5_K,
    lib.FG_TYPE_Q6_K: QT.Q6_K,
}
QUANT_SIZES = [32, 96, 544, 576, 4128]
K_SIZES = [256, 768, 1536, 2304, 4352]
FLOAT_SIZES = [1, 7, 33, 577, *QUANT_SIZES]
GUARD = 64  # bytes past every output buffer that must stay untouched

# numpy views of ggml's blocks (native/kernels.h)
BLOCK_DTYPE = {
    lib.FG_TYPE_Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    lib.FG_TYPE_Q8_1: np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)]),
    lib.FG_TYPE_Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    lib.FG_TYPE_Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    lib.FG_TYPE_Q5_0: np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    lib.FG_TYPE_Q5_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    lib.FG_TYPE_Q4_K: np.dtype(
        [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]
    ),
    lib.FG_TYPE_Q5_K: np.dtype(
        [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]
    ),
    lib.FG_TYPE_Q6_K: np.dtype(
        [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]
    ),
    lib.FG_TYPE_Q8_K: np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]),
}


def weight_cases(sizes_q=QUANT_SIZES, sizes_f=FLOAT_SIZES):
    return [
        pytest.param(t, n, id=f"{name}-{n}")
        for name, t in WEIGHT_TYPES.items()
        for n in (sizes_f if t in (lib.FG_TYPE_F32, lib.FG_TYPE_F16) else sizes_q)
    ]


def k_cases():
    return [pytest.param(t, n, id=f"{name}-{n}") for name, t in K_TYPES.items() for n in K_SIZES]


# ---- helpers -------------------------------------------------------------------------------


def fptr(a: np.ndarray):
    assert a.dtype == np.float32 and a.flags.c_contiguous
    return ffi.cast("float *", ffi.from_buffer(a))


def vptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return ffi.cast("void *", ffi.from_buffer(a))


def random_row(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normal values with a spread of block scales, plus the special blocks of the
    quantizers: all zeros (d = 0) and constant (Q4_1: d = 0 with a non-zero min)."""
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.repeat(np.float32(10.0) ** rng.uniform(-3, 1, (n + 31) // 32), 32)[:n]
    if n >= 96:
        x[:32] = 0.0
        x[32:64] = 0.75
    return x.astype(np.float32)


def c_quantize(t: int, x: np.ndarray, ref: bool) -> np.ndarray:
    n = x.size
    size = lib.fg_row_size(t, n)
    out = np.full(size + GUARD, 0xAB, np.uint8)
    fn = lib.fg_quantize_row_ref if ref else lib.fg_quantize_row
    assert fn(t, fptr(x), vptr(out), n) == lib.FG_OK
    assert (out[size:] == 0xAB).all(), "wrote past the end of the row"
    return out[:size]


def c_dequantize(t: int, data: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n + GUARD // 4, 7.0, np.float32)
    assert lib.fg_dequantize_row(t, vptr(data), fptr(out), n) == lib.FG_OK
    assert (out[n:] == 7.0).all()
    return out[:n]


def c_vec_dot(t: int, w: np.ndarray, xq: np.ndarray, n: int, ref: bool) -> float:
    out = ffi.new("float *")
    fn = lib.fg_vec_dot_ref if ref else lib.fg_vec_dot
    assert fn(t, vptr(w), vptr(xq), n, out) == lib.FG_OK
    return float(out[0])


def c_axpy(t: int, col: np.ndarray, a: float, y: np.ndarray, n: int, ref: bool) -> np.ndarray:
    buf = np.concatenate([y, np.full(GUARD // 4, 7.0, np.float32)])
    fn = lib.fg_axpy_ref if ref else lib.fg_axpy
    assert fn(t, vptr(col), a, fptr(buf), n) == lib.FG_OK
    assert (buf[n:] == 7.0).all(), "wrote past the end of y"
    return buf[:n]


def components(t: int, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale part d*q, min part m) of each value, float64; their sum is the value."""
    if t == lib.FG_TYPE_F32:
        return data.view(np.float32).astype(np.float64), np.zeros(n)
    if t == lib.FG_TYPE_F16:
        return data.view(np.float16).astype(np.float64), np.zeros(n)
    b = data.view(BLOCK_DTYPE[t])
    if t in K_TYPES.values():
        scale, q, m = k_components(t, b)
        return (scale * q).ravel(), m.ravel()
    d = b["d"].astype(np.float64)[:, None]
    qs = b["qs"].astype(np.int64)
    if t in (lib.FG_TYPE_Q4_0, lib.FG_TYPE_Q4_1, lib.FG_TYPE_Q5_0, lib.FG_TYPE_Q5_1):
        qs = np.concatenate([qs & 15, qs >> 4], axis=1)
    if t in (lib.FG_TYPE_Q5_0, lib.FG_TYPE_Q5_1):
        bit = (b["qh"].astype(np.int64)[:, None] >> np.arange(32)) & 1
        qs = qs | (bit << 4)
    if t == lib.FG_TYPE_Q4_0:
        qs = qs - 8
    if t == lib.FG_TYPE_Q5_0:
        qs = qs - 16
    with_min = t in (lib.FG_TYPE_Q4_1, lib.FG_TYPE_Q5_1)
    m = b["m"].astype(np.float64)[:, None] if with_min else np.zeros_like(d)
    return (d * qs).ravel(), np.broadcast_to(m, qs.shape).ravel().copy()


def k_components(t: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K-quant blocks -> (scale, q, min part) per value, (blocks, 256) float64 / int64:
    value = scale * q + min part (ggml-common.h's layouts, decoded independently of C)."""
    nb = b.size
    if t == lib.FG_TYPE_Q6_K:
        ql = b["ql"].astype(np.int64).reshape(nb, 2, 2, 32)  # half, which 32 bytes, l
        lo = np.concatenate([ql & 15, ql >> 4], axis=2)  # quarter k = 0..3 of each half
        qh = b["qh"].astype(np.int64).reshape(nb, 2, 1, 32)
        hi = (qh >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).reshape(nb, 256) - 32
        scale = b["d"].astype(np.float64)[:, None] * np.repeat(b["scales"], 16, axis=1)
        return scale, q, np.zeros((nb, 256))
    qs = b["qs"].astype(np.int64).reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32)  # sub-block j of 32
    if t == lib.FG_TYPE_Q5_K:
        qh = b["qh"].astype(np.int64).reshape(nb, 1, 32)
        q = q | (((qh >> np.arange(8).reshape(1, 8, 1)) & 1) << 4)
    sc, mins = Q4_K.get_scale_min(b["scales"].copy())
    scale = b["d"].astype(np.float64)[:, None] * sc.astype(np.float64)
    m = -b["dmin"].astype(np.float64)[:, None] * mins.astype(np.float64)
    return np.repeat(scale, 32, axis=1), q.reshape(nb, 256), np.repeat(m, 32, axis=1)


def random_k_blocks(rng: np.random.Generator, t: int, n: int) -> np.ndarray:
    """n values of a K-quant as raw bytes: random quants, packed scales and mins, fp16 super-
    block scales of random sign and magnitude (one block with d = 0 when there are three)."""
    nb = n // 256
    dt = BLOCK_DTYPE[t]
    b = rng.integers(0, 256, nb * dt.itemsize, dtype=np.uint8).view(dt)
    b["d"] = rng.choice([-1, 1], nb) * 10.0 ** rng.uniform(-4, -1, nb)
    if "dmin" in dt.names:
        b["dmin"] = rng.choice([-1, 1], nb) * 10.0 ** rng.uniform(-4, -1, nb)
    if nb >= 3:
        b["d"][1] = 0.0
    return b.view(np.uint8)


def numpy_q8_K(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref in numpy: iscale = -127 / (the first value of largest
    magnitude), q = min(127, round-half-even(float32(iscale * x))), d = 1 / iscale, bsums =
    sums of 16 q. An all-zero block has d = 0 and zero quants (ggml leaves its bsums unwritten;
    the C core writes zeros)."""
    xb = x.reshape(-1, 256)
    nb = xb.shape[0]
    big = xb[np.arange(nb), np.abs(xb).argmax(axis=1)]
    out = np.zeros(nb, BLOCK_DTYPE[lib.FG_TYPE_Q8_K])
    nz = big != 0
    iscale = np.float32(-127) / big[nz]
    q = np.minimum(np.rint(iscale[:, None] * xb[nz]), 127).astype(np.int8)
    out["qs"][nz] = q
    out["d"][nz] = np.float32(1) / iscale
    out["bsums"][nz] = q.reshape(-1, 16, 16).astype(np.int16).sum(axis=2)
    return out.view(np.uint8)


def q8_K_test_row(rng: np.random.Generator, n: int) -> np.ndarray:
    """random_row plus the Q8_K corner cases: a zero block, exact ties of the half-even
    rounding (max = -127: iscale = 1), and +-max in one block (the first one sets the sign)."""
    x = random_row(rng, n)
    if n >= 768:
        x[256:512] = 0.0
        x[512:768] = (rng.integers(-127, 127, 256) + 0.5).astype(np.float32)
        x[512] = -127.0
    if n >= 1536:
        x[1100] = 1000.0
        x[1200] = -1000.0
    return x


def numpy_q8_1(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_1 reference: Q8_0's d and qs (gguf-py) plus s = fp16(float(sum(qs)) * d)."""
    q8 = quantize(x, QT.Q8_0).view(BLOCK_DTYPE[lib.FG_TYPE_Q8_0])
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)  # float32, before fp16
    out = np.zeros(q8.size, BLOCK_DTYPE[lib.FG_TYPE_Q8_1])
    out["d"], out["qs"] = q8["d"], q8["qs"]
    out["s"] = (q8["qs"].astype(np.int32).sum(axis=1).astype(np.float32) * d).astype(np.float16)
    return out.view(np.uint8)


# ---- quantize / dequantize: reference against gguf-py ----------------------------------------


@pytest.mark.parametrize("t,n", weight_cases())
def test_quantize_ref_matches_gguf(t, n):
    x = random_row(np.random.default_rng([SEED, t, n]), n)
    expected = np.ascontiguousarray(quantize(x, GGUF_TYPE[t])).view(np.uint8).ravel()
    got = c_quantize(t, x, ref=True)
    # gguf-py reproduces ggml's reference rounding (roundf ties away from zero for Q8_0,
    # truncation of +0.5 / +8.5 for Q4_x, RNE fp16 scales), so the bytes are identical.
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n", QUANT_SIZES)
def test_quantize_q8_1_ref_matches_numpy(n):
    x = random_row(np.random.default_rng([SEED, 9, n]), n)
    np.testing.assert_array_equal(c_quantize(lib.FG_TYPE_Q8_1, x, ref=True), numpy_q8_1(x))


@pytest.mark.parametrize("t,n", weight_cases())
def test_dequantize_matches_gguf(t, n):
    x = random_row(np.random.default_rng([SEED, t, n, 1]), n)
    data = np.ascontiguousarray(quantize(x, GGUF_TYPE[t])).view(np.uint8).ravel()
    expected = dequantize(data, GGUF_TYPE[t]).astype(np.float32).ravel()
    got = c_dequantize(t, data, n)
    if t == lib.FG_TYPE_Q4_1:
        # d*q + m: two float32 roundings in both; a compiler that fuses them into one FMA
        # may differ by one rounding of the sum.
        dq, m = components(t, data, n)
        tol = 2 * U * (np.abs(dq) + np.abs(m)) + 1e-45
        np.testing.assert_array_less(np.abs(got - expected), tol)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("t,n", k_cases())
def test_dequantize_k_matches_gguf(t, n):
    data = random_k_blocks(np.random.default_rng([SEED, t, n, 1]), t, n)
    expected = dequantize(data, GGUF_TYPE[t]).astype(np.float32).ravel()
    # d * scale * q is exact in float32 (at most 11 + 7 + 6 significant bits), so the one
    # rounding is of the sum with the min part, in gguf-py as in C: identical floats
    np.testing.assert_array_equal(c_dequantize(t, data, n), expected)
    # the test's own decoding (components, used by the dot and axpy tests) agrees too
    dq, m = components(t, data, n)
    np.testing.assert_array_equal((dq + m).astype(np.float32), expected)


@pytest.mark.parametrize("ref", [True, False], ids=["ref", "fast"])
@pytest.mark.parametrize("n", K_SIZES)
def test_quantize_q8_K_matches_numpy(n, ref):
    x = q8_K_test_row(np.random.default_rng([SEED, lib.FG_TYPE_Q8_K, n]), n)
    np.testing.assert_array_equal(c_quantize(lib.FG_TYPE_Q8_K, x, ref=ref), numpy_q8_K(x))


def _ggml_base() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    for folder in spec.submodule_search_locations if spec else []:
        path = Path(folder) / "lib" / "libggml-base.so"
        if path.exists():
            return ctypes.CDLL(str(path))
    return None


def test_quantize_q8_K_matches_ggml():
    """Against the compiled quantize_row_q8_K_ref of the pinned llama.cpp itself (the x86 CPU
    backend's quantize_row_q8_K calls it)."""
    ggml = _ggml_base()
    if ggml is None:
        pytest.skip("llama_cpp's libggml-base.so not found")
    n = 4352
    x = q8_K_test_row(np.random.default_rng([SEED, lib.FG_TYPE_Q8_K, 8]), n)
    x[256:512] = 0.25  # no all-zero block: ggml leaves those blocks' bsums unwritten
    out = np.zeros(lib.fg_row_size(lib.FG_TYPE_Q8_K, n), np.uint8)
    ggml.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    ggml.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, n)
    np.testing.assert_array_equal(c_quantize(lib.FG_TYPE_Q8_K, x, ref=True), out)
    np.testing.assert_array_equal(c_quantize(lib.FG_TYPE_Q8_K, x, ref=False), out)
    np.testing.assert_array_equal(numpy_q8_K(x), out)


# ---- quantize: fast against reference ---------------------------------------------------------


@pytest.mark.parametrize("name,t", [("Q8_0", lib.FG_TYPE_Q8_0), ("Q8_1", lib.FG_TYPE_Q8_1)])
@pytest.mark.parametrize("n", QUANT_SIZES)
def test_quantize_q8_fast_matches_ref(name, t, n):
    rng = np.random.default_rng([SEED, t, n, 2])
    x = random_row(rng, n)
    # exact ties x * (1/d) = k + 0.5 in one block, where the rounding modes differ
    if n >= 128:
        x[96:128] = (np.arange(32) - 16 + 0.5).astype(np.float32)
        x[96] = 127.0  # d = 1 exactly
    fast = c_quantize(t, x, ref=False).view(BLOCK_DTYPE[t])
    ref = c_quantize(t, x, ref=True).view(BLOCK_DTYPE[t])
    np.testing.assert_array_equal(fast["d"].view(np.uint16), ref["d"].view(np.uint16))
    # either rounding of ties (nearest-even or away from zero) is acceptable: one step
    diff = np.abs(fast["qs"].astype(np.int32) - ref["qs"].astype(np.int32))
    assert diff.max() <= 1, f"{name}: quants differ by {diff.max()} steps"
    if t == lib.FG_TYPE_Q8_1:
        # s = d * sum(qs): agrees within the tie differences times d (plus fp16 rounding)
        d = ref["d"].astype(np.float64)
        s_fast, s_ref = fast["s"].astype(np.float64), ref["s"].astype(np.float64)
        bound = d * diff.sum(axis=1) + 2.0**-10 * np.maximum(np.abs(s_ref), np.abs(s_fast))
        np.testing.assert_array_less(np.abs(s_fast - s_ref), bound + 1e-30)


@pytest.mark.parametrize("t", [lib.FG_TYPE_Q8_0, lib.FG_TYPE_Q8_1])
def test_quantize_q8_fast_is_bit_exact(t):
    """The AVX2 quantizers reproduce roundf's ties-away rounding, so today they are
    bit-exact. If a kernel moves to nearest-even, drop this test (the one above remains)."""
    x = random_row(np.random.default_rng([SEED, t, 3]), 4096)
    x[96:128] = (np.arange(32) - 16 + 0.5).astype(np.float32)
    x[96] = 127.0
    np.testing.assert_array_equal(c_quantize(t, x, ref=False), c_quantize(t, x, ref=True))


# ---- fp16 --------------------------------------------------------------------------------------


def fp16_test_values(rng: np.random.Generator) -> np.ndarray:
    finite = np.arange(0x7C00, dtype=np.uint16)  # every non-negative finite half
    finite = np.concatenate([finite, finite | 0x8000])
    h = finite.view(np.float16).astype(np.float64)
    halves = h.astype(np.float32)
    # exact midpoints between neighbouring halves: ties, incl. subnormal ones
    step = np.concatenate([finite[:-1] + 1, [0]]).astype(np.uint16).view(np.float16)
    mid = ((h + step.astype(np.float64)) / 2)[:-1].astype(np.float32)
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            -np.nan,
            65504,
            65519.99,
            65520,
            1e6,
            -1e30,
            2.0**-24,
            2.0**-25,
            2.0**-25 * 1.0001,
            2.0**-26,
            1e-45,
            -1e-45,
            6.1e-5,
            5.96e-8,
        ],
        np.float32,
    )
    noise = (rng.standard_normal(5000) * 10.0 ** rng.uniform(-9, 6, 5000)).astype(np.float32)
    return np.concatenate([halves, mid, special, noise]).astype(np.float32)


@pytest.mark.parametrize("ref", [True, False], ids=["ref", "fast"])
def test_fp16_quantize_bit_exact(ref):
    x = fp16_test_values(np.random.default_rng(SEED))
    got = c_quantize(lib.FG_TYPE_F16, x, ref=ref).view(np.float16)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint16), expected[~nan].view(np.uint16))


def test_fp16_dequantize_all_patterns():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = c_dequantize(lib.FG_TYPE_F16, bits, bits.size)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(got[nan]).all()
    # compared as values: dequantizing is an axpy into zeros, so -0.0 comes out as +0.0
    np.testing.assert_array_equal(got[~nan], expected[~nan])


# ---- vec_dot -----------------------------------------------------------------------------------

# Extra rounding allowance, in units of U * mag, on top of one U per accumulated term.
DOT_SLACK = {
    lib.FG_TYPE_F32: 24,
    lib.FG_TYPE_F16: 24,
    lib.FG_TYPE_Q8_0: 8,
    lib.FG_TYPE_Q4_0: 8,
    lib.FG_TYPE_Q4_1: 8,
    lib.FG_TYPE_Q5_0: 8,
    lib.FG_TYPE_Q5_1: 8,
    lib.FG_TYPE_Q4_K: 8,
    lib.FG_TYPE_Q5_K: 8,
    lib.FG_TYPE_Q6_K: 8,
}


def weight_row(rng: np.random.Generator, t: int, n: int) -> np.ndarray:
    if t in K_TYPES.values():
        return random_k_blocks(rng, t, n)
    return np.ascontiguousarray(quantize(random_row(rng, n), GGUF_TYPE[t])).view(np.uint8).ravel()


def dot_case(t: int, n: int):
    rng = np.random.default_rng([SEED, t, n, 4])
    w = weight_row(rng, t, n)
    xt = lib.fg_vec_dot_type(t)
    xq = c_quantize(xt, random_row(rng, n), ref=True)
    wd, wm = components(t, w, n)
    xd, _ = components(xt, xq, n)  # activations have no min part
    exact = float(np.dot(wd + wm, xd))
    mag = float(np.abs(wd) @ np.abs(xd) + np.abs(wm) @ np.abs(xd))
    if t in (lib.FG_TYPE_Q4_1, lib.FG_TYPE_Q5_1):
        # ggml's Q4_1 (Q5_1) dot takes the min term from the activation's fp16-rounded
        # s = d * sum(qs): exact in ggml's terms is sum_b (d_w d_x sum(q_w q_x) + m_w s_x).
        s = xq.view(BLOCK_DTYPE[xt])["s"].astype(np.float64)
        m = w.view(BLOCK_DTYPE[t])["m"].astype(np.float64)
        ggml_exact = float(np.dot(wd, xd) + np.dot(m, s))
        # ... which differs from the dequantized dot only by the fp16 rounding of s
        assert abs(ggml_exact - exact) <= 2.0**-11 * float(np.abs(m) @ np.abs(s)) + 1e-30
        exact = ggml_exact
    # longest float32 accumulation chain: one term per block (quantized, reference) or
    # n / 32 per lane plus the horizontal sum and the tail (SIMD); slack for the rest (K-quants:
    # the float32 conversion of a super-block's integer sum, which may exceed 2**24)
    tol = (n // 32 + DOT_SLACK[t]) * U * mag
    return w, xq, exact, tol


@pytest.mark.parametrize("t,n", weight_cases() + k_cases())
def test_vec_dot(t, n):
    w, xq, exact, tol = dot_case(t, n)
    ref = c_vec_dot(t, w, xq, n, ref=True)
    fast = c_vec_dot(t, w, xq, n, ref=False)
    assert abs(ref - exact) <= tol, f"ref {ref} vs numpy {exact} (tol {tol:.3g})"
    assert abs(fast - ref) <= 2 * tol, f"fast {fast} vs ref {ref} (tol {2 * tol:.3g})"


# ---- axpy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,n", weight_cases() + k_cases())
def test_axpy(t, n):
    rng = np.random.default_rng([SEED, t, n, 5])
    col = weight_row(rng, t, n)
    y = rng.standard_normal(n).astype(np.float32)
    a = float(np.float32(rng.uniform(-3, 3)))
    ref = c_axpy(t, col, a, y, n, ref=True)
    fast = c_axpy(t, col, a, y, n, ref=False)
    dq, m = components(t, col, n)
    exact = y.astype(np.float64) + a * (dq + m)
    tol = 8 * U * (np.abs(y) + abs(a) * (np.abs(dq) + np.abs(m))) + 1e-45
    np.testing.assert_array_less(np.abs(ref - exact), tol)
    np.testing.assert_array_less(np.abs(fast - exact), tol)


# ---- activations -------------------------------------------------------------------------------


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * x * (1.0 + 0.044715 * x * x)))


@pytest.mark.parametrize(
    "act,fn",
    [(lib.FG_ACT_SILU, _silu), (lib.FG_ACT_GELU, _gelu)],
    ids=["silu", "gelu"],
)
def test_activate_smooth(act, fn):
    rng = np.random.default_rng([SEED, act, 6])
    x = np.concatenate([rng.standard_normal(1000) * 4, [-200, -50, -1e-6, 0, 1e-6, 50, 200]])
    x = x.astype(np.float32)
    got = x.copy()
    assert lib.fg_activate(act, 0.0, fptr(got), got.size) == lib.FG_OK
    with np.errstate(over="ignore"):
        expected = fn(x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)


def test_activate_relu():
    x = np.random.default_rng([SEED, 7]).standard_normal(1001).astype(np.float32)
    r, r2, fat, d = x.copy(), x.copy(), x.copy(), x.copy()
    assert lib.fg_activate(lib.FG_ACT_RELU, 0.5, fptr(r), r.size) == lib.FG_OK  # no threshold
    assert lib.fg_activate(lib.FG_ACT_RELU2, 0.0, fptr(r2), r2.size) == lib.FG_OK
    assert lib.fg_activate(lib.FG_ACT_FATRELU, 0.25, fptr(fat), fat.size) == lib.FG_OK
    assert lib.fg_activate(lib.FG_ACT_DRELU, 0.0, fptr(d), d.size) == lib.FG_OK
    np.testing.assert_array_equal(r, np.maximum(x, 0))
    np.testing.assert_array_equal(r2, np.where(x > 0, x * x, np.float32(0)))
    np.testing.assert_array_equal(fat, np.where(x > np.float32(0.25), x, np.float32(0)))
    np.testing.assert_array_equal(d, np.maximum(x, 0))  # the FFN applies it to gate and up


# ---- argument checks ---------------------------------------------------------------------------


def test_unsupported_type_and_bad_n():
    x = np.zeros(64, np.float32)
    buf = np.zeros(512, np.uint8)
    out = ffi.new("float *")
    q2_k, q3_k, iq2_xxs = 10, 11, 16
    for t in (q2_k, q3_k, iq2_xxs, -1, 99):
        for ref in (True, False):
            qfn = lib.fg_quantize_row_ref if ref else lib.fg_quantize_row
            dfn = lib.fg_vec_dot_ref if ref else lib.fg_vec_dot
            afn = lib.fg_axpy_ref if ref else lib.fg_axpy
            assert qfn(t, fptr(x), vptr(buf), 32) == lib.FG_ERR_TYPE
            assert dfn(t, vptr(buf), vptr(buf), 32, out) == lib.FG_ERR_TYPE
            assert afn(t, vptr(buf), 1.0, fptr(x), 32) == lib.FG_ERR_TYPE
        assert lib.fg_dequantize_row(t, vptr(buf), fptr(x), 32) == lib.FG_ERR_TYPE
        assert lib.fg_row_size(t, 32) == 0
        assert lib.fg_vec_dot_type(t) == -1
    # Q8_1 is an activation type only: no dot product or axpy with it as the weight
    assert lib.fg_vec_dot(lib.FG_TYPE_Q8_1, vptr(buf), vptr(buf), 32, out) == lib.FG_ERR_TYPE
    assert lib.fg_axpy(lib.FG_TYPE_Q8_1, vptr(buf), 1.0, fptr(x), 32) == lib.FG_ERR_TYPE
    for t in (lib.FG_TYPE_Q4_0, lib.FG_TYPE_Q4_1, lib.FG_TYPE_Q8_0):
        for n in (33, 16, -32):
            for ref in (True, False):
                qfn = lib.fg_quantize_row_ref if ref else lib.fg_quantize_row
                dfn = lib.fg_vec_dot_ref if ref else lib.fg_vec_dot
                afn = lib.fg_axpy_ref if ref else lib.fg_axpy
                assert qfn(t, fptr(x), vptr(buf), n) == lib.FG_ERR_ARG
                assert dfn(t, vptr(buf), vptr(buf), n, out) == lib.FG_ERR_ARG
                assert afn(t, vptr(buf), 1.0, fptr(x), n) == lib.FG_ERR_ARG
            assert lib.fg_dequantize_row(t, vptr(buf), fptr(x), n) == lib.FG_ERR_ARG
    assert lib.fg_quantize_row(lib.FG_TYPE_Q8_1, fptr(x), vptr(buf), 40) == lib.FG_ERR_ARG
    assert lib.fg_quantize_row(lib.FG_TYPE_F16, fptr(x), vptr(buf), -1) == lib.FG_ERR_ARG
    assert lib.fg_activate(99, 0.0, fptr(x), 4) == lib.FG_ERR_ARG
    # n = 0 is a valid empty row
    assert lib.fg_vec_dot(lib.FG_TYPE_Q4_1, vptr(buf), vptr(buf), 0, out) == lib.FG_OK
    assert out[0] == 0.0


def test_k_quant_types_bad_n():
    x = np.zeros(512, np.float32)
    buf = np.zeros(2048, np.uint8)
    out = ffi.new("float *")
    for t in K_TYPES.values():
        for ref in (True, False):
            # weights only: no quantizer for the K-quants
            qfn = lib.fg_quantize_row_ref if ref else lib.fg_quantize_row
            assert qfn(t, fptr(x), vptr(buf), 256) == lib.FG_ERR_TYPE
        for n in (32, 128, 255, 257, 288, -256):
            for ref in (True, False):
                dfn = lib.fg_vec_dot_ref if ref else lib.fg_vec_dot
                afn = lib.fg_axpy_ref if ref else lib.fg_axpy
                assert dfn(t, vptr(buf), vptr(buf), n, out) == lib.FG_ERR_ARG
                assert afn(t, vptr(buf), 1.0, fptr(x), n) == lib.FG_ERR_ARG
            assert lib.fg_dequantize_row(t, vptr(buf), fptr(x), n) == lib.FG_ERR_ARG
            assert lib.fg_row_size(t, n) == 0
        assert lib.fg_vec_dot(t, vptr(buf), vptr(buf), 0, out) == lib.FG_OK
        assert out[0] == 0.0
    for n in (32, 255, 257, -256):
        for fn in (lib.fg_quantize_row_ref, lib.fg_quantize_row):
            assert fn(lib.FG_TYPE_Q8_K, fptr(x), vptr(buf), n) == lib.FG_ERR_ARG
    # Q8_K is an activation type only
    for fn in (lib.fg_vec_dot_ref, lib.fg_vec_dot):
        assert fn(lib.FG_TYPE_Q8_K, vptr(buf), vptr(buf), 256, out) == lib.FG_ERR_TYPE
    for fn in (lib.fg_axpy_ref, lib.fg_axpy):
        assert fn(lib.FG_TYPE_Q8_K, vptr(buf), 1.0, fptr(x), 256) == lib.FG_ERR_TYPE
    assert lib.fg_vec_dot_type(lib.FG_TYPE_Q8_K) == -1
    for t in (lib.FG_TYPE_Q5_0, lib.FG_TYPE_Q5_1):
        for n in (33, 16, -32):
            assert lib.fg_vec_dot(t, vptr(buf), vptr(buf), n, out) == lib.FG_ERR_ARG
            assert lib.fg_axpy(t, vptr(buf), 1.0, fptr(x), n) == lib.FG_ERR_ARG
            assert lib.fg_quantize_row(t, fptr(x), vptr(buf), n) == lib.FG_ERR_ARG


def test_sizes_and_vec_dot_types():
    row_bytes = {  # (type, n): bytes, from ggml-common.h's block sizes
        (lib.FG_TYPE_Q4_0, 64): 36,
        (lib.FG_TYPE_Q4_1, 64): 40,
        (lib.FG_TYPE_Q5_0, 64): 44,
        (lib.FG_TYPE_Q5_1, 64): 48,
        (lib.FG_TYPE_Q8_0, 64): 68,
        (lib.FG_TYPE_Q8_1, 64): 72,
        (lib.FG_TYPE_Q4_K, 512): 288,
        (lib.FG_TYPE_Q5_K, 512): 352,
        (lib.FG_TYPE_Q6_K, 512): 420,
        (lib.FG_TYPE_Q8_K, 512): 584,
        (lib.FG_TYPE_F16, 7): 14,
        (lib.FG_TYPE_F32, 7): 28,
    }
    for (t, n), size in row_bytes.items():
        assert lib.fg_row_size(t, n) == size
    for t in (*K_TYPES.values(), lib.FG_TYPE_Q8_K):
        assert lib.fg_block_size(t) == 256
    vec_dot_type = {
        lib.FG_TYPE_Q4_0: lib.FG_TYPE_Q8_0,
        lib.FG_TYPE_Q5_0: lib.FG_TYPE_Q8_0,
        lib.FG_TYPE_Q8_0: lib.FG_TYPE_Q8_0,
        lib.FG_TYPE_Q4_1: lib.FG_TYPE_Q8_1,
        lib.FG_TYPE_Q5_1: lib.FG_TYPE_Q8_1,
        lib.FG_TYPE_Q4_K: lib.FG_TYPE_Q8_K,
        lib.FG_TYPE_Q5_K: lib.FG_TYPE_Q8_K,
        lib.FG_TYPE_Q6_K: lib.FG_TYPE_Q8_K,
        lib.FG_TYPE_F16: lib.FG_TYPE_F16,
        lib.FG_TYPE_F32: lib.FG_TYPE_F32,
    }
    for t, vt in vec_dot_type.items():
        assert lib.fg_vec_dot_type(t) == vt
    # the same numbers as gguf-py's enum (= ggml's enum ggml_type)
    for t, qt in GGUF_TYPE.items():
        assert t == int(qt)
    assert lib.FG_TYPE_Q8_K == int(QT.Q8_K)


def test_simd_name():
    name = ffi.string(lib.fg_simd_name()).decode()
    # what fg_simd_name can return (native/kernels.c, kernels_x86.c): x86 AVX-512/AVX2
    # builds, else the scalar reference
    assert name in {"avx512", "avx2", "scalar"}
    if name == "scalar":
        # without SIMD the fast entry points are the reference: identical results
        w, xq, _, _ = dot_case(lib.FG_TYPE_Q4_1, 576)
        assert c_vec_dot(lib.FG_TYPE_Q4_1, w, xq, 576, ref=False) == c_vec_dot(
            lib.FG_TYPE_Q4_1, w, xq, 576, ref=True
        )
