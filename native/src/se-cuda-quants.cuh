// The tensor types on the device (GGUF.md §7), in the layouts of se-cuda.h: each type's values as
// floats (dequant32: any 32 consecutive values of a row, for the float path and the tensor-core
// tiles) and, for the common quantized types, a warp's dot product of a row with activations
// quantized to 8 bits (dp4a: four int8 products a cycle, as llama.cpp's mmvq does).
#ifndef SE_CUDA_QUANTS_CUH
#define SE_CUDA_QUANTS_CUH

#include "se-cuda.h"
#include "se-common.h"

#include <cuda_bf16.h>
#include <stddef.h>

// Byte sizes and offsets of the blocks (se-common.h) in the device layouts of se-cuda.h: in the
// planes layout a block's codes (qs, or Q6_K's ql qh scales) and its scales (d, m) lie apart.
constexpr int Q4_0_QB = sizeof(block_q4_0::qs), Q4_0_SB = offsetof(block_q4_0, qs);   // 16 | 2
constexpr int Q4_1_QB = sizeof(block_q4_1::qs), Q4_1_SB = offsetof(block_q4_1, qs);   // 16 | 4
constexpr int Q8_0_QB = sizeof(block_q8_0::qs), Q8_0_SB = offsetof(block_q8_0, qs);   // 32 | 2
constexpr int Q6_K_QB = offsetof(block_q6_K, d), Q6_K_SB = sizeof(block_q6_K::d);     // 208 | 2
constexpr int Q6_K_QH = offsetof(block_q6_K, qh), Q6_K_SC = offsetof(block_q6_K, scales);
constexpr int Q4_K_SC = offsetof(block_q4_K, scales), Q4_K_QS = offsetof(block_q4_K, qs);
constexpr int Q5_K_SC = offsetof(block_q5_K, scales), Q5_K_QH = offsetof(block_q5_K, qh), Q5_K_QS = offsetof(block_q5_K, qs);
constexpr int Q5_0_QH = offsetof(block_q5_0, qh), Q5_0_QS = offsetof(block_q5_0, qs);
static_assert(Q4_1_QB == Q4_0_QB, "Q4_0 and Q4_1 codes");
static_assert(offsetof(block_q4_K, dmin) == offsetof(block_q5_K, dmin) && Q4_K_SC == Q5_K_SC, "K-quant heads");

__device__ __forceinline__ float h2f(const uint8_t * p) { return __half2float(*(const __half *) p); }

__device__ __forceinline__ int load_i32(const uint8_t * p) { return *(const int *) p; }  // 4-byte aligned

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One value a lane of a block of 32 quantized as the CPU path does it: d = max |x| / 127 and
// q = round-to-even(x * (1 / d)), so both backends see the same 8-bit activations.
__device__ __forceinline__ int q8_lane(float v, float & d) {
    const float amax = warp_max(fabsf(v));
    d = amax / 127.0f;
    const float inv = d == 0.0f ? 0.0f : 1.0f / d;
    return __float2int_rn(v * inv);
}

// 1 / rms(x) + eps over dim values, for a block of 256 threads (every thread gets it).
__device__ inline float block_rms_scale(const float * x, int64_t dim, float eps) {
    __shared__ float partial[8];
    float ss = 0;
    for (int64_t i = threadIdx.x; i < dim; i += 256) ss += x[i] * x[i];
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0;
#pragma unroll
    for (int w = 0; w < 8; w++) total += partial[w];
    return rsqrtf(total / (float) dim + eps);
}

