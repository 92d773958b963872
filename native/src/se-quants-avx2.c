// AVX2 + FMA + F16C kernels, chosen at run time (se_cpu_has_avx2) over the portable ones; this file
// alone is compiled with -mavx2 -mfma -mf16c. Integer dot products follow llama.cpp's approach:
// activations quantized to 8 bits in blocks of 32, unsigned weight codes times signed activation
// codes with maddubs, pairs summed to int32 with madd, one float multiply-add per block.
#include "se-impl.h"
#include "se-common.h"

#include <immintrin.h>
#include <string.h>

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

// Even blocks go to one accumulator and odd blocks to another (independent chains); the offset and
// min terms accumulate in block order. vec_dot and vec_dot4 do exactly the same operations per row,
// so a token's logits do not depend on how the prompt was cut into chunks.

#define LOAD_Q8(a, i) _mm256_loadu_si256((const __m256i *) (a)[i].qs)

// 32 bits -> 32 bytes, byte j 0xff where bit j is set: each byte picks its source byte of x, ORs in
// every bit but its own, and compares with all ones
static inline __m256i bits_to_bytes(uint32_t x) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int) x),
        _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    return _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
}

static inline const se_block_q8 * act_row(const void * act, size_t stride, int k) {
    return (const se_block_q8 *) ((const char *) act + (size_t) k * stride);
}

static inline __m256 dot_q8_q8(__m256i w, __m256i x) {  // signed x signed: |w| times x with w's sign
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

// one weight row against K activation rows `stride` bytes apart; per block the weights are loaded
// (and unpacked) once for all K rows
#define DEFINE_VEC_DOT(name, block_t, K)                                                              \
    static void name(const void * row, const void * act, size_t stride, int64_t n, float out[K]) {   \
        enum { nk = K };                                                                              \
        const block_t * b = row;                                                                      \
        const se_block_q8 * a[K];                                                                     \
        __m256 acc[K][2];                                                                             \
        float extra[K];                                                                               \
        for (int k = 0; k < K; k++) {                                                                 \
            a[k] = act_row(act, stride, k);                                                           \
            acc[k][0] = acc[k][1] = _mm256_setzero_ps();                                              \
            extra[k] = 0;                                                                             \
        }                                                                                             \
        for (int64_t i = 0; i < n / 32; i++) {                                                        \
            BLOCK_##block_t                                                                           \
        }                                                                                             \
        for (int k = 0; k < K; k++) out[k] = hsum(_mm256_add_ps(acc[k][0], acc[k][1])) + FINISH_##block_t; \
    }

#define BLOCK_block_q4_0                                                                              \
    const __m256i w = nibbles(b[i].qs);                                                               \
    const float dw = half(b[i].d);                                                                    \
    for (int k = 0; k < nk; k++) {                                                                    \
        acc[k][i & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[k][i].d), dot_u8s8(w, LOAD_Q8(a[k], i)), acc[k][i & 1]); \
        extra[k] += dw * a[k][i].s;                                                                   \
    }
#define FINISH_block_q4_0 (-8 * extra[k])  /* the codes are q + 8 */

#define BLOCK_block_q4_1                                                                              \
    const __m256i w = nibbles(b[i].qs);                                                               \
    const float dw = half(b[i].d), mw = half(b[i].m);                                                 \
    for (int k = 0; k < nk; k++) {                                                                    \
        acc[k][i & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[k][i].d), dot_u8s8(w, LOAD_Q8(a[k], i)), acc[k][i & 1]); \
        extra[k] += mw * a[k][i].s;                                                                   \
    }
#define FINISH_block_q4_1 (extra[k])

#define BLOCK_block_q8_0                                                                              \
    const __m256i w = _mm256_loadu_si256((const __m256i *) b[i].qs);                                  \
    const float dw = half(b[i].d);                                                                    \
    for (int k = 0; k < nk; k++) {                                                                    \
        acc[k][i & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[k][i].d), dot_q8_q8(w, LOAD_Q8(a[k], i)), acc[k][i & 1]); \
    }
#define FINISH_block_q8_0 (0 * extra[k])

