// AVX-512 (F, BW, VL) + VNNI kernels, chosen at run time (se_cpu_has_avx512) over the AVX2 ones.
// Every function here carries its own target attribute (SE_AVX512): the file is compiled with the
// project's ordinary flags, so nothing outside these functions may use the instructions, and a CPU
// without them never reaches them (CI and users may have AVX2-only CPUs).
//
// The repacked products (se-repack.c) take two neighbouring groups of 8 interleaved rows at once:
// one 512-bit register holds the same 4 columns of 16 rows (group g in the low half, g + 1 in the
// high half), so the 4 activation bytes broadcast to every lane still leave row r's partial sum in
// lane r. VNNI's vpdpbusd multiplies unsigned weight bytes by signed activation bytes and adds each
// lane's 4 products to its int32 sum in one instruction: it replaces AVX2's maddubs + 16-bit add +
// madd chain, which is how llama.cpp's AVX-512 VNNI build gets twice the int8 work per instruction.
// Signed weights (Q8_0, Q6_K) use |w| and the activations negated where w < 0 (a masked subtract:
// AVX-512 has no vpsignb).
//
// Integer sums are exact, and per lane the float operations are those of the AVX2 kernels in the
// same order, so a row's result does not depend on whether its group went through here paired or
// through the AVX2 kernel alone.
#include "se-impl.h"
#include "se-common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>
#include <string.h>

#define SE_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define SE_INLINE static inline __attribute__((always_inline)) SE_AVX512

static inline const se_block_q8 * act_row(const void * act, size_t stride, int k) {
    return (const se_block_q8 *) ((const char *) act + (size_t) k * stride);
}

SE_INLINE __m512i bcast4(const int8_t * p) {  // 4 activation bytes to every 32-bit lane
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

SE_INLINE __m512i load2(const uint8_t * lo, const uint8_t * hi) {  // 32 bytes of group g, then of g + 1
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) lo)),
                              _mm256_loadu_si256((const __m256i *) hi), 1);
}

SE_INLINE __m512 load2_ps(const float * lo, const float * hi) {  // 8 floats of each group
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(lo))),
                                               _mm256_castps_pd(_mm256_loadu_ps(hi)), 1));
}

SE_INLINE __m512 load2_f16(const uint16_t * lo, const uint16_t * hi) {  // 8 halves of each group, as floats
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) lo)),
                                                   _mm_loadu_si128((const __m128i *) hi), 1));
}

SE_INLINE __m512i bytes2_u32(const uint8_t * lo, const uint8_t * hi) {  // 8 bytes of each group, zero-extended
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *) lo), _mm_loadl_epi64((const __m128i *) hi)));
}

SE_INLINE __m512i bytes2_s32(const int8_t * lo, const int8_t * hi) {  // 8 signed bytes of each group
    return _mm512_cvtepi8_epi32(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *) lo), _mm_loadl_epi64((const __m128i *) hi)));
}

// |w| . x with w's sign: vpdpbusd takes unsigned bytes first
SE_INLINE __m512i dot_signed(__m512i sum, __m512i aw, __mmask64 neg, __m512i x) {
    return _mm512_dpbusd_epi32(sum, aw, _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x));
}

#define TILE_BEGIN(block_t)                                                                           \
    const block_t * b0 = group, * b1 = (const block_t *) ((const uint8_t *) group + group_bytes);     \
    const se_block_q8 * a[SE_RP_TOKENS];                                                              \
    __m512 acc[SE_RP_TOKENS];                                                                         \
    for (int t = 0; t < nt; t++) {                                                                    \
        a[t] = act_row(act, stride, t);                                                               \
        acc[t] = _mm512_setzero_ps();                                                                 \
    }
#define TILE_END for (int t = 0; t < nt; t++) _mm512_storeu_ps(out + t * ld, acc[t]);

