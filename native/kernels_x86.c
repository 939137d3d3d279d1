/*
 * x86 SIMD kernels (AVX2 + FMA + F16C, some AVX-512): only what they speed up; the
 * dispatch (kernels.c) takes the scalar reference for everything else, and on builds
 * without them (FG_SIMD_X86 undefined: another architecture, or FG_FORCE_SCALAR).
 *
 * Paths (compile-time, from the compiler's target macros; the build passes -march=native):
 *   AVX2 + FMA + F16C  every kernel below, whole ggml blocks per step;
 *   + AVX512-VNNI/VL   the 32-value-block integer dot products use vpdpbusd (same exact
 *                      int32 results; the K-quants keep maddubs + madd, which apply the
 *                      sub-block scales per 16 products);
 *   + AVX512F          the Q8_0 axpy (the default down type) works on 16 floats per step
 *                      (the same fused multiply-adds per element: results identical);
 *   anything else, or FG_FORCE_SCALAR defined: the reference (kernels_ref.c) only.
 *
 * Numerics versus the reference: the integer parts of the quantized dot products are exact
 * and identical; only the float accumulation order differs (8 lanes instead of one running
 * sum), and axpy uses fused multiply-adds. Quantization to Q8_0/Q8_1/F16 is bit-exact with
 * the reference (same scale, same 1/d, roundf's half-away-from-zero rounding, RNE fp16), and
 * so is Q8_K (ggml's nearest-even rounding of iscale * x).
 */
#include "kernels.h"

#if defined(FG_SIMD_X86)
#include <immintrin.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define FG_SIMD_VNNI 1
#endif

#if defined(__AVX512F__)
#define FG_SIMD_AVX512F 1
#endif


/* ---- helpers ------------------------------------------------------------------------ */

static inline float h2f(fg_half h) { return _cvtsh_ss(h); }

static inline fg_half f2h(float f) {
    return (fg_half)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes 0..15 in value order: the low nibbles are values 0..15
 * (low 128-bit lane), the high nibbles values 16..31 (high lane). */
static inline __m256i nibbles_to_bytes(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(q, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    return _mm256_set_m128i(hi, lo);
}

/* Sums of 4 adjacent u8 * s8 products as 8 int32. Callers keep u <= 128 and s in
 * [-127, 127] so the 16-bit pair sums of maddubs cannot saturate: both paths are exact. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(FG_SIMD_VNNI)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Signed x signed via |x| * (y with x's sign). */
static inline __m256i dot_s8s8(__m256i x, __m256i y) {
    return dot_u8s8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

/* roundf (ties away from zero) of 8 floats of magnitude < 2^23, as int32: truncate
 * v + copysign(0.5 - 2^-25, v). The largest float below 0.5 keeps v + c below the next
 * integer when frac(v) < 0.5, while frac(v) >= 0.5 reaches it (a sum landing on the
 * midpoint 1 - 2^-25 rounds up to 1.0 under round-to-nearest-even). */
static inline __m256i round_away_epi32(__m256 v) {
    const __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
    const __m256 half = _mm256_or_ps(sign, _mm256_set1_ps(0.49999997f));
    return _mm256_cvttps_epi32(_mm256_add_ps(v, half));
}

/* ---- quantize ----------------------------------------------------------------------- */

/* 4 x 8 int32 in [-128, 127] (values 0..31 in order) -> 32 int8 at qs. The packs work per
 * 128-bit lane: bytes come out as 4-value groups in the order i0lo i1lo i2lo i3lo i0hi i1hi
 * i2hi i3hi; the permute restores value order. */
static inline void store_epi8(int8_t *qs, __m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    const __m256i q = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, q);
}

/* One block of 32 floats -> 32 int8 with the reference's d, 1/d and rounding.
 * Returns d; *sum receives the sum of the int8 values. */
static inline float quantize_block_q8(const float *x, int8_t *qs, int *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(x);
    __m256 v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16);
    __m256 v3 = _mm256_loadu_ps(x + 24);
    const __m256 m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
    const __m256 m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3));
    const float amax = hmax_ps(_mm256_max_ps(m01, m23));
    const float d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    const __m256i i0 = round_away_epi32(_mm256_mul_ps(v0, id));
    const __m256i i1 = round_away_epi32(_mm256_mul_ps(v1, id));
    const __m256i i2 = round_away_epi32(_mm256_mul_ps(v2, id));
    const __m256i i3 = round_away_epi32(_mm256_mul_ps(v3, id));
    *sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    store_epi8(qs, i0, i1, i2, i3);
    return d;
}

