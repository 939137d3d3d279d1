/*
 * Scalar reference kernels. Every SIMD kernel in kernels_x86.c is checked against these
 * (tests/test_kernels.py). Arithmetic follows ggml's reference code (ggml-quants.c) so
 * that results track llama.cpp: activations are quantized to the weight's vec_dot_type.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

/* ---- fp16 ------------------------------------------------------------------------ */

float fg_half_to_float(fg_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ffu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

fg_half fg_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) { /* inf or nan */
        return (fg_half)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
    }
    if (abs >= 0x477ff000u) { /* rounds to >= 65520: overflow to inf */
        return (fg_half)(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (abs < 0x33000000u) {
            return (fg_half)sign;
        }
        const uint32_t e = abs >> 23;
        const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half_m = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1);
        const uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half_m & 1u))) {
            half_m++;
        }
        return (fg_half)(sign | half_m);
    }
    uint32_t h = ((abs >> 13) - ((127u - 15u) << 10));
    const uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        h++;
    }
    return (fg_half)(sign | h);
}

/* ---- sizes ----------------------------------------------------------------------- */

int fg_block_size(int type) {
    switch (type) {
    case FG_TYPE_F32:
    case FG_TYPE_F16: return 1;
    case FG_TYPE_Q4_0: return QK4_0;
    case FG_TYPE_Q4_1: return QK4_1;
    case FG_TYPE_Q8_0: return QK8_0;
    case FG_TYPE_Q8_1: return QK8_1;
    case FG_TYPE_Q5_0: return QK5_0;
    case FG_TYPE_Q5_1: return QK5_1;
    case FG_TYPE_Q4_K:
    case FG_TYPE_Q5_K:
    case FG_TYPE_Q6_K:
    case FG_TYPE_Q8_K: return QK_K;
    default: return 0;
    }
}

static size_t block_bytes(int type) {
    switch (type) {
    case FG_TYPE_F32: return sizeof(float);
    case FG_TYPE_F16: return sizeof(fg_half);
    case FG_TYPE_Q4_0: return sizeof(fg_block_q4_0);
    case FG_TYPE_Q4_1: return sizeof(fg_block_q4_1);
    case FG_TYPE_Q8_0: return sizeof(fg_block_q8_0);
    case FG_TYPE_Q8_1: return sizeof(fg_block_q8_1);
    case FG_TYPE_Q5_0: return sizeof(fg_block_q5_0);
    case FG_TYPE_Q5_1: return sizeof(fg_block_q5_1);
    case FG_TYPE_Q4_K: return sizeof(fg_block_q4_K);
    case FG_TYPE_Q5_K: return sizeof(fg_block_q5_K);
    case FG_TYPE_Q6_K: return sizeof(fg_block_q6_K);
    case FG_TYPE_Q8_K: return sizeof(fg_block_q8_K);
    default: return 0;
    }
}

size_t fg_row_size(int type, int64_t n) {
    const int bs = fg_block_size(type);
    if (bs == 0 || n < 0 || n % bs != 0) {
        return 0;
    }
    return (size_t)(n / bs) * block_bytes(type);
}

int fg_vec_dot_type(int weight_type) {
    switch (weight_type) {
    case FG_TYPE_F32: return FG_TYPE_F32;
    case FG_TYPE_F16: return FG_TYPE_F16;
    case FG_TYPE_Q4_0:
    case FG_TYPE_Q5_0:
    case FG_TYPE_Q8_0: return FG_TYPE_Q8_0;
    case FG_TYPE_Q4_1:
    case FG_TYPE_Q5_1: return FG_TYPE_Q8_1;
    case FG_TYPE_Q4_K:
    case FG_TYPE_Q5_K:
    case FG_TYPE_Q6_K: return FG_TYPE_Q8_K;
    default: return -1;
    }
}

/* ---- quantize (ggml's *_ref rounding) --------------------------------------------- */

static void quantize_f32(const float *x, void *out, int64_t n) {
    memcpy(out, x, (size_t)n * sizeof(float));
}

static void quantize_f16(const float *x, void *out, int64_t n) {
    fg_half *y = out;
    for (int64_t i = 0; i < n; i++) {
        y[i] = fg_float_to_half(x[i]);
    }
}