#define BLOCK_block_q5_0                                                                              \
    uint32_t qh;                                                                                      \
    memcpy(&qh, b[i].qh, 4);                                                                          \
    const __m256i w = _mm256_or_si256(nibbles(b[i].qs), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10))); \
    const float dw = half(b[i].d);                                                                    \
    for (int k = 0; k < nk; k++) {                                                                    \
        acc[k][i & 1] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[k][i].d), dot_u8s8(w, LOAD_Q8(a[k], i)), acc[k][i & 1]); \
        extra[k] += dw * a[k][i].s;                                                                   \
    }
#define FINISH_block_q5_0 (-16 * extra[k])  /* the codes are q + 16 */

DEFINE_VEC_DOT(dot1_q4_0, block_q4_0, 1)
DEFINE_VEC_DOT(dot1_q4_1, block_q4_1, 1)
DEFINE_VEC_DOT(dot1_q8_0, block_q8_0, 1)
DEFINE_VEC_DOT(vec_dot4_q4_0, block_q4_0, 4)
DEFINE_VEC_DOT(vec_dot4_q4_1, block_q4_1, 4)
DEFINE_VEC_DOT(vec_dot4_q8_0, block_q8_0, 4)
DEFINE_VEC_DOT(dot1_q5_0, block_q5_0, 1)
DEFINE_VEC_DOT(vec_dot4_q5_0, block_q5_0, 4)

// --- K-quants: a super-block of 256 weights spans 8 activation blocks

// Q4_K / Q5_K: chunk c of 32 bytes holds sub-block 2c in its low nibbles and 2c + 1 in its high ones;
// Q5_K's fifth bits are bits 2c and 2c + 1 of qh[l]
#define DEFINE_VEC_DOT_K45(name, block_t, K, FIVE)                                                    \
    static void name(const void * row, const void * act, size_t stride, int64_t n, float out[K]) {   \
        const block_t * b = row;                                                                      \
        const se_block_q8 * a[K];                                                                     \
        __m256 acc[K][2];                                                                             \
        float extra[K];                                                                               \
        for (int k = 0; k < K; k++) {                                                                 \
            a[k] = act_row(act, stride, k);                                                           \
            acc[k][0] = acc[k][1] = _mm256_setzero_ps();                                              \
            extra[k] = 0;                                                                             \
        }                                                                                             \
        const __m256i low4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);                       \
        for (int64_t i = 0; i < n / 256; i++) {                                                       \
            uint8_t sc[8], m[8];                                                                      \
            se_k_scales(b[i].scales, sc, m);                                                          \
            const float d = half(b[i].d), dmin = half(b[i].dmin);                                     \
            __m256i qh = _mm256_setzero_si256();                                                      \
            if (FIVE) qh = _mm256_loadu_si256((const __m256i *) FIVE_QH(b[i]));                       \
            for (int c = 0; c < 4; c++) {                                                             \
                const __m256i raw = _mm256_loadu_si256((const __m256i *) (b[i].qs + 32 * c));         \
                __m256i lo = _mm256_and_si256(raw, low4);                                             \
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);                       \
                if (FIVE) {                                                                           \
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4)); \
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4)); \
                }                                                                                     \
                for (int k = 0; k < K; k++) {                                                         \
                    const se_block_q8 * x = a[k] + 8 * i + 2 * c;                                     \
                    acc[k][0] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * c] * x[0].d), dot_u8s8(lo, LOAD_Q8(x, 0)), acc[k][0]); \
                    acc[k][1] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * c + 1] * x[1].d), dot_u8s8(hi, LOAD_Q8(x, 1)), acc[k][1]); \
                    extra[k] += dmin * m[2 * c] * x[0].s + dmin * m[2 * c + 1] * x[1].s;             \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int k = 0; k < K; k++) out[k] = hsum(_mm256_add_ps(acc[k][0], acc[k][1])) - extra[k];   \
    }

#define FIVE_QH(blk) (blk).qs  /* not read: Q4_K has no fifth bits */
DEFINE_VEC_DOT_K45(dot1_q4_K, block_q4_K, 1, 0)
DEFINE_VEC_DOT_K45(vec_dot4_q4_K, block_q4_K, 4, 0)
#undef FIVE_QH
#define FIVE_QH(blk) (blk).qh
DEFINE_VEC_DOT_K45(dot1_q5_K, block_q5_K, 1, 1)
DEFINE_VEC_DOT_K45(vec_dot4_q5_K, block_q5_K, 4, 1)
#undef FIVE_QH