static void quantize_q8_0_avx2(const float *x, void *out, int64_t n) {
    fg_block_q8_0 *y = out;
    for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0) {
        int sum;
        y[b].d = f2h(quantize_block_q8(x, y[b].qs, &sum));
    }
}

static void quantize_q8_1_avx2(const float *x, void *out, int64_t n) {
    fg_block_q8_1 *y = out;
    for (int64_t b = 0; b < n / QK8_1; b++, x += QK8_1) {
        int sum;
        const float d = quantize_block_q8(x, y[b].qs, &sum);
        y[b].d = f2h(d);
        y[b].s = f2h((float)sum * d);
    }
}

/* ggml's quantize_row_q8_K_ref, bit-exact with the reference: the first value of largest
 * magnitude (a vector max, then the first lane equal to it) sets iscale = -127 / max;
 * cvtps_epi32 rounds iscale * x to nearest-even under the default rounding mode, as
 * ggml's nearest_int and the reference's rintf do. */
static void quantize_q8_K_avx2(const float *x, void *out, int64_t n) {
    fg_block_q8_K *y = out;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        __m256 vmax = _mm256_setzero_ps();
        for (int k = 0; k < QK_K; k += 8) {
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
        }
        const float amax = hmax_ps(vmax);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const __m256 vamax = _mm256_set1_ps(amax);
        int first = 0;
        for (int k = 0; k < QK_K; k += 8) {
            const __m256 eq = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), vamax,
                                            _CMP_EQ_OQ);
            const int mask = _mm256_movemask_ps(eq);
            if (mask != 0) {
                first = k + __builtin_ctz((unsigned)mask);
                break;
            }
        }
        const float iscale = -127.0f / x[first];
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i cap = _mm256_set1_epi32(127);
        for (int k = 0; k < QK_K; k += 32) {
            __m256i i[4];
            for (int j = 0; j < 4; j++) {
                const __m256 v = _mm256_mul_ps(vs, _mm256_loadu_ps(x + k + 8 * j));
                i[j] = _mm256_min_epi32(_mm256_cvtps_epi32(v), cap);
            }
            store_epi8(y[b].qs + k, i[0], i[1], i[2], i[3]);
            y[b].bsums[k / 16] = (int16_t)hsum_epi32(_mm256_add_epi32(i[0], i[1]));
            y[b].bsums[k / 16 + 1] = (int16_t)hsum_epi32(_mm256_add_epi32(i[2], i[3]));
        }
        y[b].d = 1.0f / iscale;
    }
}

static void quantize_f16_avx2(const float *x, void *out, int64_t n) {
    fg_half *y = out;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(y + i), h);
    }
    for (; i < n; i++) {
        y[i] = f2h(x[i]);
    }
}

/* ---- dot products ------------------------------------------------------------------- */

/* The two fp16 values at p (a block's d and m, or d and s) as floats in lanes 0 and 1. */
static inline __m128 load_half_pair(const fg_half *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}

/* The fp16 scale d that starts every 32-value weight block (Q4_x, Q5_x, Q8_0). */
static inline float block_d(const uint8_t *block) {
    fg_half d;
    memcpy(&d, block, sizeof d);
    return h2f(d);
}

/* 32 bits -> 32 bytes, byte j = 0xff where bit j is set: byte j picks byte j / 8 of the
 * bits and tests bit j % 8 of it. */