static void quantize_q8_0(const float *x, void *out, int64_t n) {
    fg_block_q8_0 *y = out;
    for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) {
            amax = fmaxf(amax, fabsf(x[j]));
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = fg_float_to_half(d);
        for (int j = 0; j < QK8_0; j++) {
            y[b].qs[j] = (int8_t)roundf(x[j] * id);
        }
    }
}

static void quantize_q8_1(const float *x, void *out, int64_t n) {
    fg_block_q8_1 *y = out;
    for (int64_t b = 0; b < n / QK8_1; b++, x += QK8_1) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_1; j++) {
            amax = fmaxf(amax, fabsf(x[j]));
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK8_1; j++) {
            y[b].qs[j] = (int8_t)roundf(x[j] * id);
            sum += y[b].qs[j];
        }
        y[b].d = fg_float_to_half(d);
        y[b].s = fg_float_to_half((float)sum * d);
    }
}

/* The value of largest magnitude, sign kept (the first one on ties); 0 for all zeros. */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

/* Q4_0/Q5_0 (ggml's reference): the value of largest magnitude maps to -half exactly
 * (d = max / -half) and q = trunc(x / d + half + 0.5) capped at 2 half - 1: x / d lies in
 * [-half, half], so the truncation rounds. Returns d. */
static float quantize_signed_block(const float *x, int half, int *q) {
    const float d = signed_absmax(x, 32) / -(float)half;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 32; j++) {
        const int v = (int)(x[j] * id + ((float)half + 0.5f));
        q[j] = v > 2 * half - 1 ? 2 * half - 1 : v;
    }
    return d;
}

/* Q4_1/Q5_1 (ggml's reference): d = (max - min) / qmax, q = trunc((x - min) / d + 0.5)
 * capped at qmax. Returns d; *min receives the min. */
static float quantize_min_block(const float *x, int qmax, float *min, int *q) {
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < 32; j++) {
        lo = fminf(lo, x[j]);
        hi = fmaxf(hi, x[j]);
    }
    const float d = (hi - lo) / (float)qmax;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 32; j++) {
        const int v = (int)((x[j] - lo) * id + 0.5f);
        q[j] = v > qmax ? qmax : v;
    }
    *min = lo;
    return d;
}

/* 32 q in [0, 15] -> nibbles: low = value j, high = value j + 16. */
static void pack_q4(const int *q, uint8_t *qs) {
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)(q[j] | (q[j + 16] << 4));
    }
}

/* 32 q in [0, 31] -> Q5_x's qs nibbles and qh bits. */
static void pack_q5(const int *q, uint8_t *qs, uint8_t *qh_bytes) {
    uint32_t qh = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
        qh |= (uint32_t)(q[j] >> 4) << j;
        qh |= (uint32_t)(q[j + 16] >> 4) << (j + 16);
    }
    memcpy(qh_bytes, &qh, sizeof qh);
}

static void quantize_q4_0(const float *x, void *out, int64_t n) {
    fg_block_q4_0 *y = out;
    for (int64_t b = 0; b < n / QK4_0; b++, x += QK4_0) {
        int q[QK4_0];
        y[b].d = fg_float_to_half(quantize_signed_block(x, 8, q));
        pack_q4(q, y[b].qs);
    }
}

static void quantize_q5_0(const float *x, void *out, int64_t n) {
    fg_block_q5_0 *y = out;
    for (int64_t b = 0; b < n / QK5_0; b++, x += QK5_0) {
        int q[QK5_0];
        y[b].d = fg_float_to_half(quantize_signed_block(x, 16, q));
        pack_q5(q, y[b].qs, y[b].qh);
    }
}

static void quantize_q4_1(const float *x, void *out, int64_t n) {
    fg_block_q4_1 *y = out;
    for (int64_t b = 0; b < n / QK4_1; b++, x += QK4_1) {
        int q[QK4_1];
        float min;
        y[b].d = fg_float_to_half(quantize_min_block(x, 15, &min, q));
        y[b].m = fg_float_to_half(min);
        pack_q4(q, y[b].qs);
    }
}