SE_INLINE void gemm16_q4_0_nt(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols,
                              int nt, float * out, int64_t ld) {
    TILE_BEGIN(block_q4_0x8)
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m512 dw = load2_f16(b0[i].d, b1[i].d);
        __m512i sum[SE_RP_TOKENS];
        for (int t = 0; t < nt; t++) sum[t] = _mm512_setzero_si512();
        for (int k = 0; k < 4; k++) {
            const __m512i raw = load2(b0[i].qs + 32 * k, b1[i].qs + 32 * k);
            const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            for (int t = 0; t < nt; t++) {
                sum[t] = _mm512_dpbusd_epi32(sum[t], lo, bcast4(a[t][i].qs + 4 * k));
                sum[t] = _mm512_dpbusd_epi32(sum[t], hi, bcast4(a[t][i].qs + 16 + 4 * k));
            }
        }
        for (int t = 0; t < nt; t++) {  // d_w (d_x sum - 8 s_x): the codes are q + 8
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t]), _mm512_set1_ps(a[t][i].d), _mm512_set1_ps(-8 * a[t][i].s));
            acc[t] = _mm512_fmadd_ps(dw, v, acc[t]);
        }
    }
    TILE_END
}

SE_INLINE void gemm16_q5_0_nt(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols,
                              int nt, float * out, int64_t ld) {
    TILE_BEGIN(block_q5_0x8)
    const __m512i low4 = _mm512_set1_epi8(0x0f), bit4 = _mm512_set1_epi8(0x10);
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m512 dw = load2_f16(b0[i].d, b1[i].d);
        const __m512i qh = load2((const uint8_t *) b0[i].qh, (const uint8_t *) b1[i].qh);
        __m512i sum[SE_RP_TOKENS];
        for (int t = 0; t < nt; t++) sum[t] = _mm512_setzero_si512();
        for (int k = 0; k < 4; k++) {
            const __m512i raw = load2(b0[i].qs + 32 * k, b1[i].qs + 32 * k);
            // fifth bits: bit 8j + k -> bit 8j + 4 for the low nibbles, bit 8j + 4 + k -> 8j + 4 for the high
            const __m512i lo = _mm512_or_si512(_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_sll_epi32(qh, _mm_cvtsi32_si128(4 - k)), bit4));
            const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4),
                                               _mm512_and_si512(_mm512_srl_epi32(qh, _mm_cvtsi32_si128(k)), bit4));
            for (int t = 0; t < nt; t++) {
                sum[t] = _mm512_dpbusd_epi32(sum[t], lo, bcast4(a[t][i].qs + 4 * k));
                sum[t] = _mm512_dpbusd_epi32(sum[t], hi, bcast4(a[t][i].qs + 16 + 4 * k));
            }
        }
        for (int t = 0; t < nt; t++) {
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t]), _mm512_set1_ps(a[t][i].d), _mm512_set1_ps(-16 * a[t][i].s));
            acc[t] = _mm512_fmadd_ps(dw, v, acc[t]);
        }
    }
    TILE_END
}

SE_INLINE void gemm16_q8_0_nt(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols,
                              int nt, float * out, int64_t ld) {
    TILE_BEGIN(block_q8_0x8)
    for (int64_t i = 0; i < cols / 32; i++) {
        const __m512 dw = load2_f16(b0[i].d, b1[i].d);
        __m512i sum[SE_RP_TOKENS];
        for (int t = 0; t < nt; t++) sum[t] = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) {
            const __m512i w = load2((const uint8_t *) b0[i].qs + 32 * k, (const uint8_t *) b1[i].qs + 32 * k);
            const __m512i aw = _mm512_abs_epi8(w);
            const __mmask64 neg = _mm512_movepi8_mask(w);
            for (int t = 0; t < nt; t++) sum[t] = dot_signed(sum[t], aw, neg, bcast4(a[t][i].qs + 4 * k));
        }
        for (int t = 0; t < nt; t++) {
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a[t][i].d)), _mm512_cvtepi32_ps(sum[t]), acc[t]);
        }
    }
    TILE_END
}

