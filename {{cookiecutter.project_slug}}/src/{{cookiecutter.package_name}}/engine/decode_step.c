/* A whole decode step of a plain Llama in bfloat16, on a CPU with AVX-512 BF16, in one call:
   for every layer RMSNorm, the query-key-value product, the rotary embedding, the keys and
   values written into the slab, attention (decode_attention.c's), the output product, RMSNorm,
   the gate-up product with SiLU, the down product. engine/decode_step.py builds it at start,
   with the same -DGROUPS and -DCHUNKS as the attention, and packs the weights for it.

   Products: each weight is packed in blocks of 16 outputs, [n / 16][k / 2][16][2], so that one
   load of 32 bfloat16 weights and one 32-bit broadcast of an input pair give 16 outputs' sums
   (VDPBF16PS, float32 accumulators); a tile is up to 8 rows by 2 blocks, and the weights stream
   from memory once a step whatever the rows. The residual stream stays in float32 (as in
   llama.cpp), as do the products' sums until the rotary embedding and the residual additions;
   the normed inputs (as transformers rounds them), queries, keys, values and activations are
   rounded to bfloat16 once. */
#include "decode_attention.c"
#ifndef __AVX512BF16__
#error "this CPU has no AVX-512 BF16"
#endif
#if CHUNKS % 2
#error "the rotary embedding here needs a head dim in 32s"
#endif
#include <stdlib.h>
#include <string.h>

#define TILE_ROWS 8
enum { STORE, ADD, SWIGLU }; /* what a product does with its sums */

static inline __attribute__((always_inline)) void tile(
    const int rows, const int blocks, const uint16_t *x, int k, const uint16_t *w,
    __m512 out[TILE_ROWS][2]) {
    const int64_t block = (int64_t)k * 16;
    __m512 acc[TILE_ROWS][2]; /* in registers: rows and blocks are constants here */
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 2
        for (int b = 0; b < blocks; b++) acc[r][b] = _mm512_setzero_ps();
    for (int p = 0; p < k / 2; p++) {
        __m512bh wp[2];
#pragma GCC unroll 2
        for (int b = 0; b < blocks; b++)
            wp[b] = (__m512bh)_mm512_loadu_si512(w + b * block + 32 * (int64_t)p);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + (int64_t)r * k + 2 * p, sizeof pair);
            __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 2
            for (int b = 0; b < blocks; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xr, wp[b]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int b = 0; b < blocks; b++) out[r][b] = acc[r][b];
}

#define TILE(R)                                  \
    case R:                                      \
        if (blocks == 2) tile(R, 2, x, k, w, acc); \
        else tile(R, 1, x, k, w, acc);             \
        break;

static void tiles(int rows, int blocks, const uint16_t *x, int k, const uint16_t *w,
                  __m512 acc[TILE_ROWS][2]) {
    switch (rows) { TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) }
}

static inline __m512 silu(__m512 g) { /* g / (1 + exp(-g)), without overflow */
    __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    __m512 one = _mm512_set1_ps(1.0f);
    __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
    return _mm512_mul_ps(g, sigmoid);
}

/* x [rows, k] bfloat16 times the packed weight w [n, k]: y [rows, n] float32 (STORE), added
   to y (ADD), or for gate-up blocks interleaved (gate, up, gate, ...) SiLU(gate) x up rounded
   into act [rows, n / 2] (SWIGLU). Inside a parallel region: the tiles are shared out. */
static void product(const uint16_t *x, int rows, int k, const uint16_t *w, int n, float *y,
                    uint16_t *act, int mode) {
    const int blocks16 = n / 16, pairs = (blocks16 + 1) / 2;
#pragma omp for schedule(static)
    for (int t = 0; t < pairs; t++) {
        const int blocks = 2 * t + 1 < blocks16 ? 2 : 1;
        const uint16_t *wt = w + (int64_t)2 * t * k * 16;
        for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
            const int count = rows - r0 < TILE_ROWS ? rows - r0 : TILE_ROWS;
            __m512 acc[TILE_ROWS][2];
            tiles(count, blocks, x + (int64_t)r0 * k, k, wt, acc);
            for (int r = 0; r < count; r++) {
                const int64_t row = r0 + r;
                if (mode == SWIGLU) {
                    store_bf16(act + row * (n / 2) + 16 * t,
                               _mm512_mul_ps(silu(acc[r][0]), acc[r][1]));
                    continue;
                }
                for (int b = 0; b < blocks; b++) {
                    float *out = y + row * n + 32 * t + 16 * b;
                    __m512 sum = mode == ADD ? _mm512_add_ps(_mm512_loadu_ps(out), acc[r][b])
                                             : acc[r][b];
                    _mm512_storeu_ps(out, sum);
                }
            }
        }
    }
}

static inline uint16_t round_bf16(float f) { /* to nearest even, as store_bf16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u | 0x400000) >> 16);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* RMSNorm as transformers' LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) rounded to bfloat16, times
   the weight, rounded again. */
static void rms_norm(const float *x, int rows, int hidden, const uint16_t *weight, float eps,
                     uint16_t *out) {
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * hidden;
        double squares = 0.0;
        for (int i = 0; i < hidden; i++) squares += (double)xr[i] * xr[i];
        const float inverse = 1.0f / sqrtf((float)(squares / hidden) + eps);
        for (int i = 0; i < hidden; i++)
            out[(int64_t)r * hidden + i] =
                round_bf16(from_bf16(weight[i]) * from_bf16(round_bf16(xr[i] * inverse)));
    }
}

