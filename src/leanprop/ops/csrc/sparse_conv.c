/* Sparse-weight direct convolution for SWAT's unstructured layers (CPU, OpenMP, AVX-512/AVX2 through GCC vector
 * types).
 *
 * Layout "NB" (batch innermost): a 4-D activation is held as (C, H, W, L), L = the batch rounded up to a multiple
 * of 8 lanes, zero beyond the batch (tiles of 64, 16 and 8 lanes).  One weight value then multiplies one contiguous L-vector per output pixel,
 * so a convolution with a sparse weight is a loop over the weight's non-zeros, each a broadcast and a few
 * vector FMAs into register-held output tiles (the scheme of Nikdan et al., "SparseProp", ICML 2023, Sec. 3;
 * written here from the formula, not from their code).
 *
 * One kernel, `sparse_corr_nb`, serves the forward and the input gradient.  For output channel (row) rho and
 * pixel (t, u):
 *     out[rho, t*so + r0, u*so + c0, :] = sum_e val[e] * in[off[e] + (t*si*Wp + u*si) * L + lane]
 * where e runs over row rho of a CSR matrix whose offsets already hold the (channel, kh, kw) part.
 *   forward  Y = conv(X, W_s):       rows = output channels, in = X padded by the conv padding, si = stride, so = 1.
 *   input gradient dX = conv_T(G, W_s): one call per stride phase (r, rw) of the output pixels
 *       (ih + p = s*t + r), rows = input channels, entries the (co, kh, kw) with kh = s*j + r, kw = s*jw + rw,
 *       in = G padded by (Jt, Jl) = ((KH-1)/s, (KW-1)/s) on the top/left, si = 1, so = s.
 * Results equal the dense convolution up to summation order (this file is compiled with FMA contraction).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

static inline v16 ld(const float *p) { return *(const v16u *)p; }
static inline void st(float *p, v16 v) { *(v16u *)p = v; }
static inline v8 ld8(const float *p) { return *(const v8u *)p; }
static inline void st8(float *p, v8 v) { *(v8u *)p = v; }

/* ---- layout changes: NCHW / NHWC <-> NB ------------------------------------------------------------------ */

/* dst[j*ds + i] = src[i*ss + j] (+ rb[i] when rb is not NULL) for i < rows, j < cols (both <= 16). */
static inline void transpose16(const float *src, int64_t ss, float *dst, int64_t ds, int rows, int cols,
                               const float *rb) {
#ifdef __AVX512F__
    const __mmask16 cm = (__mmask16)((1u << cols) - 1u), rm = (__mmask16)((1u << rows) - 1u);
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) {
        r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ss) : _mm512_setzero_ps();
        if (rb && i < rows) r[i] = _mm512_add_ps(r[i], _mm512_set1_ps(rb[i]));
    }
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {
        r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) { /* r[4k + j], lane l: column 4l + j of rows 4k..4k+3 */
        __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        __m512 col[4] = {_mm512_shuffle_f32x4(v0, w0, 0x88), _mm512_shuffle_f32x4(v1, w1, 0x88),
                         _mm512_shuffle_f32x4(v0, w0, 0xDD), _mm512_shuffle_f32x4(v1, w1, 0xDD)};
        for (int l = 0; l < 4; ++l)
            if (4 * l + j < cols) _mm512_mask_storeu_ps(dst + (4 * l + j) * ds, rm, col[l]);
    }
#else
    for (int j = 0; j < cols; ++j)
        for (int i = 0; i < rows; ++i) dst[j * ds + i] = src[i * ss + j] + (rb ? rb[i] : 0.0f);
#endif
}

/* out (C, Hp, Wp, L) = x (N, C, H, W) [cl = 0] or (N, H, W, C) [cl = 1] at (pt + h, pl + w), zero elsewhere
 * (padding, and the lanes beyond the batch).  16x16 blocks are transposed in registers. */
void nb_pack_f32(const float *x, int64_t N, int64_t C, int64_t H, int64_t W, int cl, int64_t pt, int64_t pl,
                 int64_t Hp, int64_t Wp, int64_t L, float *out, int nt) {
    const int64_t plane = Hp * Wp * L;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t ch = 0; ch < C * Hp; ++ch) {
            int64_t hp = ch % Hp, h = hp - pt;
            float *o = out + ch * Wp * L;
            if (h < 0 || h >= H) { memset(o, 0, (size_t)(Wp * L) * sizeof(float)); continue; }
            for (int64_t wp = 0; wp < Wp; ++wp) {
                int64_t w = wp - pl;
                if (w < 0 || w >= W) memset(o + wp * L, 0, (size_t)L * sizeof(float));
                else if (N < L) memset(o + wp * L + N, 0, (size_t)(L - N) * sizeof(float));
            }
        }
        if (cl) {
#pragma omp for schedule(static)
            for (int64_t hw = 0; hw < H * W; ++hw) {
                float *o = out + ((pt + hw / W) * Wp + pl + hw % W) * L;
                for (int64_t n0 = 0; n0 < N; n0 += 16)
                    for (int64_t c0 = 0; c0 < C; c0 += 16)
                        transpose16(x + (n0 * H * W + hw) * C + c0, H * W * C, o + c0 * plane + n0, plane,
                                    (int)(N - n0 < 16 ? N - n0 : 16), (int)(C - c0 < 16 ? C - c0 : 16), NULL);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t ch = 0; ch < C * H; ++ch) {
                int64_t c = ch / H, h = ch % H;
                float *o = out + c * plane + ((pt + h) * Wp + pl) * L;
                for (int64_t n0 = 0; n0 < N; n0 += 16)
                    for (int64_t w0 = 0; w0 < W; w0 += 16)
                        transpose16(x + ((n0 * C + c) * H + h) * W + w0, C * H * W, o + w0 * L + n0, L,
                                    (int)(N - n0 < 16 ? N - n0 : 16), (int)(W - w0 < 16 ? W - w0 : 16), NULL);
            }
        }
    }
}

