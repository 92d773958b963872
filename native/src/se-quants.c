// Tensor types: block layouts (GGUF.md §7), dequantization, and dot products of a weight row with
// activations.
//
// Two paths: `dot` computes sum_j dequant(w)_j * x_j in float, exactly what the torch reference
// computes on dequantized weights; `vec_dot` is the fast path the forward pass uses, which for
// quantized weights first quantizes the activations to 8 bits per value (as llama.cpp does) and
// sums integer products per block. The portable C versions here define both; se-quants-avx2.c
// replaces them with SIMD versions on CPUs that have AVX2.
#include "se-impl.h"
#include "se-common.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// half precision

static float fp16_table[1 << 16];  // every half value, filled once: conversion by lookup

static float fp16_to_fp32_slow(uint16_t h) {
    uint32_t sign = (uint32_t) (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0 && mant == 0) {
        bits = sign;
    } else if (exp == 0) {  // subnormal: renormalize
        exp = 127 - 15 + 1;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float se_fp16_to_fp32(uint16_t h) { return fp16_table[h]; }

uint16_t se_fp32_to_fp16(float f) {  // round to nearest even, as a hardware conversion would
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (x >> 16) & 0x8000;
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;  // NaN
    if (a >= 0x47800000u) return sign | 0x7c00; // too large: infinity
    if (a >= 0x38800000u) {                      // a normal half
        uint32_t h = (((a >> 23) - 127 + 15) << 10) | ((a & 0x7fffff) >> 13);
        uint32_t rest = a & 0x1fff;
        if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  // a carry into the exponent is correct
        return sign | (uint16_t) h;
    }
    uint32_t e = a >> 23;                        // a subnormal half: round(|f| * 2^24)
    if (e < 102) return sign;
    uint32_t m = (a & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1))) h++;
    return sign | (uint16_t) h;
}

static float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t) h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// ---------------------------------------------------------------------------------------------
// dequantization

static void f32_to_float(const void * src, float * dst, int64_t n) { memcpy(dst, src, (size_t) n * sizeof(float)); }

static void f16_to_float(const void * src, float * dst, int64_t n) {
    const uint16_t * h = src;
    for (int64_t i = 0; i < n; i++) dst[i] = fp16_table[h[i]];
}

static void bf16_to_float(const void * src, float * dst, int64_t n) {
    const uint16_t * h = src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_fp32(h[i]);
}

static void q8_0_to_float(const void * src, float * dst, int64_t n) {
    const block_q8_0 * b = src;
    for (int64_t i = 0; i < n / 32; i++, b++) {
        const float d = fp16_table[b->d];
        for (int j = 0; j < 32; j++) dst[i * 32 + j] = d * b->qs[j];
    }
}

static void q4_0_to_float(const void * src, float * dst, int64_t n) {
    const block_q4_0 * b = src;
    for (int64_t i = 0; i < n / 32; i++, b++) {
        const float d = fp16_table[b->d];
        for (int j = 0; j < 16; j++) {  // weight j in the low nibble, weight j + 16 in the high one
            dst[i * 32 + j]      = d * ((b->qs[j] & 0xf) - 8);
            dst[i * 32 + j + 16] = d * ((b->qs[j] >> 4) - 8);
        }
    }
}