// Q6_K: two halves of 128 weights; activation block 4h + r has codes from ql (nibble r / 2 of byte
// 32 (r % 2) + l) and qh (bits 2r, 2r + 1 of byte l), and two int8 scales, one per 16 weights
#define DEFINE_VEC_DOT_Q6K(name, K)                                                                   \
    static void name(const void * row, const void * act, size_t stride, int64_t n, float out[K]) {   \
        const block_q6_K * b = row;                                                                   \
        const se_block_q8 * a[K];                                                                     \
        __m256 acc[K][2];                                                                             \
        for (int k = 0; k < K; k++) {                                                                 \
            a[k] = act_row(act, stride, k);                                                           \
            acc[k][0] = acc[k][1] = _mm256_setzero_ps();                                              \
        }                                                                                             \
        const __m256i low4 = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32); \
        for (int64_t i = 0; i < n / 256; i++) {                                                       \
            const float d = half(b[i].d);                                                             \
            for (int h = 0; h < 2; h++) {                                                             \
                const __m256i ql0 = _mm256_loadu_si256((const __m256i *) (b[i].ql + 64 * h));        \
                const __m256i ql1 = _mm256_loadu_si256((const __m256i *) (b[i].ql + 64 * h + 32));   \
                const __m256i qh = _mm256_loadu_si256((const __m256i *) (b[i].qh + 32 * h));         \
                for (int r = 0; r < 4; r++) {                                                         \
                    const __m256i ql = r % 2 ? ql1 : ql0;                                             \
                    const __m256i lo = r < 2 ? _mm256_and_si256(ql, low4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4); \
                    const __m256i hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * r), three), 4); \
                    const __m256i w = _mm256_sub_epi8(_mm256_or_si256(lo, hb), off);                  \
                    const int8_t * sc = b[i].scales + 8 * h + 2 * r;                                  \
                    const __m256 scales = _mm256_set_m128(_mm_set1_ps(d * sc[1]), _mm_set1_ps(d * sc[0])); \
                    for (int k = 0; k < K; k++) {                                                     \
                        const se_block_q8 * x = a[k] + 8 * i + 4 * h + r;                             \
                        const __m256 p = _mm256_mul_ps(scales, dot_q8_q8(w, LOAD_Q8(x, 0)));          \
                        acc[k][r & 1] = _mm256_fmadd_ps(_mm256_set1_ps(x->d), p, acc[k][r & 1]);     \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int k = 0; k < K; k++) out[k] = hsum(_mm256_add_ps(acc[k][0], acc[k][1]));               \
    }

DEFINE_VEC_DOT_Q6K(dot1_q6_K, 1)
DEFINE_VEC_DOT_Q6K(vec_dot4_q6_K, 4)

#define SINGLE(type)                                                                                  \
    static float vec_dot_##type(const void * row, const void * act, int64_t n) {                     \
        float out;                                                                                    \
        dot1_##type(row, act, 0, n, &out);                                                            \
        return out;                                                                                   \
    }
SINGLE(q5_0)
SINGLE(q4_K)
SINGLE(q5_K)
SINGLE(q6_K)

static float vec_dot_q4_0(const void * row, const void * act, int64_t n) {
    float out;
    dot1_q4_0(row, act, 0, n, &out);
    return out;
}

static float vec_dot_q4_1(const void * row, const void * act, int64_t n) {
    float out;
    dot1_q4_1(row, act, 0, n, &out);
    return out;
}

static float vec_dot_q8_0(const void * row, const void * act, int64_t n) {
    float out;
    dot1_q8_0(row, act, 0, n, &out);
    return out;
}

// --- interleaved groups of 8 rows (se-common.h, se-repack.c) times up to 4 activation rows
//
// Lane r of every 32-byte weight vector belongs to row r; 4 activation bytes broadcast to all lanes,
// maddubs and adds in 16 bits (bounded: 8 products of 2 x 15 x 127 < 2^15), then one madd to 32 bits
// leave each row's block sum in its lane. The weight loads and nibble unpacking are shared by the
// tokens of the tile; every token goes through exactly the same operations whatever nt is.

