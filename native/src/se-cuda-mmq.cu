// Prefill products on the int8 tensor cores: out (n, rows) = x (n, cols) W^T with W in its quantized
// blocks and x quantized to 8 bits in blocks of 32 (the same activations as the decode kernels).
//
// As llama.cpp's mmq does (facts, not code): one 32-value block of a weight row against one 32-value
// block of a token is an exact integer dot product, so mma.sync m16n8k32 (s8 x s8 -> s32, sm_80+)
// computes a 16 x 8 tile of them per block of 32, and the float scales enter once per block:
//   out[t, r] += a[r, b] * d[t, b] * isum + c[r, b] * s[t, b]
// with the weight written per block as x = a * q + c (Q4_0: a = d, q - 8 taken in the integer
// domain, c = 0; Q4_1: a = d, c = m; Q8_0: a = d, c = 0; Q4_K: a = d * scale, c = -dmin * min) and the activation block's d and
// s = d * sum(q). Q6_K's scales change every 16 values: two m16n8k16 products per block, codes
// q - 32 (signed), c = 0.
//
// Weights are not unpacked into shared memory: the tiles hold the blocks' bytes as uploaded, and the
// A fragments are assembled in registers from them (for Q4_0 one 32-bit word of codes gives both
// the low-nibble fragment, values 4k.., and the high-nibble one, values 16 + 4k..). A block of 256
// threads computes 128 rows x BN tokens, K in tiles of 256 values (a K-quant superblock), with a
// three-stage cp.async pipeline (the copy of tile k + 2 runs under the products of tile k; two
// stages measured no faster on an H200). Scale
// planes have rows padded to 16 bytes on upload (se-cuda-weights.cu), so every copy is aligned.
#include "se-cuda-quants.cuh"

#include <stdlib.h>
#include <string.h>

#define MMQ_BM 128      // weight rows a block
#define MMQ_BK 256      // values of K a tile
#define MMQ_KB (MMQ_BK / 32)
#define MMQ_XLD (MMQ_BK + 16)  // activation row stride in shared memory: conflict-free fragment loads
#define MMQ_THREADS 256
#define MMQ_STAGES 3