static void q4_1_to_float(const void * src, float * dst, int64_t n) {
    const block_q4_1 * b = src;
    for (int64_t i = 0; i < n / 32; i++, b++) {
        const float d = fp16_table[b->d], m = fp16_table[b->m];
        for (int j = 0; j < 16; j++) {
            dst[i * 32 + j]      = d * (b->qs[j] & 0xf) + m;
            dst[i * 32 + j + 16] = d * (b->qs[j] >> 4) + m;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q5_0 and the K-quants, unpacked: integer codes plus, per run of 32 (Q6_K: 16) codes, a scale and
// a min, with value = scale * code - min. Dequantization and both dot products are built on this.

typedef struct unpacked {
    int8_t code[256];
    float scale[16];  // per run of `run` codes
    float min[16];
    int run;          // 32, or 16 for Q6_K
    int n;            // codes in the block: 32 or 256
} unpacked;

static void unpack_q5_0(const void * blk, unpacked * u) {
    const block_q5_0 * b = blk;
    uint32_t qh;
    memcpy(&qh, b->qh, 4);
    for (int j = 0; j < 16; j++) {  // the fifth bit of weight j is bit j of qh, of weight j + 16 bit j + 16
        u->code[j] = (int8_t) (((b->qs[j] & 0xf) | (((qh >> j) & 1) << 4)) - 16);
        u->code[j + 16] = (int8_t) (((b->qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
    u->scale[0] = fp16_table[b->d];
    u->min[0] = 0;
    u->run = u->n = 32;
}

static void unpack_q4_K(const void * blk, unpacked * u) {
    const block_q4_K * b = blk;
    uint8_t sc[8], m[8];
    se_k_scales(b->scales, sc, m);
    const float d = fp16_table[b->d], dmin = fp16_table[b->dmin];
    for (int c = 0; c < 4; c++) {  // 32 bytes per 64 weights: low nibbles, then high nibbles
        for (int l = 0; l < 32; l++) {
            u->code[64 * c + l] = (int8_t) (b->qs[32 * c + l] & 0xf);
            u->code[64 * c + 32 + l] = (int8_t) (b->qs[32 * c + l] >> 4);
        }
    }
    for (int j = 0; j < 8; j++) {
        u->scale[j] = d * sc[j];
        u->min[j] = dmin * m[j];
    }
    u->run = 32;
    u->n = 256;
}

static void unpack_q5_K(const void * blk, unpacked * u) {
    const block_q5_K * b = blk;
    uint8_t sc[8], m[8];
    se_k_scales(b->scales, sc, m);
    const float d = fp16_table[b->d], dmin = fp16_table[b->dmin];
    for (int c = 0; c < 4; c++) {  // the fifth bits: bit 2c of qh[l] for weight 64c + l, bit 2c + 1 for 64c + 32 + l
        for (int l = 0; l < 32; l++) {
            u->code[64 * c + l] = (int8_t) ((b->qs[32 * c + l] & 0xf) | (((b->qh[l] >> (2 * c)) & 1) << 4));
            u->code[64 * c + 32 + l] = (int8_t) ((b->qs[32 * c + l] >> 4) | (((b->qh[l] >> (2 * c + 1)) & 1) << 4));
        }
    }
    for (int j = 0; j < 8; j++) {
        u->scale[j] = d * sc[j];
        u->min[j] = dmin * m[j];
    }
    u->run = 32;
    u->n = 256;
}

static void unpack_q6_K(const void * blk, unpacked * u) {
    const block_q6_K * b = blk;
    const float d = fp16_table[b->d];
    for (int h = 0; h < 2; h++) {  // two halves of 128 weights, each 4 runs of 32 from 64 ql and 32 qh bytes
        const uint8_t * ql = b->ql + 64 * h, * qh = b->qh + 32 * h;
        int8_t * q = u->code + 128 * h;
        for (int l = 0; l < 32; l++) {
            q[l] = (int8_t) (((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4)) - 32);
            q[l + 32] = (int8_t) (((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[l + 64] = (int8_t) (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[l + 96] = (int8_t) (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
    for (int j = 0; j < 16; j++) {
        u->scale[j] = d * b->scales[j];
        u->min[j] = 0;
    }
    u->run = 16;
    u->n = 256;
}

// to_float, dot (float activations) and vec_dot (8-bit activations) of an unpacked type
#define DEFINE_UNPACKED(type, block_t, unpack)                                                      \
    static void type##_to_float(const void * src, float * dst, int64_t n) {                         \
        const block_t * b = src;                                                                    \
        unpacked u;                                                                                 \
        for (int64_t i = 0; i < n; i += u.n, b++, dst += u.n) {                                      \
            unpack(b, &u);                                                                          \
            for (int j = 0; j < u.n; j++) dst[j] = u.scale[j / u.run] * u.code[j] - u.min[j / u.run]; \
        }                                                                                           \
    }                                                                                               \
    static float dot_##type(const void * row, const float * x, int64_t n) {                         \
        const block_t * b = row;                                                                    \
        unpacked u;                                                                                 \
        float acc = 0;                                                                              \
        for (int64_t i = 0; i < n; i += u.n, b++, x += u.n) {                                        \
            unpack(b, &u);                                                                          \
            for (int r = 0; r < u.n / u.run; r++) {                                                 \
                float s = 0, sx = 0;                                                                \
                for (int j = r * u.run; j < (r + 1) * u.run; j++) {                                 \
                    s += u.code[j] * x[j];                                                          \
                    sx += x[j];                                                                     \
                }                                                                                   \
                acc += u.scale[r] * s - u.min[r] * sx;                                              \
            }                                                                                       \
        }                                                                                           \
        return acc;                                                                                 \
    }                                                                                               \
    static float vec_dot_##type(const void * row, const void * act, int64_t n) {                    \
        const block_t * b = row;                                                                    \
        const se_block_q8 * a = act;                                                                \
        unpacked u;                                                                                 \
        float acc = 0;                                                                              \
        for (int64_t i = 0; i < n; i += u.n, b++) {                                                  \
            unpack(b, &u);                                                                          \
            for (int k = 0; k < u.n / 32; k++, a++) {                                               \
                for (int r = k * 32 / u.run; r < (k + 1) * 32 / u.run; r++) {                       \
                    int32_t s = 0;                                                                  \
                    for (int j = r * u.run; j < (r + 1) * u.run; j++) s += u.code[j] * a->qs[j - 32 * k]; \
                    acc += u.scale[r] * a->d * (float) s;                                           \
                }                                                                                   \
                acc -= u.min[k * u.run / 32] * a->s;                                                \
            }                                                                                       \
        }                                                                                           \
        return acc;                                                                                 \
    }

DEFINE_UNPACKED(q5_0, block_q5_0, unpack_q5_0)
DEFINE_UNPACKED(q4_K, block_q4_K, unpack_q4_K)
DEFINE_UNPACKED(q5_K, block_q5_K, unpack_q5_K)
DEFINE_UNPACKED(q6_K, block_q6_K, unpack_q6_K)

// ---------------------------------------------------------------------------------------------
// dot products: eight independent partial sums, so the loops vectorize without -ffast-math

static float hsum8(const float s[8]) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

static float dot_f32(const void * row, const float * x, int64_t n) {
    const float * w = row;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) s[k] += w[i + k] * x[i + k];
    }
    float tail = 0;
    for (; i < n; i++) tail += w[i] * x[i];
    return hsum8(s) + tail;
}

static float dot_f16(const void * row, const float * x, int64_t n) {
    const uint16_t * w = row;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) s[k] += fp16_table[w[i + k]] * x[i + k];
    }
    float tail = 0;
    for (; i < n; i++) tail += fp16_table[w[i]] * x[i];
    return hsum8(s) + tail;
}

static float dot_bf16(const void * row, const float * x, int64_t n) {
    const uint16_t * w = row;
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) s[k] += bf16_to_fp32(w[i + k]) * x[i + k];
    }
    float tail = 0;
    for (; i < n; i++) tail += bf16_to_fp32(w[i]) * x[i];
    return hsum8(s) + tail;
}

static float dot_q8_0(const void * row, const float * x, int64_t n) {
    const block_q8_0 * b = row;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++, b++, x += 32) {
        float s[8] = {0};
        for (int j = 0; j < 32; j += 8) {
            for (int k = 0; k < 8; k++) s[k] += b->qs[j + k] * x[j + k];
        }
        acc += fp16_table[b->d] * hsum8(s);
    }
    return acc;
}

static float dot_q4_0(const void * row, const float * x, int64_t n) {
    const block_q4_0 * b = row;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++, b++, x += 32) {
        float s[8] = {0};
        for (int j = 0; j < 16; j += 8) {
            for (int k = 0; k < 8; k++) {
                s[k] += ((b->qs[j + k] & 0xf) - 8) * x[j + k] + ((b->qs[j + k] >> 4) - 8) * x[j + k + 16];
            }
        }
        acc += fp16_table[b->d] * hsum8(s);
    }
    return acc;
}

static float dot_q4_1(const void * row, const float * x, int64_t n) {
    const block_q4_1 * b = row;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++, b++, x += 32) {
        float s[8] = {0}, sx[8] = {0};  // sum q * x, and sum x for the block's offset m
        for (int j = 0; j < 16; j += 8) {
            for (int k = 0; k < 8; k++) {
                s[k] += (b->qs[j + k] & 0xf) * x[j + k] + (b->qs[j + k] >> 4) * x[j + k + 16];
                sx[k] += x[j + k] + x[j + k + 16];
            }
        }
        acc += fp16_table[b->d] * hsum8(s) + fp16_table[b->m] * hsum8(sx);
    }
    return acc;
}

// ---------------------------------------------------------------------------------------------
// the fast path, portable: 8-bit activations and integer sums per block

static void quantize_q8(const float * x, se_block_q8 * out, int64_t n) {
    for (int64_t i = 0; i < n / 32; i++, x += 32, out++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127, id = d != 0 ? 1 / d : 0;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            out->qs[j] = (int8_t) nearbyintf(x[j] * id);  // to nearest even, as the SIMD conversion
            sum += out->qs[j];
        }
        out->d = d;
        out->s = d * (float) sum;
    }
}

static float vec_dot_q8_0(const void * row, const void * act, int64_t n) {
    const block_q8_0 * b = row;
    const se_block_q8 * a = act;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += b[i].qs[j] * a[i].qs[j];
        acc += fp16_table[b[i].d] * a[i].d * (float) s;
    }
    return acc;
}