static inline __m256i bcast4(const int8_t * p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline __attribute__((always_inline)) void gemm_q4_0_nt(const void * group, const void * act, size_t stride,
                                                               int64_t cols, int nt, float * out, int64_t ld) {
    const block_q4_0x8 * b = group;
    const se_block_q8 * a[SE_RP_TOKENS];
    __m256 acc[SE_RP_TOKENS];
    for (int t = 0; t < nt; t++) {
        a[t] = act_row(act, stride, t);
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) b[i].d));
        __m256i sum[SE_RP_TOKENS];
        for (int k = 0; k < 4; k++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *) (b[i].qs + 32 * k));
            const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            for (int t = 0; t < nt; t++) {
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(a[t][i].qs + 4 * k)),
                                                   _mm256_maddubs_epi16(hi, bcast4(a[t][i].qs + 16 + 4 * k)));
                sum[t] = k == 0 ? p : _mm256_add_epi16(sum[t], p);
            }
        }
        for (int t = 0; t < nt; t++) {
            // d_w (d_x sum - 8 s_x): the codes are q + 8
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum[t], ones)), _mm256_set1_ps(a[t][i].d),
                                             _mm256_set1_ps(-8 * a[t][i].s));
            acc[t] = _mm256_fmadd_ps(dw, v, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + t * ld, acc[t]);
}

static inline __attribute__((always_inline)) void gemm_q5_0_nt(const void * group, const void * act, size_t stride,
                                                               int64_t cols, int nt, float * out, int64_t ld) {
    const block_q5_0x8 * b = group;
    const se_block_q8 * a[SE_RP_TOKENS];
    __m256 acc[SE_RP_TOKENS];
    for (int t = 0; t < nt; t++) {
        a[t] = act_row(act, stride, t);
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10), ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) b[i].d));
        const __m256i qh = _mm256_loadu_si256((const __m256i *) b[i].qh);
        __m256i sum[2][SE_RP_TOKENS];  // 5-bit codes: two pieces per 16-bit partial sum (4 x 2 x 31 x 127 < 2^15)
        for (int k = 0; k < 4; k++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *) (b[i].qs + 32 * k));
            // fifth bits: bit 8j + k -> bit 8j + 4 for the low nibbles, bit 8j + 4 + k -> 8j + 4 for the high
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, low4), _mm256_and_si256(_mm256_sll_epi32(qh, _mm_cvtsi32_si128(4 - k)), bit4));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4),
                                               _mm256_and_si256(_mm256_srl_epi32(qh, _mm_cvtsi32_si128(k)), bit4));
            for (int t = 0; t < nt; t++) {
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(a[t][i].qs + 4 * k)),
                                                   _mm256_maddubs_epi16(hi, bcast4(a[t][i].qs + 16 + 4 * k)));
                sum[k / 2][t] = k % 2 == 0 ? p : _mm256_add_epi16(sum[k / 2][t], p);
            }
        }
        for (int t = 0; t < nt; t++) {
            const __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(sum[0][t], ones), _mm256_madd_epi16(sum[1][t], ones));
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(a[t][i].d), _mm256_set1_ps(-16 * a[t][i].s));
            acc[t] = _mm256_fmadd_ps(dw, v, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + t * ld, acc[t]);
}

static inline __attribute__((always_inline)) void gemm_q8_0_nt(const void * group, const void * act, size_t stride,
                                                               int64_t cols, int nt, float * out, int64_t ld) {
    const block_q8_0x8 * b = group;
    const se_block_q8 * a[SE_RP_TOKENS];
    __m256 acc[SE_RP_TOKENS];
    for (int t = 0; t < nt; t++) {
        a[t] = act_row(act, stride, t);
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) b[i].d));
        __m256i sum[SE_RP_TOKENS];
        for (int k = 0; k < 8; k++) {
            // signed x signed: |w| times x with w's sign; one pair sum reaches 2 x 128 x 127, so every
            // product goes to 32 bits on its own
            const __m256i w = _mm256_loadu_si256((const __m256i *) (b[i].qs + 32 * k));
            const __m256i aw = _mm256_sign_epi8(w, w);
            for (int t = 0; t < nt; t++) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(a[t][i].qs + 4 * k), w)), ones);
                sum[t] = k == 0 ? p : _mm256_add_epi32(sum[t], p);
            }
        }
        for (int t = 0; t < nt; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(a[t][i].d)), _mm256_cvtepi32_ps(sum[t]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + t * ld, acc[t]);
}

