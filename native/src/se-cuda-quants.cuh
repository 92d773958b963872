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
#include <string.h>

// Byte sizes and offsets of the blocks (se-common.h) in the device layouts of se-cuda.h: in the
// planes layout a block's codes (qs, or Q6_K's ql qh scales) and its scales (d, m) lie apart.
constexpr int Q4_0_QB = sizeof(block_q4_0::qs), Q4_0_SB = offsetof(block_q4_0, qs);   // 16 | 2
constexpr int Q4_1_QB = sizeof(block_q4_1::qs), Q4_1_SB = offsetof(block_q4_1, qs);   // 16 | 4
constexpr int Q8_0_QB = sizeof(block_q8_0::qs), Q8_0_SB = offsetof(block_q8_0, qs);   // 32 | 2
constexpr int Q6_K_QB = offsetof(block_q6_K, d), Q6_K_SB = 2 * sizeof(block_q6_K::d); // 208 | 4: d, 2 bytes padding
constexpr int Q6_K_QH = offsetof(block_q6_K, qh), Q6_K_SC = offsetof(block_q6_K, scales);
constexpr int Q4_K_SC = offsetof(block_q4_K, scales), Q4_K_QS = offsetof(block_q4_K, qs);
constexpr int Q5_K_SC = offsetof(block_q5_K, scales), Q5_K_QH = offsetof(block_q5_K, qh), Q5_K_QS = offsetof(block_q5_K, qs);
constexpr int Q5_0_QH = offsetof(block_q5_0, qh), Q5_0_QS = offsetof(block_q5_0, qs);
static_assert(Q4_1_QB == Q4_0_QB, "Q4_0 and Q4_1 codes");
static_assert(offsetof(block_q4_K, dmin) == offsetof(block_q5_K, dmin) && Q4_K_SC == Q5_K_SC, "K-quant heads");

// Programmatic dependent launch (sm_90; no-ops before it). trigger: this grid's dependents may
// start now (each of them still waits for this grid to finish before reading its results).
// wait: block until the grid this one depends on has finished and its writes are visible; every
// decode kernel calls it before its first read of an activation.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Ask L2 for the 128-byte lines of [p, p + bytes), a warp together (a hint: no register waits on it).
__device__ __forceinline__ void prefetch_l2(const uint8_t * p, int64_t bytes, int lane) {
    const uintptr_t end = (uintptr_t) p + (uintptr_t) bytes;
    for (uintptr_t a = ((uintptr_t) p & ~(uintptr_t) 127) + 128 * (uintptr_t) lane; a < end; a += 32 * 128) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
    }
}

// A kernel launch that may start before the previous kernel on the stream has finished (pdl), the
// kernel then waiting in pdl_wait().
template <typename... P, typename... A>
static inline cudaError_t se_launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl, A... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, k, args...);
}

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

// Four values of a block quantized with inv = 1 / d as q8_lane does, as one word of int8 codes (lowest
// byte first: dp4a's operand); sum gathers the codes (the block's d * sum term).
__device__ __forceinline__ int q8_word(const float * v, float inv, int & sum) {
    int word = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int q = __float2int_rn(v[e] * inv);
        sum += q;
        word |= (q & 0xff) << (8 * e);
    }
    return word;
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
            if (s) {          // Q4_K split (se-common.h): 128 code bytes | d, dmin, (scale, min) bytes a sub-block
                const uint8_t * h = s + SE_Q4K_SPLIT_SB * (c / 8);
                const int sub = (int) (c % 8), shift = 4 * (sub % 2);
                const float d = h2f(h) * h[4 + 2 * sub], mn = h2f(h + 2) * h[5 + 2 * sub];
                const uint8_t * qs = q + SE_Q4K_SPLIT_QB * (c / 8) + 32 * (sub / 2);
                for (int l = 0; l < 32; l++) v[l] = d * ((qs[l] >> shift) & 0xf) - mn;
                break;
            }
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