SE_INLINE void gemm16_q4_K_nt(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols,
                              int nt, float * out, int64_t ld) {
    TILE_BEGIN(block_q4_Kx8)
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t i = 0; i < cols / 256; i++) {
        const __m512 d = load2_ps(b0[i].d, b1[i].d), dmin = load2_ps(b0[i].dmin, b1[i].dmin);
        for (int c = 0; c < 4; c++) {  // sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
            __m512i s0[SE_RP_TOKENS], s1[SE_RP_TOKENS];
            for (int t = 0; t < nt; t++) s0[t] = s1[t] = _mm512_setzero_si512();
            for (int k = 0; k < 8; k++) {
                const __m512i raw = load2(b0[i].qs + 256 * c + 32 * k, b1[i].qs + 256 * c + 32 * k);
                const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                for (int t = 0; t < nt; t++) {
                    s0[t] = _mm512_dpbusd_epi32(s0[t], lo, bcast4(a[t][8 * i + 2 * c].qs + 4 * k));
                    s1[t] = _mm512_dpbusd_epi32(s1[t], hi, bcast4(a[t][8 * i + 2 * c + 1].qs + 4 * k));
                }
            }
            // the 6-bit scales multiply the exact sub-block sums; the mins apply to the block sums s
            const __m512i sc0 = bytes2_u32(b0[i].sc[2 * c], b1[i].sc[2 * c]), sc1 = bytes2_u32(b0[i].sc[2 * c + 1], b1[i].sc[2 * c + 1]);
            const __m512 m0 = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(bytes2_u32(b0[i].m[2 * c], b1[i].m[2 * c])));
            const __m512 m1 = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(bytes2_u32(b0[i].m[2 * c + 1], b1[i].m[2 * c + 1])));
            for (int t = 0; t < nt; t++) {
                const se_block_q8 * x = a[t] + 8 * i + 2 * c;
                const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(s0[t], sc0)), _mm512_set1_ps(x[0].d),
                                                 _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_mullo_epi32(s1[t], sc1)), _mm512_set1_ps(x[1].d)));
                acc[t] = _mm512_fmadd_ps(d, v, acc[t]);
                acc[t] = _mm512_fnmadd_ps(m0, _mm512_set1_ps(x[0].s), acc[t]);
                acc[t] = _mm512_fnmadd_ps(m1, _mm512_set1_ps(x[1].s), acc[t]);
            }
        }
    }
    TILE_END
}