static inline __m256i bits_to_bytes(const uint8_t *bits4) {
    int32_t bits;
    memcpy(&bits, bits4, sizeof bits);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* A Q5_0/Q5_1 block's 32 q in [0, 31], in value order: the nibbles plus qh's bits as 16. */
static inline __m256i q5_bytes(const uint8_t *qs, const uint8_t *qh) {
    return _mm256_or_si256(nibbles_to_bytes(qs),
                           _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
}

/* Decoders: a weight block's 32 values as bytes in value order (signed for the types
 * without a min, 0..31 for those with one). */
typedef __m256i (*block_decoder)(const uint8_t *block);

static inline __m256i decode_q8_0(const uint8_t *block) {
    return _mm256_loadu_si256((const __m256i *)((const fg_block_q8_0 *)block)->qs);
}

static inline __m256i decode_q4_0(const uint8_t *block) {
    return _mm256_sub_epi8(nibbles_to_bytes(((const fg_block_q4_0 *)block)->qs),
                           _mm256_set1_epi8(8));
}

static inline __m256i decode_q5_0(const uint8_t *block) {
    const fg_block_q5_0 *b = (const fg_block_q5_0 *)block;
    return _mm256_sub_epi8(q5_bytes(b->qs, b->qh), _mm256_set1_epi8(16));
}

static inline __m256i decode_q4_1(const uint8_t *block) {
    return nibbles_to_bytes(((const fg_block_q4_1 *)block)->qs);
}

static inline __m256i decode_q5_1(const uint8_t *block) {
    const fg_block_q5_1 *b = (const fg_block_q5_1 *)block;
    return q5_bytes(b->qs, b->qh);
}

/* Signed 32-value weight blocks (wsize bytes each) x Q8_0: sum_b d_w d_x dot(q_w, q_x),
 * two blocks per step into two accumulators. decode is a constant at every call, so each
 * caller gets its own inlined loop. */
static inline float dot_blocks_q8_0(const uint8_t *w, size_t wsize, block_decoder decode,
                                    const fg_block_q8_0 *b, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const uint8_t *w0 = w + (size_t)i * wsize, *w1 = w0 + wsize;
        const __m256 d0 = _mm256_set1_ps(block_d(w0) * h2f(b[i].d));
        const __m256 d1 = _mm256_set1_ps(block_d(w1) * h2f(b[i + 1].d));
        const __m256i p0 = dot_s8s8(decode(w0), _mm256_loadu_si256((const __m256i *)b[i].qs));
        const __m256i p1 =
            dot_s8s8(decode(w1), _mm256_loadu_si256((const __m256i *)b[i + 1].qs));
        acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const uint8_t *w0 = w + (size_t)i * wsize;
        const __m256 d0 = _mm256_set1_ps(block_d(w0) * h2f(b[i].d));
        const __m256i p0 = dot_s8s8(decode(w0), _mm256_loadu_si256((const __m256i *)b[i].qs));
        acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1));
}

/* Weight blocks with a min (d, m first; q in [0, 31]) x Q8_1:
 * sum_b (d_w d_x dot(q_w, q_x) + m_w s_x). */
