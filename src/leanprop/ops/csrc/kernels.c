/* Fused element-wise kernels of leanprop's BLPA unit (CPU, OpenMP, auto-vectorised by the compiler).
 *
 * A 4-D activation is walked as "rows" in memory order: NCHW rows are the H*W plane of one (n, c) -- one
 * channel, scalar coefficients -- and channels-last rows are the C channels of one pixel -- per-element
 * coefficients from the transposed table coefT[NCOEF][C] (leanprop.blpa.quantizer.channel_coefficients).
 * Codes are packed k = 8/bits per byte, first code in the high bits, and a row starts on a byte boundary
 * (the caller checks row_len % k == 0).  The arithmetic is written operation by operation like the torch
 * reference and compiled with -ffp-contract=off, so the codes are bit-identical to quantizer.encode.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

enum { ALPHA = 0, OFFSET, S, BSH, A, B, A2, B2, T, K, GAMMA, BETA, NCOEF };
#define CH 2048 /* elements per chunk (multiple of 8) */
#define MAXF(a, b) ((a) > (b) ? (a) : (b)) /* not fmaxf: that is a libm call without -ffinite-math-only */
#define MINF(a, b) ((a) < (b) ? (a) : (b))

static inline float bf16_load(const uint16_t *p, int64_t i) {
    uint32_t u = ((uint32_t)p[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void bf16_store(uint16_t *p, int64_t i, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p[i] = (uint16_t)((f != f) ? 0x7FC0u : r);
}
static inline float f32_load(const float *p, int64_t i) { return p[i]; }
static inline void f32_store(float *p, int64_t i, float f) { p[i] = f; }

static inline void pack_chunk(const uint8_t *q, int64_t len, int bits, uint8_t *out) {
    switch (bits) {
    case 8: memcpy(out, q, (size_t)len); break;
    case 4: for (int64_t j = 0; j < len / 2; ++j) out[j] = (uint8_t)((q[2 * j] << 4) | q[2 * j + 1]); break;
    case 2:
        for (int64_t j = 0; j < len / 4; ++j)
            out[j] = (uint8_t)((q[4 * j] << 6) | (q[4 * j + 1] << 4) | (q[4 * j + 2] << 2) | q[4 * j + 3]);
        break;
    default:
        for (int64_t j = 0; j < len / 8; ++j) {
            uint8_t v = 0;
            for (int l = 0; l < 8; ++l) v |= (uint8_t)(q[8 * j + l] << (7 - l));
            out[j] = v;
        }
    }
}
static inline void unpack_chunk(const uint8_t *p, int64_t len, int bits, uint8_t *q) {
    switch (bits) {
    case 8: memcpy(q, p, (size_t)len); break;
    case 4:
        for (int64_t j = 0; j < len / 2; ++j) { q[2 * j] = p[j] >> 4; q[2 * j + 1] = p[j] & 15; }
        break;
    case 2:
        for (int64_t j = 0; j < len / 4; ++j) {
            q[4 * j] = p[j] >> 6; q[4 * j + 1] = (p[j] >> 4) & 3; q[4 * j + 2] = (p[j] >> 2) & 3; q[4 * j + 3] = p[j] & 3;
        }
        break;
    default:
        for (int64_t j = 0; j < len / 8; ++j)
            for (int l = 0; l < 8; ++l) q[8 * j + l] = (p[j] >> (7 - l)) & 1;
    }
}

/* Loop skeleton: for every row (in parallel) and every chunk of it, `BODY` runs with
 *   base (flat index of the chunk start), len, c0 (first channel of the chunk, channels-last only),
 *   ch (channel of the row, NCHW only), pk (packed bytes of the chunk). */
#define ROWS(cl, N, C, inner, bits, ...)                                                                    \
    {                                                                                                       \
        const int64_t rows = (cl) ? (N) * (inner) : (N) * (C);                                              \
        const int64_t rlen = (cl) ? (C) : (inner);                                                          \
        const int kk = 8 / (bits);                                                                          \
        _Pragma("omp parallel for num_threads(nt) schedule(static)")                                        \
        for (int64_t row = 0; row < rows; ++row) {                                                          \
            uint8_t qb[CH];                                                                                 \
            const int64_t ch = (cl) ? 0 : row % (C);                                                        \
            for (int64_t off = 0; off < rlen; off += CH) {                                                  \
                const int64_t len = rlen - off < CH ? rlen - off : CH;                                      \
                const int64_t base = row * rlen + off;                                                      \
                const int64_t c0 = (cl) ? off : 0;                                                          \
                (void)ch; (void)c0; (void)kk;                                                               \
                __VA_ARGS__                                                                                 \
            }                                                                                               \
        }                                                                                                   \
    }

#define DEFINE_KERNELS(T_, SUF, LOAD, STORE)                                                                \
void blpa_encode_##SUF(const T_ *x, T_ *y, const float *cT, int64_t N, int64_t C, int64_t inner, int cl,    \
                       int bits, int relu_inplace, uint8_t *packed, int nt) {                               \
    const float hi = (float)((1 << bits) - 1);                                                              \
    ROWS(cl, N, C, inner, bits, {                                                                           \
        if (!cl) {                                                                                          \
            const float al = cT[ALPHA * C + ch], of = cT[OFFSET * C + ch], s = cT[S * C + ch];              \
            /* channels with gamma == 0 (t != s) keep unforced codes: widen the forcing bounds instead */    \
            const int force = cT[T * C + ch] == s;                                                          \
            const float lo_pos = force ? s : 0.0f, hi_neg = force ? s - 1.0f : hi;                          \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                float u = LOAD(x, base + i) * al;                                                           \
                u = u + of;                                                                                 \
                float q = floorf(u);                                                                        \
                q = q + s;                                                                                  \
                q = MINF(MAXF(q, 0.0f), hi);                                                              \
                const float yv = LOAD(y, base + i);                                                         \
                q = yv > 0.0f ? MAXF(q, lo_pos) : MINF(q, hi_neg);                                        \
                qb[i] = (uint8_t)(int)q;                                                                    \
            }                                                                                               \
        } else {                                                                                            \
            const float *al = cT + ALPHA * C + c0, *of = cT + OFFSET * C + c0, *s = cT + S * C + c0;        \
            const float *t = cT + T * C + c0;                                                               \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                float u = LOAD(x, base + i) * al[i];                                                        \
                u = u + of[i];                                                                              \
                float q = floorf(u);                                                                        \
                q = q + s[i];                                                                               \
                q = MINF(MAXF(q, 0.0f), hi);                                                              \
                const float yv = LOAD(y, base + i);                                                         \
                const int force = t[i] == s[i];                                                             \
                const float lo_pos = force ? s[i] : 0.0f, hi_neg = force ? s[i] - 1.0f : hi;                \
                q = yv > 0.0f ? MAXF(q, lo_pos) : MINF(q, hi_neg);                                        \
                qb[i] = (uint8_t)(int)q;                                                                    \
            }                                                                                               \
        }                                                                                                   \
        if (relu_inplace)                                                                                   \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float yv = LOAD(y, base + i);                                                         \
                STORE(y, base + i, yv < 0.0f ? 0.0f : yv);                                                  \
            }                                                                                               \
        pack_chunk(qb, len, bits, packed + base / kk);                                                      \
    })                                                                                                      \
}                                                                                                           \
/* z~ = [q >= t] * (q*A2 + B2) */                                                                           \
void blpa_decode_z_##SUF(const uint8_t *packed, const float *cT, int64_t N, int64_t C, int64_t inner,       \
                         int cl, int bits, T_ *z, int nt) {                                                 \
    ROWS(cl, N, C, inner, bits, {                                                                           \
        unpack_chunk(packed + base / kk, len, bits, qb);                                                    \
        if (!cl) {                                                                                          \
            const float a2 = cT[A2 * C + ch], b2 = cT[B2 * C + ch], t = cT[T * C + ch];                     \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float q = (float)qb[i];                                                               \
                float v = q * a2;                                                                           \
                v = v + b2;                                                                                 \
                STORE(z, base + i, q >= t ? v : 0.0f);                                                      \
            }                                                                                               \
        } else {                                                                                            \
            const float *a2 = cT + A2 * C + c0, *b2 = cT + B2 * C + c0, *t = cT + T * C + c0;               \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float q = (float)qb[i];                                                               \
                float v = q * a2[i];                                                                        \
                v = v + b2[i];                                                                              \
                STORE(z, base + i, q >= t[i] ? v : 0.0f);                                                   \
            }                                                                                               \
        }                                                                                                   \
    })                                                                                                      \
}                                                                                                           \
/* per-channel partial sums of g_y = m*g and g_y*xhat~ (xhat~ = q*A + B).  NCHW: partial[row][2] (float,   \
 * row = n*C + c); channels-last: partial[thread][2][C] (double, zeroed by the caller, nt rows). */         \