// Q6_K: codes q - 32 in -32..31, signed x signed; each 16-column sub-block's exact sum times its
// int8 scale, the two sub-blocks of an activation block added in 32 bits
SE_INLINE void gemm16_q6_K_nt(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols,
                              int nt, float * out, int64_t ld) {
    TILE_BEGIN(block_q6_Kx8)
    const __m512i low4 = _mm512_set1_epi8(0x0f), high2 = _mm512_set1_epi8(0x30), off = _mm512_set1_epi8(32);
    for (int64_t i = 0; i < cols / 256; i++) {
        const __m512 d = load2_ps(b0[i].d, b1[i].d);
        for (int c = 0; c < 4; c++) {  // activation blocks 2c (low nibbles) and 2c + 1 (high nibbles)
            __m512i i0[SE_RP_TOKENS], i1[SE_RP_TOKENS];
            for (int h = 0; h < 2; h++) {  // sub-blocks: columns 16h .. 16h + 15 of each block
                __m512i s0[SE_RP_TOKENS], s1[SE_RP_TOKENS];
                for (int t = 0; t < nt; t++) s0[t] = s1[t] = _mm512_setzero_si512();
                for (int kk = 0; kk < 4; kk++) {
                    const int k = 4 * h + kk, p = k % 2;
                    const __m512i raw = load2(b0[i].qs + 256 * c + 32 * k, b1[i].qs + 256 * c + 32 * k);
                    const __m512i qh = load2(b0[i].qh + 128 * c + 32 * (k / 2), b1[i].qh + 128 * c + 32 * (k / 2));
                    // high bits 8j + 4p -> 8j + 4 (block 2c), 8j + 4p + 2 -> 8j + 4 (block 2c + 1)
                    const __m512i h0 = p ? qh : _mm512_slli_epi32(qh, 4);
                    const __m512i h1 = p ? _mm512_srli_epi32(qh, 2) : _mm512_slli_epi32(qh, 2);
                    const __m512i w0 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(raw, low4), _mm512_and_si512(h0, high2)), off);
                    const __m512i w1 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4),
                                                                       _mm512_and_si512(h1, high2)), off);
                    const __m512i a0 = _mm512_abs_epi8(w0), a1 = _mm512_abs_epi8(w1);
                    const __mmask64 n0 = _mm512_movepi8_mask(w0), n1 = _mm512_movepi8_mask(w1);
                    for (int t = 0; t < nt; t++) {
                        s0[t] = dot_signed(s0[t], a0, n0, bcast4(a[t][8 * i + 2 * c].qs + 4 * k));
                        s1[t] = dot_signed(s1[t], a1, n1, bcast4(a[t][8 * i + 2 * c + 1].qs + 4 * k));
                    }
                }
                const __m512i sc0 = bytes2_s32(b0[i].sc[4 * c + h], b1[i].sc[4 * c + h]);
                const __m512i sc1 = bytes2_s32(b0[i].sc[4 * c + 2 + h], b1[i].sc[4 * c + 2 + h]);
                for (int t = 0; t < nt; t++) {
                    const __m512i m0 = _mm512_mullo_epi32(s0[t], sc0), m1 = _mm512_mullo_epi32(s1[t], sc1);
                    i0[t] = h == 0 ? m0 : _mm512_add_epi32(i0[t], m0);
                    i1[t] = h == 0 ? m1 : _mm512_add_epi32(i1[t], m1);
                }
            }
            for (int t = 0; t < nt; t++) {
                const se_block_q8 * x = a[t] + 8 * i + 2 * c;
                const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[t]), _mm512_set1_ps(x[0].d),
                                                 _mm512_mul_ps(_mm512_cvtepi32_ps(i1[t]), _mm512_set1_ps(x[1].d)));
                acc[t] = _mm512_fmadd_ps(d, v, acc[t]);
            }
        }
    }
    TILE_END
}

#define GEMM16(type)                                                                                  \
    SE_AVX512 static void gemm16_##type(const void * g, uint64_t gb, const void * act, size_t stride, int64_t cols, \
                                        int32_t nt, float * out, int64_t ld) {                        \
        switch (nt) {  /* one register allocation per tile width */                                  \
        case 1: gemm16_##type##_nt(g, gb, act, stride, cols, 1, out, ld); break;                     \
        case 2: gemm16_##type##_nt(g, gb, act, stride, cols, 2, out, ld); break;                     \
        case 3: gemm16_##type##_nt(g, gb, act, stride, cols, 3, out, ld); break;                     \
        default: gemm16_##type##_nt(g, gb, act, stride, cols, 4, out, ld); break;                    \
        }                                                                                             \
    }
GEMM16(q4_0)
GEMM16(q5_0)
GEMM16(q8_0)
GEMM16(q4_K)
GEMM16(q6_K)

// --- attention over one cell for nq query rows (decode and prefill): 16 values per step, f16 rows
// converted inside the multiply-add loop; head sizes that are not a multiple of 16 take the AVX2 forms

SE_INLINE float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