static inline float dot_blocks_q8_1(const uint8_t *w, size_t wsize, block_decoder decode,
                                    const fg_block_q8_1 *b, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m128 summ = _mm_setzero_ps(); /* lane 1: sum of m_w * s_x */
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const uint8_t *w0 = w + (size_t)i * wsize, *w1 = w0 + wsize;
        /* lanes: [d_w * d_x, m_w * s_x, 0, 0] */
        const __m128 h0 = _mm_mul_ps(load_half_pair((const fg_half *)w0), load_half_pair(&b[i].d));
        const __m128 h1 =
            _mm_mul_ps(load_half_pair((const fg_half *)w1), load_half_pair(&b[i + 1].d));
        summ = _mm_add_ps(_mm_add_ps(summ, h0), h1);
        const __m256i p0 = dot_u8s8(decode(w0), _mm256_loadu_si256((const __m256i *)b[i].qs));
        const __m256i p1 =
            dot_u8s8(decode(w1), _mm256_loadu_si256((const __m256i *)b[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(h0), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(h1), _mm256_cvtepi32_ps(p1), acc1);
    }
    for (; i < nb; i++) {
        const uint8_t *w0 = w + (size_t)i * wsize;
        const __m128 h0 = _mm_mul_ps(load_half_pair((const fg_half *)w0), load_half_pair(&b[i].d));
        summ = _mm_add_ps(summ, h0);
        const __m256i p0 = dot_u8s8(decode(w0), _mm256_loadu_si256((const __m256i *)b[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(h0), _mm256_cvtepi32_ps(p0), acc0);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_movehdup_ps(summ));
}

static void vec_dot_q8_0_avx2(const void *w, const void *xq, int64_t n, float *out) {
    *out = dot_blocks_q8_0(w, sizeof(fg_block_q8_0), decode_q8_0, xq, n / QK8_0);
}

static void vec_dot_q4_0_avx2(const void *w, const void *xq, int64_t n, float *out) {
    *out = dot_blocks_q8_0(w, sizeof(fg_block_q4_0), decode_q4_0, xq, n / QK4_0);
}

static void vec_dot_q5_0_avx2(const void *w, const void *xq, int64_t n, float *out) {
    *out = dot_blocks_q8_0(w, sizeof(fg_block_q5_0), decode_q5_0, xq, n / QK5_0);
}

static void vec_dot_q4_1_avx2(const void *w, const void *xq, int64_t n, float *out) {
    *out = dot_blocks_q8_1(w, sizeof(fg_block_q4_1), decode_q4_1, xq, n / QK4_1);
}

static void vec_dot_q5_1_avx2(const void *w, const void *xq, int64_t n, float *out) {
    *out = dot_blocks_q8_1(w, sizeof(fg_block_q5_1), decode_q5_1, xq, n / QK5_1);
}

/* ---- K-quant dot products (x Q8_K) ---------------------------------------------------- */

/* The 8 sub-block scales and mins of a Q4_K/Q5_K block as int16 (fg_kscale_min). */
static inline void kscales_mins(const uint8_t *packed, int16_t *sc, int16_t *m) {
    for (int j = 0; j < QK_K / 32; j++) {
        int s, mn;
        fg_kscale_min(packed, j, &s, &mn);
        sc[j] = (int16_t)s;
        m[j] = (int16_t)mn;
    }
}

/* sum_j m_j * (sum of x over sub-block j of 32) from Q8_K's 16 bsums: adjacent bsums pair
 * up (hadd: |pair| <= 2 * 16 * 127 fits int16), then a multiply-add with the mins. */
static inline int kmins_dot(const int16_t *m, const int16_t *bsums) {
    const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums),
                                         _mm_loadu_si128((const __m128i *)(bsums + 8)));
    __m128i s = _mm_madd_epi16(pairs, _mm_loadu_si128((const __m128i *)m));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* 32 q (u8 <= 63) times 32 x (s8) and an int16 scale per 16 products: 8 int32 sums
 * scale * (q x + q' x'). maddubs' pair sums (|.| <= 2 * 63 * 127) cannot saturate. */
static inline __m256i dot32_scaled(__m256i q, const int8_t *x, __m256i scale16) {
    const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_madd_epi16(p, scale16);
}

/* Q4_K/Q5_K block x Q8_K block (qh NULL for Q4_K): adds d_w d_x * (the scaled integer dot,
 * as 8 int32 lanes) to *acc and returns dmin_w d_x sum_j m_j sum_{v in j} x_v, which the
 * caller subtracts. Integer parts exact: |sum| <= 256 * 31 * 127 * 63 < 2^31. */
static inline float dot_q45_K_block(fg_half d, fg_half dmin, const uint8_t *scales,
                                    const uint8_t *qs, const uint8_t *qh,
                                    const fg_block_q8_K *x, __m256 *acc) {
    int16_t sc[8], m[8];
    kscales_mins(scales, sc, m);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    __m256i hb = qh != NULL ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    __m256i sumi = _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) { /* 32 bytes of qs: sub-blocks 2g (low) and 2g + 1 (high) */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        __m256i lo = _mm256_and_si256(q, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if (qh != NULL) { /* bits 2g and 2g + 1 of each qh byte, moved to bit 4 */
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
            hb = _mm256_srli_epi16(hb, 2);
        }
        sumi = _mm256_add_epi32(sumi, dot32_scaled(lo, x->qs + 64 * g,
                                                   _mm256_set1_epi16(sc[2 * g])));
        sumi = _mm256_add_epi32(sumi, dot32_scaled(hi, x->qs + 64 * g + 32,
                                                   _mm256_set1_epi16(sc[2 * g + 1])));
    }
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d) * x->d), _mm256_cvtepi32_ps(sumi), *acc);
    return (h2f(dmin) * x->d) * (float)kmins_dot(m, x->bsums);
}

