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
//
// What an int8 product costs here is instructions issued, not tensor-core time (cuobjdump -sass of
// the inner loop, per IMMA.16832: ~12 for the float scaling of its 4 outputs, which no layout
// avoids since both scales change every 32 values, and the rest for fragments, copies and
// scales). So: every copy's address is fixed per thread for the whole product (only K moves);
// offsets (Q4_0's -8, Q6_K's -32) are taken by an add and an xor per word instead of __vsubss4
// (eight instructions on sm_90); Q4_K's six-bit scales are decoded once a tile into a table in
// shared memory instead of once per warp and fragment; and 128-token tiles halve the fragment
// work per product where the grid still fills the GPU. Q4_K in the split layout (se-common.h,
// the default; SEPEDGE_CUDA_Q4K_REPACK=0 keeps the file's) copies its codes and its 20-byte heads as two planes and fills the same
// table from the heads' bytes: the same values, so the same results as from the file's superblocks.
#include "se-cuda-quants.cuh"

#include <stdlib.h>
#include <string.h>

#define MMQ_BM 128      // weight rows a block
#define MMQ_BK 256      // values of K a tile
#define MMQ_KB (MMQ_BK / 32)
#define MMQ_XLD (MMQ_BK + 16)  // activation row stride in shared memory: conflict-free fragment loads
#define MMQ_THREADS 256
#define MMQ_STAGES 3
#define MMQ_TLD (MMQ_KB + 1)  // row stride of Q4_K's scale table, in float2