SE_AVX512 static void dot_f16_n(const uint16_t * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out) {
    int32_t i = 0;
    for (; i + 4 <= nq; i += 4) {
        const float * q0 = q + i * q_stride;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < d; j += 16) {
            const __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + j)));
            a0 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + j), a0);
            a1 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + q_stride + j), a1);
            a2 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + 2 * q_stride + j), a2);
            a3 = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q0 + 3 * q_stride + j), a3);
        }
        out[i] = hsum512(a0); out[i + 1] = hsum512(a1); out[i + 2] = hsum512(a2); out[i + 3] = hsum512(a3);
    }
    for (; i < nq; i++) {
        const float * q0 = q + i * q_stride;
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j += 16) {
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + j))), _mm512_loadu_ps(q0 + j), a0);
        }
        out[i] = hsum512(a0);
    }
}

SE_AVX512 static void axpy_f16_n(float * y, int64_t y_stride, const float * a, int32_t nq, const uint16_t * v, int64_t d) {
    for (int64_t j = 0; j < d; j += 16) {
        const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (v + j)));
        for (int32_t i = 0; i < nq; i++) {
            float * yi = y + i * y_stride + j;
            _mm512_storeu_ps(yi, _mm512_fmadd_ps(_mm512_set1_ps(a[i]), vv, _mm512_loadu_ps(yi)));
        }
    }
}

static void (*avx2_dot_f16_n)(const uint16_t *, const float *, int64_t, int32_t, int64_t, float *);
static void (*avx2_axpy_f16_n)(float *, int64_t, const float *, int32_t, const uint16_t *, int64_t);

SE_AVX512 static void dot_f16_n_any(const uint16_t * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out) {
    if (d % 16) avx2_dot_f16_n(k, q, q_stride, nq, d, out);
    else dot_f16_n(k, q, q_stride, nq, d, out);
}

SE_AVX512 static void axpy_f16_n_any(float * y, int64_t y_stride, const float * a, int32_t nq, const uint16_t * v, int64_t d) {
    if (d % 16) avx2_axpy_f16_n(y, y_stride, a, nq, v, d);
    else axpy_f16_n(y, y_stride, a, nq, v, d);
}

// Many cells of one KV head (decode and prefill attention): the loop over cells runs here, so a
// cell costs no call; a key row meets up to 4 query rows per pass, and the 4 dot products are
// summed across lanes together (about 14 shuffles and adds for 4, against about 8 each alone);
// value rows add into up to 4 x 64 outputs that stay in registers across all the cells.

// the lane sums of a0..a3, in that order (each sum's order of additions is fixed: a query's score
// does not depend on its place among the 4)
SE_INLINE __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xee));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xee));
    const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xdd));
    const __m512 z = _mm512_add_ps(y, _mm512_permute_ps(y, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512 u = _mm512_add_ps(z, _mm512_permute_ps(z, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u));
}

SE_INLINE void att_dot_m(const uint16_t * base, int64_t stride, const int32_t * cells, int32_t n, const float * q, int m,
                         int64_t d, float * out, int32_t nq) {
    for (int32_t i = 0; i < n; i++) {
        const uint16_t * k = base + (int64_t) cells[i] * stride;
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t j = 0; j < d; j += 16) {
            const __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (k + j)));
            for (int r = 0; r < m; r++) a[r] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q + r * d + j), a[r]);
        }
        float s[4];
        _mm_storeu_ps(s, sum4(a[0], a[1], a[2], a[3]));
        for (int r = 0; r < m; r++) out[(int64_t) i * nq + r] = s[r];
    }
}

SE_AVX512 static void att_dot_f16(const uint16_t * base, int64_t stride, const int32_t * cells, int32_t n, const float * q,
                                  int32_t nq, int64_t d, float * out) {
    if (d % 16) {
        for (int32_t i = 0; i < n; i++) avx2_dot_f16_n(base + (int64_t) cells[i] * stride, q, d, nq, d, out + (int64_t) i * nq);
        return;
    }
    for (int32_t q0 = 0; q0 < nq; q0 += 4) {
        switch (nq - q0) {
        case 1: att_dot_m(base, stride, cells, n, q + q0 * d, 1, d, out + q0, nq); break;
        case 2: att_dot_m(base, stride, cells, n, q + q0 * d, 2, d, out + q0, nq); break;
        case 3: att_dot_m(base, stride, cells, n, q + q0 * d, 3, d, out + q0, nq); break;
        default: att_dot_m(base, stride, cells, n, q + q0 * d, 4, d, out + q0, nq); break;
        }
    }
}