// Per type: code bytes of a row per K tile (QROW), their shared-memory stride (QLD, chosen so that
// the 8 rows of a fragment load fall in distinct banks), scale bytes of a row per tile (SROW) and
// the copy unit for them.
template <int T> struct mmq_traits;
template <> struct mmq_traits<SE_TYPE_Q4_0> { static constexpr int QROW = MMQ_KB * Q4_0_QB, QLD = QROW + 16, SROW = MMQ_KB * Q4_0_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q4_1> { static constexpr int QROW = MMQ_KB * Q4_1_QB, QLD = QROW + 16, SROW = MMQ_KB * Q4_1_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q8_0> { static constexpr int QROW = MMQ_KB * Q8_0_QB, QLD = QROW + 16, SROW = MMQ_KB * Q8_0_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q4_K> { static constexpr int QROW = sizeof(block_q4_K), QLD = QROW, SROW = 0, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q6_K> { static constexpr int QROW = Q6_K_QB, QLD = QROW, SROW = Q6_K_SB, SUNIT = 4; };

template <int T, int BN>
struct mmq_layout {  // one pipeline stage in shared memory, 16-byte aligned regions
    static constexpr int Q = 0;
    static constexpr int S = Q + MMQ_BM * mmq_traits<T>::QLD;
    static constexpr int X = S + (MMQ_BM * mmq_traits<T>::SROW + 15) / 16 * 16;
    static constexpr int D = X + BN * MMQ_XLD;
    static constexpr int BYTES = D + BN * MMQ_KB * (int) sizeof(float2);
};

// Asynchronous copy of UNIT bytes global -> shared, of which src_bytes are read and the rest zeroed.
template <int UNIT>
__device__ __forceinline__ void cp_async(void * smem, const void * gmem, int src_bytes) {
    const unsigned s = (unsigned) __cvta_generic_to_shared(smem);
    if constexpr (UNIT == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(UNIT), "r"(src_bytes));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// R rows of B bytes (the tile) from src (rows `pitch` apart) to dst (rows `ld` apart); rows from
// valid_rows on and bytes from valid_bytes on read as zeros.
template <int UNIT, int R, int B>
__device__ __forceinline__ void copy_tile(uint8_t * dst, int ld, const uint8_t * src, int64_t pitch, int valid_rows,
                                          int valid_bytes) {
    constexpr int PER_ROW = B / UNIT;
    static_assert(B % UNIT == 0, "tile rows in whole copy units");
    for (int i = threadIdx.x; i < R * PER_ROW; i += MMQ_THREADS) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * UNIT;
        int n = valid_bytes - c;
        n = r >= valid_rows || n < 0 ? 0 : n > UNIT ? UNIT : n;
        cp_async<UNIT>(dst + r * ld + c, n ? src + r * pitch + c : src, n);  // n == 0 reads nothing
    }
}

template <int T, int BN>
__device__ __forceinline__ void load_stage(uint8_t * st, const se_dweight & w, const se_dact & act, int64_t r0, int32_t t0,
                                           int32_t n, int kt) {
    using tr = mmq_traits<T>;
    using L = mmq_layout<T, BN>;
    const int vr = (int) min((int64_t) MMQ_BM, w.rows - r0), vt = min(BN, n - t0);
    const int64_t nb = w.cols / 32;
    copy_tile<16, MMQ_BM, tr::QROW>(st + L::Q, tr::QLD, w.q + r0 * w.q_row + (int64_t) kt * tr::QROW, w.q_row, vr,
                                    (int) min((int64_t) tr::QROW, w.q_row - (int64_t) kt * tr::QROW));
    if constexpr (tr::SROW > 0) {
        const int64_t s_used = T == SE_TYPE_Q6_K ? (w.cols / 256) * Q6_K_SB : nb * (tr::SROW / MMQ_KB);
        copy_tile<tr::SUNIT, MMQ_BM, tr::SROW>(st + L::S, tr::SROW, w.s + r0 * w.s_row + (int64_t) kt * tr::SROW, w.s_row, vr,
                                               (int) min((int64_t) tr::SROW, s_used - (int64_t) kt * tr::SROW));
    }
    copy_tile<16, BN, MMQ_BK>(st + L::X, MMQ_XLD, (const uint8_t *) act.qx + (int64_t) t0 * w.cols + (int64_t) kt * MMQ_BK,
                              w.cols, vt, (int) min((int64_t) MMQ_BK, w.cols - (int64_t) kt * MMQ_BK));
    copy_tile<8, BN, MMQ_KB * 8>(st + L::D, MMQ_KB * 8, (const uint8_t *) (act.ds + (int64_t) t0 * nb + kt * MMQ_KB), nb * 8,
                                 vt, (int) min((int64_t) MMQ_KB * 8, (nb - (int64_t) kt * MMQ_KB) * 8));
}

__device__ __forceinline__ void mma_k32(int (&c)[4], const int (&a)[4], int b0, int b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_k16(int (&c)[4], int a0, int a1, int b0) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ int ld32(const uint8_t * p) { return *(const int *) p; }

// Fragment words of a row for block kb of the tile: lo = values 4 tig .. 4 tig + 3, hi = values
// 16 + 4 tig ..; and the row's (a, c) for the block (Q6_K: a of each half, c unused).
template <int T>
__device__ __forceinline__ void row_block(const uint8_t * q, const uint8_t * s, int kb, int tig, int & lo, int & hi, float2 & ac,
                                          float2 & a6) {
    if constexpr (T == SE_TYPE_Q4_0 || T == SE_TYPE_Q4_1) {
        const int v = ld32(q + Q4_0_QB * kb + 4 * tig);
        lo = v & 0x0f0f0f0f;
        hi = (v >> 4) & 0x0f0f0f0f;
        if constexpr (T == SE_TYPE_Q4_0) {  // q - 8 in the integer domain: no offset term per output
            lo = (int) __vsubss4((unsigned) lo, 0x08080808u);
            hi = (int) __vsubss4((unsigned) hi, 0x08080808u);
            ac = make_float2(h2f(s + Q4_0_SB * kb), 0.0f);
        } else {
            ac = make_float2(h2f(s + Q4_1_SB * kb), h2f(s + Q4_1_SB * kb + offsetof(block_q4_1, m)));
        }
    } else if constexpr (T == SE_TYPE_Q8_0) {
        lo = ld32(q + Q8_0_QB * kb + 4 * tig);
        hi = ld32(q + Q8_0_QB * kb + 16 + 4 * tig);
        ac = make_float2(h2f(s + Q8_0_SB * kb), 0.0f);
    } else if constexpr (T == SE_TYPE_Q4_K) {  // sub-block kb: nibbles (kb % 2) of 32 bytes at chunk kb / 2
        const uint8_t * qs = q + Q4_K_QS + 32 * (kb / 2);
        const int shift = 4 * (kb % 2);
        lo = (ld32(qs + 4 * tig) >> shift) & 0x0f0f0f0f;
        hi = (ld32(qs + 16 + 4 * tig) >> shift) & 0x0f0f0f0f;
        int sc, m;
        k_scale_min(q + Q4_K_SC, kb, sc, m);
        ac = make_float2(h2f(q) * sc, -h2f(q + offsetof(block_q4_K, dmin)) * m);
    } else {  // Q6_K: block kb = group g of half h; value l: ql nibble (g / 2), qh bits 2 g, minus 32
        const int h = kb / 4, g = kb % 4;
        const uint8_t * ql = q + 64 * h + (g & 1) * 32, * qh = q + Q6_K_QH + 32 * h;
        const int sh = g < 2 ? 0 : 4;
        const int l0 = ((ld32(ql + 4 * tig) >> sh) & 0x0f0f0f0f) | (((ld32(qh + 4 * tig) >> (2 * g)) & 0x03030303) << 4);
        const int l1 = ((ld32(ql + 16 + 4 * tig) >> sh) & 0x0f0f0f0f) | (((ld32(qh + 16 + 4 * tig) >> (2 * g)) & 0x03030303) << 4);
        lo = (int) __vsubss4((unsigned) l0, 0x20202020u);
        hi = (int) __vsubss4((unsigned) l1, 0x20202020u);
        const int8_t * sc = (const int8_t *) (q + Q6_K_SC + 8 * h + 2 * g);
        const float d = h2f(s);
        a6 = make_float2(d * sc[0], d * sc[1]);
        ac = make_float2(0.0f, 0.0f);
    }
}

// grid (row tiles, token tiles), 256 threads: 8 warps as 4 (rows) x 2 (tokens), a warp 32 rows x
// BN / 2 tokens: 2 x (BN / 16) tiles of 16 x 8.
template <int T, int BN>
__global__ void __launch_bounds__(MMQ_THREADS) k_mmq(const se_mm_out o, const se_dact act, int32_t n) {
    extern __shared__ __align__(16) uint8_t smem[];
    using tr = mmq_traits<T>;
    using L = mmq_layout<T, BN>;
    constexpr int NT = BN / 16;  // n8 tiles a warp
    const se_dweight & w = o.w;
    const int64_t r0 = (int64_t) blockIdx.x * MMQ_BM;
    const int32_t t0 = blockIdx.y * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
    const int wm = warp / 2, wn = warp % 2;
    const int nkt = (int) ((w.cols + MMQ_BK - 1) / MMQ_BK);

    float acc[2][NT][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < MMQ_STAGES - 1; s++) {
        if (s < nkt) load_stage<T, BN>(smem + s * L::BYTES, w, act, r0, t0, n, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nkt; kt++) {
        cp_async_wait<MMQ_STAGES - 2>();
        __syncthreads();  // tile kt is in; every warp is done with the buffer refilled next
        const int next = kt + MMQ_STAGES - 1;
        if (next < nkt) load_stage<T, BN>(smem + (next % MMQ_STAGES) * L::BYTES, w, act, r0, t0, n, next);
        cp_async_commit();

        const uint8_t * st = smem + (kt % MMQ_STAGES) * L::BYTES;
        const uint8_t * xq = st + L::X;
        const float2 * xd = (const float2 *) (st + L::D);
#pragma unroll 2
        for (int kb = 0; kb < MMQ_KB; kb++) {
            int b[NT][2];
            float2 dx[NT][2];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int tok = wn * (BN / 2) + 8 * j;
                b[j][0] = ld32(xq + (tok + g) * MMQ_XLD + 32 * kb + 4 * tig);
                b[j][1] = ld32(xq + (tok + g) * MMQ_XLD + 32 * kb + 16 + 4 * tig);
                dx[j][0] = xd[(tok + 2 * tig) * MMQ_KB + kb];
                dx[j][1] = xd[(tok + 2 * tig + 1) * MMQ_KB + kb];
            }
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int ra = wm * 32 + 16 * i + g, rb = ra + 8;
                int a[4];
                float2 aca, acb, a6a, a6b;
                row_block<T>(st + L::Q + ra * tr::QLD, st + L::S + ra * tr::SROW, kb, tig, a[0], a[2], aca, a6a);
                row_block<T>(st + L::Q + rb * tr::QLD, st + L::S + rb * tr::SROW, kb, tig, a[1], a[3], acb, a6b);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    if constexpr (T == SE_TYPE_Q6_K) {
                        int c0[4] = {0, 0, 0, 0}, c1[4] = {0, 0, 0, 0};
                        mma_k16(c0, a[0], a[1], b[j][0]);
                        mma_k16(c1, a[2], a[3], b[j][1]);
                        acc[i][j][0] += dx[j][0].x * (a6a.x * c0[0] + a6a.y * c1[0]);
                        acc[i][j][1] += dx[j][1].x * (a6a.x * c0[1] + a6a.y * c1[1]);
                        acc[i][j][2] += dx[j][0].x * (a6b.x * c0[2] + a6b.y * c1[2]);
                        acc[i][j][3] += dx[j][1].x * (a6b.x * c0[3] + a6b.y * c1[3]);
                    } else {
                        int c[4] = {0, 0, 0, 0};
                        mma_k32(c, a, b[j][0], b[j][1]);
                        acc[i][j][0] += aca.x * dx[j][0].x * __int2float_rn(c[0]);
                        acc[i][j][1] += aca.x * dx[j][1].x * __int2float_rn(c[1]);
                        acc[i][j][2] += acb.x * dx[j][0].x * __int2float_rn(c[2]);
                        acc[i][j][3] += acb.x * dx[j][1].x * __int2float_rn(c[3]);
                        if constexpr (T == SE_TYPE_Q4_1 || T == SE_TYPE_Q4_K) {  // the blocks' offsets (mins)
                            acc[i][j][0] += aca.y * dx[j][0].y;
                            acc[i][j][1] += aca.y * dx[j][1].y;
                            acc[i][j][2] += acb.y * dx[j][0].y;
                            acc[i][j][3] += acb.y * dx[j][1].y;
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t r = r0 + wm * 32 + 16 * i + g + 8 * (e / 2);
                const int32_t t = t0 + wn * (BN / 2) + 8 * j + 2 * tig + (e % 2);
                if (r >= w.rows || t >= n) continue;
                float v = acc[i][j][e];
                if (o.bias) v += o.bias[r];
                float * dst = o.out + (int64_t) t * w.rows + r;
                *dst = o.accumulate ? *dst + v : v;
            }
}

bool se_cuda_has_mmq(int32_t type) {
    return type == SE_TYPE_Q4_0 || type == SE_TYPE_Q4_1 || type == SE_TYPE_Q8_0 || type == SE_TYPE_Q4_K || type == SE_TYPE_Q6_K;
}

template <int T, int BN>
static int launch_mmq(const se_mm_out * o, se_dact act, int32_t n, cudaStream_t s) {
    constexpr int smem = MMQ_STAGES * mmq_layout<T, BN>::BYTES;
    static bool ready = false;  // more than 48 KiB of shared memory must be asked for, once a kernel
    if (!ready) {
        cudaFuncSetAttribute(k_mmq<T, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        cudaFuncSetAttribute(k_mmq<T, BN>, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        SE_CUDA_CHECK(cudaGetLastError());
        ready = true;
    }
    const dim3 grid((unsigned) ((o->w.rows + MMQ_BM - 1) / MMQ_BM), (unsigned) ((n + BN - 1) / BN));
    k_mmq<T, BN><<<grid, MMQ_THREADS, smem, s>>>(*o, act, n);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

template <int T>
static int launch_type(const se_mm_out * o, se_dact act, int32_t n, cudaStream_t s) {
    // 64 tokens a block where that still gives a block per multiprocessor, else 32 (K, V and short prompts)
    const int64_t tiles64 = (o->w.rows + MMQ_BM - 1) / MMQ_BM * ((n + 63) / 64);
    return tiles64 >= se_cuda_n_sms() ? launch_mmq<T, 64>(o, act, n, s) : launch_mmq<T, 32>(o, act, n, s);
}

int se_cuda_mmq(const se_mm_out * o, se_dact act, int32_t n, cudaStream_t s) {
    if (o->w.cols % 32) return SE_ERR_UNSUPPORTED;
    switch (o->w.type) {
        case SE_TYPE_Q4_0: return launch_type<SE_TYPE_Q4_0>(o, act, n, s);
        case SE_TYPE_Q4_1: return launch_type<SE_TYPE_Q4_1>(o, act, n, s);
        case SE_TYPE_Q8_0: return launch_type<SE_TYPE_Q8_0>(o, act, n, s);
        case SE_TYPE_Q4_K: return launch_type<SE_TYPE_Q4_K>(o, act, n, s);
        case SE_TYPE_Q6_K: return launch_type<SE_TYPE_Q6_K>(o, act, n, s);
        default: return SE_ERR_UNSUPPORTED;
    }
}

bool se_cuda_mmq_enabled() {
    const char * env = getenv("SEPEDGE_CUDA_MMQ");
    return !(env && !strcmp(env, "0"));
}