/* The rotary embedding of one head (transformers' rotate_half), rounded to bfloat16. */
static void rotate(const float *x, const float *cos, const float *sin, uint16_t *out) {
    const int half = 8 * CHUNKS;
    for (int i = 0; i < half; i += 16) {
        __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + half + i);
        __m512 ca = _mm512_loadu_ps(cos + i), cb = _mm512_loadu_ps(cos + half + i);
        __m512 sa = _mm512_loadu_ps(sin + i), sb = _mm512_loadu_ps(sin + half + i);
        store_bf16(out + i, _mm512_fnmadd_ps(b, sa, _mm512_mul_ps(a, ca)));
        store_bf16(out + half + i, _mm512_fmadd_ps(a, sb, _mm512_mul_ps(b, cb)));
    }
}

/* weights: for each layer its input norm, packed query-key-value product, packed output
   product, post-attention norm, packed gate-up product (blocks interleaved), packed down
   product. x: [rows, hidden] bfloat16, the embedded tokens in, the residual stream out. cos,
   sin: [rows, dim] bfloat16. mask: [rows, end + 1 - start] float32, additive. keys, values:
   each layer's slab buffer, [rows, kv_heads, columns, dim] with strides kv_row and kv_head;
   the step's keys and values go to column end, attention reads [start, end]. Returns 0, -1
   for a shape this build is not for, -2 if memory ran out. */
int decode_step(const uint16_t *const *weights, int layers, int hidden, int heads, int kv_heads,
                int dim, int inter, float eps, uint16_t *x, const uint16_t *cos,
                const uint16_t *sin, const float *mask, int rows, uint16_t *const *keys,
                uint16_t *const *values, int64_t kv_row, int64_t kv_head, int start, int end,
                int threads) {
    if (heads != kv_heads * GROUPS || dim != 16 * CHUNKS || hidden % 16 || inter % 16) return -1;
    const int q_width = heads * dim, qkv_width = (heads + 2 * kv_heads) * dim;
    const int length = end + 1 - start;
    const float scale = 1.0f / sqrtf((float)dim);
    float *residual = malloc(sizeof(float) * rows * (hidden + qkv_width + 2 * dim));
    uint16_t *half = malloc(sizeof(uint16_t) * rows * (hidden + 2 * q_width + inter));
    float *scores = malloc(sizeof(float) * threads * GROUPS * length);
    if (!residual || !half || !scores) {
        free(residual), free(half), free(scores);
        return -2;
    }
    float *qkv = residual + rows * hidden, *trig = qkv + rows * qkv_width;
    uint16_t *normed = half, *q = normed + rows * hidden, *attended = q + rows * q_width;
    uint16_t *act = attended + rows * q_width;
    for (int64_t i = 0; i < (int64_t)rows * hidden; i++) residual[i] = from_bf16(x[i]);
    for (int64_t i = 0; i < (int64_t)rows * dim; i++) {
        trig[i] = from_bf16(cos[i]);
        trig[rows * dim + i] = from_bf16(sin[i]);
    }
#pragma omp parallel num_threads(threads)
    for (int layer = 0; layer < layers; layer++) {
        const uint16_t *const *w = weights + 6 * layer;
        rms_norm(residual, rows, hidden, w[0], eps, normed);
        product(normed, rows, hidden, w[1], qkv_width, qkv, NULL, STORE);
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) { /* rotary embedding; keys and values into the slab */
            const float *row = qkv + (int64_t)r * qkv_width;
            const float *c = trig + (int64_t)r * dim, *s = trig + (int64_t)(rows + r) * dim;
            for (int h = 0; h < heads; h++)
                rotate(row + h * dim, c, s, q + (int64_t)r * q_width + h * dim);
            for (int h = 0; h < kv_heads; h++) {
                const int64_t at = r * kv_row + h * kv_head + (int64_t)end * dim;
                rotate(row + (heads + h) * dim, c, s, keys[layer] + at);
                for (int i = 0; i < dim; i += 16)
                    store_bf16(values[layer] + at + i,
                               _mm512_loadu_ps(row + (heads + kv_heads + h) * dim + i));
            }
        }
#pragma omp for schedule(static)
        for (int task = 0; task < rows * kv_heads; task++) {
            const int r = task / kv_heads, h = task % kv_heads;
            const int64_t kv = r * kv_row + h * kv_head + (int64_t)start * dim;
            const int64_t at = (int64_t)r * q_width + (int64_t)h * GROUPS * dim;
            attend(q + at, keys[layer] + kv, values[layer] + kv, mask + (int64_t)r * length,
                   attended + at, scores + (int64_t)omp_get_thread_num() * GROUPS * length,
                   length, scale);
        }
        product(attended, rows, q_width, w[2], hidden, residual, NULL, ADD);
        rms_norm(residual, rows, hidden, w[3], eps, normed);
        product(normed, rows, hidden, w[4], 2 * inter, NULL, act, SWIGLU);
        product(act, rows, inter, w[5], hidden, residual, NULL, ADD);
    }
    for (int64_t i = 0; i < (int64_t)rows * hidden; i++) x[i] = round_bf16(residual[i]);
    free(residual), free(half), free(scores);
    return 0;
}