// Each lane issues the loads of MV_U of its blocks (of every row) before it uses any of them: a
// decode product is bound by how many bytes are in flight, and the rows of a layer are too few for
// the warps alone to keep enough in flight (4096 rows: 2048 warps for 132 multiprocessors).
// MV_U is a template parameter of the decode kernels (se-cuda-matmul.cu's MV_UNROLL).

// Q4_0 / Q4_1: a lane takes whole blocks, 16 code bytes in one load.
template <bool MIN, int NR, int MV_U>
__device__ inline void dot_q4(const qrows<NR> & w, int64_t nb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    constexpr int SB = MIN ? Q4_1_SB : Q4_0_SB;
    for (int64_t b0 = lane; b0 < nb; b0 += 32 * MV_U) {
        int4 qv[MV_U][NR], x0[MV_U], x1[MV_U];
        float2 sc[MV_U][NR], a[MV_U];
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int64_t b = b0 + 32 * u;
            const bool ok = b < nb;
            x0[u] = ok ? *(const int4 *) (qx + 32 * b) : make_int4(0, 0, 0, 0);
            x1[u] = ok ? *(const int4 *) (qx + 32 * b + 16) : make_int4(0, 0, 0, 0);
            a[u] = ok ? ds[b] : make_float2(0.0f, 0.0f);
#pragma unroll
            for (int n = 0; n < NR; n++) {
                qv[u][n] = ok ? *(const int4 *) (w.q[n] + Q4_0_QB * b) : make_int4(0, 0, 0, 0);  // Q4_1_QB == Q4_0_QB
                if (MIN) {
                    sc[u][n] = ok ? __half22float2(*(const __half2 *) (w.s[n] + SB * b)) : make_float2(0.0f, 0.0f);
                } else {
                    sc[u][n] = make_float2(ok ? h2f(w.s[n] + SB * b) : 0.0f, 0.0f);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int xl[4] = {x0[u].x, x0[u].y, x0[u].z, x0[u].w}, xh[4] = {x1[u].x, x1[u].y, x1[u].z, x1[u].w};
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const int qs[4] = {qv[u][n].x, qv[u][n].y, qv[u][n].z, qv[u][n].w};
                int sumi = 0;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    sumi = __dp4a(qs[i] & 0x0f0f0f0f, xl[i], sumi);
                    sumi = __dp4a((qs[i] >> 4) & 0x0f0f0f0f, xh[i], sumi);
                }
                if (MIN) {  // d q + m
                    acc[n] += sc[u][n].x * a[u].x * sumi + sc[u][n].y * a[u].y;
                } else {    // d (q - 8)
                    acc[n] += sc[u][n].x * (a[u].x * sumi - 8 * a[u].y);
                }
            }
        }
    }
}

template <int NR, int MV_U>
__device__ inline void dot_q8_0(const qrows<NR> & w, int64_t nb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    for (int64_t b0 = lane; b0 < nb; b0 += 32 * MV_U) {
        int4 q0[MV_U][NR], q1[MV_U][NR], x0[MV_U], x1[MV_U];
        float d[MV_U][NR], dx[MV_U];
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int64_t b = b0 + 32 * u;
            const bool ok = b < nb;
            x0[u] = ok ? *(const int4 *) (qx + 32 * b) : make_int4(0, 0, 0, 0);
            x1[u] = ok ? *(const int4 *) (qx + 32 * b + 16) : make_int4(0, 0, 0, 0);
            dx[u] = ok ? ds[b].x : 0.0f;
#pragma unroll
            for (int n = 0; n < NR; n++) {
                q0[u][n] = ok ? *(const int4 *) (w.q[n] + Q8_0_QB * b) : make_int4(0, 0, 0, 0);
                q1[u][n] = ok ? *(const int4 *) (w.q[n] + Q8_0_QB * b + 16) : make_int4(0, 0, 0, 0);
                d[u][n] = ok ? h2f(w.s[n] + Q8_0_SB * b) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
#pragma unroll
            for (int n = 0; n < NR; n++) {
                int sumi = __dp4a(q0[u][n].x, x0[u].x, 0);
                sumi = __dp4a(q0[u][n].y, x0[u].y, sumi);
                sumi = __dp4a(q0[u][n].z, x0[u].z, sumi);
                sumi = __dp4a(q0[u][n].w, x0[u].w, sumi);
                sumi = __dp4a(q1[u][n].x, x1[u].x, sumi);
                sumi = __dp4a(q1[u][n].y, x1[u].y, sumi);
                sumi = __dp4a(q1[u][n].z, x1[u].z, sumi);
                sumi = __dp4a(q1[u][n].w, x1[u].w, sumi);
                acc[n] += d[u][n] * dx[u] * sumi;
            }
        }
    }
}