/* out (N, C, H, W) [cl = 0] or (N, H, W, C) [cl = 1] = y (C, H, W, L) (+ bias[c] when bias is not NULL). */
void nb_unpack_f32(const float *y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t L, int cl,
                   const float *bias, float *out, int nt) {
    const int64_t plane = H * W * L;
    if (cl) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t hw = 0; hw < H * W; ++hw)
            for (int64_t c0 = 0; c0 < C; c0 += 16)
                for (int64_t n0 = 0; n0 < N; n0 += 16)
                    transpose16(y + c0 * plane + hw * L + n0, plane, out + (n0 * H * W + hw) * C + c0, H * W * C,
                                (int)(C - c0 < 16 ? C - c0 : 16), (int)(N - n0 < 16 ? N - n0 : 16),
                                bias ? bias + c0 : NULL);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ch = 0; ch < C * H; ++ch) {
        int64_t c = ch / H;
        float b[16];
        for (int i = 0; i < 16; ++i) b[i] = bias ? bias[c] : 0.0f;
        for (int64_t w0 = 0; w0 < W; w0 += 16)
            for (int64_t n0 = 0; n0 < N; n0 += 16)
                transpose16(y + ch * W * L + w0 * L + n0, L, out + (n0 * C * H + ch) * W + w0, C * H * W,
                            (int)(W - w0 < 16 ? W - w0 : 16), (int)(N - n0 < 16 ? N - n0 : 16), bias ? b : NULL);
    }
}

/* ---- CSR forms of a sparse weight w (Co, Ci, KH, KW) ------------------------------------------------------- */

/* Forward: rows co, entries (ci, kh, kw) with w != 0, offset ((ci*Hp + kh*dh)*Wp + kw*dw)*L.
 * count = 1: only rowptr[co + 1] = entries of row co; count = 0: rowptr is the prefix sum, fill off/val. */
void csr_forward_f32(const float *w, int64_t Co, int64_t Ci, int64_t KH, int64_t KW, int64_t dh, int64_t dw,
                     int64_t Hp, int64_t Wp, int64_t L, int count, int64_t *rowptr, int64_t *off, float *val,
                     int nt) {
    int64_t K = Ci * KH * KW;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t co = 0; co < Co; ++co) {
        const float *r = w + co * K;
        if (count) {
            int64_t c = 0;
            for (int64_t k = 0; k < K; ++k) c += r[k] != 0.0f;
            rowptr[co + 1] = c;
            continue;
        }
        int64_t e = rowptr[co];
        for (int64_t ci = 0; ci < Ci; ++ci)
            for (int64_t kh = 0; kh < KH; ++kh)
                for (int64_t kw = 0; kw < KW; ++kw) {
                    float v = r[(ci * KH + kh) * KW + kw];
                    if (v == 0.0f) continue;
                    off[e] = ((ci * Hp + kh * dh) * Wp + kw * dw) * L;
                    val[e++] = v;
                }
    }
}

/* Input gradient, stride phase (r, rw) of stride s: rows ci, entries (co, kh = s*j + r, kw = s*jw + rw) with
 * w != 0, offset ((co*Gh + Jt - j)*Gw + Jl - jw)*L.  count as in csr_forward_f32. */
void csr_grad_input_f32(const float *w, int64_t Co, int64_t Ci, int64_t KH, int64_t KW, int64_t s, int64_t r,
                        int64_t rw, int64_t Jt, int64_t Jl, int64_t Gh, int64_t Gw, int64_t L, int count,
                        int64_t *rowptr, int64_t *off, float *val, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t ci = 0; ci < Ci; ++ci) {
        int64_t e = count ? 0 : rowptr[ci];
        for (int64_t co = 0; co < Co; ++co)
            for (int64_t kh = r; kh < KH; kh += s)
                for (int64_t kw = rw; kw < KW; kw += s) {
                    float v = w[((co * Ci + ci) * KH + kh) * KW + kw];
                    if (v == 0.0f) continue;
                    if (!count) {
                        off[e] = ((co * Gh + Jt - kh / s) * Gw + Jl - kw / s) * L;
                        val[e] = v;
                    }
                    ++e;
                }
        if (count) rowptr[ci + 1] = e;
    }
}

/* ---- the sparse correlation ------------------------------------------------------------------------------- */

#define P4 6  /* pixels per tile when 64 lanes (4 vectors) are computed at once: 24 accumulators */
#define P1 12 /* pixels per tile for a 16-lane remainder */
#define P8 24 /* pixels per tile for an 8-lane remainder (a batch of 8 or less, or 8 more than 16s) */