static float vec_dot_q4_0(const void * row, const void * act, int64_t n) {
    const block_q4_0 * b = row;
    const se_block_q8 * a = act;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (b[i].qs[j] & 0xf) * a[i].qs[j] + (b[i].qs[j] >> 4) * a[i].qs[j + 16];
        acc += fp16_table[b[i].d] * (a[i].d * (float) s - 8 * a[i].s);  // the codes are q + 8
    }
    return acc;
}

static float vec_dot_q4_1(const void * row, const void * act, int64_t n) {
    const block_q4_1 * b = row;
    const se_block_q8 * a = act;
    float acc = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (b[i].qs[j] & 0xf) * a[i].qs[j] + (b[i].qs[j] >> 4) * a[i].qs[j + 16];
        acc += fp16_table[b[i].d] * a[i].d * (float) s + fp16_table[b[i].m] * a[i].s;
    }
    return acc;
}

// float activations: the fast path is the exact one
static float vec_dot_f32(const void * row, const void * act, int64_t n) { return dot_f32(row, act, n); }
static float vec_dot_f16(const void * row, const void * act, int64_t n) { return dot_f16(row, act, n); }
static float vec_dot_bf16(const void * row, const void * act, int64_t n) { return dot_bf16(row, act, n); }

static float plain_dot_f32(const float * a, const float * b, int64_t n) { return dot_f32(a, b, n); }
static float plain_dot_f16(const uint16_t * a, const float * b, int64_t n) { return dot_f16(a, b, n); }

