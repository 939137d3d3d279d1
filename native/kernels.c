/*
 * Kernel dispatch: the fastest implementation this build has for a type (an
 * architecture's SIMD file where it provides one, else the scalar reference of
 * kernels_ref.c), and the checked entry points of flashgguf.h.
 */
#include "kernels.h"

fg_vec_dot_fn fg_vec_dot_fast_fn(int weight_type) {
#if defined(FG_SIMD_X86)
    const fg_vec_dot_fn fn = fg_vec_dot_simd_fn(weight_type);
    if (fn != NULL) return fn;
#endif
    return fg_vec_dot_ref_fn(weight_type);
}

fg_axpy_fn fg_axpy_fast_fn(int type) {
#if defined(FG_SIMD_X86)
    const fg_axpy_fn fn = fg_axpy_simd_fn(type);
    if (fn != NULL) return fn;
#endif
    return fg_axpy_ref_fn(type);
}

fg_quantize_fn fg_quantize_fast_fn(int type) {
#if defined(FG_SIMD_X86)
    const fg_quantize_fn fn = fg_quantize_simd_fn(type);
    if (fn != NULL) return fn;
#endif
    return fg_quantize_ref_fn(type);
}

const char *fg_simd_name(void) {
#if defined(FG_SIMD_X86)
    return fg_simd_path();
#else
    return "scalar";
#endif
}

/* ---- public entry points (checked arguments), fast and reference ------------------ */

static int checked(int have_kernel, int type, int64_t n) {
    if (!have_kernel) return FG_ERR_TYPE;
    return fg_row_size(type, n) == 0 && n != 0 ? FG_ERR_ARG : FG_OK;
}

static int quantize_with(fg_quantize_fn fn, int type, const float *x, void *out, int64_t n) {
    const int rc = checked(fn != NULL, type, n);
    if (rc == FG_OK) fn(x, out, n);
    return rc;
}

static int vec_dot_with(fg_vec_dot_fn fn, int type, const void *w, const void *xq, int64_t n,
                        float *out) {
    const int rc = checked(fn != NULL, type, n);
    if (rc == FG_OK) fn(w, xq, n, out);
    return rc;
}

static int axpy_with(fg_axpy_fn fn, int type, const void *col, float a, float *y, int64_t n) {
    const int rc = checked(fn != NULL, type, n);
    if (rc == FG_OK) fn(col, a, y, n);
    return rc;
}

int fg_quantize_row(int type, const float *x, void *out, int64_t n) {
    return quantize_with(fg_quantize_fast_fn(type), type, x, out, n);
}

int fg_quantize_row_ref(int type, const float *x, void *out, int64_t n) {
    return quantize_with(fg_quantize_ref_fn(type), type, x, out, n);
}

int fg_vec_dot(int weight_type, const void *w, const void *xq, int64_t n, float *out) {
    return vec_dot_with(fg_vec_dot_fast_fn(weight_type), weight_type, w, xq, n, out);
}

int fg_vec_dot_ref(int weight_type, const void *w, const void *xq, int64_t n, float *out) {
    return vec_dot_with(fg_vec_dot_ref_fn(weight_type), weight_type, w, xq, n, out);
}

int fg_axpy(int type, const void *col, float a, float *y, int64_t n) {
    return axpy_with(fg_axpy_fast_fn(type), type, col, a, y, n);
}

int fg_axpy_ref(int type, const void *col, float a, float *y, int64_t n) {
    return axpy_with(fg_axpy_ref_fn(type), type, col, a, y, n);
}