static inline void tile4_acc(const float *const *ip, float *const *op, int np, const int64_t *off,
                             const float *val, int64_t e0, int64_t e1, int first) {
    v16 a[P4][4];
    for (int p = 0; p < P4; ++p)
        for (int z = 0; z < 4; ++z) a[p][z] = first || p >= np ? (v16){0} : ld(op[p] + 16 * z);
    for (int64_t e = e0; e < e1; ++e) {
        const v16 v = (v16){0} + val[e];
        const int64_t o = off[e];
        for (int p = 0; p < P4; ++p)
            for (int z = 0; z < 4; ++z) a[p][z] += v * ld(ip[p] + o + 16 * z);
    }
    for (int p = 0; p < np; ++p)
        for (int z = 0; z < 4; ++z) st(op[p] + 16 * z, a[p][z]);
}

static inline void tile1_acc(const float *const *ip, float *const *op, int np, const int64_t *off,
                             const float *val, int64_t e0, int64_t e1, int first) {
    v16 a[P1];
    for (int p = 0; p < P1; ++p) a[p] = first || p >= np ? (v16){0} : ld(op[p]);
    for (int64_t e = e0; e < e1; ++e) {
        const v16 v = (v16){0} + val[e];
        const int64_t o = off[e];
        for (int p = 0; p < P1; ++p) a[p] += v * ld(ip[p] + o);
    }
    for (int p = 0; p < np; ++p) st(op[p], a[p]);
}

static inline void tile8_acc(const float *const *ip, float *const *op, int np, const int64_t *off,
                             const float *val, int64_t e0, int64_t e1, int first) {
    v8 a[P8];
    for (int p = 0; p < P8; ++p) a[p] = first || p >= np ? (v8){0} : ld8(op[p]);
    for (int64_t e = e0; e < e1; ++e) {
        const v8 v = (v8){0} + val[e];
        const int64_t o = off[e];
        for (int p = 0; p < P8; ++p) a[p] += v * ld8(ip[p] + o);
    }
    for (int p = 0; p < np; ++p) st8(op[p], a[p]);
}

/* See the header.  in: (., ., Wp, L); out: (nrows, ., out_w, L) with out_plane floats per row; pixels (t, u) in
 * [T0, T1) x [U0, U1).  The entries of a row must be sorted by offset; they are taken in blocks of offsets
 * [b*blk_span, (b+1)*blk_span) (blk_span <= 0: one block), all tiles and rows of one block before the next, so that
 * the input a block reads stays in cache (the first block writes the outputs, the others add to them). */
void sparse_corr_nb_f32(const float *in, int64_t Wp, int64_t L, int64_t si, const int64_t *rowptr,
                        const int64_t *off, const float *val, int64_t nrows, int64_t T0, int64_t T1, int64_t U0,
                        int64_t U1, float *out, int64_t out_plane, int64_t out_w, int64_t so, int64_t r0, int64_t c0,
                        int64_t blk_span, int64_t nblk, int64_t *blkptr, int nt) {
    int64_t U = U1 - U0, npix = (T1 - T0) * U;
    if (npix <= 0 || nrows <= 0) return;
    if (blk_span <= 0) nblk = 1;
    /* blkptr (nrows, nblk + 1): the entry range of each block of each row */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t rho = 0; rho < nrows; ++rho) {
        int64_t e = rowptr[rho], end = rowptr[rho + 1];
        int64_t *bp = blkptr + rho * (nblk + 1);
        bp[0] = e;
        for (int64_t b = 1; b < nblk; ++b) {
            while (e < end && off[e] < b * blk_span) ++e;
            bp[b] = e;
        }
        bp[nblk] = end;
    }
    int64_t ntile4 = (npix + P4 - 1) / P4, ntile1 = (npix + P1 - 1) / P1, ntile8 = (npix + P8 - 1) / P8;
    int64_t n64 = L / 64, rem = (L % 64) / 16, r8 = (L % 16) / 8; /* L: a multiple of 8 */
    int64_t per_row = ntile4 * n64 + ntile1 * rem + ntile8 * r8; /* work items of one row */
    for (int64_t b = 0; b < nblk; ++b) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t item = 0; item < nrows * per_row; ++item) {
            int64_t k = item / nrows, rho = item % nrows; /* rows innermost: one tile's input stays in cache */
            int kind = k < ntile4 * n64 ? 4 : k < ntile4 * n64 + ntile1 * rem ? 1 : 8; /* lanes / 16 per tile */
            int64_t P = kind == 4 ? P4 : kind == 1 ? P1 : P8, tile, lane;
            if (kind == 4) { tile = k / n64; lane = 64 * (k % n64); }
            else if (kind == 1) { k -= ntile4 * n64; tile = k / rem; lane = 64 * n64 + 16 * (k % rem); }
            else { tile = k - ntile4 * n64 - ntile1 * rem; lane = L - 8; }
            const float *ip[P8];
            float *op[P8];
            int np = 0;
            for (int p = 0; p < P; ++p) {
                int64_t q = tile * P + p;
                if (q < npix) np = p + 1;
                else q = npix - 1; /* a tail tile recomputes the last pixel and does not store it */
                int64_t t = T0 + q / U, u = U0 + q % U;
                ip[p] = in + (t * si * Wp + u * si) * L + lane;
                op[p] = out + rho * out_plane + ((t * so + r0) * out_w + u * so + c0) * L + lane;
            }
            const int64_t *bp = blkptr + rho * (nblk + 1);
            if (kind == 4) tile4_acc(ip, op, np, off, val, bp[b], bp[b + 1], b == 0);
            else if (kind == 1) tile1_acc(ip, op, np, off, val, bp[b], bp[b + 1], b == 0);
            else tile8_acc(ip, op, np, off, val, bp[b], bp[b + 1], b == 0);
        }
    }
}