static void axpy_f32(float * y, float a, const float * x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void axpy_f16(float * y, float a, const uint16_t * x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * fp16_table[x[i]];
}

static void f16_to_f32(const uint16_t * x, float * y, int64_t n) { f16_to_float(x, y, n); }

static void dot_f16_n(const uint16_t * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out) {
    for (int32_t i = 0; i < nq; i++) out[i] = plain_dot_f16(k, q + i * q_stride, d);
}

static void axpy_f16_n(float * y, int64_t y_stride, const float * a, int32_t nq, const uint16_t * v, int64_t d) {
    for (int32_t i = 0; i < nq; i++) axpy_f16(y + i * y_stride, a[i], v, d);
}

static void dot_f32_n(const float * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out) {
    for (int32_t i = 0; i < nq; i++) out[i] = plain_dot_f32(k, q + i * q_stride, d);
}

static void axpy_f32_n(float * y, int64_t y_stride, const float * a, int32_t nq, const float * v, int64_t d) {
    for (int32_t i = 0; i < nq; i++) axpy_f32(y + i * y_stride, a[i], v, d);
}

// many cells through the per-cell forms of the ISA in use (portable, AVX2)
static void att_dot_f16_cells(const uint16_t * base, int64_t stride, const int32_t * cells, int32_t n, const float * q,
                              int32_t nq, int64_t d, float * out) {
    for (int32_t i = 0; i < n; i++) se_kern.dot_f16_n(base + (int64_t) cells[i] * stride, q, d, nq, d, out + (int64_t) i * nq);
}

static void att_axpy_f16_cells(float * y, const float * w, int32_t nq, const uint16_t * base, int64_t stride,
                               const int32_t * cells, int32_t n, int64_t d) {
    for (int32_t i = 0; i < n; i++) se_kern.axpy_f16_n(y, d, w + (int64_t) i * nq, nq, base + (int64_t) cells[i] * stride, d);
}

// four activation rows through vec_dot, for types without a dedicated kernel
static void vec_dot4_generic(float (*vec_dot)(const void *, const void *, int64_t), const void * row,
                             const void * act, size_t stride, int64_t n, float out[4]) {
    for (int k = 0; k < 4; k++) out[k] = vec_dot(row, (const char *) act + (size_t) k * stride, n);
}

#define VEC_DOT4(name, vec_dot) \
    static void name(const void * row, const void * act, size_t stride, int64_t n, float out[4]) { \
        vec_dot4_generic(vec_dot, row, act, stride, n, out); \
    }
VEC_DOT4(vec_dot4_q8_0, vec_dot_q8_0)
VEC_DOT4(vec_dot4_q4_0, vec_dot_q4_0)
VEC_DOT4(vec_dot4_q4_1, vec_dot_q4_1)
VEC_DOT4(vec_dot4_q5_0, vec_dot_q5_0)
VEC_DOT4(vec_dot4_q4_K, vec_dot_q4_K)
VEC_DOT4(vec_dot4_q5_K, vec_dot_q5_K)
VEC_DOT4(vec_dot4_q6_K, vec_dot_q6_K)

size_t se_act_row_bytes(int32_t act, int64_t n) {
    return act == SE_ACT_Q8 ? (size_t) (n / 32) * sizeof(se_block_q8) : (size_t) n * sizeof(float);
}

// ---------------------------------------------------------------------------------------------
// the type table: every ggml type id with its block size, kernels where the core has them

static se_type_traits types[SE_TYPE_COUNT] = {
    [SE_TYPE_F32]  = {"F32", 1, 4, f32_to_float, dot_f32, SE_ACT_F32, vec_dot_f32},
    [SE_TYPE_F16]  = {"F16", 1, 2, f16_to_float, dot_f16, SE_ACT_F32, vec_dot_f16},
    [SE_TYPE_Q4_0] = {"Q4_0", 32, 18, q4_0_to_float, dot_q4_0, SE_ACT_Q8, vec_dot_q4_0, vec_dot4_q4_0},
    [SE_TYPE_Q4_1] = {"Q4_1", 32, 20, q4_1_to_float, dot_q4_1, SE_ACT_Q8, vec_dot_q4_1, vec_dot4_q4_1},
    [6]  = {"Q5_0", 32, 22, q5_0_to_float, dot_q5_0, SE_ACT_Q8, vec_dot_q5_0, vec_dot4_q5_0},
    [7]  = {"Q5_1", 32, 24, NULL, NULL},
    [SE_TYPE_Q8_0] = {"Q8_0", 32, 34, q8_0_to_float, dot_q8_0, SE_ACT_Q8, vec_dot_q8_0, vec_dot4_q8_0},
    [9]  = {"Q8_1", 32, 36, NULL, NULL},
    [10] = {"Q2_K", 256, 84, NULL, NULL},
    [11] = {"Q3_K", 256, 110, NULL, NULL},
    [12] = {"Q4_K", 256, 144, q4_K_to_float, dot_q4_K, SE_ACT_Q8, vec_dot_q4_K, vec_dot4_q4_K},
    [13] = {"Q5_K", 256, 176, q5_K_to_float, dot_q5_K, SE_ACT_Q8, vec_dot_q5_K, vec_dot4_q5_K},
    [14] = {"Q6_K", 256, 210, q6_K_to_float, dot_q6_K, SE_ACT_Q8, vec_dot_q6_K, vec_dot4_q6_K},
    [15] = {"Q8_K", 256, 292, NULL, NULL},
    [16] = {"IQ2_XXS", 256, 66, NULL, NULL},
    [17] = {"IQ2_XS", 256, 74, NULL, NULL},
    [18] = {"IQ3_XXS", 256, 98, NULL, NULL},
    [19] = {"IQ1_S", 256, 50, NULL, NULL},
    [20] = {"IQ4_NL", 32, 18, NULL, NULL},
    [21] = {"IQ3_S", 256, 110, NULL, NULL},
    [22] = {"IQ2_S", 256, 82, NULL, NULL},
    [23] = {"IQ4_XS", 256, 136, NULL, NULL},
    [24] = {"I8", 1, 1, NULL, NULL},
    [25] = {"I16", 1, 2, NULL, NULL},
    [26] = {"I32", 1, 4, NULL, NULL},
    [27] = {"I64", 1, 8, NULL, NULL},
    [28] = {"F64", 1, 8, NULL, NULL},
    [29] = {"IQ1_M", 256, 56, NULL, NULL},
    [SE_TYPE_BF16] = {"BF16", 1, 2, bf16_to_float, dot_bf16, SE_ACT_F32, vec_dot_bf16},
    [34] = {"TQ1_0", 256, 54, NULL, NULL},
    [35] = {"TQ2_0", 256, 66, NULL, NULL},
    [39] = {"MXFP4", 32, 17, NULL, NULL},
    [40] = {"NVFP4", 64, 36, NULL, NULL},
    [41] = {"Q1_0", 128, 18, NULL, NULL},
};

const se_type_traits * se_type_get(int32_t type) {
    if (type < 0 || type >= SE_TYPE_COUNT || types[type].block == 0) return NULL;
    return &types[type];
}

// ---------------------------------------------------------------------------------------------
// kernel selection

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

// the 8 six-bit scales and mins of a Q4_K/Q5_K block (GGUF.md §7.2); the AVX2 kernels share it
void se_k_scales(const uint8_t s[12], uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xf) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

se_kernels se_kern = {quantize_q8, plain_dot_f32, plain_dot_f16, axpy_f32, axpy_f16, f16_to_f32,
                      dot_f16_n, axpy_f16_n, dot_f32_n, axpy_f32_n, att_dot_f16_cells, att_axpy_f16_cells};

bool se_cpu_has_avx2(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();  // also checks that the OS saves the AVX state
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

static se_type_traits portable_types[SE_TYPE_COUNT];
static se_kernels portable_kern;

// Instruction-set levels of the kernel table, each on top of the one below.
enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char * const isa_names[] = {"none", "avx2", "avx512"};
static int isa_chosen;  // at load: the best the CPU has, capped by SEPEDGE_ISA / SEPEDGE_SIMD
static int isa_now;

static int isa_best(void) {
#if defined(__x86_64__)
    if (se_cpu_has_avx512()) return ISA_AVX512;
    if (se_cpu_has_avx2()) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

// Point the kernels at those of `isa` (which the CPU must have), or at the portable C.
static void choose_kernels(int isa) {
    memcpy(types, portable_types, sizeof types);
    se_kern = portable_kern;
#if defined(__x86_64__)
    if (isa >= ISA_AVX2) se_quants_use_avx2(types, &se_kern);
    if (isa >= ISA_AVX512) se_quants_use_avx512(types, &se_kern);
#endif
    if (!se_kern.att_dot_f16) se_kern.att_dot_f16 = att_dot_f16_cells;
    if (!se_kern.att_axpy_f16) se_kern.att_axpy_f16 = att_axpy_f16_cells;
    isa_now = isa;
}

static void init_tables(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) fp16_table[i] = fp16_to_fp32_slow((uint16_t) i);
    se_repack_portable(types);
    memcpy(portable_types, types, sizeof types);
    portable_kern = se_kern;
    // SEPEDGE_ISA=avx2|portable forces a lower level than the CPU's (so the lower paths are tested
    // and measured on any machine); SEPEDGE_SIMD=0 is the older spelling of portable
    isa_chosen = isa_best();
    const char * env = getenv("SEPEDGE_ISA"), * simd = getenv("SEPEDGE_SIMD");
    if (env && (!strcmp(env, "portable") || !strcmp(env, "none"))) isa_chosen = ISA_PORTABLE;
    else if (env && !strcmp(env, "avx2") && isa_chosen > ISA_AVX2) isa_chosen = ISA_AVX2;
    if (simd && simd[0] == '0') isa_chosen = ISA_PORTABLE;
    choose_kernels(isa_chosen);
}

void se_quants_init(void) { pthread_once(&init_once, init_tables); }

// ---------------------------------------------------------------------------------------------
// public kernel API (tests and tools)

static int kernel_args(int32_t type, int64_t n, const se_type_traits ** tt) {
    se_quants_init();
    *tt = se_type_get(type);
    if (!*tt || !(*tt)->to_float) return se_error(SE_ERR_UNSUPPORTED, "tensor type %d has no kernels", type);
    if (n < 0 || n % (*tt)->block) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "%lld values do not split into %s blocks of %d", (long long) n,
                        (*tt)->name, (*tt)->block);
    }
    return SE_OK;
}