static void quantize_q5_1(const float *x, void *out, int64_t n) {
    fg_block_q5_1 *y = out;
    for (int64_t b = 0; b < n / QK5_1; b++, x += QK5_1) {
        int q[QK5_1];
        float min;
        y[b].d = fg_float_to_half(quantize_min_block(x, 31, &min, q));
        y[b].m = fg_float_to_half(min);
        pack_q5(q, y[b].qs, y[b].qh);
    }
}

/* ggml's quantize_row_q8_K_ref (which the x86 CPU backend uses as is): the signed value of
 * largest magnitude (the first one on ties) maps to -127 through iscale = -127 / max; every
 * value is rounded to nearest-even of the float32 product iscale * x (ggml's nearest_int),
 * capped at 127; d = 1 / iscale; bsums are the sums of each 16 qs. All-zero blocks: d = 0. */
static void quantize_q8_K(const float *x, void *out, int64_t n) {
    fg_block_q8_K *y = out;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        const float max = signed_absmax(x, QK_K);
        memset(y[b].bsums, 0, sizeof y[b].bsums);
        if (max == 0.0f) {
            y[b].d = 0.0f;
            memset(y[b].qs, 0, sizeof y[b].qs);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const float v = rintf(iscale * x[j]); /* the default rounding mode: nearest-even */
            y[b].qs[j] = (int8_t)(v > 127.0f ? 127 : (int)v);
            y[b].bsums[j / 16] = (int16_t)(y[b].bsums[j / 16] + y[b].qs[j]);
        }
        y[b].d = 1.0f / iscale;
    }
}

fg_quantize_fn fg_quantize_ref_fn(int type) {
    switch (type) {
    case FG_TYPE_F32: return quantize_f32;
    case FG_TYPE_F16: return quantize_f16;
    case FG_TYPE_Q4_0: return quantize_q4_0;
    case FG_TYPE_Q4_1: return quantize_q4_1;
    case FG_TYPE_Q8_0: return quantize_q8_0;
    case FG_TYPE_Q8_1: return quantize_q8_1;
    case FG_TYPE_Q5_0: return quantize_q5_0;
    case FG_TYPE_Q5_1: return quantize_q5_1;
    case FG_TYPE_Q8_K: return quantize_q8_K;
    default: return NULL; /* Q4_K, Q5_K, Q6_K: no weight quantizer in C */
    }
}

/* ---- dot products: weight row x quantized activation row -------------------------- */

static void vec_dot_f32(const void *w, const void *xq, int64_t n, float *out) {
    const float *a = w, *b = xq;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double)a[i] * (double)b[i];
    }
    *out = (float)sum;
}

static void vec_dot_f16(const void *w, const void *xq, int64_t n, float *out) {
    const fg_half *a = w, *b = xq;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double)(fg_half_to_float(a[i]) * fg_half_to_float(b[i]));
    }
    *out = (float)sum;
}

static void vec_dot_q8_0(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q8_0 *a = w;
    const fg_block_q8_0 *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; j++) {
            sumi += a[i].qs[j] * b[i].qs[j];
        }
        sum += (float)sumi * (fg_half_to_float(a[i].d) * fg_half_to_float(b[i].d));
    }
    *out = sum;
}

static void vec_dot_q4_0(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q4_0 *a = w;
    const fg_block_q8_0 *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            const int v0 = (a[i].qs[j] & 0x0f) - 8;
            const int v1 = (a[i].qs[j] >> 4) - 8;
            sumi += v0 * b[i].qs[j] + v1 * b[i].qs[j + QK4_0 / 2];
        }
        sum += (float)sumi * (fg_half_to_float(a[i].d) * fg_half_to_float(b[i].d));
    }
    *out = sum;
}

static void vec_dot_q4_1(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q4_1 *a = w;
    const fg_block_q8_1 *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_1 / 2; j++) {
            sumi += (a[i].qs[j] & 0x0f) * b[i].qs[j] + (a[i].qs[j] >> 4) * b[i].qs[j + QK4_1 / 2];
        }
        sum += (fg_half_to_float(a[i].d) * fg_half_to_float(b[i].d)) * (float)sumi
             + fg_half_to_float(a[i].m) * fg_half_to_float(b[i].s);
    }
    *out = sum;
}

/* The 32 5-bit q of a Q5_0/Q5_1 block: nibble j (low/high half of qs[j % 16]) plus bit j
 * of qh as bit 4. */
