// Matrix products on the device.
//
// Decode (one token) is a matrix-vector product bound by reading the weights once: a warp per row,
// 16-byte loads of the codes, activations quantized to 8 bits and multiplied with dp4a (or, for
// types without such a kernel, weights dequantized in registers against float activations). Up to
// three weights sharing the input (Q, K, V; gate, up) go in one launch.
//
// Prefill (many tokens) is bound by arithmetic: tiles of weights are dequantized into shared memory
// as f16 and multiplied on the tensor cores (WMMA 16x16x16, f32 accumulation), so every weight
// value read serves 64 tokens.
#include "se-cuda-quants.cuh"

#include <mma.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// decode: a warp per row over the rows of up to three weights; a block takes a contiguous run of
// rows. Optionally the block first normalizes the input itself (RMSNorm) into shared memory, and
// with gate and up, applies SwiGLU to its rows and quantizes them for the down projection.

struct mv_args {
    se_mm_out o[3];
    int n_outs;
    se_dact act;               // the input in global memory (without norm)
    int path;
    const float * norm_x;      // with norm: act = rmsnorm(norm_x) * norm_w, made in shared memory
    const float * norm_w;
    float eps;
    bool want_float, want_q8;  // which forms of the normalized input the weights read
    bool swiglu;
    int8_t * hq;               // swiglu: h in 8 bits (n_ff % 32 == 0) or NULL
    float2 * hds;
    int rows_per_block;        // a multiple of 32 with swiglu
    bool vec;                  // with norm: dim % 32 == 0 and x, norm 16-byte aligned (float4 loads)
    int prefetch;              // se_cuda_opts.prefetch
};

bool se_cuda_wants_q8(const se_dweight * w, int path) { return path == SE_MV_AUTO && has_q8_kernel(w->type); }

// T: the weights' kind (se_dkind: the type, or Q4_K's split layout) when the kernel is made for one
// (the others' code left out of it), else -1 and kind chosen at run time.
template <int NR, int U, int T>
__device__ __forceinline__ void qdot(int32_t kind, int64_t cols, const qrows<NR> & w, const se_dact & act, int lane, float * acc) {
#pragma unroll
    for (int n = 0; n < NR; n++) acc[n] = 0;
    switch (T >= 0 ? T : kind) {
        case SE_TYPE_Q4_0: dot_q4<false, NR, U>(w, cols / 32, act.qx, act.ds, lane, acc); break;
        case SE_TYPE_Q4_1: dot_q4<true, NR, U>(w, cols / 32, act.qx, act.ds, lane, acc); break;
        case SE_TYPE_Q8_0: dot_q8_0<NR, U>(w, cols / 32, act.qx, act.ds, lane, acc); break;
        case SE_TYPE_Q4_K: dot_q4_K<NR, U>(w, cols / 256, act.qx, act.ds, lane, acc); break;
        case SE_DK_Q4_K_SPLIT: dot_q4_K_split<NR, U>(w, cols / 256, act.qx, act.ds, lane, acc); break;
        default:           dot_q6_K<NR, U>(w, cols / 256, act.qx, act.ds, lane, acc); break;
    }
}

__device__ __forceinline__ const uint8_t * scales_of(const se_dweight & w, int64_t r) { return w.s ? w.s + r * w.s_row : nullptr; }

// A lane's share of row r . x.
template <int U, int T>
__device__ __forceinline__ float dot1(const se_dweight & w, int64_t r, const se_dact & act, int path, int lane) {
    if (T < 0 && (path == SE_MV_FLOAT || !has_q8_kernel(w.type))) return dot_float(w, r, act.x, lane);
    const qrows<1> q = {{w.q + r * w.q_row}, {scales_of(w, r)}};
    float acc[1];
    qdot<1, U, T>(se_dkind(w), w.cols, q, act, lane, acc);
    return acc[0];
}