// six-bit scale and min j (0..7) of a Q4_K / Q5_K superblock
__device__ __forceinline__ void k_scale_min(const uint8_t * s, int j, int & sc, int & m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Values [32c, 32c + 32) of `row` as floats; for the float types, values past `cols` read as 0.
__device__ inline void dequant32(const se_dweight & w, int64_t row, int64_t c, float v[32]) {
    const uint8_t * q = w.q + row * w.q_row;
    const uint8_t * s = w.s ? w.s + row * w.s_row : nullptr;
    switch (w.type) {
        case SE_TYPE_F32:
        case SE_TYPE_F16:
        case SE_TYPE_BF16: {
            for (int j = 0; j < 32; j++) {
                const int64_t k = 32 * c + j;
                if (k >= w.cols) {
                    v[j] = 0;
                } else if (w.type == SE_TYPE_F32) {
                    v[j] = ((const float *) q)[k];
                } else if (w.type == SE_TYPE_F16) {
                    v[j] = __half2float(((const __half *) q)[k]);
                } else {
                    v[j] = __uint_as_float((uint32_t) ((const uint16_t *) q)[k] << 16);
                }
            }
            break;
        }
        case SE_TYPE_Q4_0: {  // planes: 16 code bytes, f16 scale; weight j low nibble, j + 16 high
            const uint8_t * qs = q + Q4_0_QB * c;
            const float d = h2f(s + Q4_0_SB * c);
            for (int j = 0; j < 16; j++) {
                v[j] = d * ((qs[j] & 0xf) - 8);
                v[j + 16] = d * ((qs[j] >> 4) - 8);
            }
            break;
        }
        case SE_TYPE_Q4_1: {  // planes: 16 code bytes, f16 scale and min
            const uint8_t * qs = q + Q4_1_QB * c;
            const float d = h2f(s + Q4_1_SB * c), m = h2f(s + Q4_1_SB * c + offsetof(block_q4_1, m));
            for (int j = 0; j < 16; j++) {
                v[j] = d * (qs[j] & 0xf) + m;
                v[j + 16] = d * (qs[j] >> 4) + m;
            }
            break;
        }
        case SE_TYPE_Q8_0: {  // planes: 32 code bytes, f16 scale
            const int8_t * qs = (const int8_t *) (q + Q8_0_QB * c);
            const float d = h2f(s + Q8_0_SB * c);
            for (int j = 0; j < 32; j++) v[j] = d * qs[j];
            break;
        }
        case SE_TYPE_Q5_0: {  // raw 22-byte blocks: d, qh (fifth bits), qs
            const uint8_t * b = q + sizeof(block_q5_0) * c, * h = b + Q5_0_QH, * qs = b + Q5_0_QS;
            const float d = h2f(b);
            const uint32_t qh = h[0] | (h[1] << 8) | (h[2] << 16) | ((uint32_t) h[3] << 24);
            for (int j = 0; j < 16; j++) {
                v[j] = d * ((int) ((qs[j] & 0xf) | (((qh >> j) & 1) << 4)) - 16);
                v[j + 16] = d * ((int) ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
            }
            break;
        }
        case SE_TYPE_Q4_K:
        case SE_TYPE_Q5_K: {  // raw superblocks of 256: d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
            const bool five = w.type == SE_TYPE_Q5_K;
            const uint8_t * b = q + (five ? sizeof(block_q5_K) : sizeof(block_q4_K)) * (c / 8);
            const int sub = (int) (c % 8), chunk = sub / 2, shift = 4 * (sub % 2);
            int sc, m;
            k_scale_min(b + Q4_K_SC, sub, sc, m);
            const float d = h2f(b) * sc, mn = h2f(b + offsetof(block_q4_K, dmin)) * m;
            const uint8_t * qs = b + (five ? Q5_K_QS : Q4_K_QS) + 32 * chunk;
            for (int l = 0; l < 32; l++) {
                int code = (qs[l] >> shift) & 0xf;
                if (five) code |= ((b[Q5_K_QH + l] >> sub) & 1) << 4;
                v[l] = d * code - mn;
            }
            break;
        }
        case SE_TYPE_Q6_K: {  // planes: ql[128] qh[64] scales[16] per superblock, f16 scale
            const uint8_t * b = q + Q6_K_QB * (c / 8);
            const int half = (int) (c % 8) / 4, g = (int) (c % 4);
            const uint8_t * ql = b + 64 * half + (g & 1) * 32, * qh = b + Q6_K_QH + 32 * half;
            const int8_t * sc = (const int8_t *) (b + Q6_K_SC + 8 * half);
            const float d = h2f(s + Q6_K_SB * (c / 8));
            for (int l = 0; l < 32; l++) {
                const int lo = g < 2 ? ql[l] & 0xf : ql[l] >> 4;
                const int code = lo | (((qh[l] >> (2 * g)) & 3) << 4);
                v[l] = d * sc[l / 16 + 2 * g] * (code - 32);
            }
            break;
        }
        default:
            for (int j = 0; j < 32; j++) v[j] = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// A lane's share of row . x: float activations, any type (the dequantize-in-registers path).

__device__ inline float dot_float(const se_dweight & w, int64_t row, const float * x, int lane) {
    float acc = 0;
    if (w.type == SE_TYPE_F32 || w.type == SE_TYPE_F16 || w.type == SE_TYPE_BF16) {
        const uint8_t * q = w.q + row * w.q_row;
        for (int64_t k = lane; k < w.cols; k += 32) {
            const float a = w.type == SE_TYPE_F32 ? ((const float *) q)[k]
                          : w.type == SE_TYPE_F16 ? __half2float(((const __half *) q)[k])
                          : __uint_as_float((uint32_t) ((const uint16_t *) q)[k] << 16);
            acc += a * x[k];
        }
        return acc;
    }
    float v[32];
    for (int64_t c = lane; c < w.cols / 32; c += 32) {
        dequant32(w, row, c, v);
        const float4 * x4 = (const float4 *) (x + 32 * c);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float4 xv = x4[j];
            acc += v[4 * j] * xv.x + v[4 * j + 1] * xv.y + v[4 * j + 2] * xv.z + v[4 * j + 3] * xv.w;
        }
    }
    return acc;
}

// ---------------------------------------------------------------------------------------------
// A lane's share of NR rows . x with 8-bit activations: qx the codes, ds per block of 32 (d, d * sum).
// The rows (of one type and length) are read together so that each lane has NR loads in flight and
// the activations are read once for all of them.

template <int NR>
struct qrows {
    const uint8_t * q[NR];   // each row's codes (or raw blocks)
    const uint8_t * s[NR];   // each row's scale plane, or NULL
};

// Q4_0 / Q4_1: a lane takes whole blocks, 16 code bytes in one load.
template <bool MIN, int NR>
__device__ inline void dot_q4(const qrows<NR> & w, int64_t nb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
#pragma unroll 2
    for (int64_t b = lane; b < nb; b += 32) {
        const int4 x0 = *(const int4 *) (qx + 32 * b), x1 = *(const int4 *) (qx + 32 * b + 16);
        const int xl[4] = {x0.x, x0.y, x0.z, x0.w}, xh[4] = {x1.x, x1.y, x1.z, x1.w};
        const float2 a = ds[b];
#pragma unroll
        for (int n = 0; n < NR; n++) {
            const int4 qv = *(const int4 *) (w.q[n] + Q4_0_QB * b);  // Q4_1_QB == Q4_0_QB
            const int qs[4] = {qv.x, qv.y, qv.z, qv.w};
            int sumi = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                sumi = __dp4a(qs[i] & 0x0f0f0f0f, xl[i], sumi);
                sumi = __dp4a((qs[i] >> 4) & 0x0f0f0f0f, xh[i], sumi);
            }
            if (MIN) {  // d q + m
                acc[n] += h2f(w.s[n] + Q4_1_SB * b) * a.x * sumi + h2f(w.s[n] + Q4_1_SB * b + offsetof(block_q4_1, m)) * a.y;
            } else {    // d (q - 8)
                acc[n] += h2f(w.s[n] + Q4_0_SB * b) * (a.x * sumi - 8 * a.y);
            }
        }
    }
}

template <int NR>
__device__ inline void dot_q8_0(const qrows<NR> & w, int64_t nb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
#pragma unroll 2
    for (int64_t b = lane; b < nb; b += 32) {
        const int4 x0 = *(const int4 *) (qx + 32 * b), x1 = *(const int4 *) (qx + 32 * b + 16);
        const float dx = ds[b].x;
#pragma unroll
        for (int n = 0; n < NR; n++) {
            const int4 q0 = *(const int4 *) (w.q[n] + Q8_0_QB * b), q1 = *(const int4 *) (w.q[n] + Q8_0_QB * b + 16);
            int sumi = __dp4a(q0.x, x0.x, 0);
            sumi = __dp4a(q0.y, x0.y, sumi);
            sumi = __dp4a(q0.z, x0.z, sumi);
            sumi = __dp4a(q0.w, x0.w, sumi);
            sumi = __dp4a(q1.x, x1.x, sumi);
            sumi = __dp4a(q1.y, x1.y, sumi);
            sumi = __dp4a(q1.z, x1.z, sumi);
            sumi = __dp4a(q1.w, x1.w, sumi);
            acc[n] += h2f(w.s[n] + Q8_0_SB * b) * dx * sumi;
        }
    }
}

// Q4_K: eight lanes a superblock; lane t takes 16 code bytes of chunk t / 2 (64 weights), the low
// nibbles being weights [16 (t % 2), +16) of sub-block 2 (t / 2), the high ones of the next.
template <int NR>
__device__ inline void dot_q4_K(const qrows<NR> & w, int64_t nsb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    const int t = lane % 8, chunk = t / 2, h = t % 2;
#pragma unroll 2
    for (int64_t sb = lane / 8; sb < nsb; sb += 4) {
        const int64_t blo = sb * 8 + 2 * chunk;  // activation blocks of the two sub-blocks
        const int4 xl4 = *(const int4 *) (qx + 32 * blo + 16 * h), xh4 = *(const int4 *) (qx + 32 * (blo + 1) + 16 * h);
        const int xl[4] = {xl4.x, xl4.y, xl4.z, xl4.w}, xh[4] = {xh4.x, xh4.y, xh4.z, xh4.w};
        int sl = 0, sh = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            sl = __dp4a(0x01010101, xl[i], sl);
            sh = __dp4a(0x01010101, xh[i], sh);
        }
        const float axl = ds[blo].x, axh = ds[blo + 1].x;
#pragma unroll
        for (int n = 0; n < NR; n++) {
            const uint8_t * b = w.q[n] + sizeof(block_q4_K) * sb;
            const int4 qv = *(const int4 *) (b + Q4_K_QS + 32 * chunk + 16 * h);
            const int qs[4] = {qv.x, qv.y, qv.z, qv.w};
            int dl = 0, dh = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                dl = __dp4a(qs[i] & 0x0f0f0f0f, xl[i], dl);
                dh = __dp4a((qs[i] >> 4) & 0x0f0f0f0f, xh[i], dh);
            }
            int scl, ml, sch, mh;
            k_scale_min(b + Q4_K_SC, 2 * chunk, scl, ml);
            k_scale_min(b + Q4_K_SC, 2 * chunk + 1, sch, mh);
            const float d = h2f(b), dmin = h2f(b + offsetof(block_q4_K, dmin));
            acc[n] += d * (scl * axl * dl + sch * axh * dh) - dmin * (ml * axl * sl + mh * axh * sh);
        }
    }
}