static void unpack_q5(const uint8_t *qs, const uint8_t *qh_bytes, int *q) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, sizeof qh);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0x0f) | (int)(((qh >> j) & 1u) << 4);
        q[j + 16] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
    }
}

/* sum_b d_w d_x sum_j (q_j - 16) x_j */
static void vec_dot_q5_0(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q5_0 *a = w;
    const fg_block_q8_0 *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_0; i++) {
        int q[QK5_0];
        unpack_q5(a[i].qs, a[i].qh, q);
        int sumi = 0;
        for (int j = 0; j < QK5_0; j++) {
            sumi += (q[j] - 16) * b[i].qs[j];
        }
        sum += (float)sumi * (fg_half_to_float(a[i].d) * fg_half_to_float(b[i].d));
    }
    *out = sum;
}

/* sum_b (d_w d_x sum_j q_j x_j + m_w s_x), s_x = d_x sum_j x_j stored by Q8_1 */
static void vec_dot_q5_1(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q5_1 *a = w;
    const fg_block_q8_1 *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        int q[QK5_1];
        unpack_q5(a[i].qs, a[i].qh, q);
        int sumi = 0;
        for (int j = 0; j < QK5_1; j++) {
            sumi += q[j] * b[i].qs[j];
        }
        sum += (fg_half_to_float(a[i].d) * fg_half_to_float(b[i].d)) * (float)sumi
             + fg_half_to_float(a[i].m) * fg_half_to_float(b[i].s);
    }
    *out = sum;
}

/* q (4 bits, or 5 with qh) of value v of a Q4_K/Q5_K block (qh NULL for Q4_K). */
static inline int kquant_q(const uint8_t *qs, const uint8_t *qh, int v) {
    const int sub = v / 32, l = v % 32;
    const uint8_t byte = qs[32 * (sub / 2) + l];
    const int lo = (sub & 1) ? byte >> 4 : byte & 0x0f;
    return qh != NULL ? lo | (((qh[l] >> sub) & 1) << 4) : lo;
}

/* Q4_K/Q5_K x Q8_K, per super-block (ggml's arithmetic, integer parts exact):
 *   d_w d_x sum_j sc_j sum_{v in j} q_v x_v  -  dmin_w d_x sum_j m_j (bsums[2j] + bsums[2j+1])
 * the second sum is dmin m_j times the sum of x over sub-block j, read from the bsums. */
static float dot_q45_K(fg_half d, fg_half dmin, const uint8_t *scales, const uint8_t *qs,
                       const uint8_t *qh, const fg_block_q8_K *x) {
    int sumi = 0, summ = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        int sc, m;
        fg_kscale_min(scales, j, &sc, &m);
        int dot = 0;
        for (int l = 0; l < 32; l++) {
            dot += kquant_q(qs, qh, 32 * j + l) * x->qs[32 * j + l];
        }
        sumi += sc * dot;
        summ += m * (x->bsums[2 * j] + x->bsums[2 * j + 1]);
    }
    return (fg_half_to_float(d) * x->d) * (float)sumi
         - (fg_half_to_float(dmin) * x->d) * (float)summ;
}

static void vec_dot_q4_K(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q4_K *a = w;
    const fg_block_q8_K *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        sum += dot_q45_K(a[i].d, a[i].dmin, a[i].scales, a[i].qs, NULL, &b[i]);
    }
    *out = sum;
}

static void vec_dot_q5_K(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q5_K *a = w;
    const fg_block_q8_K *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        sum += dot_q45_K(a[i].d, a[i].dmin, a[i].scales, a[i].qs, a[i].qh, &b[i]);
    }
    *out = sum;
}

/* q - 32 (in [-32, 31]) of value v = 128h + 32k + l of a Q6_K block. */
static inline int q6_K_value(const fg_block_q6_K *b, int v) {
    const int h = v / 128, k = (v % 128) / 32, l = v % 32;
    const uint8_t lo = b->ql[64 * h + 32 * (k & 1) + l];
    const int q = (k < 2 ? lo & 0x0f : lo >> 4) | (((b->qh[32 * h + l] >> (2 * k)) & 3) << 4);
    return q - 32;
}