static void vec_dot_q4_K_avx2(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q4_K *a = w;
    const fg_block_q8_K *b = xq;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        mins += dot_q45_K_block(a[i].d, a[i].dmin, a[i].scales, a[i].qs, NULL, &b[i], &acc);
    }
    *out = hsum_ps(acc) - mins;
}

static void vec_dot_q5_K_avx2(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q5_K *a = w;
    const fg_block_q8_K *b = xq;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        mins += dot_q45_K_block(a[i].d, a[i].dmin, a[i].scales, a[i].qs, a[i].qh, &b[i], &acc);
    }
    *out = hsum_ps(acc) - mins;
}

/* The 4 x 32 q in [0, 63] of one half (128 values) of a Q6_K block: quarter k is the low
 * (k < 2) or high nibble of ql[32 (k & 1) + l] with bits 2k..2k+1 of qh[l] as bits 4..5. */
static inline void q6_K_half(const uint8_t *ql, const uint8_t *qh, __m256i *q) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    const __m256i la = _mm256_loadu_si256((const __m256i *)ql);
    const __m256i lb = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    q[0] = _mm256_or_si256(_mm256_and_si256(la, low4),
                           _mm256_and_si256(_mm256_slli_epi16(h, 4), bits45));
    q[1] = _mm256_or_si256(_mm256_and_si256(lb, low4),
                           _mm256_and_si256(_mm256_slli_epi16(h, 2), bits45));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), low4),
                           _mm256_and_si256(h, bits45));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), low4),
                           _mm256_and_si256(_mm256_srli_epi16(h, 2), bits45));
}

/* Q6_K x Q8_K: sum_s sc_s sum_{v in s} (q_v - 32) x_v = sum_s sc_s (sum q x - 32 bsums_s),
 * so the quants stay unsigned for maddubs; 16 int16 lanes of a 32-value product are two
 * sub-blocks (low lane s, high lane s + 1). |integer sum| <= 256 * 63 * 127 * 128 < 2^31. */