/* ---- pointwise (1x1, stride 1) convolution in NCHW: the pixels innermost --------------------------------------
 *
 *     y[n, m, p] = bias[m] + sum_e val[e] * x[n, off[e] + p]        (off[e] = the entry's channel times P)
 *
 * the forward (rows = output channels, x = X) and the input gradient (rows = input channels, the CSR of W^T,
 * x = G) of a 1x1 convolution, read and written in the tensors' own NCHW layout: no layout change at all.  Each
 * task is (image, a chunk of up to 128 pixels, a block of rows): one non-zero weight multiplies up to 8 vectors
 * of its input row, accumulated in registers, and the chunk's slab of x (rows x 512 bytes) stays in the L2 cache
 * for every row of the block.  A chunk's last vector may be partial (masked loads and stores). */

static inline v16 ldm(const float *p, int cnt) {
#ifdef __AVX512F__
    return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1u), p);
#else
    v16 v = {0};
    memcpy(&v, p, (size_t)cnt * sizeof(float));
    return v;
#endif
}

static inline void stm(float *p, v16 v, int cnt) {
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << cnt) - 1u), (__m512)v);
#else
    memcpy(p, &v, (size_t)cnt * sizeof(float));
#endif
}

static inline void pw_rows(const float *xb, float *yb, int64_t P, const int64_t *rowptr, const int64_t *off,
                           const float *val, const float *bias, int64_t m0, int64_t m1, int nv, int tail) {
    for (int64_t m = m0; m < m1; ++m) {
        v16 a[8];
        const v16 b0 = (v16){0} + (bias ? bias[m] : 0.0f);
        for (int z = 0; z < nv; ++z) a[z] = b0;
        for (int64_t e = rowptr[m]; e < rowptr[m + 1]; ++e) {
            const v16 v = (v16){0} + val[e];
            const float *xr = xb + off[e];
            for (int z = 0; z < nv - 1; ++z) a[z] += v * ld(xr + 16 * z);
            a[nv - 1] += v * (tail == 16 ? ld(xr + 16 * (nv - 1)) : ldm(xr + 16 * (nv - 1), tail));
        }
        float *yr = yb + m * P;
        for (int z = 0; z < nv - 1; ++z) st(yr + 16 * z, a[z]);
        if (tail == 16) st(yr + 16 * (nv - 1), a[nv - 1]);
        else stm(yr + 16 * (nv - 1), a[nv - 1], tail);
    }
}

#define PW_ROWS(NV) \
    static void pw_rows##NV(const float *xb, float *yb, int64_t P, const int64_t *rp, const int64_t *off, \
                            const float *val, const float *bias, int64_t m0, int64_t m1, int tail) { \
        pw_rows(xb, yb, P, rp, off, val, bias, m0, m1, NV, tail); }
PW_ROWS(1)
PW_ROWS(2)
PW_ROWS(3)
PW_ROWS(4)
PW_ROWS(5)
PW_ROWS(6)
PW_ROWS(7)
PW_ROWS(8)
typedef void (*pw_fn)(const float *, float *, int64_t, const int64_t *, const int64_t *, const float *,
                      const float *, int64_t, int64_t, int);

/* x: N images of xs floats, each (K, P); y: N images of ys floats, each (M, P); rows m of the CSR (rowptr, off,
 * val) with off = k * P.  bias may be NULL. */
static const pw_fn pw_fns[9] = {NULL, pw_rows1, pw_rows2, pw_rows3, pw_rows4, pw_rows5, pw_rows6, pw_rows7,
                                 pw_rows8};

/* The tasks of a pointwise call: (image n, 128-pixel chunk c, block mb of `per` rows), enough for every thread. */
typedef struct { int64_t nchunk, mblk, per, ntask; } pw_split;
enum { PW_CHUNK = 128 };

static pw_split pw_tasks(int64_t N, int64_t P, int64_t M, int nt) {
    pw_split t;
    t.nchunk = (P + PW_CHUNK - 1) / PW_CHUNK;
    t.mblk = (4 * (int64_t)nt + N * t.nchunk - 1) / (N * t.nchunk);
    if (t.mblk < 1) t.mblk = 1;
    if (t.mblk > (M + 7) / 8) t.mblk = (M + 7) / 8;
    t.per = (M + t.mblk - 1) / t.mblk;
    t.ntask = N * t.nchunk * t.mblk;
    return t;
}