/* Q6_K x Q8_K: sum_b d_w d_x sum_s scales[s] sum_{v in s} (q_v - 32) x_v, s = 16 values. */
static void vec_dot_q6_K(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q6_K *a = w;
    const fg_block_q8_K *b = xq;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sumi = 0;
        for (int s = 0; s < QK_K / 16; s++) {
            int dot = 0;
            for (int l = 0; l < 16; l++) {
                dot += q6_K_value(&a[i], 16 * s + l) * b[i].qs[16 * s + l];
            }
            sumi += a[i].scales[s] * dot;
        }
        sum += (fg_half_to_float(a[i].d) * b[i].d) * (float)sumi;
    }
    *out = sum;
}

fg_vec_dot_fn fg_vec_dot_ref_fn(int weight_type) {
    switch (weight_type) {
    case FG_TYPE_F32: return vec_dot_f32;
    case FG_TYPE_F16: return vec_dot_f16;
    case FG_TYPE_Q4_0: return vec_dot_q4_0;
    case FG_TYPE_Q4_1: return vec_dot_q4_1;
    case FG_TYPE_Q8_0: return vec_dot_q8_0;
    case FG_TYPE_Q5_0: return vec_dot_q5_0;
    case FG_TYPE_Q5_1: return vec_dot_q5_1;
    case FG_TYPE_Q4_K: return vec_dot_q4_K;
    case FG_TYPE_Q5_K: return vec_dot_q5_K;
    case FG_TYPE_Q6_K: return vec_dot_q6_K;
    default: return NULL;
    }
}

/* ---- axpy: y += a * dequant(col) --------------------------------------------------- */

static void axpy_f32(const void *col, float a, float *y, int64_t n) {
    const float *c = col;
    for (int64_t i = 0; i < n; i++) {
        y[i] += a * c[i];
    }
}

static void axpy_f16(const void *col, float a, float *y, int64_t n) {
    const fg_half *c = col;
    for (int64_t i = 0; i < n; i++) {
        y[i] += a * fg_half_to_float(c[i]);
    }
}

static void axpy_q8_0(const void *col, float a, float *y, int64_t n) {
    const fg_block_q8_0 *c = col;
    for (int64_t b = 0; b < n / QK8_0; b++, y += QK8_0) {
        const float ad = a * fg_half_to_float(c[b].d);
        for (int j = 0; j < QK8_0; j++) {
            y[j] += ad * (float)c[b].qs[j];
        }
    }
}

static void axpy_q4_0(const void *col, float a, float *y, int64_t n) {
    const fg_block_q4_0 *c = col;
    for (int64_t b = 0; b < n / QK4_0; b++, y += QK4_0) {
        const float ad = a * fg_half_to_float(c[b].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] += ad * (float)((c[b].qs[j] & 0x0f) - 8);
            y[j + QK4_0 / 2] += ad * (float)((c[b].qs[j] >> 4) - 8);
        }
    }
}

static void axpy_q4_1(const void *col, float a, float *y, int64_t n) {
    const fg_block_q4_1 *c = col;
    for (int64_t b = 0; b < n / QK4_1; b++, y += QK4_1) {
        const float ad = a * fg_half_to_float(c[b].d);
        const float am = a * fg_half_to_float(c[b].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j] += ad * (float)(c[b].qs[j] & 0x0f) + am;
            y[j + QK4_1 / 2] += ad * (float)(c[b].qs[j] >> 4) + am;
        }
    }
}

static void axpy_q5_0(const void *col, float a, float *y, int64_t n) {
    const fg_block_q5_0 *c = col;
    for (int64_t b = 0; b < n / QK5_0; b++, y += QK5_0) {
        const float ad = a * fg_half_to_float(c[b].d);
        int q[QK5_0];
        unpack_q5(c[b].qs, c[b].qh, q);
        for (int j = 0; j < QK5_0; j++) {
            y[j] += ad * (float)(q[j] - 16);
        }
    }
}

static void axpy_q5_1(const void *col, float a, float *y, int64_t n) {
    const fg_block_q5_1 *c = col;
    for (int64_t b = 0; b < n / QK5_1; b++, y += QK5_1) {
        const float ad = a * fg_half_to_float(c[b].d);
        const float am = a * fg_half_to_float(c[b].m);
        int q[QK5_1];
        unpack_q5(c[b].qs, c[b].qh, q);
        for (int j = 0; j < QK5_1; j++) {
            y[j] += ad * (float)q[j] + am;
        }
    }
}