void blpa_bn_sums_##SUF(const uint8_t *packed, const T_ *g, const float *cT, int64_t N, int64_t C,          \
                        int64_t inner, int cl, int bits, void *partial_, int nt) {                          \
    if (!cl) {                                                                                              \
        float *partial = (float *)partial_;                                                                 \
        ROWS(0, N, C, inner, bits, {                                                                        \
            unpack_chunk(packed + base / kk, len, bits, qb);                                                \
            const float a = cT[A * C + ch], b = cT[B * C + ch], t = cT[T * C + ch];                         \
            float s1 = 0.0f, s2 = 0.0f;                                                                     \
            _Pragma("omp simd reduction(+:s1, s2)")                                                         \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float q = (float)qb[i];                                                               \
                const float gy = q >= t ? LOAD(g, base + i) : 0.0f;                                         \
                float xh = q * a;                                                                           \
                xh = xh + b;                                                                                \
                s1 += gy;                                                                                   \
                s2 += gy * xh;                                                                              \
            }                                                                                               \
            if (off == 0) { partial[row * 2] = 0.0f; partial[row * 2 + 1] = 0.0f; }                         \
            partial[row * 2] += s1;                                                                         \
            partial[row * 2 + 1] += s2;                                                                     \
        })                                                                                                  \
        return;                                                                                             \
    }                                                                                                       \
    double *acc = (double *)partial_;                                                                       \
    const int kk = 8 / bits;                                                                                \
    const int64_t rows = N * inner;                                                                         \
    _Pragma("omp parallel num_threads(nt)")                                                                 \
    {                                                                                                       \
        double *pa = acc + (int64_t)omp_get_thread_num() * 2 * C;                                           \
        uint8_t qb[CH];                                                                                     \
        _Pragma("omp for schedule(static)")                                                                 \
        for (int64_t row = 0; row < rows; ++row)                                                            \
            for (int64_t off = 0; off < C; off += CH) {                                                     \
                const int64_t len = C - off < CH ? C - off : CH;                                            \
                const int64_t base = row * C + off;                                                         \
                unpack_chunk(packed + base / kk, len, bits, qb);                                            \
                const float *a = cT + A * C + off, *b = cT + B * C + off, *t = cT + T * C + off;            \
                double *p1 = pa + off, *p2 = pa + C + off;                                                  \
                for (int64_t i = 0; i < len; ++i) {                                                         \
                    const float q = (float)qb[i];                                                           \
                    const float gy = q >= t[i] ? LOAD(g, base + i) : 0.0f;                                  \
                    float xh = q * a[i];                                                                    \
                    xh = xh + b[i];                                                                         \
                    p1[i] += gy;                                                                            \
                    p2[i] += gy * xh;                                                                       \
                }                                                                                           \
            }                                                                                               \
    }                                                                                                       \
}                                                                                                           \
/* g_x = K * (m*g - mean1 - xhat~*mean2) */                                                                 \
void blpa_bn_grad_input_##SUF(const uint8_t *packed, const T_ *g, const float *cT, const float *mean1,     \
                              const float *mean2, int64_t N, int64_t C, int64_t inner, int cl, int bits,    \
                              T_ *gx, int nt) {                                                             \
    ROWS(cl, N, C, inner, bits, {                                                                           \
        unpack_chunk(packed + base / kk, len, bits, qb);                                                    \
        if (!cl) {                                                                                          \
            const float a = cT[A * C + ch], b = cT[B * C + ch], t = cT[T * C + ch], kc = cT[K * C + ch];    \
            const float m1 = mean1[ch], m2 = mean2[ch];                                                     \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float q = (float)qb[i];                                                               \
                const float gy = q >= t ? LOAD(g, base + i) : 0.0f;                                         \
                float xh = q * a;                                                                           \
                xh = xh + b;                                                                                \
                float v = gy - m1;                                                                          \
                v = v - xh * m2;                                                                            \
                STORE(gx, base + i, kc * v);                                                                \
            }                                                                                               \
        } else {                                                                                            \
            const float *a = cT + A * C + c0, *b = cT + B * C + c0, *t = cT + T * C + c0;                   \
            const float *kc = cT + K * C + c0, *m1 = mean1 + c0, *m2 = mean2 + c0;                          \
            for (int64_t i = 0; i < len; ++i) {                                                             \
                const float q = (float)qb[i];                                                               \
                const float gy = q >= t[i] ? LOAD(g, base + i) : 0.0f;                                      \
                float xh = q * a[i];                                                                        \
                xh = xh + b[i];                                                                             \
                float v = gy - m1[i];                                                                       \
                v = v - xh * m2[i];                                                                         \
                STORE(gx, base + i, kc[i] * v);                                                             \
            }                                                                                               \
        }                                                                                                   \
    })                                                                                                      \
}