// Six-bit scale and min j of a Q4_K superblock from the scale words of its 16-byte head (h.y, h.z,
// h.w = scales[0..3], [4..7], [8..11]), j = jj or jj + 1 with jj even: shifts, no indexed array.
__device__ __forceinline__ void k_scale_min_words(const int4 & h, int j, int & sc, int & m) {
    if (j < 4) {
        sc = (h.y >> (8 * j)) & 63;
        m = (h.z >> (8 * j)) & 63;
    } else {
        const int s = 8 * (j - 4);
        sc = ((h.w >> s) & 0xf) | (((h.y >> (s + 6)) & 3) << 4);
        m = ((h.w >> (s + 4)) & 0xf) | (((h.z >> (s + 6)) & 3) << 4);
    }
}

// Q4_K, 16 code bytes of chunk `chunk` (their low nibbles: 16 weights of sub-block 2 chunk, the high
// ones: of the next) against 8-bit activations xl / xh (block scales al / ah, code sums sl / sh, for
// the mins); hd = the superblock's head (d, dmin, scales).
__device__ __forceinline__ float q4_K_dot16(const int q[4], const int4 & hd, int chunk, const int xl[4], const int xh[4],
                                            float al, float ah, int sl, int sh) {
    int dl = 0, dh = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        dl = __dp4a(q[i] & 0x0f0f0f0f, xl[i], dl);
        dh = __dp4a((q[i] >> 4) & 0x0f0f0f0f, xh[i], dh);
    }
    int scl, ml, sch, mh;
    k_scale_min_words(hd, 2 * chunk, scl, ml);
    k_scale_min_words(hd, 2 * chunk + 1, sch, mh);
    const float2 dm = __half22float2(*(const __half2 *) &hd.x);  // d, dmin
    return dm.x * (scl * al * dl + sch * ah * dh) - dm.y * (ml * al * sl + mh * ah * sh);
}

// Q4_K: eight lanes a superblock; lane t takes 16 code bytes of chunk t / 2 (64 weights), the low
// nibbles being weights [16 (t % 2), +16) of sub-block 2 (t / 2), the high ones of the next. The
// superblock's head (d, dmin, scales) comes in one 16-byte load.
template <int NR, int MV_U>
__device__ inline void dot_q4_K(const qrows<NR> & w, int64_t nsb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    static_assert(Q4_K_SC == 4 && Q4_K_QS == 16, "Q4_K head: d, dmin, 12 scale bytes in 16 bytes");
    const int t = lane % 8, chunk = t / 2, h = t % 2;
    for (int64_t sb0 = lane / 8; sb0 < nsb; sb0 += 4 * MV_U) {
        int4 qv[MV_U][NR], hd[MV_U][NR], xl4[MV_U], xh4[MV_U];
        float axl[MV_U], axh[MV_U];
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int64_t sb = sb0 + 4 * u, blo = sb * 8 + 2 * chunk;  // activation blocks of the two sub-blocks
            const bool ok = sb < nsb;
            xl4[u] = ok ? *(const int4 *) (qx + 32 * blo + 16 * h) : make_int4(0, 0, 0, 0);
            xh4[u] = ok ? *(const int4 *) (qx + 32 * (blo + 1) + 16 * h) : make_int4(0, 0, 0, 0);
            axl[u] = ok ? ds[blo].x : 0.0f;
            axh[u] = ok ? ds[blo + 1].x : 0.0f;
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const uint8_t * b = w.q[n] + sizeof(block_q4_K) * sb;
                hd[u][n] = ok ? *(const int4 *) b : make_int4(0, 0, 0, 0);
                qv[u][n] = ok ? *(const int4 *) (b + Q4_K_QS + 32 * chunk + 16 * h) : make_int4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int xl[4] = {xl4[u].x, xl4[u].y, xl4[u].z, xl4[u].w}, xh[4] = {xh4[u].x, xh4[u].y, xh4[u].z, xh4[u].w};
            int sl = 0, sh = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                sl = __dp4a(0x01010101, xl[i], sl);
                sh = __dp4a(0x01010101, xh[i], sh);
            }
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const int qs[4] = {qv[u][n].x, qv[u][n].y, qv[u][n].z, qv[u][n].w};
                acc[n] += q4_K_dot16(qs, hd[u][n], chunk, xl, xh, axl[u], axh[u], sl, sh);
            }
        }
    }
}