/* task t's image n, first pixel p0 and pixel count len, rows [m0, m1) */
static inline void pw_task(pw_split s, int64_t t, int64_t P, int64_t M, int64_t *n, int64_t *p0, int64_t *len,
                           int64_t *m0, int64_t *m1) {
    const int64_t mb = t % s.mblk, c = (t / s.mblk) % s.nchunk;
    *n = t / (s.mblk * s.nchunk);
    *p0 = c * PW_CHUNK;
    *len = P - *p0 < PW_CHUNK ? P - *p0 : PW_CHUNK;
    *m0 = mb * s.per;
    *m1 = *m0 + s.per < M ? *m0 + s.per : M;
}

void pointwise_nchw_f32(const float *x, int64_t N, int64_t xs, int64_t P, const int64_t *rowptr, const int64_t *off,
                        const float *val, int64_t M, const float *bias, float *y, int64_t ys, int nt) {
    if (N <= 0 || P <= 0 || M <= 0) return;
    const pw_split s = pw_tasks(N, P, M, nt);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t t = 0; t < s.ntask; ++t) {
        int64_t n, p0, len, m0, m1;
        pw_task(s, t, P, M, &n, &p0, &len, &m0, &m1);
        int nv = (int)((len + 15) / 16), tail = (int)(len - 16 * (nv - 1));
        pw_fns[nv](x + n * xs + p0, y + n * ys + p0, P, rowptr, off, val, bias, m0, m1, tail);
    }
}

/* bf16 <-> fp32: a bf16 is the high half of an fp32 (widening is exact); narrowing rounds to nearest, ties to
 * even, and keeps a NaN a NaN. */
static inline float bf2f(uint16_t h) {
    union { uint32_t u; float f; } c = {(uint32_t)h << 16};
    return c.f;
}

static inline uint16_t f2bf(float f) {
    union { float f; uint32_t u; } c = {f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* pointwise_nchw_f32 on bf16 x and y (N images of K rows of P pixels, and of M rows): each task widens its
 * chunk's slab of x (K rows x up to 128 pixels) into a per-thread fp32 buffer, accumulates its rows in fp32 as
 * above, and rounds them into y; the CSR's offsets are k * 128 (the buffer's row stride), its values fp32. */
void pointwise_nchw_bf16(const uint16_t *x, int64_t N, int64_t K, int64_t xs, int64_t P, const int64_t *rowptr,
                         const int64_t *off, const float *val, int64_t M, const float *bias, uint16_t *y,
                         int64_t ys, int nt) {
    if (N <= 0 || P <= 0 || M <= 0) return;
    const pw_split s = pw_tasks(N, P, M, nt);
    const int64_t chunk = PW_CHUNK;
#pragma omp parallel num_threads(nt)
    {
        float *xin = (float *)malloc((size_t)(K * chunk) * sizeof(float));
        float *yout = (float *)malloc((size_t)(s.per * chunk) * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < s.ntask; ++t) {
            int64_t n, p0, len, m0, m1;
            pw_task(s, t, P, M, &n, &p0, &len, &m0, &m1);
            int nv = (int)((len + 15) / 16), tail = (int)(len - 16 * (nv - 1));
            for (int64_t k = 0; k < K; ++k) {
                const uint16_t *src = x + n * xs + k * P + p0;
                float *dst = xin + k * chunk;
                for (int64_t i = 0; i < len; ++i) dst[i] = bf2f(src[i]);
            }
            pw_fns[nv](xin, yout, chunk, rowptr + m0, off, val, bias ? bias + m0 : NULL, 0, m1 - m0, tail);
            for (int64_t m = m0; m < m1; ++m) {
                const float *src = yout + (m - m0) * chunk;
                uint16_t *dst = y + n * ys + m * P + p0;
                for (int64_t i = 0; i < len; ++i) dst[i] = f2bf(src[i]);
            }
        }
        free(xin);
        free(yout);
    }
}

/* ---- the weight gradient from the non-zeros of X_s ----------------------------------------------------------
 *
 *     dW[co, ci, kh, kw] = sum_n sum_(oh, ow) G[n, co, oh, ow] * X_s[n, ci, oh*s - ph + kh, ow*s - pw + kw]
 *
 * driven by the kept entries of X (|x| >= thr, x != 0): an entry at (ih, iw) adds x * G[n, oh, ow, :] to
 * dW[ci, kh, kw, :] for every tap with oh = (ih + ph - kh) / s, ow = (iw + pw - kw) / s integral.  With
 * q = (ih + ph) / s, r = (ih + ph) % s (the entry's stride phase) those taps are kh = r + j*s, oh = q - j.
 * G is channels-last and zero-padded, (N, GH, GW, Cp) with Cp a multiple of 16 and row q of X at row q + A
 * (A, B top/left), so that every tap reads memory and a tap outside G adds zeros (no branches).
 *
 * Images are taken in blocks of nb, so that the block of G they read stays in the L2 cache; threads split the
 * input channels (each owns its rows of dW).  Per (image block, ci) the kept entries are listed by phase, then
 * every tap of the phase runs over the list with 16*Z output channels held in registers.  out is
 * (Ci, KH, KW, Cp), overwritten. */

static inline void dw_tap(float *acc_p, const float *g, const int64_t *off, const float *val, int64_t e0,
                          int64_t e1, int64_t d, int Z) {
    v16 a[8], b[8];
    for (int z = 0; z < Z; ++z) { a[z] = ld(acc_p + 16 * z); b[z] = (v16){0}; }
    int64_t e = e0;
    for (; e + 1 < e1; e += 2) { /* two chains: an FMA's latency is hidden behind the other's */
        const v16 v0 = (v16){0} + val[e], v1 = (v16){0} + val[e + 1];
        const float *p0 = g + off[e] - d, *p1 = g + off[e + 1] - d;
        for (int z = 0; z < Z; ++z) { a[z] += v0 * ld(p0 + 16 * z); b[z] += v1 * ld(p1 + 16 * z); }
    }
    if (e < e1) {
        const v16 v0 = (v16){0} + val[e];
        const float *p0 = g + off[e] - d;
        for (int z = 0; z < Z; ++z) a[z] += v0 * ld(p0 + 16 * z);
    }
    for (int z = 0; z < Z; ++z) st(acc_p + 16 * z, a[z] + b[z]);
}

#define DW_TAP(Zc) \
    static void dw_tap##Zc(float *acc_p, const float *g, const int64_t *off, const float *val, int64_t e0, \
                           int64_t e1, int64_t d) { dw_tap(acc_p, g, off, val, e0, e1, d, Zc); }