DEFINE_KERNELS(float, f32, f32_load, f32_store)
DEFINE_KERNELS(uint16_t, bf16, bf16_load, bf16_store)

/* standalone pack / unpack of a flat code buffer (any length) */
void blpa_pack(const uint8_t *codes, int64_t numel, int bits, uint8_t *out, int nt) {
    const int k = 8 / bits;
    const int64_t full = numel / k;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t j0 = 0; j0 < full; j0 += CH) {
        const int64_t nb = full - j0 < CH ? full - j0 : CH;
        pack_chunk(codes + j0 * k, nb * k, bits, out + j0);
    }
    if (full * k < numel) {
        uint8_t v = 0;
        for (int64_t i = full * k; i < numel; ++i) v |= (uint8_t)(codes[i] << (8 - bits * (i - full * k + 1)));
        out[full] = v;
    }
}
void blpa_unpack(const uint8_t *packed, int64_t numel, int bits, uint8_t *codes, int nt) {
    const int k = 8 / bits;
    const int64_t full = numel / k;
    const uint8_t mask = (uint8_t)((1u << bits) - 1u);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t j0 = 0; j0 < full; j0 += CH) {
        const int64_t nb = full - j0 < CH ? full - j0 : CH;
        unpack_chunk(packed + j0, nb * k, bits, codes + j0 * k);
    }
    for (int64_t i = full * k; i < numel; ++i) codes[i] = (uint8_t)((packed[full] >> (8 - bits * (i - full * k + 1))) & mask);
}

