/* Decode attention for bfloat16 on a CPU with AVX-512 (engine/decode_attention.py builds it
   at start, for one model's shape: -DGROUPS, the query heads of a key/value head, and -DCHUNKS,
   its head dim in 16s). One query token a row attends to its row's keys and values, all in
   float32 from the bfloat16 inputs; each (row, key/value head) is one task, spread over the
   OpenMP threads of the torch this process loaded (the same libgomp, by its soname). */
#ifndef __AVX512F__
#error "this CPU has no AVX-512"
#endif
#if !defined(GROUPS) || !defined(CHUNKS)
#error "build with -DGROUPS=<query heads per key/value head> -DCHUNKS=<head dim / 16>"
#endif
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store_bf16(uint16_t *p, __m512 x) { /* round to nearest even, NaN kept */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/* exp(x) for x <= 0, exactly 0 below -87 (-inf included): Cephes' expf, about 1 ulp. */
static inline __m512 exp_nonpositive(__m512 x) {
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* a NaN stays NaN: the second operand */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

/* The sums of four vectors' lanes, as one vector of four. */
static inline __m128 sum4(const __m512 v[4]) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
    __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xee));
    return _mm_add_ps(_mm_add_ps(_mm512_extractf32x4_ps(x, 0), _mm512_extractf32x4_ps(x, 1)),
                      _mm_add_ps(_mm512_extractf32x4_ps(x, 2), _mm512_extractf32x4_ps(x, 3)));
}

static void attend(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *m, uint16_t *o,
    float *s, int length, float scale) {
    const int groups = GROUPS, chunks = CHUNKS, dim = 16 * CHUNKS;
    __m512 qf[GROUPS][CHUNKS], acc[GROUPS][CHUNKS];
    for (int g = 0; g < groups; g++)
        for (int c = 0; c < chunks; c++)
            qf[g][c] = _mm512_mul_ps(load_bf16(q + g * dim + 16 * c), _mm512_set1_ps(scale));
    int j = 0;
    for (; j + 4 <= length; j += 4) { /* the scores, four keys at a time */
        __m512 dots[GROUPS][4];
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < 4; i++) dots[g][i] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++)
            for (int i = 0; i < 4; i++) {
                __m512 kc = load_bf16(k + (int64_t)(j + i) * dim + 16 * c);
                for (int g = 0; g < groups; g++)
                    dots[g][i] = _mm512_fmadd_ps(qf[g][c], kc, dots[g][i]);
            }
        for (int g = 0; g < groups; g++)
            _mm_storeu_ps(s + g * length + j, _mm_add_ps(sum4(dots[g]), _mm_loadu_ps(m + j)));
    }
    for (; j < length; j++) { /* the last keys, one at a time */
        const uint16_t *kj = k + (int64_t)j * dim;
        __m512 dots[GROUPS];
        for (int g = 0; g < groups; g++) dots[g] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            __m512 kc = load_bf16(kj + 16 * c);
            for (int g = 0; g < groups; g++) dots[g] = _mm512_fmadd_ps(qf[g][c], kc, dots[g]);
        }
        for (int g = 0; g < groups; g++) s[g * length + j] = _mm512_reduce_add_ps(dots[g]) + m[j];
    }
    float total[GROUPS];
    for (int g = 0; g < groups; g++) { /* softmax's exponentials and their sum */
        float *sg = s + g * length;
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int j = 0; j < length; j += 16) {
            __mmask16 in = length - j >= 16 ? 0xffff : (__mmask16)((1u << (length - j)) - 1);
            top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, in, sg + j));
        }
        float highest = _mm512_reduce_max_ps(top);
        if (highest == -INFINITY) { /* every column masked: zeros, as SDPA gives */
            for (int j = 0; j < length; j++) sg[j] = 0.0f;
            total[g] = 0.0f;
            for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
            continue;
        }
        __m512 most = _mm512_set1_ps(highest);
        for (int j = 0; j < length; j += 16) {
            __mmask16 in = length - j >= 16 ? 0xffff : (__mmask16)((1u << (length - j)) - 1);
            __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, sg + j), most));
            e = _mm512_maskz_mov_ps(in, e);
            _mm512_mask_storeu_ps(sg + j, in, e);
            sum = _mm512_add_ps(sum, e);
        }
        total[g] = _mm512_reduce_add_ps(sum);
        for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
    }
    for (int j = 0; j < length; j++) { /* the values, weighted */
        const uint16_t *vj = v + (int64_t)j * dim;
        for (int c = 0; c < chunks; c++) {
            __m512 vc = load_bf16(vj + 16 * c);
            for (int g = 0; g < groups; g++)
                acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(s[g * length + j]), vc, acc[g][c]);
        }
    }
    for (int g = 0; g < groups; g++) {
        __m512 inverse = _mm512_set1_ps(total[g] > 0.0f ? 1.0f / total[g] : 0.0f);
        for (int c = 0; c < chunks; c++)
            store_bf16(o + g * dim + 16 * c, _mm512_mul_ps(acc[g][c], inverse));
    }
}

/* out[r, (h * GROUPS + g) * dim + d] for every row r, key/value head h and query g of its
   group. q: [rows, heads * GROUPS, dim], row stride q_row; keys, values: [rows, heads, length,
   dim], strides kv_row and kv_head (the same for both); mask: [rows, length] float32, additive
   (0 or -inf); out: [rows, heads * GROUPS * dim]; scores: [threads, GROUPS, length] float32,
   scratch. Returns 0, or -1 for a shape this build is not for. */
int decode_attention(const uint16_t *q, int64_t q_row, const uint16_t *keys,
                     const uint16_t *values, int64_t kv_row, int64_t kv_head, const float *mask,
                     uint16_t *out, float *scores, int rows, int heads, int groups, int length,
                     int dim, float scale, int threads) {
    if (groups != GROUPS || dim != 16 * CHUNKS) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < rows * heads; task++) {
        const int r = task / heads, h = task % heads;
        const int64_t kv = r * kv_row + h * kv_head, at = ((int64_t)r * heads + h) * GROUPS * dim;
        attend(q + r * q_row + (int64_t)h * GROUPS * dim, keys + kv, values + kv,
               mask + (int64_t)r * length, out + at,
               scores + (int64_t)omp_get_thread_num() * GROUPS * length, length, scale);
    }
    return 0;
}