DW_TAP(8)
DW_TAP(4)
DW_TAP(2)
DW_TAP(1)

/* The packed X_s of SWAT's compressed storage (ops/sparse_storage.py): a 1-bit mask over the NCHW elements (element
 * i at bit 7 - i % 8 of byte i / 8) and the kept values in element order.  plane_starts gives each (n, ci) plane's
 * first value index: the set bits before it. */
void plane_starts(const uint8_t *bits, int64_t nplanes, int64_t HW, int64_t *pstart) {
    const int64_t numel = nplanes * HW, nw = numel / 64 + 1;
    int64_t *cum = (int64_t *)malloc((size_t)(nw + 1) * sizeof(int64_t)); /* set bits before word w (64 elements) */
    cum[0] = 0;
    for (int64_t w = 0; w < nw; ++w) {
        int64_t c = 0;
        if ((w + 1) * 64 <= numel) {
            uint64_t v;
            memcpy(&v, bits + w * 8, 8);
            c = __builtin_popcountll(v);
        } else
            for (int64_t b = w * 8; b < (numel + 7) / 8; ++b) c += __builtin_popcount(bits[b]);
        cum[w + 1] = cum[w] + c;
    }
    for (int64_t p = 0; p < nplanes; ++p) { /* before element f: its word's count, whole bytes, the byte's top bits */
        const int64_t f = p * HW;
        int64_t c = cum[f >> 6];
        for (int64_t b = (f >> 6) * 8; b < (f >> 3); ++b) c += __builtin_popcount(bits[b]);
        if (f & 7) c += __builtin_popcount((unsigned)bits[f >> 3] >> (8 - (f & 7)));
        pstart[p] = c;
    }
    free(cum);
}

/* The mask bits of elements [f, f + len) (len <= 64) at the top of a word: element f at bit 63.  nbytes bounds
 * the reads (the mask's size). */
static inline uint64_t bits_at(const uint8_t *bits, int64_t f, int len, int64_t nbytes) {
    const int64_t b = f >> 3;
    const int o = (int)(f & 7);
    uint8_t buf[9] = {0};
    memcpy(buf, bits + b, (size_t)(b + 9 <= nbytes ? 9 : nbytes - b));
    uint64_t w;
    memcpy(&w, buf, 8);
    w = __builtin_bswap64(w); /* byte 0 on top: bit 7 of byte 0 is bit 63 */
    if (o) w = (w << o) | ((uint64_t)buf[8] >> (8 - o));
    return len == 64 ? w : w & ~(~0ull >> len);
}

/* x is fp32 (bf16 = 0) or bf16 (bf16 = 1, widened as it is listed); everything else fp32.  With bits != NULL, x is
 * the packed X_s's values (pstart: plane_starts), listed from the mask's set bits in one pass, each into its stride
 * phase's region of the list (a phase's region holds every pixel of that phase, so none overflows). */