// Two rows (of one weight or two) at once where they share a type, else one after the other.
template <int U, int T>
__device__ __forceinline__ void dot2(const se_dweight & wa, int64_t ra, const se_dweight & wb, int64_t rb, const se_dact & act,
                                     int path, int lane, float & da, float & db) {
    if (T >= 0 || (path != SE_MV_FLOAT && has_q8_kernel(wa.type) && se_dkind(wa) == se_dkind(wb) && wa.cols == wb.cols)) {
        const qrows<2> q = {{wa.q + ra * wa.q_row, wb.q + rb * wb.q_row}, {scales_of(wa, ra), scales_of(wb, rb)}};
        float acc[2];
        qdot<2, U, T>(se_dkind(wa), wa.cols, q, act, lane, acc);
        da = acc[0];
        db = acc[1];
        return;
    }
    da = dot1<U, T>(wa, ra, act, path, lane);
    db = dot1<U, T>(wb, rb, act, path, lane);
}

// Output k and its row for row v of the outputs' concatenation; false past the end.
__device__ __forceinline__ bool locate(const mv_args & a, int64_t v, int & k, int64_t & r) {
    k = 0;
    r = v;
    while (k < a.n_outs && r >= a.o[k].w.rows) r -= a.o[k].w.rows, k++;
    return k < a.n_outs;
}

__device__ __forceinline__ void store(const se_mm_out & o, int64_t r, float acc) {
    const float v = o.bias ? acc + o.bias[r] : acc;
    o.out[r] = o.accumulate ? o.out[r] + v : v;
}

// Ask L2 for row v of the outputs' concatenation (codes and scales), a warp together.
__device__ __forceinline__ void prefetch_row(const mv_args & a, int64_t v, int lane) {
    int k;
    int64_t r;
    if (!locate(a, v, k, r)) return;
    const se_dweight & w = a.o[k].w;
    prefetch_l2(w.q + r * w.q_row, w.q_row, lane);
    if (w.s) prefetch_l2(w.s + r * w.s_row, w.s_row, lane);
}

// A warp's task rr of the block (rows r0 + rr and the next; with swiglu row r0 + rr of gate and up).
__device__ __forceinline__ void prefetch_task(const mv_args & a, int64_t r0, int rr, int lane, int level) {
    if (a.prefetch < level || rr >= a.rows_per_block) return;
    if (a.swiglu) {
        const int64_t r = r0 + rr;
        if (r >= a.o[0].w.rows) return;
        for (int k = 0; k < 2; k++) {
            const se_dweight & w = a.o[k].w;
            prefetch_l2(w.q + r * w.q_row, w.q_row, lane);
            if (w.s) prefetch_l2(w.s + r * w.s_row, w.s_row, lane);
        }
        return;
    }
    prefetch_row(a, r0 + rr, lane);
    prefetch_row(a, r0 + rr + 1, lane);
}