/* SWAT sparse storage (leanprop.ops.sparse_storage): keep = |x| >= thr, as a 1-bit mask (element i -> byte i/8, bit
 * 7 - i%8, like blpa_pack with bits=1) plus the kept values in memory order. The flat tensor is cut into
 * `nch` chunks of `chunk` elements (a multiple of 8; the last may be shorter); pass 1 writes the mask and
 * counts each chunk, the caller turns the counts into offsets (exclusive prefix sums), pass 2 copies the
 * kept values of chunk j to values + offsets[j]; expand is the inverse (zeros where the mask is 0). */
#if defined(__AVX2__)
#include <immintrin.h>
/* bit-reversed bytes: movemask puts element 0 in the low bit, the mask layout wants it in the high bit */
static const uint8_t REV8[256] = {
#define R2(n) n, n + 2 * 64, n + 1 * 64, n + 3 * 64
#define R4(n) R2(n), R2(n + 2 * 16), R2(n + 1 * 16), R2(n + 3 * 16)
#define R6(n) R4(n), R4(n + 2 * 4), R4(n + 1 * 4), R4(n + 3 * 4)
    R6(0), R6(2), R6(1), R6(3)
#undef R2
#undef R4
#undef R6
};
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
/* |x| >= thr for 8 elements (ordered compare: NaN is dropped, as in magnitude_mask) */
#define MASK8(SUF, x, b, thrv) REV8[_mm256_movemask_ps(_mm256_cmp_ps( \
    _mm256_andnot_ps(_mm256_set1_ps(-0.0f), load8_##SUF((x) + (b))), thrv, _CMP_GE_OQ))]
/* x > 0 for 8 elements (ordered: NaN is not positive, as in torch) */
#define POS8(SUF, x, b) REV8[_mm256_movemask_ps(_mm256_cmp_ps(load8_##SUF((x) + (b)), _mm256_setzero_ps(), \
    _CMP_GT_OQ))]
#else
#define MASK8(SUF, x, b, thrv) mask8_scalar_##SUF((x), (b), thr)
#define POS8(SUF, x, b) pos8_scalar_##SUF((x), (b))
#endif
static inline unsigned pos8_scalar_f32(const float *x, int64_t b) {
    unsigned v = 0;
    for (int t = 0; t < 8; ++t) v |= (unsigned)(x[b + t] > 0.0f) << (7 - t);
    return v;
}
static inline unsigned pos8_scalar_bf16(const uint16_t *x, int64_t b) {
    unsigned v = 0;
    for (int t = 0; t < 8; ++t) v |= (unsigned)(bf16_load(x, b + t) > 0.0f) << (7 - t);
    return v;
}
static inline unsigned mask8_scalar_f32(const float *x, int64_t b, float thr) {
    unsigned v = 0;
    for (int t = 0; t < 8; ++t) v |= (unsigned)(fabsf(x[b + t]) >= thr) << (7 - t);
    return v;
}
static inline unsigned mask8_scalar_bf16(const uint16_t *x, int64_t b, float thr) {
    unsigned v = 0;
    for (int t = 0; t < 8; ++t) v |= (unsigned)(fabsf(bf16_load(x, b + t)) >= thr) << (7 - t);
    return v;
}