// Four products of unsigned bytes of a with signed bytes of b, added to c (PTX dp4a.u32.s32; the
// intrinsic __dp4a takes both signed or both unsigned).
__device__ __forceinline__ int dp4a_us(unsigned a, int b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Q4_K split (se-common.h), 16 code bytes as q4_K_dot16 takes them; scm = the bytes (scale, min) of
// the two sub-blocks, dm = d | dmin << 16; al, ah = the activation blocks' (d, d * sum), .y zero where
// another lane adds the block's mins (the min term of a block uses its whole sum: no code sums here),
// and ah.x divided by 16: the high nibbles enter the unsigned dp4a in place (16 times the codes, no
// shift), 16 dh < 2^19 exact in int.
__device__ __forceinline__ float q4_K_split_dot16(const int q[4], int scm, int dm, const int xl[4], const int xh[4], float2 al,
                                                  float2 ah) {
    int dl = 0, dh = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        dl = __dp4a(q[i] & 0x0f0f0f0f, xl[i], dl);
        dh = dp4a_us((unsigned) q[i] & 0xf0f0f0f0u, xh[i], dh);
    }
    const int scl = (int) __byte_perm(scm, 0, 0x4440), ml = (int) __byte_perm(scm, 0, 0x4441);
    const int sch = (int) __byte_perm(scm, 0, 0x4442), mh = (int) __byte_perm(scm, 0, 0x4443);
    __half2 h2;
    memcpy(&h2, &dm, sizeof h2);
    const float2 d = __half22float2(h2);  // d, dmin
    return d.x * ((float) (scl * dl) * al.x + (float) (sch * dh) * ah.x) - d.y * ((float) ml * al.y + (float) mh * ah.y);
}

// Q4_K split (se-common.h): eight lanes a superblock as dot_q4_K; lane t takes code bytes [16 t, +16)
// of the superblock's 128 (chunk t / 2, half t % 2), its two sub-blocks' scales and mins in one
// 4-byte load (head word 1 + t / 2) and d, dmin in another (word 0): 24 bytes a lane where the raw
// layout takes 32, and no six-bit unpacking. The mins enter through the activation blocks' d * sum,
// added by the lanes t % 2 == 0 for the whole block.
template <int NR, int MV_U>
__device__ inline void dot_q4_K_split(const qrows<NR> & w, int64_t nsb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    const int t = lane % 8, chunk = t / 2, h = t % 2;
    const float own = h ? 0.0f : 1.0f;  // this lane adds the mins of its two blocks
    for (int64_t sb0 = lane / 8; sb0 < nsb; sb0 += 4 * MV_U) {
        int4 qv[MV_U][NR], xl4[MV_U], xh4[MV_U];
        int scm[MV_U][NR], dm[MV_U][NR];
        float2 al[MV_U], ah[MV_U];
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int64_t sb = sb0 + 4 * u, blo = sb * 8 + 2 * chunk;
            const bool ok = sb < nsb;
            xl4[u] = ok ? *(const int4 *) (qx + 32 * blo + 16 * h) : make_int4(0, 0, 0, 0);
            xh4[u] = ok ? *(const int4 *) (qx + 32 * (blo + 1) + 16 * h) : make_int4(0, 0, 0, 0);
            al[u] = ok ? ds[blo] : make_float2(0.0f, 0.0f);
            ah[u] = ok ? ds[blo + 1] : make_float2(0.0f, 0.0f);
            al[u].y *= own;
            ah[u] = make_float2(ah[u].x * 0.0625f, ah[u].y * own);  // q4_K_split_dot16's 16 dh
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const uint8_t * hd = w.s[n] + SE_Q4K_SPLIT_SB * sb;
                qv[u][n] = ok ? *(const int4 *) (w.q[n] + SE_Q4K_SPLIT_QB * sb + 16 * t) : make_int4(0, 0, 0, 0);
                dm[u][n] = ok ? load_i32(hd) : 0;
                scm[u][n] = ok ? load_i32(hd + 4 + 4 * chunk) : 0;
            }
        }