static void vec_dot_q6_K_avx2(const void *w, const void *xq, int64_t n, float *out) {
    const fg_block_q6_K *a = w;
    const fg_block_q8_K *b = xq;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)a[i].scales));
        const __m256i bsums = _mm256_loadu_si256((const __m256i *)b[i].bsums);
        __m256i sumi = _mm256_mullo_epi32(_mm256_madd_epi16(bsums, sc16), _mm256_set1_epi32(-32));
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6_K_half(a[i].ql + 64 * h, a[i].qh + 32 * h, q);
            for (int k = 0; k < 4; k++) {
                const int c = 4 * h + k; /* values 32c.., sub-blocks 2c and 2c + 1 */
                const __m256i scale = _mm256_set_m128i(_mm_set1_epi16(a[i].scales[2 * c + 1]),
                                                       _mm_set1_epi16(a[i].scales[2 * c]));
                sumi = _mm256_add_epi32(sumi, dot32_scaled(q[k], b[i].qs + 32 * c, scale));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(a[i].d) * b[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *out = hsum_ps(acc);
}

static void vec_dot_f16_avx2(const void *w, const void *xq, int64_t n, float *out) {
    const fg_half *a = w, *b = xq;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
#define FG_LOAD_PH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(FG_LOAD_PH(a + i), FG_LOAD_PH(b + i), acc0);
        acc1 = _mm256_fmadd_ps(FG_LOAD_PH(a + i + 8), FG_LOAD_PH(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(FG_LOAD_PH(a + i + 16), FG_LOAD_PH(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(FG_LOAD_PH(a + i + 24), FG_LOAD_PH(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) {
        acc0 = _mm256_fmadd_ps(FG_LOAD_PH(a + i), FG_LOAD_PH(b + i), acc0);
    }
#undef FG_LOAD_PH
    float tail = 0.0f;
    for (; i < n; i++) {
        tail += h2f(a[i]) * h2f(b[i]);
    }
    *out = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) + tail;
}

static void vec_dot_f32_avx2(const void *w, const void *xq, int64_t n, float *out) {
    const float *a = w, *b = xq;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    }
    float tail = 0.0f;
    for (; i < n; i++) {
        tail += a[i] * b[i];
    }
    *out = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) + tail;
}

/* ---- axpy: y += a * dequant(col) ---------------------------------------------------- */

/* y[0..8) += s * (8 int32 as float). */
static inline void axpy8(float *y, __m256 s, __m256i q) {
    _mm256_storeu_ps(y, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q), _mm256_loadu_ps(y)));
}

/* y[0..8) += s * q + m, with s * q + m formed first as in the reference. */
static inline void axpy8_min(float *y, __m256 s, __m256 m, __m256i q) {
    const __m256 v = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(q), m);
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), v));
}

