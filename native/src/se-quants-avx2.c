// AVX2 + FMA + F16C kernels, chosen at run time (se_cpu_has_avx2) over the portable ones; this file
// alone is compiled with -mavx2 -mfma -mf16c. Integer dot products follow llama.cpp's approach:
// activations quantized to 8 bits in blocks of 32, unsigned weight codes times signed activation
// codes with maddubs, pairs summed to int32 with madd, one float multiply-add per block.
#include "se-impl.h"

#include <immintrin.h>
#include <string.h>

typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;
typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;

static inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static inline float half(uint16_t h) { return _cvtsh_ss(h); }

// 16 bytes of nibbles -> 32 bytes: weight j (low nibble of byte j) first, then weight j + 16
static inline __m256i nibbles(const uint8_t * qs) {
    const __m128i raw = _mm_loadu_si128((const __m128i *) qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

// sum of 32 products of unsigned and signed bytes, in 8 int32 lanes, as floats
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static float vec_dot_q4_0(const void * row, const void * act, int64_t n) {
    const block_q4_0 * b = row;
    const se_block_q8 * a = act;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offset = 0;
    int64_t i = 0, nb = n / 32;
    for (; i + 1 < nb; i += 2) {  // two blocks per step: independent chains
        const float d0 = half(b[i].d) * a[i].d, d1 = half(b[i + 1].d) * a[i + 1].d;
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), dot_u8s8(nibbles(b[i].qs), _mm256_loadu_si256((const __m256i *) a[i].qs)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), dot_u8s8(nibbles(b[i + 1].qs), _mm256_loadu_si256((const __m256i *) a[i + 1].qs)), acc1);
        offset += d0 * (float) a[i].sum + d1 * (float) a[i + 1].sum;
    }
    for (; i < nb; i++) {
        const float d = half(b[i].d) * a[i].d;
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d), dot_u8s8(nibbles(b[i].qs), _mm256_loadu_si256((const __m256i *) a[i].qs)), acc0);
        offset += d * (float) a[i].sum;
    }
    return hsum(_mm256_add_ps(acc0, acc1)) - 8 * offset;  // the codes are q + 8
}

static float vec_dot_q4_1(const void * row, const void * act, int64_t n) {
    const block_q4_1 * b = row;
    const se_block_q8 * a = act;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float mins = 0;
    int64_t i = 0, nb = n / 32;
    for (; i + 1 < nb; i += 2) {
        const float d0 = half(b[i].d) * a[i].d, d1 = half(b[i + 1].d) * a[i + 1].d;
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), dot_u8s8(nibbles(b[i].qs), _mm256_loadu_si256((const __m256i *) a[i].qs)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), dot_u8s8(nibbles(b[i + 1].qs), _mm256_loadu_si256((const __m256i *) a[i + 1].qs)), acc1);
        mins += half(b[i].m) * a[i].d * (float) a[i].sum + half(b[i + 1].m) * a[i + 1].d * (float) a[i + 1].sum;
    }
    for (; i < nb; i++) {
        const float d = half(b[i].d) * a[i].d;
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d), dot_u8s8(nibbles(b[i].qs), _mm256_loadu_si256((const __m256i *) a[i].qs)), acc0);
        mins += half(b[i].m) * a[i].d * (float) a[i].sum;
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + mins;
}

static float vec_dot_q8_0(const void * row, const void * act, int64_t n) {
    const block_q8_0 * b = row;
    const se_block_q8 * a = act;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0, nb = n / 32;
    for (; i + 1 < nb; i += 2) {
        for (int k = 0; k < 2; k++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *) b[i + k].qs);
            const __m256i x = _mm256_loadu_si256((const __m256i *) a[i + k].qs);
            // signed x signed via maddubs: |w| times x with w's sign
            const __m256 p = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            if (k == 0) acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].d) * a[i].d), p, acc0);
            else acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i + 1].d) * a[i + 1].d), p, acc1);
        }
    }
    for (; i < nb; i++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *) b[i].qs);
        const __m256i x = _mm256_loadu_si256((const __m256i *) a[i].qs);
        const __m256 p = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[i].d) * a[i].d), p, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

// --- float activations

static float dot_f32(const float * a, const float * b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float dot_f16(const uint16_t * a, const float * b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i))), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i + 8))), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (a + i))), _mm256_loadu_ps(b + i), acc0);
    }
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += half(a[i]) * b[i];
    return s;
}

static inline __m256 bf16x8(const uint16_t * p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) p)), 16));
}

static float dot_bf16(const uint16_t * a, const float * b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(bf16x8(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(bf16x8(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) {
        const uint32_t bits = (uint32_t) a[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        s += f * b[i];
    }
    return s;
}

static float vec_dot_f32(const void * row, const void * act, int64_t n) { return dot_f32(row, act, n); }
static float vec_dot_f16(const void * row, const void * act, int64_t n) { return dot_f16(row, act, n); }
static float vec_dot_bf16(const void * row, const void * act, int64_t n) { return dot_bf16(row, act, n); }

static void axpy_f32(float * y, float a, const float * x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16(float * y, float a, const uint16_t * x, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] += a * half(x[i]);
}

// --- activations to 8 bits: d = max|x| / 127, q = x / d rounded to nearest even

static void quantize_q8(const float * x, se_block_q8 * out, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / 32; i++, x += 32, out++) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float d = _mm_cvtss_f32(m) / 127, id = d != 0 ? 1 / d : 0;
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        const __m256i sum4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum4), _mm256_extracti128_si256(sum4, 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        // 32 int32 -> 32 int8 in order: the packs interleave 128-bit lanes, the permute undoes it
        const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        const __m256i p8 = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *) out->qs, p8);
        out->d = d;
        out->sum = _mm_cvtsi128_si32(s);
    }
}

void se_quants_use_avx2(se_type_traits * types, se_kernels * k) {
    types[SE_TYPE_Q4_0].vec_dot = vec_dot_q4_0;
    types[SE_TYPE_Q4_1].vec_dot = vec_dot_q4_1;
    types[SE_TYPE_Q8_0].vec_dot = vec_dot_q8_0;
    types[SE_TYPE_F32].vec_dot = vec_dot_f32;
    types[SE_TYPE_F16].vec_dot = vec_dot_f16;
    types[SE_TYPE_BF16].vec_dot = vec_dot_bf16;
    *k = (se_kernels) {quantize_q8, dot_f32, dot_f16, axpy_f32, axpy_f16};
}