// Per type: code bytes of a row per K tile (QROW), their shared-memory stride (QLD, chosen so that
// the 8 rows of a fragment load fall in distinct banks), scale bytes of a row per tile (SROW) and
// the copy unit for them.
template <int T> struct mmq_traits;
template <> struct mmq_traits<SE_TYPE_Q4_0> { static constexpr int QROW = MMQ_KB * Q4_0_QB, QLD = QROW + 16, SROW = MMQ_KB * Q4_0_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q4_1> { static constexpr int QROW = MMQ_KB * Q4_1_QB, QLD = QROW + 16, SROW = MMQ_KB * Q4_1_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q8_0> { static constexpr int QROW = MMQ_KB * Q8_0_QB, QLD = QROW + 16, SROW = MMQ_KB * Q8_0_SB, SUNIT = 16; };
template <> struct mmq_traits<SE_TYPE_Q4_K> { static constexpr int QROW = sizeof(block_q4_K), QLD = QROW, SROW = 0, SUNIT = 16; };
template <> struct mmq_traits<SE_DK_Q4_K_SPLIT> { static constexpr int QROW = SE_Q4K_SPLIT_QB, QLD = QROW + 16, SROW = SE_Q4K_SPLIT_SB, SUNIT = 4; };
template <> struct mmq_traits<SE_TYPE_Q6_K> { static constexpr int QROW = Q6_K_QB, QLD = QROW, SROW = Q6_K_SB, SUNIT = 4; };

template <int T, int BN>
struct mmq_layout {  // one pipeline stage in shared memory, 16-byte aligned regions
    static constexpr int Q = 0;
    static constexpr int S = Q + MMQ_BM * mmq_traits<T>::QLD;
    static constexpr int X = S + (MMQ_BM * mmq_traits<T>::SROW + 15) / 16 * 16;
    static constexpr int D = X + BN * MMQ_XLD;
    static constexpr int BYTES = D + BN * MMQ_KB * (int) sizeof(float2);
    // after the stages: Q4_K's (a, c) per row and block of the current tile, decoded once a tile;
    // rows MMQ_TLD float2 apart so that the 8 rows of a fragment's lanes fall in distinct banks
    static constexpr int TABLE = T == SE_TYPE_Q4_K || T == SE_DK_Q4_K_SPLIT ? MMQ_BM * MMQ_TLD * (int) sizeof(float2) : 0;
    static constexpr int SMEM = MMQ_STAGES * BYTES + TABLE;
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

// A thread's share of copying R rows of B bytes (one K tile) in pieces of UNIT: TPR threads a row
// (a power of two, so a thread keeps its column and moves RSTEP rows a piece), set up once a
// product, so that a whole tile costs a thread one 64-bit add and one copy a piece (every tile
// but a short last one, which copy_tile serves). Rows from valid_rows on read as zeros.
template <int UNIT, int R, int B>
struct tile_copier {
    static constexpr int PER_ROW = B / UNIT;
    static constexpr int TPR = PER_ROW <= 1 ? 1 : PER_ROW <= 2 ? 2 : PER_ROW <= 4 ? 4 : PER_ROW <= 8 ? 8 : PER_ROW <= 16 ? 16 : 32;
    static constexpr int RSTEP = MMQ_THREADS / TPR, P = (R + RSTEP - 1) / RSTEP;
    static_assert(B % UNIT == 0 && PER_ROW <= 32, "tile rows in at most 32 whole copy units");
    static_assert(R % RSTEP == 0 || P == 1, "a thread's pieces are all rows of the tile");
    const uint8_t * src;  // the thread's first piece in the first tile
    int step;             // bytes between its pieces: RSTEP rows
    uint32_t dst;         // shared address of its first piece in stage 0
    int n_ok;             // pieces [0, n_ok) are rows below valid_rows; -1: the thread copies nothing

    __device__ __forceinline__ void init(const uint8_t * stage0, int ld, const uint8_t * src0, int64_t pitch, int valid_rows) {
        const int r = (int) threadIdx.x / TPR, u = (int) threadIdx.x % TPR;
        src = src0 + r * pitch + u * UNIT;
        step = (int) (RSTEP * pitch);
        dst = (uint32_t) __cvta_generic_to_shared(stage0) + r * ld + u * UNIT;
        n_ok = u >= PER_ROW || r >= R ? -1 : valid_rows > r ? (valid_rows - r + RSTEP - 1) / RSTEP : 0;
    }
    template <int LD>
    __device__ __forceinline__ void copy(uint32_t stage_off, int64_t k_off) const {
        if (n_ok < 0) return;
        const uint8_t * g = src + k_off;
#pragma unroll
        for (int p = 0; p < P; p++) {
            const bool ok = p < n_ok;
            const uint32_t d = dst + stage_off + p * RSTEP * LD;
            if constexpr (UNIT == 16) {
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(ok ? g : src), "r"(ok ? 16 : 0));
            } else {
                asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(ok ? g : src), "n"(UNIT), "r"(ok ? UNIT : 0));
            }
            g += step;
        }
    }
};

// The four copies of a pipeline stage: weight codes, weight scales, activation codes, their scales.
template <int T, int BN>
struct stage_copier {
    using tr = mmq_traits<T>;
    tile_copier<16, MMQ_BM, tr::QROW> q;
    tile_copier<tr::SUNIT, MMQ_BM, tr::SROW ? tr::SROW : tr::SUNIT> s;
    tile_copier<16, BN, MMQ_BK> x;
    tile_copier<8, BN, MMQ_KB * 8> d;
};

template <int T, int BN>
__device__ __forceinline__ void load_stage(uint8_t * smem, const stage_copier<T, BN> & cp, const se_dweight & w, const se_dact & act,
                                           int64_t r0, int32_t t0, int32_t n, int kt) {
    using tr = mmq_traits<T>;
    using L = mmq_layout<T, BN>;
    const int stage = kt % MMQ_STAGES;
    if ((int64_t) (kt + 1) * MMQ_BK <= w.cols) {  // a whole tile: no byte bounds
        const uint32_t off = (uint32_t) (stage * L::BYTES);
        cp.q.template copy<tr::QLD>(off, (int64_t) kt * tr::QROW);
        if constexpr (tr::SROW > 0) cp.s.template copy<tr::SROW>(off, (int64_t) kt * tr::SROW);
        cp.x.template copy<MMQ_XLD>(off, (int64_t) kt * MMQ_BK);
        cp.d.template copy<MMQ_KB * 8>(off, (int64_t) kt * MMQ_KB * 8);
        return;
    }
    uint8_t * st = smem + stage * L::BYTES;
    const int vr = (int) min((int64_t) MMQ_BM, w.rows - r0), vt = min(BN, n - t0);
    const int64_t nb = w.cols / 32;
    const uint8_t * q = w.q + r0 * w.q_row + (int64_t) kt * tr::QROW;
    const uint8_t * sc = tr::SROW > 0 ? w.s + r0 * w.s_row + (int64_t) kt * tr::SROW : nullptr;
    const uint8_t * x = (const uint8_t *) act.qx + (int64_t) t0 * w.cols + (int64_t) kt * MMQ_BK;
    const uint8_t * d = (const uint8_t *) (act.ds + (int64_t) t0 * nb + kt * MMQ_KB);
    copy_tile<16, MMQ_BM, tr::QROW>(st + L::Q, tr::QLD, q, w.q_row, vr, (int) min((int64_t) tr::QROW, w.q_row - (int64_t) kt * tr::QROW));
    if constexpr (tr::SROW > 0) {
        const int64_t s_used = T == SE_TYPE_Q6_K || T == SE_DK_Q4_K_SPLIT ? (w.cols / 256) * tr::SROW : nb * (tr::SROW / MMQ_KB);
        copy_tile<tr::SUNIT, MMQ_BM, tr::SROW>(st + L::S, tr::SROW, sc, w.s_row, vr, (int) min((int64_t) tr::SROW, s_used - (int64_t) kt * tr::SROW));
    }
    copy_tile<16, BN, MMQ_BK>(st + L::X, MMQ_XLD, x, w.cols, vt, (int) min((int64_t) MMQ_BK, w.cols - (int64_t) kt * MMQ_BK));
    copy_tile<8, BN, MMQ_KB * 8>(st + L::D, MMQ_KB * 8, d, nb * 8, vt, (int) min((int64_t) MMQ_KB * 8, (nb - (int64_t) kt * MMQ_KB) * 8));
}

// Q4_K: the (a, c) of every row and block of the tile in stage st, into the table (4 a thread).
__device__ __forceinline__ void decode_q4k_scales(const uint8_t * st, float2 * table) {
    const int r = threadIdx.x / 2, h = threadIdx.x % 2;
    static_assert(MMQ_THREADS == 2 * MMQ_BM, "two threads a row");
    const uint8_t * q = st + mmq_layout<SE_TYPE_Q4_K, 32>::Q + r * mmq_traits<SE_TYPE_Q4_K>::QLD;
    const float d = h2f(q), dmin = h2f(q + offsetof(block_q4_K, dmin));
#pragma unroll
    for (int j = 4 * h; j < 4 * h + 4; j++) {
        int sc, m;
        k_scale_min(q + Q4_K_SC, j, sc, m);
        table[r * MMQ_TLD + j] = make_float2(d * sc, -dmin * m);
    }
}

// Q4_K split: the same table from the tile's heads (d, dmin, then scale and min of sub-block j as bytes).
__device__ __forceinline__ void decode_q4k_split_scales(const uint8_t * st, float2 * table) {
    const int r = threadIdx.x / 2, h = threadIdx.x % 2;
    const uint8_t * hd = st + mmq_layout<SE_DK_Q4_K_SPLIT, 32>::S + r * SE_Q4K_SPLIT_SB;
    const float d = h2f(hd), dmin = h2f(hd + 2);
#pragma unroll
    for (int j = 4 * h; j < 4 * h + 4; j++) table[r * MMQ_TLD + j] = make_float2(d * (int) hd[4 + 2 * j], -dmin * (int) hd[5 + 2 * j]);
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

// Bytes of codes c (0 .. 15, or 0 .. 63 with bias 32) minus bias, as signed bytes: c + (128 - bias)
// stays below 256 in every byte (no carry into the next), and flipping the top bit subtracts 128.
template <int BIAS>
__device__ __forceinline__ int unbias(int c) {
    return (int) (((unsigned) c + 0x01010101u * (128 - BIAS)) ^ 0x80808080u);
}

// Fragment words of a row for block kb of the tile: lo = values 4 tig .. 4 tig + 3, hi = values
// 16 + 4 tig ..; and the row's (a, c) for the block (Q4_K: from the tile's table; Q6_K: a of each
// half, c unused).
template <int T>
__device__ __forceinline__ void row_block(const uint8_t * q, const uint8_t * s, const float2 * table, int kb, int tig, int & lo,
                                          int & hi, float2 & ac, float2 & a6) {
    if constexpr (T == SE_TYPE_Q4_0 || T == SE_TYPE_Q4_1) {
        const int v = ld32(q + Q4_0_QB * kb + 4 * tig);
        lo = v & 0x0f0f0f0f;
        hi = (v >> 4) & 0x0f0f0f0f;
        if constexpr (T == SE_TYPE_Q4_0) {  // q - 8 in the integer domain: no offset term per output
            lo = unbias<8>(lo);
            hi = unbias<8>(hi);
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
        ac = table[kb];
    } else if constexpr (T == SE_DK_Q4_K_SPLIT) {  // the same, the codes without the head
        const uint8_t * qs = q + 32 * (kb / 2);
        const int shift = 4 * (kb % 2);
        lo = (ld32(qs + 4 * tig) >> shift) & 0x0f0f0f0f;
        hi = (ld32(qs + 16 + 4 * tig) >> shift) & 0x0f0f0f0f;
        ac = table[kb];
    } else {  // Q6_K: block kb = group g of half h; value l: ql nibble (g / 2), qh bits 2 g, minus 32
        const int h = kb / 4, g = kb % 4;
        const uint8_t * ql = q + 64 * h + (g & 1) * 32, * qh = q + Q6_K_QH + 32 * h;
        const int sh = g < 2 ? 0 : 4;
        const int l0 = ((ld32(ql + 4 * tig) >> sh) & 0x0f0f0f0f) | (((ld32(qh + 4 * tig) >> (2 * g)) & 0x03030303) << 4);
        const int l1 = ((ld32(ql + 16 + 4 * tig) >> sh) & 0x0f0f0f0f) | (((ld32(qh + 16 + 4 * tig) >> (2 * g)) & 0x03030303) << 4);
        lo = unbias<32>(l0);
        hi = unbias<32>(l1);
        const int8_t * sc = (const int8_t *) (q + Q6_K_SC + 8 * h + 2 * g);
        const float d = h2f(s);
        a6 = make_float2(d * sc[0], d * sc[1]);
        ac = make_float2(0.0f, 0.0f);
    }
}

// The integer dot products to float. CVT_I2F (the default): the conversion instruction (I2FP), four
// an MMA. CVT_MAGIC (SEPEDGE_CUDA_MMQ_CVT=magic): the MMA starts from C0 = 0x4B400000 (the bits of
// 2^23 + 2^22) instead of 0, so that it returns the bits of the float 12582912 + dot, exactly, for
// any |dot| < 2^22 (the largest here: Q8_0, 32 x 128 x 127 < 2^19), and one FADD leaves dot: the
// conversion moved from the conversion unit to the FP32 pipe (the trick of CUTLASS's fast numeric
// converters). Measured on an H200: 3-7% slower (the FP32 pipe, which also carries the scaling,
// is the busier one), so kept only as the A/B.
enum { CVT_I2F = 0, CVT_MAGIC = 1 };
template <int CVT>
__device__ __forceinline__ float to_float(int c) {
    if constexpr (CVT == CVT_MAGIC) return __int_as_float(c) - 12582912.0f;
    return __int2float_rn(c);
}

// Up to three products of the same input, type and K in one grid (Q, K and V; gate and up): one
// wave of blocks over all their row tiles instead of a partial last wave each.
struct mmq_group {
    se_mm_out o[3];
    int32_t end[3];  // row tiles of outputs 0 .. k together
};

// grid (row tiles of every output, token tiles), 256 threads: 8 warps as 4 (rows) x 2 (tokens), a
// warp 32 rows x BN / 2 tokens: 2 x (BN / 16) tiles of 16 x 8. 32-token blocks are held to 128
// registers so that two fit a multiprocessor (their shared memory allows it; mmq_width counts on it).
template <int T, int BN, int CVT>
__global__ void __launch_bounds__(MMQ_THREADS, BN == 32 ? 2 : 1) k_mmq(const mmq_group grp, const se_dact act, int32_t n) {
    extern __shared__ __align__(16) uint8_t smem[];
    using tr = mmq_traits<T>;
    using L = mmq_layout<T, BN>;
    constexpr int NT = BN / 16;  // n8 tiles a warp
    constexpr int C0 = CVT == CVT_MAGIC ? 0x4B400000 : 0;  // the MMAs' starting value (to_float)
    const int bx = (int) blockIdx.x, k = bx < grp.end[0] ? 0 : bx < grp.end[1] ? 1 : 2;
    const se_mm_out & o = k == 0 ? grp.o[0] : k == 1 ? grp.o[1] : grp.o[2];
    const se_dweight & w = o.w;
    const int64_t r0 = (int64_t) (bx - (k == 0 ? 0 : grp.end[k - 1])) * MMQ_BM;
    const int32_t t0 = blockIdx.y * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tig = lane % 4;
    const int wm = warp / 2, wn = warp % 2;
    const int nkt = (int) ((w.cols + MMQ_BK - 1) / MMQ_BK);
    float2 * table = (float2 *) (smem + MMQ_STAGES * L::BYTES);
    stage_copier<T, BN> cp;
    {
        const int vr = (int) min((int64_t) MMQ_BM, w.rows - r0), vt = min(BN, n - t0);
        const int64_t nb = w.cols / 32;
        cp.q.init(smem + L::Q, tr::QLD, w.q + r0 * w.q_row, w.q_row, vr);
        if constexpr (tr::SROW > 0) cp.s.init(smem + L::S, tr::SROW, w.s + r0 * w.s_row, w.s_row, vr);
        cp.x.init(smem + L::X, MMQ_XLD, (const uint8_t *) act.qx + (int64_t) t0 * w.cols, w.cols, vt);
        cp.d.init(smem + L::D, MMQ_KB * 8, (const uint8_t *) (act.ds + (int64_t) t0 * nb), nb * 8, vt);
    }

    float acc[2][NT][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < MMQ_STAGES - 1; s++) {
        if (s < nkt) load_stage<T, BN>(smem, cp, w, act, r0, t0, n, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nkt; kt++) {
        cp_async_wait<MMQ_STAGES - 2>();
        __syncthreads();  // tile kt is in; every warp is done with the buffer refilled next (and the table)
        const int next = kt + MMQ_STAGES - 1;
        if (next < nkt) load_stage<T, BN>(smem, cp, w, act, r0, t0, n, next);
        cp_async_commit();

        const uint8_t * st = smem + (kt % MMQ_STAGES) * L::BYTES;
        if constexpr (T == SE_TYPE_Q4_K) {
            decode_q4k_scales(st, table);
            __syncthreads();
        } else if constexpr (T == SE_DK_Q4_K_SPLIT) {
            decode_q4k_split_scales(st, table);
            __syncthreads();
        }
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
                row_block<T>(st + L::Q + ra * tr::QLD, st + L::S + ra * tr::SROW, table + ra * MMQ_TLD, kb, tig, a[0], a[2], aca, a6a);
                row_block<T>(st + L::Q + rb * tr::QLD, st + L::S + rb * tr::SROW, table + rb * MMQ_TLD, kb, tig, a[1], a[3], acb, a6b);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    if constexpr (T == SE_TYPE_Q6_K) {
                        int c0[4] = {C0, C0, C0, C0}, c1[4] = {C0, C0, C0, C0};
                        mma_k16(c0, a[0], a[1], b[j][0]);
                        mma_k16(c1, a[2], a[3], b[j][1]);
                        acc[i][j][0] += dx[j][0].x * (a6a.x * to_float<CVT>(c0[0]) + a6a.y * to_float<CVT>(c1[0]));
                        acc[i][j][1] += dx[j][1].x * (a6a.x * to_float<CVT>(c0[1]) + a6a.y * to_float<CVT>(c1[1]));
                        acc[i][j][2] += dx[j][0].x * (a6b.x * to_float<CVT>(c0[2]) + a6b.y * to_float<CVT>(c1[2]));
                        acc[i][j][3] += dx[j][1].x * (a6b.x * to_float<CVT>(c0[3]) + a6b.y * to_float<CVT>(c1[3]));
                    } else {
                        int c[4] = {C0, C0, C0, C0};
                        mma_k32(c, a, b[j][0], b[j][1]);
                        acc[i][j][0] += aca.x * dx[j][0].x * to_float<CVT>(c[0]);
                        acc[i][j][1] += aca.x * dx[j][1].x * to_float<CVT>(c[1]);
                        acc[i][j][2] += acb.x * dx[j][0].x * to_float<CVT>(c[2]);
                        acc[i][j][3] += acb.x * dx[j][1].x * to_float<CVT>(c[3]);
                        if constexpr (T == SE_TYPE_Q4_1 || T == SE_TYPE_Q4_K || T == SE_DK_Q4_K_SPLIT) {  // the blocks' offsets (mins)
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

template <int T, int BN, int CVT>
static int launch_cvt(const mmq_group & g, int n_outs, se_dact act, int32_t n, cudaStream_t s) {
    constexpr int smem = mmq_layout<T, BN>::SMEM;
    static bool ready = false;  // more than 48 KiB of shared memory must be asked for, once a kernel
    if (!ready) {
        cudaFuncSetAttribute(k_mmq<T, BN, CVT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        cudaFuncSetAttribute(k_mmq<T, BN, CVT>, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        SE_CUDA_CHECK(cudaGetLastError());
        ready = true;
    }
    const dim3 grid((unsigned) g.end[n_outs - 1], (unsigned) ((n + BN - 1) / BN));
    k_mmq<T, BN, CVT><<<grid, MMQ_THREADS, smem, s>>>(g, act, n);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

static bool cvt_magic() {
    const char * env = getenv("SEPEDGE_CUDA_MMQ_CVT");
    return env && !strcmp(env, "magic");
}

template <int T, int BN>
static int launch_mmq(const mmq_group & g, int n_outs, se_dact act, int32_t n, cudaStream_t s) {
    return cvt_magic() ? launch_cvt<T, BN, CVT_MAGIC>(g, n_outs, act, n, s) : launch_cvt<T, BN, CVT_I2F>(g, n_outs, act, n, s);
}

// Shared memory a block may have on this GPU (227 KiB on sm_90, 163 on sm_80, 99 on sm_86 / sm_89).
static int max_smem() {
    static int v = 0;
    if (!v) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
            cudaGetLastError();
            v = 48 * 1024;
        }
    }
    return v;
}

template <int T>
static bool width_fits(int bn) {
    const int need = bn == 32 ? mmq_layout<T, 32>::SMEM : bn == 64 ? mmq_layout<T, 64>::SMEM : mmq_layout<T, 128>::SMEM;
    return need <= max_smem();
}

// Tokens a block: of the widths whose stages fit shared memory, the one with the least estimated
// time, waves x work a block. A block's work is its width times the instructions a product at that
// width (fragments are shared by width / 16 products: relative 1.25, 1.0, 0.9 at 32, 64, 128 by a
// count of the inner loop); 32-token blocks fit two a multiprocessor, the others one.
// SEPEDGE_CUDA_MMQ_BN=32|64|128 asks for a width (tests, A/B; the widest that fits at most that).
// 0: no width fits.
template <int T>
static int mmq_width(int64_t row_tiles, int32_t n) {
    const char * env = getenv("SEPEDGE_CUDA_MMQ_BN");
    const int forced = env ? atoi(env) : 0;
    if (forced == 32 || forced == 64 || forced == 128) {
        for (int bn = forced; bn >= 32; bn /= 2)
            if (width_fits<T>(bn)) return bn;
        return 0;
    }
    const int64_t sms = se_cuda_n_sms();
    int best = 0;
    double best_cost = 0.0;
    for (int bn : {32, 64, 128}) {
        if (!width_fits<T>(bn)) continue;
        const int per_sm = bn == 32 ? 2 : 1;
        const int64_t tiles = row_tiles * ((n + bn - 1) / bn);
        // a lone block on a multiprocessor runs as fast as its own work allows
        const int64_t rounds = tiles <= sms ? 1 : (tiles + sms * per_sm - 1) / (sms * per_sm) * per_sm;
        const double cost = (double) rounds * bn * (bn == 32 ? 1.25 : bn == 64 ? 1.0 : 0.9);
        if (!best || cost < best_cost) best = bn, best_cost = cost;
    }
    return best;
}

template <int T>
static int launch_type(const mmq_group & g, int n_outs, se_dact act, int32_t n, cudaStream_t s) {
    switch (mmq_width<T>(g.end[n_outs - 1], n)) {
        case 32: return launch_mmq<T, 32>(g, n_outs, act, n, s);
        case 64: return launch_mmq<T, 64>(g, n_outs, act, n, s);
        case 128: return launch_mmq<T, 128>(g, n_outs, act, n, s);
        default: return SE_ERR_UNSUPPORTED;
    }
}

static int launch_group(const se_mm_out * outs, int n_outs, se_dact act, int32_t n, cudaStream_t s) {
    mmq_group g = {};
    int32_t tiles = 0;
    for (int k = 0; k < 3; k++) {
        if (k < n_outs) {
            g.o[k] = outs[k];
            tiles += (int32_t) ((outs[k].w.rows + MMQ_BM - 1) / MMQ_BM);
        }
        g.end[k] = tiles;
    }
    switch (se_dkind(outs[0].w)) {
        case SE_TYPE_Q4_0: return launch_type<SE_TYPE_Q4_0>(g, n_outs, act, n, s);
        case SE_TYPE_Q4_1: return launch_type<SE_TYPE_Q4_1>(g, n_outs, act, n, s);
        case SE_TYPE_Q8_0: return launch_type<SE_TYPE_Q8_0>(g, n_outs, act, n, s);
        case SE_TYPE_Q4_K: return launch_type<SE_TYPE_Q4_K>(g, n_outs, act, n, s);
        case SE_DK_Q4_K_SPLIT: return launch_type<SE_DK_Q4_K_SPLIT>(g, n_outs, act, n, s);
        case SE_TYPE_Q6_K: return launch_type<SE_TYPE_Q6_K>(g, n_outs, act, n, s);
        default: return SE_ERR_UNSUPPORTED;
    }
}

// Whether some width of the kind's (se_dkind) kernel fits this GPU's shared memory.
static bool type_fits(int32_t kind) {
    switch (kind) {
        case SE_TYPE_Q4_0: return width_fits<SE_TYPE_Q4_0>(32);
        case SE_TYPE_Q4_1: return width_fits<SE_TYPE_Q4_1>(32);
        case SE_TYPE_Q8_0: return width_fits<SE_TYPE_Q8_0>(32);
        case SE_TYPE_Q4_K: return width_fits<SE_TYPE_Q4_K>(32);
        case SE_DK_Q4_K_SPLIT: return width_fits<SE_DK_Q4_K_SPLIT>(32);
        case SE_TYPE_Q6_K: return width_fits<SE_TYPE_Q6_K>(32);
        default: return false;
    }
}

int se_cuda_mmq(const se_mm_out * outs, int n_outs, se_dact act, int32_t n, cudaStream_t s) {
    for (int k = 0; k < n_outs; k++)  // every check before the first launch: a refusal launched nothing
        if (!se_cuda_has_mmq(outs[k].w.type) || outs[k].w.cols % 32 || !type_fits(se_dkind(outs[k].w))) return SE_ERR_UNSUPPORTED;
    // runs of outputs with the same type and K share a grid (SEPEDGE_CUDA_MMQ_GROUP=0: one each)
    const char * env = getenv("SEPEDGE_CUDA_MMQ_GROUP");
    const bool group = !(env && !strcmp(env, "0"));
    for (int k = 0; k < n_outs;) {
        int m = 1;
        while (group && k + m < n_outs && m < 3 && se_dkind(outs[k + m].w) == se_dkind(outs[k].w) && outs[k + m].w.cols == outs[k].w.cols) m++;
        const int r = launch_group(outs + k, m, act, n, s);
        if (r != SE_OK) return r;
        k += m;
    }
    return SE_OK;
}

bool se_cuda_mmq_enabled() {
    const char * env = getenv("SEPEDGE_CUDA_MMQ");
    return !(env && !strcmp(env, "0"));
}