/* y += a * (d sc_j q - dmin m_j) per sub-block j; d sc_j and dmin m_j are exact in float
 * (11-bit by 6-bit significands), and so is d sc_j q: with a = 1 (dequantize) the one
 * rounding is of the difference, as in ggml's dequantize_row_q4_K/q5_K. */
static void axpy_q45_K(fg_half d, fg_half dmin, const uint8_t *scales, const uint8_t *qs,
                       const uint8_t *qh, float a, float *y) {
    for (int j = 0; j < QK_K / 32; j++) {
        int sc, m;
        fg_kscale_min(scales, j, &sc, &m);
        const float ad = a * (fg_half_to_float(d) * (float)sc);
        const float am = a * (fg_half_to_float(dmin) * (float)m);
        for (int l = 0; l < 32; l++) {
            y[32 * j + l] += ad * (float)kquant_q(qs, qh, 32 * j + l) - am;
        }
    }
}

static void axpy_q4_K(const void *col, float a, float *y, int64_t n) {
    const fg_block_q4_K *c = col;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        axpy_q45_K(c[b].d, c[b].dmin, c[b].scales, c[b].qs, NULL, a, y);
    }
}

static void axpy_q5_K(const void *col, float a, float *y, int64_t n) {
    const fg_block_q5_K *c = col;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        axpy_q45_K(c[b].d, c[b].dmin, c[b].scales, c[b].qs, c[b].qh, a, y);
    }
}

/* y += a * d * scales[v / 16] * (q_v - 32); d * scale * (q - 32) is exact in float. */
static void axpy_q6_K(const void *col, float a, float *y, int64_t n) {
    const fg_block_q6_K *c = col;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        for (int s = 0; s < QK_K / 16; s++) {
            const float ad = a * (fg_half_to_float(c[b].d) * (float)c[b].scales[s]);
            for (int l = 0; l < 16; l++) {
                y[16 * s + l] += ad * (float)q6_K_value(&c[b], 16 * s + l);
            }
        }
    }
}

fg_axpy_fn fg_axpy_ref_fn(int type) {
    switch (type) {
    case FG_TYPE_F32: return axpy_f32;
    case FG_TYPE_F16: return axpy_f16;
    case FG_TYPE_Q4_0: return axpy_q4_0;
    case FG_TYPE_Q4_1: return axpy_q4_1;
    case FG_TYPE_Q8_0: return axpy_q8_0;
    case FG_TYPE_Q5_0: return axpy_q5_0;
    case FG_TYPE_Q5_1: return axpy_q5_1;
    case FG_TYPE_Q4_K: return axpy_q4_K;
    case FG_TYPE_Q5_K: return axpy_q5_K;
    case FG_TYPE_Q6_K: return axpy_q6_K;
    default: return NULL;
    }
}

/* ---- public entry points (checked arguments) --------------------------------------- */

int fg_dequantize_row(int type, const void *src, float *out, int64_t n) {
    /* Dequantizing is an axpy with a = 1 into zeros: one code path for both. */
    const fg_axpy_fn fn = fg_axpy_ref_fn(type);
    if (fn == NULL) return FG_ERR_TYPE;
    if (fg_row_size(type, n) == 0 && n != 0) return FG_ERR_ARG;
    memset(out, 0, (size_t)n * sizeof(float));
    fn(src, 1.0f, out, n);
    return FG_OK;
}

int fg_activate(int activation, float threshold, float *x, int64_t n) {
    switch (activation) {
    case FG_ACT_SILU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
        return FG_OK;
    case FG_ACT_GELU: {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
        for (int64_t i = 0; i < n; i++) {
            const float v = x[i];
            x[i] = 0.5f * v * (1.0f + tanhf(k * v * (1.0f + 0.044715f * v * v)));
        }
        return FG_OK;
    }
    case FG_ACT_RELU:
    case FG_ACT_DRELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
        return FG_OK;
    case FG_ACT_RELU2:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] * x[i] : 0.0f;
        return FG_OK;
    case FG_ACT_FATRELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] > threshold ? x[i] : 0.0f;
        return FG_OK;
    default:
        return FG_ERR_ARG;
    }
}