/* y[0..32) += s * q for 32 signed bytes q. */
static inline void axpy32_s8(float *y, __m256 s, __m256i q) {
    const __m128i lo = _mm256_castsi256_si128(q);
    const __m128i hi = _mm256_extracti128_si256(q, 1);
    axpy8(y, s, _mm256_cvtepi8_epi32(lo));
    axpy8(y + 8, s, _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
    axpy8(y + 16, s, _mm256_cvtepi8_epi32(hi));
    axpy8(y + 24, s, _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
}

/* y[0..32) += s * q + m for 32 unsigned bytes q. */
static inline void axpy32_u8_min(float *y, __m256 s, __m256 m, __m256i q) {
    const __m128i lo = _mm256_castsi256_si128(q);
    const __m128i hi = _mm256_extracti128_si256(q, 1);
    axpy8_min(y, s, m, _mm256_cvtepu8_epi32(lo));
    axpy8_min(y + 8, s, m, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
    axpy8_min(y + 16, s, m, _mm256_cvtepu8_epi32(hi));
    axpy8_min(y + 24, s, m, _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
}

/* Signed 32-value blocks (Q4_0, Q5_0, Q8_0): y += (a d) q per block. */
static inline void axpy_blocks_s8(const uint8_t *col, size_t csize, block_decoder decode, float a,
                                  float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += 32, col += csize) {
        axpy32_s8(y, _mm256_set1_ps(a * block_d(col)), decode(col));
    }
}

/* Blocks with a min (Q4_1, Q5_1: d, m first): y += (a d) q + (a m) per block. */
static inline void axpy_blocks_min(const uint8_t *col, size_t csize, block_decoder decode,
                                   float a, float *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, y += 32, col += csize) {
        const __m128 dm = _mm_mul_ps(_mm_set1_ps(a), load_half_pair((const fg_half *)col));
        axpy32_u8_min(y, _mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
                      decode(col));
    }
}

#if !defined(FG_SIMD_AVX512F)
static void axpy_q8_0_avx2(const void *col, float a, float *y, int64_t n) {
    axpy_blocks_s8(col, sizeof(fg_block_q8_0), decode_q8_0, a, y, n / QK8_0);
}
#endif

#if defined(FG_SIMD_AVX512F)
/* Measured on the project machine (AMD EPYC, Zen 4): 30 us vs 39 us for SmolLM2's 1536
 * down columns of 576 values: the int8 -> float conversions, not y's loads, bound it. */
static void axpy_q8_0_avx512(const void *col, float a, float *y, int64_t n) {
    const fg_block_q8_0 *c = col;
    for (int64_t b = 0; b < n / QK8_0; b++, y += QK8_0) {
        const __m512 ad = _mm512_set1_ps(a * h2f(c[b].d));
        const __m128i lo = _mm_loadu_si128((const __m128i *)c[b].qs);
        const __m128i hi = _mm_loadu_si128((const __m128i *)(c[b].qs + 16));
        _mm512_storeu_ps(y, _mm512_fmadd_ps(ad, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                                            _mm512_loadu_ps(y)));
        _mm512_storeu_ps(y + 16,
                         _mm512_fmadd_ps(ad, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                                         _mm512_loadu_ps(y + 16)));
    }
}
#endif

static void axpy_q4_0_avx2(const void *col, float a, float *y, int64_t n) {
    axpy_blocks_s8(col, sizeof(fg_block_q4_0), decode_q4_0, a, y, n / QK4_0);
}

static void axpy_q5_0_avx2(const void *col, float a, float *y, int64_t n) {
    axpy_blocks_s8(col, sizeof(fg_block_q5_0), decode_q5_0, a, y, n / QK5_0);
}

static void axpy_q4_1_avx2(const void *col, float a, float *y, int64_t n) {
    axpy_blocks_min(col, sizeof(fg_block_q4_1), decode_q4_1, a, y, n / QK4_1);
}

static void axpy_q5_1_avx2(const void *col, float a, float *y, int64_t n) {
    axpy_blocks_min(col, sizeof(fg_block_q5_1), decode_q5_1, a, y, n / QK5_1);
}

/* Q4_K/Q5_K: y += (a d sc_j) q - (a dmin m_j) per sub-block j of 32 (qh NULL for Q4_K). */
static inline void axpy_q45_K_block(fg_half d, fg_half dmin, const uint8_t *scales,
                                    const uint8_t *qs, const uint8_t *qh, float a, float *y) {
    int16_t sc[8], m[8];
    kscales_mins(scales, sc, m);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    __m256i hb = qh != NULL ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int g = 0; g < 4; g++, y += 64) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        __m256i lo = _mm256_and_si256(q, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if (qh != NULL) {
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bit4));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(hb, 3), bit4));
            hb = _mm256_srli_epi16(hb, 2);
        }
        /* a * (d * sc): d * sc is exact, as in the reference */
        axpy32_u8_min(y, _mm256_set1_ps(a * (h2f(d) * sc[2 * g])),
                      _mm256_set1_ps(-(a * (h2f(dmin) * m[2 * g]))), lo);
        axpy32_u8_min(y + 32, _mm256_set1_ps(a * (h2f(d) * sc[2 * g + 1])),
                      _mm256_set1_ps(-(a * (h2f(dmin) * m[2 * g + 1]))), hi);
    }
}

static void axpy_q4_K_avx2(const void *col, float a, float *y, int64_t n) {
    const fg_block_q4_K *c = col;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        axpy_q45_K_block(c[b].d, c[b].dmin, c[b].scales, c[b].qs, NULL, a, y);
    }
}

static void axpy_q5_K_avx2(const void *col, float a, float *y, int64_t n) {
    const fg_block_q5_K *c = col;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        axpy_q45_K_block(c[b].d, c[b].dmin, c[b].scales, c[b].qs, c[b].qh, a, y);
    }
}