#if defined(__AVX2__)
#define SPARSE_THR_VEC const __m256 thrv = _mm256_set1_ps(thr);
#else
#define SPARSE_THR_VEC
#endif
#define DEFINE_SPARSE(T_, SUF, LOAD)                                                                          \
void swat_mask_count_##SUF(const T_ *x, int64_t n, float thr, int64_t chunk, int64_t nch, uint8_t *bits,     \
                           int64_t *counts, int nt) {                                                         \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nch; ++j) {                                                                     \
        const int64_t lo = j * chunk, hi = lo + chunk < n ? lo + chunk : n;                                  \
        const int64_t full = lo + ((hi - lo) & ~(int64_t)7);                                                 \
        int64_t cnt = 0;                                                                                      \
        SPARSE_THR_VEC                                                                                                \
        for (int64_t b = lo; b < full; b += 8) {                                                             \
            const unsigned v = MASK8(SUF, x, b, thrv);                                                                \
            bits[b >> 3] = (uint8_t)v;                                                                        \
            cnt += __builtin_popcount(v);                                                                     \
        }                                                                                                     \
        if (full < hi) {                                                                                      \
            unsigned v = 0;                                                                                   \
            for (int64_t i = full; i < hi; ++i) v |= (unsigned)(fabsf(LOAD(x, i)) >= thr) << (7 - (i - full)); \
            bits[full >> 3] = (uint8_t)v;                                                                     \
            cnt += __builtin_popcount(v);                                                                     \
        }                                                                                                     \
        counts[j] = cnt;                                                                                      \
    }                                                                                                         \
}                                                                                                             \
void swat_compact_##SUF(const T_ *x, int64_t n, const uint8_t *bits, int64_t chunk, int64_t nch,             \
                        const int64_t *offsets, T_ *values, int nt) {                                         \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nch; ++j) {                                                                     \
        const int64_t lo = j * chunk, hi = lo + chunk < n ? lo + chunk : n;                                  \
        T_ *out = values + offsets[j];                                                                        \
        for (int64_t b = lo; b < hi; b += 8) {                                                               \
            unsigned v = bits[b >> 3];                                                                        \
            while (v) { /* set bits high to low = elements in order */                                       \
                const int t = __builtin_clz(v) - 24;                                                          \
                *out++ = x[b + t];                                                                            \
                v &= ~(0x80u >> t);                                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
void swat_expand_##SUF(const T_ *values, int64_t n, const uint8_t *bits, int64_t chunk, int64_t nch,         \
                       const int64_t *offsets, T_ *out, int nt) {                                             \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nch; ++j) {                                                                     \
        const int64_t lo = j * chunk, hi = lo + chunk < n ? lo + chunk : n;                                  \
        const T_ *in = values + offsets[j];                                                                   \
        memset(out + lo, 0, (size_t)(hi - lo) * sizeof(T_));                                                  \
        for (int64_t b = lo; b < hi; b += 8) {                                                               \
            unsigned v = bits[b >> 3];                                                                        \
            while (v) {                                                                                       \
                const int t = __builtin_clz(v) - 24;                                                          \
                out[b + t] = *in++;                                                                           \
                v &= ~(0x80u >> t);                                                                           \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
}

DEFINE_SPARSE(float, f32, f32_load)
DEFINE_SPARSE(uint16_t, bf16, bf16_load)

/* ReLU keeping a 1-bit mask (MaskReLU): out = max(x, 0) and bits = [x > 0] (layout of blpa_pack, bits=1) in one
 * pass; backward gx = g where the bit is set, else 0. Flat buffers in the tensor's memory order. */
#define DEFINE_RELU_MASK(T_, SUF, LOAD)                                                                       \
void relu_mask_##SUF(const T_ *x, int64_t n, T_ *out, uint8_t *bits, int nt) {                               \
    const int64_t nb = (n + 7) / 8;                                                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nb; ++j) {                                                                      \
        const int64_t b = j * 8, e = b + 8 < n ? b + 8 : n;                                                  \
        unsigned v = 0;                                                                                       \
        for (int64_t i = b; i < e; ++i) {                                                                    \
            const float f = LOAD(x, i);                                                                       \
            const int k = f > 0.0f;                                                                           \
            out[i] = (k || f != f) ? x[i] : (T_)0; /* NaN stays NaN, like torch.relu */                      \
            v |= (unsigned)k << (7 - (i - b));                                                                \
        }                                                                                                     \
        bits[j] = (uint8_t)v;                                                                                 \
    }                                                                                                         \
}                                                                                                             \
void positive_bits_##SUF(const T_ *x, int64_t n, uint8_t *bits, int nt) { /* bits = [x > 0] only */          \
    const int64_t nb = (n + 7) / 8, full = n / 8;                                                             \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < full; ++j) {                                                                    \
        bits[j] = (uint8_t)POS8(SUF, x, j * 8);                                                               \
    }                                                                                                         \
    if (nb > full) {                                                                                          \
        unsigned v = 0;                                                                                       \
        for (int64_t i = full * 8; i < n; ++i) v |= (unsigned)(LOAD(x, i) > 0.0f) << (7 - (i - full * 8));   \
        bits[full] = (uint8_t)v;                                                                              \
    }                                                                                                         \
}                                                                                                             \
void range_bits_##SUF(const T_ *x, int64_t n, float lo, float hi, uint8_t *inside, uint8_t *above, int nt) { \
    /* inside = [lo < x < hi], above = [x >= hi] (if asked) */                                                \
    const int64_t nb = (n + 7) / 8;                                                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nb; ++j) {                                                                      \
        const int64_t b = j * 8, e = b + 8 < n ? b + 8 : n;                                                  \
        unsigned vi = 0, va = 0;                                                                              \
        for (int64_t i = b; i < e; ++i) {                                                                    \
            const float f = LOAD(x, i);                                                                       \
            vi |= (unsigned)(f > lo && f < hi) << (7 - (i - b));                                              \
            va |= (unsigned)(f >= hi) << (7 - (i - b));                                                       \
        }                                                                                                     \
        inside[j] = (uint8_t)vi;                                                                              \
        if (above) above[j] = (uint8_t)va;                                                                    \
    }                                                                                                         \
}                                                                                                             \
void relu_mask_backward_##SUF(const T_ *g, const uint8_t *bits, int64_t n, T_ *gx, int nt) {                 \
    const int64_t nb = (n + 7) / 8;                                                                           \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < nb; ++j) {                                                                      \
        const int64_t b = j * 8, e = b + 8 < n ? b + 8 : n;                                                  \
        const unsigned v = bits[j];                                                                           \
        for (int64_t i = b; i < e; ++i) gx[i] = (v & (0x80u >> (i - b))) ? g[i] : (T_)0;                    \
    }                                                                                                         \
}