// The block's normalized input in shared memory: xs (floats) and / or qs, ds (8-bit blocks of 32,
// as q8_lane makes them). Every load of a thread is issued before its arithmetic: two rounds
// through memory (the sum of squares, then the values) instead of one per block of 32.
__device__ void norm_prologue(const mv_args & a, int64_t dim, float * xs, int8_t * qs, float2 * ds) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (!a.vec) {  // dim % 32 != 0 or unaligned: a value a thread
        const float scale = block_rms_scale(a.norm_x, dim, a.eps);
        if (a.want_q8) {
            for (int64_t c = warp; c < dim / 32; c += 8) {
                const int64_t i = 32 * c + lane;
                const float v = a.norm_x[i] * scale * a.norm_w[i];
                if (xs) xs[i] = v;
                float d;
                const int q = q8_lane(v, d);
                qs[i] = (int8_t) q;
                const float sum = warp_sum((float) q);
                if (lane == 0) ds[c] = make_float2(d, d * sum);
            }
        } else {
            for (int64_t i = threadIdx.x; i < dim; i += 256) xs[i] = a.norm_x[i] * scale * a.norm_w[i];
        }
        return;
    }
    __shared__ float partial[8];
    const float4 * x4 = (const float4 *) a.norm_x, * w4 = (const float4 *) a.norm_w;
    const int64_t n4 = dim / 4, n16 = dim / 16;
    float ss = 0;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < n4; i += 256) {
        const float4 v = x4[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float total = 0;
#pragma unroll
    for (int w = 0; w < 8; w++) total += partial[w];
    const float scale = rsqrtf(total / (float) dim + a.eps);
    // a thread 16 values (half a block of 32: the pair of lanes 2i, 2i + 1 makes one block)
    for (int64_t base = threadIdx.x - lane; base < n16; base += 256) {  // warp-uniform bounds
        const int64_t h = base + lane;
        const bool ok = h < n16;
        float v[16];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float4 x = ok ? x4[4 * h + j] : make_float4(0, 0, 0, 0), w = ok ? w4[4 * h + j] : make_float4(0, 0, 0, 0);
            v[4 * j] = x.x * scale * w.x;
            v[4 * j + 1] = x.y * scale * w.y;
            v[4 * j + 2] = x.z * scale * w.z;
            v[4 * j + 3] = x.w * scale * w.w;
        }
        if (xs && ok) {
#pragma unroll
            for (int j = 0; j < 4; j++) ((float4 *) xs)[4 * h + j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
        }
        if (!a.want_q8) continue;
        float amax = 0;
#pragma unroll
        for (int j = 0; j < 16; j++) amax = fmaxf(amax, fabsf(v[j]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        const float d = amax / 127.0f, inv = d == 0.0f ? 0.0f : 1.0f / d;
        int packed[4];
        int sum = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) packed[j] = q8_word(v + 4 * j, inv, sum);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        if (ok) {
            ((int4 *) qs)[h] = make_int4(packed[0], packed[1], packed[2], packed[3]);
            if (lane % 2 == 0) ds[h / 2] = make_float2(d, d * (float) sum);
        }
    }
}

// Two blocks a multiprocessor (123 registers a thread). Measured on an H200: 3 (80 registers, no
// spills) is 12% slower a token (benchmarks/results/cuda_kernels_log.md). T: one weight type, every
// output of that type on the 8-bit path (-1: any types and paths, chosen per row).
template <int U, int T>
__global__ void __launch_bounds__(256, 2) k_matvec(const mv_args a) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    se_dact act = a.act;
    float * h_s = (float *) smem;  // swiglu: the block's rows of h
    const int64_t r0 = (int64_t) blockIdx.x * a.rows_per_block;
    // the weights depend on nothing before: ask for the first task's rows, let the next kernel
    // start, then wait for the input
    prefetch_task(a, r0, a.swiglu ? warp : 2 * warp, lane, 1);
    pdl_trigger();
    pdl_wait();
    if (a.norm_x) {  // smem: [h rows] [float input] [8-bit codes] [block scales]
        const int64_t dim = a.o[0].w.cols;
        uint8_t * p = smem + (a.swiglu ? a.rows_per_block * sizeof(float) : 0);
        float * xs = a.want_float ? (float *) p : nullptr;
        p += a.want_float ? dim * sizeof(float) : 0;
        int8_t * qs = (int8_t *) p;
        float2 * ds = (float2 *) (p + dim);
        norm_prologue(a, dim, xs, qs, ds);
        __syncthreads();
        act = se_dact{xs, qs, ds};
    }
    if (a.swiglu) {
        const se_mm_out & gate = a.o[0], & up = a.o[1];
        for (int rr = warp; rr < a.rows_per_block; rr += 8) {
            prefetch_task(a, r0, rr + 8, lane, 2);
            const int64_t r = r0 + rr;
            float h = 0;
            if (r < gate.w.rows) {
                float g, u;
                dot2<U, T>(gate.w, r, up.w, r, act, a.path, lane, g, u);
                g = warp_sum(g);
                u = warp_sum(u);
                h = g / (1.0f + expf(-g)) * u;
                if (lane == 0) gate.out[r] = h;
            }
            if (lane == 0) h_s[rr] = h;
        }
        if (!a.hq) return;
        __syncthreads();
        for (int c = warp; c < a.rows_per_block / 32; c += 8) {
            const int64_t i = r0 + 32 * c + lane;
            if (r0 + 32 * c >= gate.w.rows) break;  // rows % 32 == 0: whole blocks or none
            float d;
            const int q = q8_lane(h_s[32 * c + lane], d);
            a.hq[i] = (int8_t) q;
            const float sum = warp_sum((float) q);
            if (lane == 0) a.hds[i / 32] = make_float2(d, d * sum);
        }
        return;
    }
    for (int rr = 2 * warp; rr < a.rows_per_block; rr += 16) {  // rows in pairs
        prefetch_task(a, r0, rr + 16, lane, 2);
        int ka, kb;
        int64_t ra, rb;
        if (!locate(a, r0 + rr, ka, ra)) return;
        if (locate(a, r0 + rr + 1, kb, rb)) {
            float da, db;
            dot2<U, T>(a.o[ka].w, ra, a.o[kb].w, rb, act, a.path, lane, da, db);
            da = warp_sum(da);
            db = warp_sum(db);
            if (lane == 0) {
                store(a.o[ka], ra, da);
                store(a.o[kb], rb, db);
            }
        } else {
            const float da = warp_sum(dot1<U, T>(a.o[ka].w, ra, act, a.path, lane));
            if (lane == 0) store(a.o[ka], ra, da);
        }
    }
}

// Rows a block: enough blocks for two a multiprocessor, a warp taking rows two at a time (a pair
// of gate and up rows with swiglu, whose blocks take whole 8-bit blocks of rows: 32).
static int rows_per_block(int64_t rows, bool swiglu) {
    const int64_t target = 2 * (int64_t) se_cuda_n_sms();
    const int per_step = swiglu ? 8 : 16;
    int64_t steps = (rows + per_step * target - 1) / (per_step * target);
    if (steps < 1) steps = 1;
    if (steps > 32) steps = 32;
    int rpb = (int) (per_step * steps);
    if (swiglu) rpb = (rpb + 31) / 32 * 32;
    return rpb;
}

// Blocks a lane has in flight per row. Measured on an H200 (benchmarks/results/cuda_kernels_log.md):
// 2 beats 1 (fewer loads in flight) and 4 (161 registers: one block a multiprocessor).
#define MV_UNROLL 2

// The one kind (se_dkind) every output has on the 8-bit path, else -1.
static int one_q8_type(const mv_args & a) {
    if (a.path != SE_MV_AUTO || !has_q8_kernel(a.o[0].w.type)) return -1;
    for (int k = 1; k < a.n_outs; k++)
        if (se_dkind(a.o[k].w) != se_dkind(a.o[0].w) || a.o[k].w.cols != a.o[0].w.cols) return -1;
    return se_dkind(a.o[0].w);
}

typedef void (*mv_kernel)(mv_args);

static mv_kernel matvec_kernel(int type) {
    switch (type) {
        case SE_TYPE_Q4_0: return k_matvec<MV_UNROLL, SE_TYPE_Q4_0>;
        case SE_TYPE_Q4_1: return k_matvec<MV_UNROLL, SE_TYPE_Q4_1>;
        case SE_TYPE_Q8_0: return k_matvec<MV_UNROLL, SE_TYPE_Q8_0>;
        case SE_TYPE_Q4_K: return k_matvec<MV_UNROLL, SE_TYPE_Q4_K>;
        case SE_DK_Q4_K_SPLIT: return k_matvec<MV_UNROLL, SE_DK_Q4_K_SPLIT>;
        case SE_TYPE_Q6_K: return k_matvec<MV_UNROLL, SE_TYPE_Q6_K>;
        default:           return k_matvec<MV_UNROLL, -1>;
    }
}

static int launch(mv_args & a, int64_t rows, size_t smem, cudaStream_t s) {
    a.rows_per_block = rows_per_block(rows, a.swiglu);
    const unsigned grid = (unsigned) ((rows + a.rows_per_block - 1) / a.rows_per_block);
    a.prefetch = se_cuda_opts.prefetch;
    SE_CUDA_CHECK(se_launch(matvec_kernel(se_cuda_opts.mv_typed ? one_q8_type(a) : -1), dim3(grid), dim3(256), smem, s,
                            se_cuda_opts.pdl, a));
    return SE_OK;
}

// Whether the row-team kernels (se-cuda-matvec.cu) take every output, as they do Q4_0, Q4_K, Q6_K.
static bool all_mvt(const se_mm_out * outs, int n_outs, int path) {
    const int mode = path == SE_MV_AUTO ? se_cuda_mvt_mode() : SE_MVT_OFF;
    if (mode == SE_MVT_OFF) return false;
    for (int k = 0; k < n_outs; k++) {
        if (!se_cuda_mvt_takes(&outs[k].w) || outs[k].w.cols != outs[0].w.cols) return false;
        // where the choice depends on the shape, one type: the first launch never precedes a refusal
        if (mode == SE_MVT_AUTO && outs[k].w.type != outs[0].w.type) return false;
    }
    return true;
}

int se_cuda_matvec(const se_mm_out * outs, int n_outs, se_dact act, int path, cudaStream_t s) {
    if (all_mvt(outs, n_outs, path)) {  // a launch per run of one type
        int r = SE_OK;
        for (int k0 = 0, k1; k0 < n_outs && r == SE_OK; k0 = k1) {
            for (k1 = k0 + 1; k1 < n_outs && outs[k1].w.type == outs[k0].w.type;) k1++;
            r = se_cuda_mvt(outs + k0, k1 - k0, act.qx, act.ds, NULL, NULL, 0.0f, false, NULL, NULL, s);
        }
        if (r != SE_ERR_UNSUPPORTED) return r;  // unsupported: decided before the first launch
    }
    mv_args a = {};
    int64_t rows = 0;
    for (int k = 0; k < n_outs; k++) {
        a.o[k] = outs[k];
        rows += outs[k].w.rows;
    }
    a.n_outs = n_outs;
    a.act = act;
    a.path = path;
    return launch(a, rows, 0, s);
}

#define MV_MAX_SMEM (48 << 10)

int se_cuda_matvec_norm(const se_mm_out * outs, int n_outs, const float * x, const float * norm, float eps, int path,
                        bool swiglu, int8_t * hq, float2 * hds, cudaStream_t s) {
    if (all_mvt(outs, n_outs, path) && (!swiglu || outs[1].w.type == outs[0].w.type)) {
        int r = SE_OK;
        for (int k0 = 0, k1; k0 < n_outs && r == SE_OK; k0 = k1) {  // a launch per run of one type
            for (k1 = k0 + 1; k1 < n_outs && outs[k1].w.type == outs[k0].w.type;) k1++;
            r = se_cuda_mvt(outs + k0, k1 - k0, NULL, NULL, x, norm, eps, swiglu, hq, hds, s);
        }
        if (r != SE_ERR_UNSUPPORTED) return r;
    }
    mv_args a = {};
    int64_t rows = swiglu ? outs[0].w.rows : 0;
    for (int k = 0; k < n_outs; k++) {
        a.o[k] = outs[k];
        if (!swiglu) rows += outs[k].w.rows;
        if (se_cuda_wants_q8(&outs[k].w, path)) a.want_q8 = true;
        else a.want_float = true;
    }
    const int64_t dim = outs[0].w.cols;
    if (a.want_q8 && dim % 32) return SE_ERR_UNSUPPORTED;
    a.n_outs = n_outs;
    a.path = path;
    a.norm_x = x;
    a.norm_w = norm;
    a.eps = eps;
    a.vec = dim % 32 == 0 && (uintptr_t) x % 16 == 0 && (uintptr_t) norm % 16 == 0;
    a.swiglu = swiglu;
    a.hq = swiglu && rows % 32 == 0 ? hq : NULL;
    const size_t smem = (swiglu ? (size_t) rows_per_block(rows, true) * sizeof(float) : 0) +
                        (a.want_float ? (size_t) dim * sizeof(float) : 0) + (size_t) dim + (size_t) (dim / 32) * sizeof(float2);
    if (smem > MV_MAX_SMEM) return SE_ERR_UNSUPPORTED;
    a.hds = hds;
    return launch(a, rows, smem, s);
}

// The rows a block of the one-token product of outs reads in turn from its first (gate and up with
// swiglu, from the normalized input): 0 where the row-team kernel serves, whose first round of
// groups is the first rows of the weights (an earlier kernel's L2 prefetch follows this order).
int64_t se_cuda_matvec_period(const se_mm_out * outs, int n_outs, bool swiglu, int path) {
    if (all_mvt(outs, n_outs, path) && se_cuda_mvt_serves(&outs[0].w, outs[0].w.rows, true, swiglu)) return 0;
    return rows_per_block(swiglu ? outs[0].w.rows : outs[0].w.rows * n_outs, swiglu);
}

// ---------------------------------------------------------------------------------------------
// prefill: out (n, rows) = x (n, cols) W^T, a block per 64 rows x 64 tokens, K in steps of 32

namespace wmma = nvcuda::wmma;

#define MM_BM 64   // weight rows per block
#define MM_BN 64   // tokens per block
#define MM_BK 32
#define MM_LD (MM_BK + 8)  // f16 row stride of the tiles: 80 bytes keeps WMMA's 32-byte alignment
#define MM_LDC (MM_BN + 4)

__global__ void __launch_bounds__(128) k_matmul(const se_mm_out o, const float * x, int32_t n) {
    __shared__ __align__(32) __half ws[MM_BM * MM_LD];   // weight tile (row, k)
    __shared__ __align__(32) __half xs[MM_BN * MM_LD];   // activation tile (token, k)
    __shared__ __align__(32) float cs[MM_BM * MM_LDC];   // result (row, token)
    const se_dweight & w = o.w;
    const int64_t r0 = (int64_t) blockIdx.x * MM_BM;
    const int32_t t0 = blockIdx.y * MM_BN;
    const int tid = threadIdx.x, warp = tid / 32;
    const int wr = warp / 2, wc = warp % 2;  // this warp's 32 x 32 quarter of the block
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

    const int64_t n_chunks = (w.cols + MM_BK - 1) / MM_BK;
    for (int64_t c = 0; c < n_chunks; c++) {
        float v[32];
        if (tid < MM_BM) {  // one weight row's 32 values
            const int64_t r = r0 + tid;
            if (r < w.rows) {
                dequant32(w, r, c, v);
            } else {
                for (int j = 0; j < 32; j++) v[j] = 0;
            }
            for (int j = 0; j < 32; j++) ws[tid * MM_LD + j] = __float2half(v[j]);
        } else {            // one token's 32 activations
            const int t = tid - MM_BM;
            const float * xr = x + (int64_t) (t0 + t) * w.cols + 32 * c;
            for (int j = 0; j < 32; j++) {
                const bool ok = t0 + t < n && 32 * c + j < w.cols;
                xs[t * MM_LD + j] = __float2half(ok ? xr[j] : 0.0f);
            }
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], ws + (32 * wr + 16 * i) * MM_LD + kk, MM_LD);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], xs + (32 * wc + 16 * j) * MM_LD + kk, MM_LD);
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(cs + (32 * wr + 16 * i) * MM_LDC + 32 * wc + 16 * j, acc[i][j], MM_LDC,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < MM_BM * MM_BN; idx += blockDim.x) {  // rows fastest: coalesced stores
        const int r = idx % MM_BM, t = idx / MM_BM;
        if (r0 + r >= w.rows || t0 + t >= n) continue;
        float val = cs[r * MM_LDC + t];
        if (o.bias) val += o.bias[r0 + r];
        float * dst = o.out + (int64_t) (t0 + t) * w.rows + r0 + r;
        *dst = o.accumulate ? *dst + val : val;
    }
}

int se_cuda_matmul(const se_mm_out * o, const float * x, int32_t n, cudaStream_t s) {
    const dim3 grid((unsigned) ((o->w.rows + MM_BM - 1) / MM_BM), (unsigned) ((n + MM_BN - 1) / MM_BN));
    k_matmul<<<grid, 128, 0, s>>>(*o, x, n);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

void se_cuda_matmul_init() {
    const int types[] = {SE_TYPE_Q4_0, SE_TYPE_Q4_1, SE_TYPE_Q8_0, SE_TYPE_Q4_K, SE_DK_Q4_K_SPLIT, SE_TYPE_Q6_K, -1};
    for (int t : types) cudaFuncSetAttribute((const void *) matvec_kernel(t), cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    const void * kernels[] = {(const void *) k_matmul};
    for (const void * k : kernels) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaGetLastError();
}