/* y[0..16) += s * q for the 16 signed bytes q. */
static inline void axpy16_s8(float *y, __m256 s, __m128i q) {
    axpy8(y, s, _mm256_cvtepi8_epi32(q));
    axpy8(y + 8, s, _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
}

/* Q6_K: y += (a d scales[s]) (q - 32) per sub-block s of 16. */
static void axpy_q6_K_avx2(const void *col, float a, float *y, int64_t n) {
    const fg_block_q6_K *c = col;
    const __m256i off = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = h2f(c[b].d);
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6_K_half(c[b].ql + 64 * h, c[b].qh + 32 * h, q);
            for (int k = 0; k < 4; k++) {
                const int s = 8 * h + 2 * k; /* values 16s.. and 16(s + 1).. */
                const __m256i v = _mm256_sub_epi8(q[k], off);
                axpy16_s8(y + 16 * s, _mm256_set1_ps(a * (d * c[b].scales[s])),
                          _mm256_castsi256_si128(v));
                axpy16_s8(y + 16 * s + 16, _mm256_set1_ps(a * (d * c[b].scales[s + 1])),
                          _mm256_extracti128_si256(v, 1));
            }
        }
    }
}

static void axpy_f16_avx2(const void *col, float a, float *y, int64_t n) {
    const fg_half *c = col;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        y[i] += a * h2f(c[i]);
    }
}

static void axpy_f32_avx2(const void *col, float a, float *y, int64_t n) {
    const float *c = col;
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(c + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        y[i] += a * c[i];
    }
}

/* ---- what this file provides ------------------------------------------------------ */

fg_vec_dot_fn fg_vec_dot_simd_fn(int weight_type) {
    switch (weight_type) {
    case FG_TYPE_F32: return vec_dot_f32_avx2;
    case FG_TYPE_F16: return vec_dot_f16_avx2;
    case FG_TYPE_Q4_0: return vec_dot_q4_0_avx2;
    case FG_TYPE_Q4_1: return vec_dot_q4_1_avx2;
    case FG_TYPE_Q5_0: return vec_dot_q5_0_avx2;
    case FG_TYPE_Q5_1: return vec_dot_q5_1_avx2;
    case FG_TYPE_Q4_K: return vec_dot_q4_K_avx2;
    case FG_TYPE_Q5_K: return vec_dot_q5_K_avx2;
    case FG_TYPE_Q6_K: return vec_dot_q6_K_avx2;
    case FG_TYPE_Q8_0: return vec_dot_q8_0_avx2;
    default: return NULL;
    }
}

fg_axpy_fn fg_axpy_simd_fn(int type) {
    switch (type) {
    case FG_TYPE_F32: return axpy_f32_avx2;
    case FG_TYPE_F16: return axpy_f16_avx2;
    case FG_TYPE_Q4_0: return axpy_q4_0_avx2;
    case FG_TYPE_Q4_1: return axpy_q4_1_avx2;
    case FG_TYPE_Q5_0: return axpy_q5_0_avx2;
    case FG_TYPE_Q5_1: return axpy_q5_1_avx2;
    case FG_TYPE_Q4_K: return axpy_q4_K_avx2;
    case FG_TYPE_Q5_K: return axpy_q5_K_avx2;
    case FG_TYPE_Q6_K: return axpy_q6_K_avx2;
#if defined(FG_SIMD_AVX512F)
    case FG_TYPE_Q8_0: return axpy_q8_0_avx512;
#else
    case FG_TYPE_Q8_0: return axpy_q8_0_avx2;
#endif
    default: return NULL;
    }
}

fg_quantize_fn fg_quantize_simd_fn(int type) {
    switch (type) {
    case FG_TYPE_F16: return quantize_f16_avx2;
    case FG_TYPE_Q8_0: return quantize_q8_0_avx2;
    case FG_TYPE_Q8_1: return quantize_q8_1_avx2;
    case FG_TYPE_Q8_K: return quantize_q8_K_avx2;
    default: return NULL;
    }
}

const char *fg_simd_path(void) {
#if defined(FG_SIMD_AVX512F)
    return "avx512";
#else
    return "avx2";
#endif
}

#endif /* FG_SIMD_X86 */