static inline __m256i scales16(const uint8_t s[8]) {  // 8 bytes -> each in both 16-bit halves of its lane
    __m128i v;
    v = _mm_loadl_epi64((const __m128i *) s);
    const __m256i w = _mm256_cvtepu8_epi32(v);
    return _mm256_or_si256(w, _mm256_slli_epi32(w, 16));
}

static inline __attribute__((always_inline)) void gemm_q4_K_nt(const void * group, const void * act, size_t stride,
                                                               int64_t cols, int nt, float * out, int64_t ld) {
    const block_q4_Kx8 * b = group;
    const se_block_q8 * a[SE_RP_TOKENS];
    __m256 acc[SE_RP_TOKENS];
    for (int t = 0; t < nt; t++) {
        a[t] = act_row(act, stride, t);
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t i = 0; i < cols / 256; i++) {
        const __m256 d = _mm256_loadu_ps(b[i].d), dmin = _mm256_loadu_ps(b[i].dmin);
        for (int c = 0; c < 4; c++) {  // sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
            __m256i s0[SE_RP_TOKENS], s1[SE_RP_TOKENS];
            for (int k = 0; k < 8; k++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *) (b[i].qs + 256 * c + 32 * k));
                const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                for (int t = 0; t < nt; t++) {
                    const __m256i p0 = _mm256_maddubs_epi16(lo, bcast4(a[t][8 * i + 2 * c].qs + 4 * k));
                    const __m256i p1 = _mm256_maddubs_epi16(hi, bcast4(a[t][8 * i + 2 * c + 1].qs + 4 * k));
                    s0[t] = k == 0 ? p0 : _mm256_add_epi16(s0[t], p0);
                    s1[t] = k == 0 ? p1 : _mm256_add_epi16(s1[t], p1);
                }
            }
            // the 6-bit scales multiply in the 16 -> 32 bit madd; the mins apply to the block sums s
            const __m256i sc0 = scales16(b[i].sc[2 * c]), sc1 = scales16(b[i].sc[2 * c + 1]);
            const __m256 m0 = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) b[i].m[2 * c]))));
            const __m256 m1 = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) b[i].m[2 * c + 1]))));
            for (int t = 0; t < nt; t++) {
                const se_block_q8 * x = a[t] + 8 * i + 2 * c;
                const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0[t], sc0)), _mm256_set1_ps(x[0].d),
                                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1[t], sc1)), _mm256_set1_ps(x[1].d)));
                acc[t] = _mm256_fmadd_ps(d, v, acc[t]);
                acc[t] = _mm256_fnmadd_ps(m0, _mm256_set1_ps(x[0].s), acc[t]);
                acc[t] = _mm256_fnmadd_ps(m1, _mm256_set1_ps(x[1].s), acc[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + t * ld, acc[t]);
}

static inline __m256i scales16_s8(const int8_t s[8]) {  // signed bytes -> each in both 16-bit halves of its lane
    const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) s));
    return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(w, 16));
}