DEFINE_RELU_MASK(float, f32, f32_load)
DEFINE_RELU_MASK(uint16_t, bf16, bf16_load)

/* Group codes of the saved-tensor codec (leanprop.ops.codec._Packed): a flat fp32 buffer of ngroups * G elements
 * (the caller pads), per group lo = min, step = max((max - lo) / (2^bits - 1), FLT_MIN), codes
 * q = clamp(floor((v - lo) / step + r), 0, 2^bits - 1) with r = 0.5 (nearest, ties up) or r uniform in [0, 1)
 * (stochastic): drawn by a xorshift64* generator per group, seeded by seeds[g] (the caller draws them from its
 * torch generator, so the draws follow its seed). Packed like blpa_pack; decode writes lo + q * step. With
 * exact_zero, a group whose minimum is 0 (a ReLU output) codes every positive value as 1 or more, so its decoded
 * zeros are exactly the original's: a backward that reads v > 0 off the codes reads the exact mask. */
/* range of a group: min and max of v[0..G) (G > 0) */
static inline void group_minmax(const float *v, int64_t G, float *lo_out, float *hi_out) {
    int64_t i = 0;
    float lo = v[0], hi = v[0];
#if defined(__AVX512F__)
    if (G >= 16) {
        __m512 mn = _mm512_loadu_ps(v), mx = mn;
        for (i = 16; i + 16 <= G; i += 16) {
            const __m512 t = _mm512_loadu_ps(v + i);
            mn = _mm512_min_ps(mn, t);
            mx = _mm512_max_ps(mx, t);
        }
        lo = _mm512_reduce_min_ps(mn);
        hi = _mm512_reduce_max_ps(mx);
    }
#endif
    for (; i < G; ++i) { lo = MINF(lo, v[i]); hi = MAXF(hi, v[i]); }
    *lo_out = lo;
    *hi_out = hi;
}
/* MASK_LUT[m][l] = bit 7 - l of m as 0.0 / 1.0: a packed mask byte as 8 multipliers (vectorisable) */
static float MASK_LUT[256][8];
__attribute__((constructor)) static void init_mask_lut(void) {
    for (int m = 0; m < 256; ++m)
        for (int l = 0; l < 8; ++l) MASK_LUT[m][l] = (float)((m >> (7 - l)) & 1);
}
static inline float uniform01(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    *s = x;
    return (float)((x * 0x2545F4914F6CDD1DULL) >> 40) * (1.0f / 16777216.0f);
}
/* codes of one group of G values with range [lo, hi]: returns the step */
static inline float quantize_group(const float *v, int64_t G, float lo, float hi, float levels, const uint64_t *seed,
                                   int exact_zero, uint8_t *q) {
    float step = (hi - lo) / levels;
    if (!(step > 1.17549435e-38f)) step = 1.17549435e-38f;
    const float inv = 1.0f / step;
    uint64_t st = seed ? (*seed | 1ULL) : 0;
    for (int64_t i = 0; i < G; ++i) {
        float t = (v[i] - lo) * inv + (seed ? uniform01(&st) : 0.5f);
        t = t < 0.0f ? 0.0f : (t > levels ? levels : t);
        q[i] = (uint8_t)t; /* truncation = floor for t >= 0 */
    }
    if (exact_zero && lo == 0.0f)
        for (int64_t i = 0; i < G; ++i) q[i] += (uint8_t)(q[i] == 0 && v[i] > 0.0f);
    return step;
}
void group_encode_f32(const float *x, const uint64_t *seeds, int64_t ngroups, int64_t G, int bits, int exact_zero,
                      uint8_t *packed, float *lo_out, float *step_out, int nt) {
    const int k = 8 / bits;
    const float levels = (float)((1 << bits) - 1);
    #pragma omp parallel num_threads(nt)
    {
        uint8_t q[4096];
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; ++g) {
            const float *v = x + g * G;
            float lo, hi;
            group_minmax(v, G, &lo, &hi);
            const float step = quantize_group(v, G, lo, hi, levels, seeds ? seeds + g : 0, exact_zero, q);
            pack_chunk(q, G, bits, packed + g * (G / k));
            lo_out[g] = lo;
            step_out[g] = step;
        }
    }
}
void group_decode_f32(const uint8_t *packed, const float *lo, const float *step, int64_t ngroups, int64_t G,
                      int bits, float *out, int nt) {
    const int k = 8 / bits;
    #pragma omp parallel num_threads(nt)
    {
        uint8_t q[4096];
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; ++g) {
            unpack_chunk(packed + g * (G / k), G, bits, q);
            const float l = lo[g], s = step[g];
            float *o = out + g * G;
            for (int64_t i = 0; i < G; ++i) o[i] = l + (float)q[i] * s;
        }
    }
}

/* One group of decoded codes through a per-channel affine, o[i] = (l + q[i] * s) * scale[c] + shift[c] with
 * c = ((i0 + i) / inner) % C (a missing scale is 1, a missing shift 0). */