SE_API int se_type_info(int32_t type, const char ** name, int32_t * block, int32_t * size, int32_t * supported) {
    const se_type_traits * tt = se_type_get(type);
    if (!tt) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown tensor type %d", type);
    if (name) *name = tt->name;
    if (block) *block = tt->block;
    if (size) *size = tt->size;
    if (supported) *supported = tt->to_float != NULL;
    return SE_OK;
}

SE_API int se_dequantize(int32_t type, const void * src, float * dst, int64_t n) {
    const se_type_traits * tt;
    int r = kernel_args(type, n, &tt);
    if (r == SE_OK) tt->to_float(src, dst, n);
    return r;
}

SE_API int se_dot(int32_t type, const void * row, const float * x, int64_t n, float * out) {
    const se_type_traits * tt;
    int r = kernel_args(type, n, &tt);
    if (r == SE_OK) *out = tt->dot(row, x, n);
    return r;
}

SE_API int se_vec_dot(int32_t type, const void * row, const float * x, int64_t n, float * out) {
    const se_type_traits * tt;
    int r = kernel_args(type, n, &tt);
    if (r != SE_OK) return r;
    if (tt->act == SE_ACT_Q8) {
        se_block_q8 * q = malloc(se_act_row_bytes(SE_ACT_Q8, n) + sizeof(se_block_q8));
        if (!q) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
        se_kern.quantize_q8(x, q, n);
        *out = tt->vec_dot(row, q, n);
        free(q);
    } else {
        *out = tt->vec_dot(row, x, n);
    }
    return SE_OK;
}