// Q6_K: codes q - 32 in -32..31, so signed x signed with the sign trick; |q - 32| <= 32 lets the 4
// pieces of a 16-column sub-block add in 16 bits (4 x 2 x 32 x 127 < 2^15) before the int8 scale
// multiplies in the madd
static inline __attribute__((always_inline)) void gemm_q6_K_nt(const void * group, const void * act, size_t stride,
                                                               int64_t cols, int nt, float * out, int64_t ld) {
    const block_q6_Kx8 * b = group;
    const se_block_q8 * a[SE_RP_TOKENS];
    __m256 acc[SE_RP_TOKENS];
    for (int t = 0; t < nt; t++) {
        a[t] = act_row(act, stride, t);
        acc[t] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f), high2 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < cols / 256; i++) {
        const __m256 d = _mm256_loadu_ps(b[i].d);
        for (int c = 0; c < 4; c++) {  // activation blocks 2c (low nibbles) and 2c + 1 (high nibbles)
            __m256i i0[SE_RP_TOKENS], i1[SE_RP_TOKENS];
            for (int h = 0; h < 2; h++) {  // sub-blocks: columns 16h .. 16h + 15 of each block
                __m256i s0[SE_RP_TOKENS], s1[SE_RP_TOKENS];
                for (int kk = 0; kk < 4; kk++) {
                    const int k = 4 * h + kk, p = k % 2;
                    const __m256i raw = _mm256_loadu_si256((const __m256i *) (b[i].qs + 256 * c + 32 * k));
                    const __m256i qh = _mm256_loadu_si256((const __m256i *) (b[i].qh + 128 * c + 32 * (k / 2)));
                    // high bits 8j + 4p -> 8j + 4 (block 2c), 8j + 4p + 2 -> 8j + 4 (block 2c + 1)
                    const __m256i h0 = p ? qh : _mm256_slli_epi32(qh, 4);
                    const __m256i h1 = p ? _mm256_srli_epi32(qh, 2) : _mm256_slli_epi32(qh, 2);
                    const __m256i w0 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(raw, low4), _mm256_and_si256(h0, high2)), off);
                    const __m256i w1 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4),
                                                                       _mm256_and_si256(h1, high2)), off);
                    const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
                    for (int t = 0; t < nt; t++) {
                        const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(bcast4(a[t][8 * i + 2 * c].qs + 4 * k), w0));
                        const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(bcast4(a[t][8 * i + 2 * c + 1].qs + 4 * k), w1));
                        s0[t] = kk == 0 ? p0 : _mm256_add_epi16(s0[t], p0);
                        s1[t] = kk == 0 ? p1 : _mm256_add_epi16(s1[t], p1);
                    }
                }
                const __m256i sc0 = scales16_s8(b[i].sc[4 * c + h]), sc1 = scales16_s8(b[i].sc[4 * c + 2 + h]);
                for (int t = 0; t < nt; t++) {
                    const __m256i m0 = _mm256_madd_epi16(s0[t], sc0), m1 = _mm256_madd_epi16(s1[t], sc1);
                    i0[t] = h == 0 ? m0 : _mm256_add_epi32(i0[t], m0);
                    i1[t] = h == 0 ? m1 : _mm256_add_epi32(i1[t], m1);
                }
            }
            for (int t = 0; t < nt; t++) {
                const se_block_q8 * x = a[t] + 8 * i + 2 * c;
                const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0[t]), _mm256_set1_ps(x[0].d),
                                                 _mm256_mul_ps(_mm256_cvtepi32_ps(i1[t]), _mm256_set1_ps(x[1].d)));
                acc[t] = _mm256_fmadd_ps(d, v, acc[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(out + t * ld, acc[t]);
}

#define GEMM(type)                                                                                    \
    static void gemm_##type(const void * g, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) { \
        switch (nt) {  /* one register allocation per tile width */                                  \
        case 1: gemm_##type##_nt(g, act, stride, cols, 1, out, ld); break;                           \
        case 2: gemm_##type##_nt(g, act, stride, cols, 2, out, ld); break;                           \
        case 3: gemm_##type##_nt(g, act, stride, cols, 3, out, ld); break;                           \
        default: gemm_##type##_nt(g, act, stride, cols, 4, out, ld); break;                          \
        }                                                                                             \
    }
GEMM(q4_0)
GEMM(q8_0)
GEMM(q5_0)
GEMM(q6_K)
GEMM(q4_K)

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

static void f16_to_f32(const uint16_t * x, float * y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + i))));
    for (; i < n; i++) y[i] = half(x[i]);
}

// --- attention over one cell for nq query rows: the row is loaded (and converted from f16) once per
// 8 values for 4 queries at a time; with d a multiple of 8 (head sizes are) no scalar tail