#pragma unroll
        for (int u = 0; u < MV_U; u++) {
            const int xl[4] = {xl4[u].x, xl4[u].y, xl4[u].z, xl4[u].w}, xh[4] = {xh4[u].x, xh4[u].y, xh4[u].z, xh4[u].w};
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const int qs[4] = {qv[u][n].x, qv[u][n].y, qv[u][n].z, qv[u][n].w};
                acc[n] += q4_K_split_dot16(qs, scm[u][n], dm[u][n], xl, xh, al[u], ah[u]);
            }
        }
    }
}

// Q6_K: eight lanes a superblock; lane t takes l in [8 (t % 4), +8) of half t / 4: from 8 bytes of
// ql, 8 more 32 bytes on and 8 of qh, the weights l, l + 32, l + 64, l + 96 of that half.
template <int NR, int MV_U>
__device__ inline void dot_q6_K(const qrows<NR> & w, int64_t nsb, const int8_t * qx, const float2 * ds, int lane, float * acc) {
    constexpr int MV_U6 = MV_U > 1 ? MV_U / 2 : 1;
    const int t = lane % 8, half = t / 4, l0 = 8 * (t % 4);
    for (int64_t sb0 = lane / 8; sb0 < nsb; sb0 += 4 * MV_U6) {
        int2 a2[MV_U6][NR], b2[MV_U6][NR], h2[MV_U6][NR], xv[MV_U6][4];
        int sc2[MV_U6][NR];
        float dx[MV_U6][4], dw[MV_U6][NR];
#pragma unroll
        for (int u = 0; u < MV_U6; u++) {
            const int64_t sb = sb0 + 4 * u;
            const bool ok = sb < nsb;
#pragma unroll
            for (int g = 0; g < 4; g++) {
                const int64_t blk = sb * 8 + 4 * half + g;
                xv[u][g] = ok ? *(const int2 *) (qx + 32 * blk + l0) : make_int2(0, 0);
                dx[u][g] = ok ? ds[blk].x : 0.0f;
            }
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const uint8_t * b = w.q[n] + Q6_K_QB * sb;
                a2[u][n] = ok ? *(const int2 *) (b + 64 * half + l0) : make_int2(0, 0);
                b2[u][n] = ok ? *(const int2 *) (b + 64 * half + 32 + l0) : make_int2(0, 0);
                h2[u][n] = ok ? *(const int2 *) (b + Q6_K_QH + 32 * half + l0) : make_int2(0, 0);
                // the four scales this lane needs, sc[2 g] for g = 0..3, at stride 2 from l0 / 16
                const uint8_t * sp = b + Q6_K_SC + 8 * half + l0 / 16;
                sc2[u][n] = ok ? (sp[0] | (sp[2] << 8) | (sp[4] << 16) | ((int) sp[6] << 24)) : 0;
                dw[u][n] = ok ? h2f(w.s[n] + Q6_K_SB * sb) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < MV_U6; u++) {
#pragma unroll
            for (int n = 0; n < NR; n++) {
                const int av[2] = {a2[u][n].x, a2[u][n].y}, bv[2] = {b2[u][n].x, b2[u][n].y}, hv[2] = {h2[u][n].x, h2[u][n].y};
                float part = 0;
#pragma unroll
                for (int g = 0; g < 4; g++) {
                    int sumi = 0;
                    const int xg[2] = {xv[u][g].x, xv[u][g].y};
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        const int lo = g == 0 ? av[i] & 0x0f0f0f0f : g == 1 ? bv[i] & 0x0f0f0f0f
                                     : g == 2 ? (av[i] >> 4) & 0x0f0f0f0f : (bv[i] >> 4) & 0x0f0f0f0f;
                        const int hi = ((hv[i] >> (2 * g)) << 4) & 0x30303030;
                        sumi = __dp4a((int) __vsubss4(lo | hi, 0x20202020), xg[i], sumi);
                    }
                    part += (float) (int8_t) (sc2[u][n] >> (8 * g)) * dx[u][g] * sumi;
                }
                acc[n] += dw[u][n] * part;
            }
        }
    }
}