SE_API int se_quantize_act_q8(const float * x, void * out, int64_t n) {
    se_quants_init();
    if (n < 0 || n % 32) return se_error(SE_ERR_INVALID_ARGUMENT, "%lld values do not split into blocks of 32", (long long) n);
    se_kern.quantize_q8(x, out, n);
    return SE_OK;
}

SE_API const char * se_simd(void) {
    se_quants_init();
    return isa_names[isa_now];
}

SE_API int se_set_simd(int32_t enable) {
    se_quants_init();
    choose_kernels(enable ? isa_chosen : ISA_PORTABLE);
    return SE_OK;
}

SE_API int se_set_isa(const char * name) {
    se_quants_init();
    int isa = -1;
    for (int i = 0; i < 3; i++) {
        if (name && !strcmp(name, isa_names[i])) isa = i;
    }
    if (name && !strcmp(name, "portable")) isa = ISA_PORTABLE;
    if (isa < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown instruction set '%s' (avx512, avx2, portable)", name ? name : "(null)");
    if (isa > isa_best()) return se_error(SE_ERR_UNSUPPORTED, "this CPU has no %s kernels", isa_names[isa]);
    choose_kernels(isa);
    return SE_OK;
}

SE_API int se_fp32_to_fp16_row(const float * src, uint16_t * dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = se_fp32_to_fp16(src[i]);
    return SE_OK;
}