// Q6_K: eight lanes a superblock; lane t takes l in [8 (t % 4), +8) of half t / 4: from 8 bytes of
// ql, 8 more 32 bytes on and 8 of qh, the weights l, l + 32, l + 64, l + 96 of that half.
template <int NR>
__device__ inline void dot_q6_K(const qrows<NR> & w, int64_t nsb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    const int t = lane % 8, half = t / 4, l0 = 8 * (t % 4);
    for (int64_t sb = lane / 8; sb < nsb; sb += 4) {
        int xv[4][2];
        float dx[4];
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const int64_t blk = sb * 8 + 4 * half + g;
            const int2 x2 = *(const int2 *) (qx + 32 * blk + l0);
            xv[g][0] = x2.x;
            xv[g][1] = x2.y;
            dx[g] = ds[blk].x;
        }
#pragma unroll
        for (int n = 0; n < NR; n++) {
            const uint8_t * b = w.q[n] + Q6_K_QB * sb;
            const int2 a2 = *(const int2 *) (b + 64 * half + l0), b2 = *(const int2 *) (b + 64 * half + 32 + l0);
            const int2 h2 = *(const int2 *) (b + Q6_K_QH + 32 * half + l0);
            const int8_t * sc = (const int8_t *) (b + Q6_K_SC + 8 * half + l0 / 16);
            const int av[2] = {a2.x, a2.y}, bv[2] = {b2.x, b2.y}, hv[2] = {h2.x, h2.y};
            float part = 0;
#pragma unroll
            for (int g = 0; g < 4; g++) {
                int sumi = 0;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int lo = g == 0 ? av[i] & 0x0f0f0f0f : g == 1 ? bv[i] & 0x0f0f0f0f
                                 : g == 2 ? (av[i] >> 4) & 0x0f0f0f0f : (bv[i] >> 4) & 0x0f0f0f0f;
                    const int hi = ((hv[i] >> (2 * g)) << 4) & 0x30303030;
                    sumi = __dp4a((int) __vsubss4(lo | hi, 0x20202020), xv[g][i], sumi);
                }
                part += sc[2 * g] * dx[g] * sumi;
            }
            acc[n] += h2f(w.s[n] + Q6_K_SB * sb) * part;
        }
    }
}

// Whether a type has a dp4a kernel (else the float path serves it).
__host__ __device__ inline bool has_q8_kernel(int32_t type) {
    return type == SE_TYPE_Q4_0 || type == SE_TYPE_Q4_1 || type == SE_TYPE_Q8_0 || type == SE_TYPE_Q4_K ||
           type == SE_TYPE_Q6_K;
}

#endif  // SE_CUDA_QUANTS_CUH