static inline void grad_weight(const void *x, int bf16, float thr, const uint8_t *bits, const int64_t *pstart,
                               int64_t nbytes, int64_t N, int64_t Ci, int64_t H, int64_t W,
                               const float *g, int64_t GH, int64_t GW, int64_t Cp, int64_t A, int64_t B, int64_t s,
                               int64_t ph, int64_t pw, int64_t KH, int64_t KW, int64_t nb, float *out, int nt) {
    const int64_t HW = H * W, S2 = s * s;
    const float t = thr > 0.0f ? thr : 1.4e-45f; /* |x| >= t; t = the least denormal keeps all non-zeros */
    memset(out, 0, (size_t)(Ci * KH * KW * Cp) * sizeof(float));
    if (nb < 1) nb = 1;
    int64_t *otab = NULL; /* packed: pixel q's offset into an image's padded G, its stride phase, and (tmask) */
    int32_t *ktab = NULL;  /* whether any tap reads it, 64 pixels per word */
    uint64_t *tmask = NULL;
    if (bits) {
        otab = (int64_t *)malloc((size_t)HW * sizeof(int64_t));
        ktab = (int32_t *)malloc((size_t)HW * sizeof(int32_t));
        tmask = (uint64_t *)calloc((size_t)(HW / 64 + 1), sizeof(uint64_t));
        for (int64_t q = 0; q < HW; ++q) {
            const int64_t ih = q / W, iw = q % W;
            otab[q] = (((ih + ph) / s + A) * GW + B + (iw + pw) / s) * Cp;
            const int64_t rh = (ih + ph) % s, rw = (iw + pw) % s;
            ktab[q] = rh < KH && rw < KW ? (int32_t)(rh * s + rw) : -1; /* -1: no tap reads this phase */
            if (ktab[q] >= 0) tmask[q >> 6] |= 0x8000000000000000ull >> (q & 63);
        }
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t *off = (int64_t *)malloc((size_t)(nb * HW + 1) * sizeof(int64_t));
        float *val = (float *)malloc((size_t)(nb * HW + 1) * sizeof(float));
        int64_t *start = (int64_t *)malloc((size_t)(S2 + 1) * sizeof(int64_t)); /* phase k: [start[k], start[k+1]) */
        int64_t *end = (int64_t *)malloc((size_t)(S2 + 1) * sizeof(int64_t));    /* and its end (packed: a cursor) */
        for (int64_t n0 = 0; n0 < N; n0 += nb) {
            int64_t n1 = n0 + nb < N ? n0 + nb : N;
#pragma omp for schedule(static)
            for (int64_t ci = 0; ci < Ci; ++ci) {
                int64_t e = 0;
                if (bits) {
                    for (int64_t rh = 0; rh < s; ++rh) /* region k: (n1 - n0) x its rows x its columns */
                        for (int64_t rw = 0; rw < s; ++rw) {
                            int64_t ih0 = ((rh - ph) % s + s) % s, iw0 = ((rw - pw) % s + s) % s;
                            int64_t rows = ih0 < H ? (H - ih0 + s - 1) / s : 0, cols = iw0 < W ? (W - iw0 + s - 1) / s : 0;
                            start[rh * s + rw] = end[rh * s + rw] = e;
                            e += (n1 - n0) * rows * cols;
                        }
                    for (int64_t n = n0; n < n1; ++n) {
                        const int64_t p = n * Ci + ci, f0 = p * HW, obase = n * GH * GW * Cp;
                        int64_t r = pstart[p];
                        for (int64_t q0 = 0; q0 < HW; q0 += 64) { /* 64 pixels of the plane at once */
                            const int len = HW - q0 < 64 ? (int)(HW - q0) : 64;
                            const uint64_t all = bits_at(bits, f0 + q0, len, nbytes);
                            uint64_t word = all & tmask[q0 >> 6]; /* the pixels some tap reads */
                            while (word) { /* set bits high to low = pixels in order */
                                const int t = __builtin_clzll(word);
                                word &= ~(0x8000000000000000ull >> t);
                                const int64_t q = q0 + t, ee = end[ktab[q]]++;
                                const int64_t v = r + (t ? __builtin_popcountll(all >> (64 - t)) : 0); /* its rank */
                                off[ee] = obase + otab[q];
                                val[ee] = bf16 ? bf2f(((const uint16_t *)x)[v]) : ((const float *)x)[v];
                            }
                            r += __builtin_popcountll(all);
                        }
                    }
                } else {
                for (int64_t rh = 0; rh < s; ++rh)
                    for (int64_t rw = 0; rw < s; ++rw) {
                        start[rh * s + rw] = e;
                        if (rh >= KH || rw >= KW) continue; /* no tap reads this phase (a 1x1 conv, stride 2) */
                        int64_t ih0 = ((rh - ph) % s + s) % s, iw0 = ((rw - pw) % s + s) % s;
                        for (int64_t n = n0; n < n1; ++n) {
                            const int64_t pl = (n * Ci + ci) * HW;
                            for (int64_t ih = ih0; ih < H; ih += s) {
                                const int64_t row = pl + ih * W;
                                int64_t o = ((n * GH + (ih + ph) / s + A) * GW + B + (iw0 + pw) / s) * Cp;
                                for (int64_t iw = iw0; iw < W; iw += s, o += Cp) { /* branch-free: write, keep */
                                    float v = bf16 ? bf2f(((const uint16_t *)x)[row + iw])
                                                   : ((const float *)x)[row + iw];
                                    off[e] = o;
                                    val[e] = v;
                                    e += __builtin_fabsf(v) >= t;
                                }
                            }
                        }
                    }
                start[S2] = e;
                for (int64_t k = 0; k < S2; ++k) end[k] = start[k + 1];
                }
                for (int64_t rh = 0; rh < s; ++rh)
                    for (int64_t rw = 0; rw < s; ++rw) {
                        int64_t e0 = start[rh * s + rw], e1 = end[rh * s + rw];
                        if (e0 == e1) continue;
                        for (int64_t kh = rh; kh < KH; kh += s)
                            for (int64_t kw = rw; kw < KW; kw += s) {
                                int64_t d = ((kh / s) * GW + kw / s) * Cp;
                                float *acc = out + ((ci * KH + kh) * KW + kw) * Cp;
                                int64_t c = 0;
                                for (; c + 128 <= Cp; c += 128) dw_tap8(acc + c, g + c, off, val, e0, e1, d);
                                if (c + 64 <= Cp) { dw_tap4(acc + c, g + c, off, val, e0, e1, d); c += 64; }
                                if (c + 32 <= Cp) { dw_tap2(acc + c, g + c, off, val, e0, e1, d); c += 32; }
                                if (c + 16 <= Cp) { dw_tap1(acc + c, g + c, off, val, e0, e1, d); c += 16; }
                            }
                    }
            }
        }
        free(off);
        free(val);
        free(start);
        free(end);
    }
    free(otab);
    free(ktab);
    free(tmask);
}

