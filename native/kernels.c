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

int fg_quantize_row(int type, const float *x, void *out, int64_t n) {
    const fg_quantize_fn fn = fg_quantize_fast_fn(type);
    if (fn == NULL) return FG_ERR_TYPE;
    if (fg_row_size(type, n) == 0 && n != 0) return FG_ERR_ARG;
    fn(x, out, n);
    return FG_OK;
}

int fg_vec_dot(int weight_type, const void *w, const void *xq, int64_t n, float *out) {
    const fg_vec_dot_fn fn = fg_vec_dot_fast_fn(weight_type);
    if (fn == NULL) return FG_ERR_TYPE;
    if (fg_row_size(weight_type, n) == 0 && n != 0) return FG_ERR_ARG;
    fn(w, xq, n, out);
    return FG_OK;
}

int fg_axpy(int type, const void *col, float a, float *y, int64_t n) {
    const fg_axpy_fn fn = fg_axpy_fast_fn(type);
    if (fn == NULL) return FG_ERR_TYPE;
    if (fg_row_size(type, n) == 0 && n != 0) return FG_ERR_ARG;
    fn(col, a, y, n);
    return FG_OK;
}