// dequant32 with 16-byte loads where the layout of se-cuda.h makes them aligned: Q4_0's code plane
// (16 bytes a block) and Q4_K's raw superblocks (144 bytes, head and code chunks at multiples of 16);
// the same values through the same float operations. The other types through dequant32.
__device__ inline void dequant32_wide(const se_dweight & w, int64_t row, int64_t c, float v[32]) {
    if (w.type == SE_TYPE_Q4_0) {
        const int4 q4 = *(const int4 *) (w.q + row * w.q_row + Q4_0_QB * c);
        const float d = h2f(w.s + row * w.s_row + Q4_0_SB * c);
        const int qs[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int byte = (qs[j / 4] >> (8 * (j % 4))) & 0xff;
            v[j] = d * ((byte & 0xf) - 8);
            v[j + 16] = d * ((byte >> 4) - 8);
        }
        return;
    }
    if (se_dkind(w) == SE_DK_Q4_K_SPLIT) {  // codes apart, (scale, min) bytes of sub-blocks 2 chunk, + 1 in a word
        const int sub = (int) (c % 8), chunk = sub / 2, shift = 4 * (sub % 2);
        const uint8_t * b = w.q + row * w.q_row + SE_Q4K_SPLIT_QB * (c / 8) + 32 * chunk;
        const uint8_t * hd = w.s + row * w.s_row + SE_Q4K_SPLIT_SB * (c / 8);
        const int4 q0 = *(const int4 *) b, q1 = *(const int4 *) (b + 16);
        const int scm = load_i32(hd + 4 + 4 * chunk) >> (16 * (sub % 2));
        const float d = h2f(hd) * (scm & 0xff), mn = h2f(hd + 2) * ((scm >> 8) & 0xff);
        const int qs[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int l = 0; l < 32; l++) v[l] = d * ((qs[l / 4] >> (8 * (l % 4) + shift)) & 0xf) - mn;
        return;
    }
    if (w.type == SE_TYPE_Q4_K) {
        static_assert(Q4_K_SC == 4 && Q4_K_QS == 16 && sizeof(block_q4_K) % 16 == 0, "Q4_K: 16-byte head and chunks");
        const uint8_t * b = w.q + row * w.q_row + sizeof(block_q4_K) * (c / 8);
        const int sub = (int) (c % 8), chunk = sub / 2, shift = 4 * (sub % 2);
        const int4 hd = *(const int4 *) b;
        const int4 q0 = *(const int4 *) (b + Q4_K_QS + 32 * chunk), q1 = *(const int4 *) (b + Q4_K_QS + 32 * chunk + 16);
        int sc, m;
        k_scale_min_words(hd, sub, sc, m);
        const float d = h2f(b) * sc, mn = h2f(b + offsetof(block_q4_K, dmin)) * m;
        const int qs[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int l = 0; l < 32; l++) v[l] = d * ((qs[l / 4] >> (8 * (l % 4) + shift)) & 0xf) - mn;
        return;
    }
    dequant32(w, row, c, v);
}

// Whether a type has a dp4a kernel (else the float path serves it).
__host__ __device__ inline bool has_q8_kernel(int32_t type) {
    return type == SE_TYPE_Q4_0 || type == SE_TYPE_Q4_1 || type == SE_TYPE_Q8_0 || type == SE_TYPE_Q4_K ||
           type == SE_TYPE_Q6_K;
}

#endif  // SE_CUDA_QUANTS_CUH