// y rows [q0, q0 + m), columns [j0, j0 + 16 nc): sum over the cells in registers, then added to y
SE_INLINE void att_axpy_m(float * y, const float * w, int32_t nq, const uint16_t * base, int64_t stride,
                          const int32_t * cells, int32_t n, int64_t d, int m, int nc) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++) {
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    }
    for (int32_t i = 0; i < n; i++) {
        const uint16_t * v = base + (int64_t) cells[i] * stride;
        const float * wi = w + (int64_t) i * nq;
        for (int c = 0; c < nc; c++) {
            const __m512 vv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (v + 16 * c)));
            for (int r = 0; r < m; r++) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(wi[r]), vv, acc[r][c]);
        }
    }
    for (int r = 0; r < m; r++) {
        for (int c = 0; c < nc; c++) {
            float * yr = y + r * d + 16 * c;
            _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), acc[r][c]));
        }
    }
}

SE_AVX512 static void att_axpy_f16(float * y, const float * w, int32_t nq, const uint16_t * base, int64_t stride,
                                   const int32_t * cells, int32_t n, int64_t d) {
    if (d % 16) {
        for (int32_t i = 0; i < n; i++) avx2_axpy_f16_n(y, d, w + (int64_t) i * nq, nq, base + (int64_t) cells[i] * stride, d);
        return;
    }
    for (int32_t q0 = 0; q0 < nq; q0 += 4) {
        for (int64_t j0 = 0; j0 < d; j0 += 64) {
            const int m = nq - q0 < 4 ? nq - q0 : 4, nc = d - j0 < 64 ? (int) (d - j0) / 16 : 4;
            float * yq = y + q0 * d + j0;
            const uint16_t * b = base + j0;
            const float * wq = w + q0;
#define AXPY_CASE(M, NC) att_axpy_m(yq, wq, nq, b, stride, cells, n, d, M, NC)
            if (nc == 4) {
                switch (m) {
                case 1: AXPY_CASE(1, 4); break;
                case 2: AXPY_CASE(2, 4); break;
                case 3: AXPY_CASE(3, 4); break;
                default: AXPY_CASE(4, 4); break;
                }
            } else {
                att_axpy_m(yq, wq, nq, b, stride, cells, n, d, m, nc);
            }
#undef AXPY_CASE
        }
    }
}

bool se_cpu_has_avx512(void) {
    __builtin_cpu_init();  // also checks that the OS saves the 512-bit state
    return se_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// On top of the AVX2 table (se_quants_use_avx2 first): the paired-group products and attention rows.
void se_quants_use_avx512(se_type_traits * types, se_kernels * k) {
    types[SE_TYPE_Q4_0].gemm16 = gemm16_q4_0;
    types[SE_TYPE_Q5_0].gemm16 = gemm16_q5_0;
    types[SE_TYPE_Q8_0].gemm16 = gemm16_q8_0;
    types[SE_TYPE_Q4_K].gemm16 = gemm16_q4_K;
    types[SE_TYPE_Q6_K].gemm16 = gemm16_q6_K;
    avx2_dot_f16_n = k->dot_f16_n;
    avx2_axpy_f16_n = k->axpy_f16_n;
    k->dot_f16_n = dot_f16_n_any;
    k->axpy_f16_n = axpy_f16_n_any;
    k->att_dot_f16 = att_dot_f16;
    k->att_axpy_f16 = att_axpy_f16;
}

#endif