static void affine_group(const uint8_t *q, float l, float s, const float *scale, const float *shift, int64_t C,
                         int64_t inner, int64_t i0, int64_t G, float *o) {
    int64_t c = (i0 / inner) % C, r = i0 % inner, i = 0;
    if (inner == 1 && scale && shift) { /* channels-last: runs of consecutive channels, vectorisable */
        for (; i < G; c = 0) {
            const int64_t n = (G - i) < (C - c) ? (G - i) : (C - c);
            for (int64_t t = 0; t < n; ++t) o[i + t] = (l + (float)q[i + t] * s) * scale[c + t] + shift[c + t];
            i += n;
        }
    }
    while (i < G) { /* runs of one channel: y = a + q * b, vectorisable */
        const int64_t n = (G - i) < (inner - r) ? (G - i) : (inner - r);
        const float sc = scale ? scale[c] : 1.0f, sh = shift ? shift[c] : 0.0f;
        const float a0 = l * sc + sh, b0 = s * sc;
        for (int64_t t = 0; t < n; ++t) o[i + t] = a0 + (float)q[i + t] * b0;
        i += n;
        r = 0;
        if (++c == C) c = 0;
    }
}

/* o[i] zeroed where bit i0 + i of a 1-bit mask (NumPy packbits order) is clear; i0 and G are multiples of 8, so
 * the group covers whole mask bytes. */
static void mask_group(const uint8_t *mask, int64_t i0, int64_t G, float *o) {
    const uint8_t *mb = mask + (i0 >> 3);
    for (int64_t t = 0; t < G; t += 8) {
        const float *f = MASK_LUT[mb[t >> 3]];
        for (int bit = 0; bit < 8; ++bit) o[t + bit] *= f[bit];
    }
}

/* The same group codes of a per-channel affine image of a tensor in its memory order, v = (x - shift[c]) * scale[c]
 * with c = (i / inner) % C (NCHW-contiguous: inner = H * W; channels-last: inner = 1) -- a BatchNorm input's xhat
 * without materialising it (leanprop.ops.bn_units) -- and the decode of such codes back through an affine,
 * y = (lo + q * step) * scale[c] + shift[c] (+ addend[i], a residual branch, fp32 in the same memory order),
 * optionally zeroed where a 1-bit mask (bit 7 - i % 8 of byte i / 8, as NumPy's packbits, same memory order) is
 * clear: a ReLU of a rebuilt BN output, or of BN output + identity, in one pass. x and y are fp32 or bf16.
 * numel must be a multiple of G. */
#define DEFINE_AFFINE(T_, SUF, LOAD, STORE)                                                                    \
void group_encode_affine_##SUF(const T_ *x, const float *shift, const float *scale, int64_t C, int64_t inner,  \
                               const uint64_t *seeds, int64_t ngroups, int64_t G, int bits, uint8_t *packed,    \
                               float *lo_out, float *step_out, int nt) {                                        \
    const int k = 8 / bits;                                                                                     \
    const float levels = (float)((1 << bits) - 1);                                                              \
    _Pragma("omp parallel num_threads(nt)")                                                                     \
    {                                                                                                           \
        uint8_t q[4096];                                                                                        \
        float v[4096];                                                                                          \
        _Pragma("omp for schedule(static)")                                                                     \
        for (int64_t g = 0; g < ngroups; ++g) {                                                                 \
            const int64_t i0 = g * G;                                                                           \
            int64_t c = (i0 / inner) % C, r = i0 % inner, i = 0;                                                \
            if (inner == 1) /* channels-last: runs of consecutive channels, vectorisable */                      \
                for (; i < G; c = 0) {                                                                          \
                    const int64_t n = (G - i) < (C - c) ? (G - i) : (C - c);                                    \
                    for (int64_t t = 0; t < n; ++t)                                                             \
                        v[i + t] = (LOAD(x, i0 + i + t) - shift[c + t]) * scale[c + t];                         \
                    i += n;                                                                                     \
                }                                                                                               \
            while (i < G) { /* runs of one channel */                                                           \
                const int64_t n = (G - i) < (inner - r) ? (G - i) : (inner - r);                                \
                const float sh = shift[c], sc = scale[c];                                                       \
                for (int64_t t = 0; t < n; ++t) v[i + t] = (LOAD(x, i0 + i + t) - sh) * sc;                      \
                i += n;                                                                                         \
                r = 0;                                                                                          \
                if (++c == C) c = 0;                                                                            \
            }                                                                                                   \
            float lo, hi;                                                                                       \
            group_minmax(v, G, &lo, &hi);                                                                       \
            const float step = quantize_group(v, G, lo, hi, levels, seeds ? seeds + g : 0, 0, q);               \
            pack_chunk(q, G, bits, packed + g * (G / k));                                                       \
            lo_out[g] = lo;                                                                                     \
            step_out[g] = step;                                                                                 \
        }                                                                                                       \
    }                                                                                                           \
}                                                                                                               \
void group_decode_affine_##SUF(const uint8_t *packed, const float *lo, const float *step, int64_t ngroups,     \
                               int64_t G, int bits, const float *scale, const float *shift, int64_t C,          \
                               int64_t inner, const float *addend, const uint8_t *mask, const uint8_t *above,   \
                               float clo, float chi, T_ *out, int nt) {                                        \
    const int k = 8 / bits;                                                                                     \
    _Pragma("omp parallel num_threads(nt)")                                                                     \
    {                                                                                                           \
        uint8_t q[4096];                                                                                        \
        float o[4096];                                                                                          \
        _Pragma("omp for schedule(static)")                                                                     \
        for (int64_t g = 0; g < ngroups; ++g) {                                                                 \
            const int64_t i0 = g * G;                                                                           \
            unpack_chunk(packed + g * (G / k), G, bits, q);                                                     \
            affine_group(q, lo[g], step[g], scale, shift, C, inner, i0, G, o);                                  \
            if (addend) for (int64_t t = 0; t < G; ++t) o[t] += addend[i0 + t];                                 \
            if (mask && above) { /* a clamp: o inside (clo, chi), else chi where `above` is set, else clo */    \
                const uint8_t *mb = mask + (i0 >> 3), *ab = above + (i0 >> 3);                                  \
                for (int64_t t = 0; t < G; t += 8) {                                                            \
                    const float *f = MASK_LUT[mb[t >> 3]], *h = MASK_LUT[ab[t >> 3]];                           \
                    for (int bit = 0; bit < 8; ++bit)                                                           \
                        o[t + bit] = o[t + bit] * f[bit] + (1.0f - f[bit]) * (clo + h[bit] * (chi - clo));      \
                }                                                                                               \
            } else if (mask) {                                                                                  \
                mask_group(mask, i0, G, o);                                                                     \
            }                                                                                                   \
            for (int64_t t = 0; t < G; ++t) STORE(out, i0 + t, o[t]);                                           \
        }                                                                                                       \
    }                                                                                                           \
}
DEFINE_AFFINE(float, f32, f32_load, f32_store)
DEFINE_AFFINE(uint16_t, bf16, bf16_load, bf16_store)