static inline __m256 load8_f16(const uint16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
static inline __m256 load8_f32(const float * p) { return _mm256_loadu_ps(p); }

#define DEFINE_ATT_N(sfx, elem_t, LOAD, CONV)                                                         \
    static void dot_##sfx##_n(const elem_t * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out) { \
        if (d % 8) {                                                                                  \
            for (int32_t i = 0; i < nq; i++) out[i] = dot_##sfx(k, q + i * q_stride, d);              \
            return;                                                                                   \
        }                                                                                             \
        int32_t i = 0;                                                                                \
        for (; i + 4 <= nq; i += 4) {                                                                 \
            const float * q0 = q + i * q_stride;                                                      \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                               \
            for (int64_t j = 0; j < d; j += 8) {                                                      \
                const __m256 kv = LOAD(k + j);                                                        \
                a0 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + j), a0);                                \
                a1 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + q_stride + j), a1);                     \
                a2 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + 2 * q_stride + j), a2);                 \
                a3 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + 3 * q_stride + j), a3);                 \
            }                                                                                         \
            out[i] = hsum(a0); out[i + 1] = hsum(a1); out[i + 2] = hsum(a2); out[i + 3] = hsum(a3);   \
        }                                                                                             \
        for (; i < nq; i++) {                                                                         \
            const float * q0 = q + i * q_stride;                                                      \
            __m256 a0 = _mm256_setzero_ps();                                                          \
            for (int64_t j = 0; j < d; j += 8) a0 = _mm256_fmadd_ps(LOAD(k + j), _mm256_loadu_ps(q0 + j), a0); \
            out[i] = hsum(a0);                                                                        \
        }                                                                                             \
    }                                                                                                 \
    static void axpy_##sfx##_n(float * y, int64_t y_stride, const float * a, int32_t nq, const elem_t * v, int64_t d) { \
        if (d % 8) {                                                                                  \
            for (int32_t i = 0; i < nq; i++) axpy_##sfx(y + i * y_stride, a[i], v, d);                \
            return;                                                                                   \
        }                                                                                             \
        for (int64_t j = 0; j < d; j += 8) {                                                          \
            const __m256 vv = LOAD(v + j);                                                            \
            for (int32_t i = 0; i < nq; i++) {                                                        \
                float * yi = y + i * y_stride + j;                                                    \
                _mm256_storeu_ps(yi, _mm256_fmadd_ps(_mm256_set1_ps(a[i]), vv, _mm256_loadu_ps(yi))); \
            }                                                                                         \
        }                                                                                             \
    }

DEFINE_ATT_N(f16, uint16_t, load8_f16, 0)
DEFINE_ATT_N(f32, float, load8_f32, 0)

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
        out->s = d * (float) _mm_cvtsi128_si32(s);
    }
}

void se_quants_use_avx2(se_type_traits * types, se_kernels * k) {
    types[SE_TYPE_Q4_0].vec_dot = vec_dot_q4_0;
    types[SE_TYPE_Q4_1].vec_dot = vec_dot_q4_1;
    types[SE_TYPE_Q8_0].vec_dot = vec_dot_q8_0;
    types[6].vec_dot = vec_dot_q5_0;    // Q5_0
    types[6].vec_dot4 = vec_dot4_q5_0;
    types[12].vec_dot = vec_dot_q4_K;   // Q4_K
    types[12].vec_dot4 = vec_dot4_q4_K;
    types[13].vec_dot = vec_dot_q5_K;   // Q5_K
    types[13].vec_dot4 = vec_dot4_q5_K;
    types[14].vec_dot = vec_dot_q6_K;   // Q6_K
    types[14].vec_dot4 = vec_dot4_q6_K;
    types[SE_TYPE_Q4_0].vec_dot4 = vec_dot4_q4_0;
    types[SE_TYPE_Q4_1].vec_dot4 = vec_dot4_q4_1;
    types[SE_TYPE_Q8_0].vec_dot4 = vec_dot4_q8_0;
    types[SE_TYPE_Q4_0].gemm = gemm_q4_0;
    types[SE_TYPE_Q8_0].gemm = gemm_q8_0;
    types[SE_TYPE_Q5_0].gemm = gemm_q5_0;
    types[SE_TYPE_Q6_K].gemm = gemm_q6_K;
    types[SE_TYPE_Q4_K].gemm = gemm_q4_K;
    types[SE_TYPE_F32].vec_dot = vec_dot_f32;
    types[SE_TYPE_F16].vec_dot = vec_dot_f16;
    types[SE_TYPE_BF16].vec_dot = vec_dot_bf16;
    *k = (se_kernels) {quantize_q8, dot_f32, dot_f16, axpy_f32, axpy_f16, f16_to_f32, dot_f16_n, axpy_f16_n, dot_f32_n, axpy_f32_n,
                       NULL, NULL};  // the batched attention forms: the generic ones over these (se-quants.c)
}