void sparse_grad_weight_f32(const float *x, float thr, int64_t N, int64_t Ci, int64_t H, int64_t W,
                            const float *g, int64_t GH, int64_t GW, int64_t Cp, int64_t A, int64_t B, int64_t s,
                            int64_t ph, int64_t pw, int64_t KH, int64_t KW, int64_t nb, float *out, int nt) {
    grad_weight(x, 0, thr, NULL, NULL, 0, N, Ci, H, W, g, GH, GW, Cp, A, B, s, ph, pw, KH, KW, nb, out, nt);
}

void sparse_grad_weight_bf16(const uint16_t *x, float thr, int64_t N, int64_t Ci, int64_t H, int64_t W,
                             const float *g, int64_t GH, int64_t GW, int64_t Cp, int64_t A, int64_t B, int64_t s,
                             int64_t ph, int64_t pw, int64_t KH, int64_t KW, int64_t nb, float *out, int nt) {
    grad_weight(x, 1, thr, NULL, NULL, 0, N, Ci, H, W, g, GH, GW, Cp, A, B, s, ph, pw, KH, KW, nb, out, nt);
}

/* dW from SWAT's packed X_s (bits, values of dtype bf16 ? bf16 : fp32, pstart = plane_starts) without expanding
 * it. */
void sparse_grad_weight_packed(const void *values, int bf16, const uint8_t *bits, const int64_t *pstart, int64_t N,
                               int64_t Ci, int64_t H, int64_t W, const float *g, int64_t GH, int64_t GW, int64_t Cp,
                               int64_t A, int64_t B, int64_t s, int64_t ph, int64_t pw, int64_t KH, int64_t KW,
                               int64_t nb, float *out, int nt) {
    const int64_t nbytes = (N * Ci * H * W + 7) / 8;
    if (bf16)
        grad_weight(values, 1, 0.0f, bits, pstart, nbytes, N, Ci, H, W, g, GH, GW, Cp, A, B, s, ph, pw, KH, KW, nb,
                    out, nt);
    else
        grad_weight(values, 0, 0.0f, bits, pstart, nbytes, N, Ci, H, W, g, GH, GW, Cp, A, B, s, ph, pw, KH, KW, nb,
                    out, nt);
}

/* out (N, GH, GW, Cp) = g (N, C, H, W) [cl = 0] or (N, H, W, C) [cl = 1] at (top + h, left + w), zero elsewhere
 * (the border and the channels from C to Cp): the channels-last, padded G of sparse_grad_weight_f32. */
void nhwc_pad_f32(const float *g, int64_t N, int64_t C, int64_t H, int64_t W, int cl, int64_t top, int64_t left,
                  int64_t GH, int64_t GW, int64_t Cp, float *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t nr = 0; nr < N * GH; ++nr) {
        int64_t n = nr / GH, h = nr % GH - top;
        float *o = out + nr * GW * Cp;
        if (h < 0 || h >= H) { memset(o, 0, (size_t)(GW * Cp) * sizeof(float)); continue; }
        if (left > 0) memset(o, 0, (size_t)(left * Cp) * sizeof(float));
        if (left + W < GW) memset(o + (left + W) * Cp, 0, (size_t)((GW - left - W) * Cp) * sizeof(float));
        float *row = o + left * Cp;
        if (C < Cp)
            for (int64_t w = 0; w < W; ++w) memset(row + w * Cp + C, 0, (size_t)(Cp - C) * sizeof(float));
        if (cl) {
            for (int64_t w = 0; w < W; ++w) memcpy(row + w * Cp, g + ((n * H + h) * W + w) * C, (size_t)C * 4);
            continue;
        }
        for (int64_t c0 = 0; c0 < C; c0 += 16)
            for (int64_t w0 = 0; w0 < W; w0 += 16)
                transpose16(g + ((n * C + c0) * H + h) * W + w0, H * W, row + w0 * Cp + c0, Cp,
                            (int)(C - c0 < 16 ? C - c0 : 16), (int)(W - w0 < 16 ? W - w0 : 16), NULL);
    }
}

/* dst (C, R) = src (R, Cp)[:, :C] transposed: the (Co, Ci, KH, KW) weight gradient of sparse_grad_weight_f32's
 * (Ci, KH, KW, Cp) result (R = Ci*KH*KW). */
void transpose_rows_f32(const float *src, int64_t R, int64_t Cp, int64_t C, float *dst, int nt) {
    int64_t nrb = (R + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t rb = 0; rb < nrb; ++rb)
        for (int64_t c0 = 0; c0 < C; c0 += 16)
            transpose16(src + rb * 16 * Cp + c0, Cp, dst + c0 * R + rb * 16, R,
                        (int)(R - rb * 16 < 16 ? R - rb * 16 : 16), (int)(C - c0 < 16 ? C - c0 : 16), NULL);
}