/* A chain of post-activation residual outputs rebuilt in one pass: acc = base (or 0), then for each level L
 * (innermost first) acc = ReLU_L((lo + q * step) * scale[c] + shift[c] + acc), the ReLU a 1-bit mask (none: no
 * ReLU); the same arithmetic, level by level, as group_decode_affine_f32 with acc as its addend, without writing
 * the levels in between. `levels` holds 7 int64 per level: packed, lo, step, scale, shift, mask addresses (0:
 * none) and bits. All levels share the shape, layout and group G. */
void group_decode_chain_f32(const int64_t *levels, int nlev, int64_t ngroups, int64_t G, int64_t C, int64_t inner,
                            const float *base, float *out, int nt) {
    #pragma omp parallel num_threads(nt)
    {
        uint8_t q[4096];
        float buf_a[4096], buf_b[4096];
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; ++g) {
            const int64_t i0 = g * G;
            float *acc = buf_a, *o = buf_b;
            for (int64_t t = 0; t < G; ++t) acc[t] = base ? base[i0 + t] : 0.0f;
            for (int L = 0; L < nlev; ++L) {
                const int64_t *lv = levels + 7 * L;
                const int bits = (int)lv[6], k = 8 / bits;
                const float *lo = (const float *)lv[1], *step = (const float *)lv[2];
                unpack_chunk((const uint8_t *)lv[0] + g * (G / k), G, bits, q);
                affine_group(q, lo[g], step[g], (const float *)lv[3], (const float *)lv[4], C, inner, i0, G, o);
                for (int64_t t = 0; t < G; ++t) o[t] += acc[t];
                if (lv[5]) mask_group((const uint8_t *)lv[5], i0, G, o);
                float *done = o; /* this level's value is the next one's addend */
                o = acc;
                acc = done;
            }
            for (int64_t t = 0; t < G; ++t) out[i0 + t] = acc[t];
        }
    }
}

/* A 1-bit mask (NumPy packbits order) as values: out[i] = bit ? inside : outside, in one pass. */
#define DEFINE_MASK_VALUES(T_, SUF, STORE)                                                                    \
void mask_values_##SUF(const uint8_t *bits, int64_t n, float inside, float outside, T_ *out, int nt) {      \
    const int64_t full = n / 8;                                                                               \
    const float d = inside - outside;                                                                         \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t j = 0; j < full; ++j) {                                                                    \
        const float *f = MASK_LUT[bits[j]];                                                                   \
        for (int t = 0; t < 8; ++t) STORE(out, j * 8 + t, outside + f[t] * d);                              \
    }                                                                                                         \
    for (int64_t i = full * 8; i < n; ++i)                                                                    \
        STORE(out, i, ((bits[full] >> (7 - (i - full * 8))) & 1) ? inside : outside);                        \
}
DEFINE_MASK_VALUES(float, f32, f32_store)
DEFINE_MASK_VALUES(uint16_t, bf16, bf16_store)
