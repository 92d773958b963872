// Attention over the live cells of the cache, in cache order [initial | separators | recent].
//
// One token (decode): split-K ("flash-decoding"). The live cells are cut into splits; a block takes
// one split for the query heads sharing a KV head, so each key and value row is read once for all
// of them. A cell's row is read by a group of lanes with 16-byte loads (head_dim / 8 lanes), so a
// warp has several cells in flight; each group keeps its own running max, sum and weighted values
// (online softmax), merged at the end of the block. The last block of a column to finish merges the
// splits. The token's own rotation and its store into the cache happen in the same kernel. The grid
// covers the most splits there can be and blocks past the live cells return at once, so the launch
// does not depend on the step (CUDA graphs). Two measured-no-faster variants stay behind switches
// (cuda_kernels_log.md, session 5): keys and values through a cp.async ring in shared memory
// (SEPEDGE_CUDA_ATTN_RING=1), and the idle blocks asking L2 for the next products' weights
// (SEPEDGE_CUDA_NEXT_L2=MB). The same scheme on the tensor cores (k_attn_decode_tc: mma.sync with the
// cells as rows and the query heads as columns, keys turned by their cells' deltas in registers) at
// head_dim 128 by default and at 64 with SEPEDGE_CUDA_ATTN_TC=1 or 2 (decode_tc_applies).
//
// Many tokens (prefill), head_dim 64 or 128: a block takes 64 query rows (token, head) of one KV head,
// a warp 16 of them, and streams the live cells through shared memory 64 at a time; Q K^T, the
// online softmax and P V stay in registers (mma.sync, FlashAttention-2's layout). The older WMMA
// kernel (16 rows a block, scores through shared memory) remains behind SEPEDGE_CUDA_ATTN_MMA=0, and a
// warp-per-row kernel serves other head sizes.
//
// Keys are stored rotated with their original position; a cell with a delta (positions within the
// cache) has its key rotated by the delta as it is read (se-cuda-rope.cuh, tables from se-cuda-rope.cu).
#include "se-cuda-rope.cuh"

#include <mma.h>
#include <stdlib.h>
#include <string.h>

// Whether the query at position p sees the cell (se_kv_visible on the host).
__device__ __forceinline__ bool visible(const se_dcell & c, int p, int floor, int mode, int n_local) {
    if (c.pos + c.delta > p) return false;
    if (mode != SE_KV_MODE_SEPLLM) return true;
    return c.sep == INT32_MAX || c.pos > p - n_local || (c.sep >= 0 && c.sep >= floor);
}

// Tensor-core operands: two f16 in a register, the m16n8k16 product (f16 in, f32 accumulation).
__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *(const uint32_t *) &h;
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void * p) {
    const unsigned s = (unsigned) __cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// ---------------------------------------------------------------------------------------------
// one token

#define DEC_WARPS 4
#define DEC_MAX_G 8    // query heads a block
#define DEC_STAGE 256  // cells staged in shared memory at once
#define DEC_U 4        // cells a lane group takes a step
// Blocks a multiprocessor must hold (a register cap): the kernel is bound by latency, so more warps
// in flight; four query heads a block fit 128 registers a thread without spills.
#define DEC_MIN_BLOCKS(GB) ((GB) <= 4 ? 4 : 2)
#define DEC_PREFETCH 64 // cells of its split a block asks L2 for before it waits for its inputs
#define DEC_AHEAD 2     // main-loop steps ahead that a lane group asks L2 for its cells
#define DEC_MAX_SLOTS 4 // ring slots at most (SEPEDGE_CUDA_ATTN_STAGES)

// Ask L2 for the lines of one cache row [p, p + bytes), one thread.
__device__ __forceinline__ void prefetch_row_l2(const __half * p, int bytes) {
    const uintptr_t end = (uintptr_t) p + (uintptr_t) bytes;
    for (uintptr_t x = (uintptr_t) p & ~(uintptr_t) 127; x < end; x += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(x));
}

__device__ __forceinline__ int n_splits_of(int n_live, const se_dattn & a) {
    const int n = (n_live + a.split_cells - 1) / a.split_cells;
    return n < a.max_splits ? n : a.max_splits;
}

// 16 bytes global -> shared, not through L1 (cache rows are read once a layer).
__device__ __forceinline__ void cp_async16(void * dst, const void * src) {
    const unsigned s = (unsigned) __cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Until at most n - 1 of this thread's groups are in flight (n = the ring's slots).
__device__ __forceinline__ void cp_async_wait_slots(int n) {
    if (n >= 4) asm volatile("cp.async.wait_group 3;" ::: "memory");
    else if (n == 3) asm volatile("cp.async.wait_group 2;" ::: "memory");
    else asm volatile("cp.async.wait_group 1;" ::: "memory");
}

// The blocks of the grid past the live cells, while the few others work: ask L2 for the next
// products' weights (se_dattn.next: wo, then the rows of gate and up read first), so that those
// kernels start from L2 instead of device memory. Skipped when the cache rows this layer reads are
// many (next_max_cache): they need the bandwidth and the L2 themselves.
__device__ __forceinline__ void prefetch_next(const se_dattn & a, int n_splits) {
    if (a.n_next == 0 || (int64_t) a.step->n_live * a.cache_row_bytes > a.next_max_cache) return;
    const int64_t idle = (int64_t) (gridDim.y - n_splits) * gridDim.x;
    const int64_t me = ((int64_t) (blockIdx.y - n_splits) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t stride = idle * blockDim.x;
    int64_t first = 0;  // lines of the spans before this one
    for (int s = 0; s < a.n_next; s++) {
        const se_l2_span sp = a.next[s];
        const int64_t lines_a_chunk = sp.chunk / 128 + 2;  // the chunk's lines, wherever it starts
        const int64_t lines = lines_a_chunk * sp.n;
        int64_t i = me - first;
        if (i < 0) i += ((-i + stride - 1) / stride) * stride;  // this thread's first line of the span
        for (; i < lines; i += stride) {
            const int64_t c = i / lines_a_chunk, l = i % lines_a_chunk;
            const uintptr_t base = (uintptr_t) (sp.p + c * sp.stride);
            const uintptr_t x = min((uintptr_t) ((base & ~(uintptr_t) 127) + 128 * l), base + sp.chunk - 1);
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(x));
        }
        first += lines;
    }
}

// Shared memory of the decode kernel beyond its fixed arrays (dynamic): the ring (RING), whose
// slots hold a step's cells for each thread: its 16-byte pieces of DEC_U keys and values, and with
// deltas the cells' (cos, sin) rows; after the loop, the lane groups' partial sums (acc) in the same bytes.
template <int DP, int GB>
struct dec_smem {
    static constexpr int C = 32 / (DP / 8);
    static constexpr size_t kv = (size_t) DEC_U * 2 * DEC_WARPS * 32 * 16;
    static constexpr size_t tab = (size_t) DEC_WARPS * DEC_U * C * (DP / 2) * sizeof(float2);
    static constexpr size_t acc = (size_t) DEC_WARPS * C * GB * DP * sizeof(float);
    static size_t bytes(bool ring, bool rot, int slots) {
        const size_t r = ring ? (size_t) slots * (kv + (rot ? tab : 0)) : 0;
        return r > acc ? r : acc;
    }
};

// The start of a decode block. The cells' keys and values of earlier steps depend on nothing the
// kernels before this one write (the step's upload precedes the pass): ask L2 for the split's first
// ones, let the next kernel start, then wait for the token's query, key and value. False for the
// blocks past the live cells, which ask L2 for the next products' weights instead and return.
__device__ __forceinline__ bool dec_enter(const se_dattn & a, int c0, int c1, int hk, int n_splits) {
    const int d = a.head_dim;
    for (int t = threadIdx.x; t < min(c1 - c0, a.prefetch >= 1 ? DEC_PREFETCH : 0); t += blockDim.x) {
        const int cell = a.live[c0 + t].cell;
        prefetch_row_l2(a.k + se_kv_at(a, cell, hk), d * (int) sizeof(__half));
        prefetch_row_l2(a.v + se_kv_at(a, cell, hk), d * (int) sizeof(__half));
    }
    pdl_trigger();
    pdl_wait();
    if ((int) blockIdx.y >= n_splits) {
        prefetch_next(a, n_splits);
        return false;
    }
    return true;
}

// The token itself: its gb queries (scaled) into s_q and its key rotated by its position into s_k,
// its value into s_v (key and value rounded to f16; dimensions d..DP zero, rows gb..GB not written);
// one block a KV head stores key and value in the token's cell. Ends past a barrier.
template <int DP, int GB>
__device__ __forceinline__ void dec_token(const se_dattn & a, int gb, int h0, int hk, int split, float (*s_q)[DP],
                                          __half * s_k, __half * s_v) {
    const int d = a.head_dim, half = d / 2, tid = threadIdx.x, own = a.cells[0];
    for (int idx = tid; idx < (gb + 1) * half; idx += blockDim.x) {
        const int g = idx / half, i = idx % half;
        int ia, ib;
        rope_pair(i, d, a.rope_type, ia, ib);
        const float * x = g < gb ? a.q + (int64_t) (h0 + g) * d : a.k_new + (int64_t) hk * d;
        const float2 r = rope_turn(x[ia], x[ib], a.rope[i]);
        const float r0 = r.x, r1 = r.y;
        if (g < gb) {
            s_q[g][ia] = r0 * a.scale;
            s_q[g][ib] = r1 * a.scale;
        } else {
            s_k[ia] = __float2half(r0);
            s_k[ib] = __float2half(r1);
        }
    }
    for (int j = d + tid; j < DP; j += blockDim.x) {
        s_k[j] = __float2half(0.0f);
        for (int g = 0; g < GB; g++) s_q[g][j] = 0;
    }
    for (int j = tid; j < DP; j += blockDim.x) s_v[j] = __float2half(j < d ? a.v_new[(int64_t) hk * d + j] : 0.0f);
    __syncthreads();
    if (split == 0 && h0 % (a.n_head / a.n_head_kv) == 0) {  // one block a KV head stores the token
        for (int j = tid; j < d; j += blockDim.x) {
            a.k[se_kv_at(a, own, hk) + j] = s_k[j];
            a.v[se_kv_at(a, own, hk) + j] = s_v[j];
        }
    }
}

// The splits' handshake of a.merge >= 2, one thread of the block after a barrier (the pattern of
// CUTLASS's generic barrier, arrive and wait): the acquire-release fence before the atomic releases
// every partial this block's threads stored before the barrier; the one after it acquires the other
// blocks' partials, and the barrier that follows passes that on to this block's threads. One thread's
// fences instead of every thread's two sequentially consistent ones (__threadfence: MEMBAR.SC.GPU, with
// an invalidation of L1, on sm_90).
__device__ __forceinline__ unsigned count_add_acq_rel(unsigned * p) {
    unsigned old;
    asm volatile("fence.acq_rel.gpu;\n\tatom.relaxed.gpu.global.add.u32 %0, [%1], 1;\n\tfence.acq_rel.gpu;"
                 : "=r"(old) : "l"(p) : "memory");
    return old;
}

// The end of a decode block, after its `ng` groups (lane groups, warps) wrote their running max
// s_m[i * GB + g], sum s_l[i * GB + g] and weighted values s_acc[(i * GB + g) * DP + j] per head g:
// this split's (values, max, sum) per head into a.part; the column's last block to finish merges
// every split (s_acc, of at least 2 GB SE_ATTN_MAX_SPLITS + GB floats, is its scratch then); the
// output to a.out, with qx also in 8-bit blocks (head_dim % 32 == 0: a warp's 32 values, one head).
// The merge's weighted sums: MERGE false (SEPEDGE_CUDA_ATTN_MERGE=0), each split's partial loaded right
// before its multiply-add, so every split is a dependent L2 round trip (below 32 splits the unrolled
// loop's remainder issues load, multiply-add, exit test, split by split: 4 outputs x 7 splits = 28
// round trips a thread at 4 heads of 128 in 7 splits); MERGE (the kernels made for SEPEDGE_CUDA_ATTN_MERGE
// >= 1, the default, taken below 32 splits: decode_merge), the partials of MERGE_LOADS splits issued
// together, then the same multiply-adds in the same order: the same bits, two round trips an output up to
// MERGE_LOADS splits (ptxas issues 2 loads, their multiply-adds, then the other 6; 16 loads a batch came
// out as 4 + 6 + 6, and all of a thread's outputs at once, 64 registers, spilled in the tensor-core
// kernel's main loop). A template argument, not a
// branch on a.merge: the kernels of 0 then compile to the instructions they had (a branch moved
// ptxas's allocation: 8 bytes of stack in the tensor-core kernel's main loop).
#define MERGE_LOADS 8

template <int DP, int GB, bool MERGE>
__device__ __forceinline__ void dec_finish(const se_dattn & a, int gb, int h0, int split, int n_splits, int ng, const float * s_m,
                                           const float * s_l, float * s_acc, float (*s_q)[DP], int8_t * qx, float2 * ds) {
    __shared__ int s_last;
    const int d = a.head_dim, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    __syncthreads();
    for (int idx = tid; idx < gb * d; idx += blockDim.x) {
        const int g = idx / d, j = idx % d;
        float mx = -INFINITY;
        for (int i = 0; i < ng; i++) mx = fmaxf(mx, s_m[i * GB + g]);
        float sum = 0, val = 0;
        if (mx != -INFINITY) {
            for (int i = 0; i < ng; i++) {
                const float f = __expf(s_m[i * GB + g] - mx);
                sum += s_l[i * GB + g] * f;
                val += s_acc[(i * GB + g) * DP + j] * f;
            }
        }
        if (n_splits == 1) {
            s_q[g][j] = sum > 0 ? val / sum : 0.0f;
            continue;
        }
        float * part = a.part + ((int64_t) (h0 + g) * a.max_splits + split) * (d + 2);
        part[j] = val;
        if (j == 0) part[d] = mx, part[d + 1] = sum;
    }
    if (n_splits > 1) {  // the column's last block to finish merges every split
        if (MERGE && a.merge >= 2) {
            __syncthreads();  // every thread's partials stored
            if (tid == 0) s_last = count_add_acq_rel(&a.count[blockIdx.x]) == (unsigned) n_splits - 1;
            __syncthreads();
            if (!s_last) return;
        } else {
            __threadfence();
            __syncthreads();
            if (tid == 0) s_last = atomicAdd(&a.count[blockIdx.x], 1u) == (unsigned) n_splits - 1;
            __syncthreads();
            if (!s_last) return;
            __threadfence();
        }
        // each split's weight exp(m - max) per head (in s_acc, free now), then the weighted sums
        float * s_pw = s_acc, * s_pl = s_pw + GB * SE_ATTN_MAX_SPLITS, * s_hm = s_pl + GB * SE_ATTN_MAX_SPLITS;
        for (int idx = tid; idx < gb * n_splits; idx += blockDim.x) {
            const int g = idx / n_splits, sp = idx % n_splits;
            const float * part = a.part + ((int64_t) (h0 + g) * a.max_splits + sp) * (d + 2);
            s_pw[g * SE_ATTN_MAX_SPLITS + sp] = __ldcg(part + d);
            s_pl[g * SE_ATTN_MAX_SPLITS + sp] = __ldcg(part + d + 1);
        }
        __syncthreads();
        for (int g = warp; g < gb; g += DEC_WARPS) {
            float mx = -INFINITY;
            for (int sp = lane; sp < n_splits; sp += 32) mx = fmaxf(mx, s_pw[g * SE_ATTN_MAX_SPLITS + sp]);
            mx = warp_max(mx);
            float sum = 0;
            for (int sp = lane; sp < n_splits; sp += 32) {
                const float ms = s_pw[g * SE_ATTN_MAX_SPLITS + sp];
                const float f = ms == -INFINITY ? 0.0f : __expf(ms - mx);
                s_pw[g * SE_ATTN_MAX_SPLITS + sp] = f;
                sum += s_pl[g * SE_ATTN_MAX_SPLITS + sp] * f;
            }
            sum = warp_sum(sum);
            if (lane == 0) s_hm[g] = sum;
        }
        __syncthreads();
        if (MERGE) {
            for (int idx = tid; idx < gb * d; idx += blockDim.x) {
                const int g = idx / d, j = idx % d;
                const float * part = a.part + (int64_t) (h0 + g) * a.max_splits * (d + 2) + j;
                const float * w = s_pw + g * SE_ATTN_MAX_SPLITS;
                float val = 0;
                for (int sp0 = 0; sp0 < n_splits; sp0 += MERGE_LOADS) {
                    float x[MERGE_LOADS];
#pragma unroll
                    for (int u = 0; u < MERGE_LOADS; u++) x[u] = sp0 + u < n_splits ? __ldcg(part + (sp0 + u) * (d + 2)) : 0.0f;
#pragma unroll
                    for (int u = 0; u < MERGE_LOADS; u++)
                        if (sp0 + u < n_splits) val += x[u] * w[sp0 + u];
                }
                s_q[g][j] = s_hm[g] > 0 ? val / s_hm[g] : 0.0f;
            }
        } else {
            for (int idx = tid; idx < gb * d; idx += blockDim.x) {
                const int g = idx / d, j = idx % d;
                const float * part = a.part + (int64_t) (h0 + g) * a.max_splits * (d + 2) + j;
                const float * w = s_pw + g * SE_ATTN_MAX_SPLITS;
                float val = 0;
#pragma unroll 32
                for (int sp = 0; sp < n_splits; sp++) val += __ldcg(part + sp * (d + 2)) * w[sp];
                s_q[g][j] = s_hm[g] > 0 ? val / s_hm[g] : 0.0f;
            }
        }
        if (tid == 0) a.count[blockIdx.x] = 0;
    }
    __syncthreads();
    for (int b0 = 32 * warp; b0 < gb * d; b0 += 32 * DEC_WARPS) {
        const int idx = b0 + lane, g = idx / d, j = idx % d;
        const float out = idx < gb * d ? s_q[g][j] : 0.0f;
        if (idx < gb * d) a.out[(int64_t) (h0 + g) * d + j] = out;
        if (qx) {
            float dq;
            const int qv = q8_lane(out, dq);
            const float qsum = warp_sum((float) qv);
            qx[(int64_t) h0 * d + idx] = (int8_t) qv;
            if (lane == 0) ds[((int64_t) h0 * d + idx) / 32] = make_float2(dq, dq * qsum);
        }
    }
}

// grid (n_head / gb, max_splits); block DEC_WARPS warps; head_dim d <= DP, d % 16 == 0; gb <= GB
// query heads (registers scale with GB: fewer for smaller groups, more blocks a multiprocessor).
// RING: the cells' keys, values (and delta rows) come through shared memory with cp.async, `slots`
// steps in flight while a step is computed; else a lane group loads a step's keys and values into
// registers, then computes (the default: faster on the H200).
template <int DP, int GB, bool RING, bool MERGE = false>
__global__ void __launch_bounds__(DEC_WARPS * 32, DEC_MIN_BLOCKS(GB))
    k_attn_decode(const se_dattn a, int gb, int8_t * qx, float2 * ds, int slots) {
    constexpr int L = DP / 8, C = 32 / L;  // lanes a cell, cells a warp at once
    using SM = dec_smem<DP, GB>;
    extern __shared__ __align__(16) uint8_t dsm[];
    __shared__ __align__(16) float s_q[GB][DP];  // queries; at the end, the outputs
    __shared__ __align__(16) __half s_k[DP], s_v[DP];   // the token's own key and value
    __shared__ float s_m[DEC_WARPS][C][GB], s_l[DEC_WARPS][C][GB];
    __shared__ se_dcell s_cells[DEC_STAGE];                // the stage's cells; cell -1: not visible
    float * s_acc = (float *) dsm;  // [DEC_WARPS][C][GB][DP], after the loop
    auto acc_at = [&](int w, int u, int g, int j) -> float & { return s_acc[((w * C + u) * GB + g) * DP + j]; };

    const int n_live = a.step->n_live, n_splits = n_splits_of(n_live, a), split = blockIdx.y;
    const int len = (n_live + n_splits - 1) / n_splits, c0 = split * len, c1 = min(c0 + len, n_live);
    const int d = a.head_dim, half = d / 2, group = a.n_head / a.n_head_kv;
    const int h0 = blockIdx.x * gb, hk = h0 / group;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, G = lane / L, j0 = 8 * (lane % L);
    if (!dec_enter(a, c0, c1, hk, n_splits)) return;
    const int p = a.pos[0], floor = a.floor[0], mode = a.step->mode, n_local = a.step->n_local, own = a.cells[0];
    dec_token<DP, GB>(a, gb, h0, hk, split, s_q, s_k, s_v);

    float acc[GB][8], m[GB], l[GB];  // the queries stay in shared memory (registers)
#pragma unroll
    for (int g = 0; g < GB; g++) {
        m[g] = -INFINITY;
        l[g] = 0;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0;
    }
    const bool dims = j0 < d, rot = a.dtab != nullptr;
    // One step of a lane group: DEC_U cells' scores for every head from their keys (k8 gives the
    // lane's 8 dimensions of cell u's key, rotated by its delta), one online-softmax step for all of
    // them (one rescale of the running sums per DEC_U cells, not per cell), then their values (v8).
    auto step = [&](const int (&cu)[DEC_U], auto && k8, auto && v8) {
        float sc[DEC_U][GB];
#pragma unroll
        for (int u = 0; u < DEC_U; u++) {
            const bool vis = cu[u] >= 0;
            float k[8];
            k8(u, k);
#pragma unroll
            for (int g = 0; g < GB; g++) {
                float t = 0;
                if (g < gb) {
                    const float4 qa = *(const float4 *) &s_q[g][j0], qb = *(const float4 *) &s_q[g][j0 + 4];
                    t = qa.x * k[0] + qa.y * k[1] + qa.z * k[2] + qa.w * k[3] + qb.x * k[4] + qb.y * k[5] + qb.z * k[6] +
                        qb.w * k[7];
#pragma unroll
                    for (int off = L / 2; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
                }
                sc[u][g] = vis ? t : -INFINITY;
            }
        }
        // per head: the new max, the old sums rescaled once, the cells' weights (into sc)
#pragma unroll
        for (int g = 0; g < GB; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) mx = fmaxf(mx, sc[u][g]);
            if (g >= gb || mx == -INFINITY) {  // nothing visible yet
#pragma unroll
                for (int u = 0; u < DEC_U; u++) sc[u][g] = 0;
                continue;
            }
            const float alpha = __expf(m[g] - mx);
            float wsum = 0;
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                sc[u][g] = __expf(sc[u][g] - mx);
                wsum += sc[u][g];
            }
            m[g] = mx;
            l[g] = l[g] * alpha + wsum;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= alpha;
        }
#pragma unroll
        for (int u = 0; u < DEC_U; u++) {
            float v[8];
            v8(u, v);
#pragma unroll
            for (int g = 0; g < GB; g++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] += sc[u][g] * v[e];
        }
    };
    const int first = warp * C * DEC_U, stride = DEC_WARPS * C * DEC_U;
    // the split's cells, a stage at a time: staged in shared memory with their visibility, then each
    // lane group takes DEC_U of them a step
    for (int sb = c0; sb < c1; sb += DEC_STAGE) {
        const int sn = min(DEC_STAGE, c1 - sb);
        __syncthreads();  // the previous stage is done
        for (int t = tid; t < sn; t += blockDim.x) {
            se_dcell c = a.live[sb + t];
            if (!visible(c, p, floor, mode, n_local)) c.cell = -1;
            s_cells[t] = c;
        }
        __syncthreads();
        // ask L2 for the cells of the step `DEC_AHEAD` steps after the one at `base` (prefetch 2)
        auto prefetch_ahead = [&](int base) {
            if (a.prefetch < 2 || j0 != 0 || base + DEC_AHEAD * stride < DEC_PREFETCH) return;
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                const int i = base + DEC_AHEAD * stride + u * C + G;
                const int cell = i < sn ? s_cells[i].cell : -1;
                if (cell >= 0) {
                    prefetch_row_l2(a.k + se_kv_at(a, cell, hk), d * (int) sizeof(__half));
                    prefetch_row_l2(a.v + se_kv_at(a, cell, hk), d * (int) sizeof(__half));
                }
            }
        };
        if (!RING) {
            for (int base = first; base < sn; base += stride) {
                int4 kraw[DEC_U], vraw[DEC_U];
                int cu[DEC_U], du[DEC_U];  // the cells and their deltas
                prefetch_ahead(base);
#pragma unroll
                for (int u = 0; u < DEC_U; u++) {  // every load in flight before any arithmetic
                    const int i = base + u * C + G;
                    cu[u] = i < sn ? s_cells[i].cell : -1;
                    du[u] = i < sn ? s_cells[i].delta : 0;
                    if (cu[u] >= 0 && dims) {
                        const bool mine = cu[u] == own;
                        const __half * kr = mine ? s_k : a.k + se_kv_at(a, cu[u], hk);
                        const __half * vr = mine ? s_v : a.v + se_kv_at(a, cu[u], hk);
                        kraw[u] = *(const int4 *) (kr + j0);
                        vraw[u] = *(const int4 *) (vr + j0);
                    } else {
                        kraw[u] = vraw[u] = make_int4(0, 0, 0, 0);
                    }
                }
                step(cu, [&](int u, float (&k)[8]) {
                    unpack8(kraw[u], k);
                    if (cu[u] >= 0 && dims && du[u] != 0) {  // the table row: a second round trip
                        const __half * kr = cu[u] == own ? s_k : a.k + se_kv_at(a, cu[u], hk);
                        rope_rotate8(k, kr, j0, d, a.dtab + (int64_t) cu[u] * half, a.rope_type);
                    }
                }, [&](int u, float (&v)[8]) { unpack8(vraw[u], v); });
            }
            continue;
        }
        // the ring: slot s of a thread's pieces; a cell's (cos, sin) row is shared by its lane group
        const size_t slot_bytes = SM::kv + (rot ? SM::tab : 0);
        auto piece = [&](int s, int u, int which, int thread) -> int4 * {
            return (int4 *) (dsm + s * slot_bytes) + (u * 2 + which) * (DEC_WARPS * 32) + thread;
        };
        auto tab_row = [&](int s, int u) -> float2 * {
            return (float2 *) (dsm + s * slot_bytes + SM::kv) + ((warp * DEC_U + u) * C + G) * (DP / 2);
        };
        const int n_steps = sn > first ? (sn - first + stride - 1) / stride : 0;
        auto issue = [&](int it) {
            const int base = first + it * stride, s = it % slots;
            prefetch_ahead(base);
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                const int i = base + u * C + G;
                if (i >= sn) continue;
                const se_dcell c = s_cells[i];
                if (c.cell < 0) continue;
                if (dims && c.cell == own) {  // the token itself: from shared memory (its store may not be seen yet)
                    *piece(s, u, 0, tid) = *(const int4 *) (s_k + j0);
                    *piece(s, u, 1, tid) = *(const int4 *) (s_v + j0);
                } else if (dims) {
                    cp_async16(piece(s, u, 0, tid), a.k + se_kv_at(a, c.cell, hk) + j0);
                    cp_async16(piece(s, u, 1, tid), a.v + se_kv_at(a, c.cell, hk) + j0);
                }
                if (rot && c.delta != 0) {  // the delta's row (d / 4 pieces) in the same round as the key
                    const uint8_t * t = (const uint8_t *) (a.dtab + (int64_t) c.cell * half);
                    uint8_t * st = (uint8_t *) tab_row(s, u);
                    for (int q = lane % L; q < d / 4; q += L) cp_async16(st + 16 * q, t + 16 * q);
                }
            }
        };
        for (int it = 0; it < slots - 1; it++) {
            if (it < n_steps) issue(it);
            cp_async_commit();
        }
        for (int it = 0; it < n_steps; it++) {
            __syncwarp();  // every lane is done with the slot refilled now
            if (it + slots - 1 < n_steps) issue(it + slots - 1);
            cp_async_commit();
            cp_async_wait_slots(slots);
            __syncwarp();  // the step's pieces of the other lanes (delta rows, partner dimensions) are in
            const int base = first + it * stride, s = it % slots;
            int cu[DEC_U];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                const int i = base + u * C + G;
                cu[u] = i < sn ? s_cells[i].cell : -1;
            }
            step(cu, [&](int u, float (&k)[8]) {
                const int i = base + u * C + G;
                if (cu[u] < 0 || !dims) {
#pragma unroll
                    for (int e = 0; e < 8; e++) k[e] = 0;
                    return;
                }
                unpack8(*piece(s, u, 0, tid), k);
                if (rot && s_cells[i].delta != 0) {
                    // SE_ROPE_NEOX's partner dimensions j0 +- d / 2: one other lane's piece (d / 2 % 8 == 0)
                    float pk[8];
                    if (a.rope_type != SE_ROPE_NORM) {
                        unpack8(*piece(s, u, 0, warp * 32 + G * L + (j0 < half ? j0 + half : j0 - half) / 8), pk);
                    }
                    rope_rotate8_row(k, pk, tab_row(s, u), j0, d, a.rope_type);
                }
            }, [&](int u, float (&v)[8]) {
                if (cu[u] < 0 || !dims) {
#pragma unroll
                    for (int e = 0; e < 8; e++) v[e] = 0;
                    return;
                }
                unpack8(*piece(s, u, 1, tid), v);
            });
        }
    }
    if (RING) __syncthreads();  // the partial sums below take the ring's bytes
    // this block's lane groups' (weighted values, max, sum) per head, for dec_finish
#pragma unroll
    for (int g = 0; g < GB; g++) {
        if (g >= gb) break;
        if (lane % L == 0) s_m[warp][G][g] = m[g], s_l[warp][G][g] = l[g];
#pragma unroll
        for (int e = 0; e < 8; e++) acc_at(warp, G, g, j0 + e) = acc[g][e];
    }
    dec_finish<DP, GB, MERGE>(a, gb, h0, split, n_splits, DEC_WARPS * C, &s_m[0][0][0], &s_l[0][0][0], s_acc, s_q, qx, ds);
}

// ---------------------------------------------------------------------------------------------
// one token on the tensor cores (SEPEDGE_CUDA_ATTN_TC=1 or 2, where decode_tc_applies: head_dim 64
// or 128)
//
// The split-K scheme, the token's rotation and store and the ending of k_attn_decode (dec_enter,
// dec_token, dec_finish), but a warp takes TC_CELLS = 16 cells a step through mma.sync m16n8k16
// with the cells as the rows and the block's query heads (up to 8) as the columns:
//     S^T (16 cells x 8 heads) = K (16 cells x d) Q^T (d x 8 heads)          d / 16 products
//     O^T (d x 8 heads)       += V^T (d x 16 cells) P^T (16 cells x 8 heads)  d / 16 products
// (columns past the block's heads are zero). Fragments, lane = 4 r + c (PTX ISA, mma m16n8k16):
// - K as A: the products sum over the dimensions in any order, so the order is chosen to make a
//   lane's fragments its own 16-byte loads: lane (r, c) loads chunks 4 h + c (8 dimensions each,
//   h < d / 32) of cells r and r + 8; k-step 2 h + t takes words 2 t, 2 t + 1 of chunk h. The
//   queries' B fragments (built once, f16) take their dimensions in the same order.
// - The scores' accumulator holds cells r, r + 8 x heads 2 c, 2 c + 1; each head's running max is
//   the same in the 8 lanes of its column (3 shuffles a step), the sums stay per lane until the end.
//   P (f16) packed per cell row is moved into P^T's B fragment (heads x cell pairs) by
//   movmatrix.trans, one instruction per 8 x 8 half.
// - V^T as A needs two cells' values of one dimension in a register: lane (r, c) loads dimensions
//   [r d / 8, (r + 1) d / 8) of cells 2 c, 2 c + 1, 2 c + 8, 2 c + 9 and pairs them with byte
//   permutes; output row i of m-tile mt is dimension r d / 8 + mt (i = r) or + d / 16 + mt (i = r + 8).
// - Deltas (ROT: the modes whose cells' keys turn by a delta as they are read): a lane's chunks of a
//   key hold whole rotary pairs. SE_ROPE_NORM's (2 i, 2 i + 1) lie inside a chunk; SE_ROPE_NEOX's
//   (i, i + d / 2) lie in chunks 4 h + c and 4 h + c + d / 16 = 4 (h + d / 64) + c: the same lane's
//   chunk h + CH / 2 (CH = d / 32 chunks a cell). So each lane turns its own registers after the
//   load, before they become A fragments, with a quarter of the cell's (cos, sin) row: d / 16
//   16-byte pieces a cell (NORM: pairs 4 (4 h + c) .. + 3 of chunk h; NEOX: pairs 8 (4 h + c) .. + 7
//   of chunks h, h + CH / 2), rounded back to f16 as the prefill kernel's rotated keys are. Only a
//   step whose 16 cells hold one with a delta loads rows (initial and separator cells: the first
//   n_init + n_sep of the cache order, a few steps); a cell without one turns by (1, 0), exactly.
// Each head's queries are scaled by a power of two into f16's range before the rounding (the
// scores scaled back exactly in f32): the f16 cache bounds keys, nothing bounds queries.
// Rounding: queries and P to f16 (2^-11 relative each), everything summed in f32; with deltas the
// turned keys to f16 too.

#define TC_CELLS 16
#define TC_STAGE 512  // cells staged at once (their rows' offsets), read with every load in flight
#define TC_Q_EXP 8       // a head's largest query magnitude scaled into [2^(TC_Q_EXP - 1), 2^TC_Q_EXP)

// The 8 x 8 matrix of b16 whose row i / 4, columns 2 (i % 4), +1 lane i holds, transposed.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

// The halves i of two rows of f16 (words w0, w1) as one register: row 0's in the low half.
__device__ __forceinline__ uint32_t pair_halves(uint32_t w0, uint32_t w1, int i) {
    return __byte_perm(w0, w1, i % 2 ? 0x7632 : 0x5410);
}

// Chunks h of a cell's key (8 f16 dimensions each, chunks 4 h + c of the row, lane column c) turned by
// the cell's delta: piece q of the lane's quarter of the cell's (cos, sin) row at t[32 q] (shared
// memory, tc_delta_rows).
template <int D>
__device__ __forceinline__ void tc_rotate(int4 (&k)[D / 32], const int4 * t, int rope_type) {
    constexpr int CH = D / 32;
    if (rope_type == SE_ROPE_NORM) {  // word w of chunk h: pair 4 (4 h + c) + w, in piece 2 h + w / 2
#pragma unroll
        for (int h = 0; h < CH; h++)
#pragma unroll
            for (int w = 0; w < 4; w++) {
                uint32_t & kw = ((uint32_t *) &k[h])[w];
                const float2 x = __half22float2(*(const __half2 *) &kw);
                const int4 piece = t[32 * (2 * h + w / 2)];
                const float2 r = rope_turn(x.x, x.y, ((const float2 *) &piece)[w % 2]);
                kw = pack_half2(r.x, r.y);
            }
        return;
    }
#pragma unroll
    for (int h = 0; h < CH / 2; h++)  // word w of chunks h, h + CH / 2: pairs 8 (4 h + c) + 2 w, + 1, piece 4 h + w
#pragma unroll
        for (int w = 0; w < 4; w++) {
            uint32_t & lo = ((uint32_t *) &k[h])[w], & hi = ((uint32_t *) &k[h + CH / 2])[w];
            const float2 xl = __half22float2(*(const __half2 *) &lo), xh = __half22float2(*(const __half2 *) &hi);
            const int4 piece = t[32 * (4 * h + w)];
            const float2 * cs = (const float2 *) &piece;
            const float2 r0 = rope_turn(xl.x, xh.x, cs[0]), r1 = rope_turn(xl.y, xh.y, cs[1]);
            lo = pack_half2(r0.x, r1.x);
            hi = pack_half2(r0.y, r1.y);
        }
}

// The lane's d / 16 pieces of a cell's (cos, sin) row (row: its d / 2 pairs; NULL: no delta, (1, 0)
// exactly) into t[32 q], q < d / 16, by cp.async (complete after cp.async.wait_all): NORM piece q
// pairs 4 (4 (q / 2) + c) + 2 (q % 2), + 1; NEOX piece q pairs 8 (4 (q / 4) + c) + 2 (q % 4), + 1.
template <int D>
__device__ __forceinline__ void tc_delta_rows(int4 * t, const float2 * row, int c, int rope_type) {
#pragma unroll
    for (int q = 0; q < D / 16; q++) {
        const int i = rope_type == SE_ROPE_NORM ? 4 * (4 * (q / 2) + c) + 2 * (q % 2) : 8 * (4 * (q / 4) + c) + 2 * (q % 4);
        if (row) cp_async16(t + 32 * q, row + i);
        else t[32 * q] = make_int4(__float_as_int(1.0f), 0, __float_as_int(1.0f), 0);
    }
}

// MINB blocks a multiprocessor at least (a register cap), at head_dim 128: 3 (SEPEDGE_CUDA_ATTN_TC=1,
// 166 registers) issues a step's 16 key and value loads before its first product; 4 (=2, 128
// registers: 16 warps) leaves no room for that, the compiler issues the values' 8 loads after the
// keys' products, so each step waits for two memory round trips. ROT: the context's cells carry
// deltas (a.dtab); without, the kernel has no trace of them.
template <int D, int MINB, bool ROT, bool MERGE = false>
__global__ void __launch_bounds__(DEC_WARPS * 32, MINB)
    k_attn_decode_tc(const se_dattn a, int gb, int8_t * qx, float2 * ds) {
    constexpr int GB = DEC_MAX_G;  // columns of the products
    constexpr int KS = D / 16;     // k-steps of Q K^T, m-tiles of P V
    constexpr int CH = D / 32;     // a lane's 16-byte chunks of a key row
    constexpr int W = D / 8;       // a lane's dimensions of a value row
    constexpr int VQ = W / 8;      // ... in 16-byte loads
    constexpr int ACC0 = DEC_WARPS * GB * D > 2 * GB * SE_ATTN_MAX_SPLITS + GB ? DEC_WARPS * GB * D : 2 * GB * SE_ATTN_MAX_SPLITS + GB;
    constexpr int TAB = DEC_WARPS * 2 * (D / 16) * 32 * 4;  // ROT: a warp's pieces of 2 cells' (cos, sin) rows a lane (floats)
    constexpr int ACC = ROT && TAB > ACC0 ? TAB : ACC0;
    __shared__ __align__(16) float s_q[GB][D];  // queries; at the end, the outputs
    __shared__ __align__(16) __half s_k[D], s_v[D];
    __shared__ float s_m[DEC_WARPS][GB], s_l[DEC_WARPS][GB], s_qs[GB];
    __shared__ int64_t s_off[TC_STAGE];  // the stage's rows (se_kv_at); -1 not visible, -2 the token's own
    __shared__ int s_dc[ROT ? TC_STAGE : 1];  // ROT: the stage's cells that turn (a.dtab's row), else -1
    __shared__ __align__(16) float s_acc[ACC];  // in the loop (ROT): the (cos, sin) pieces, after it the partials

    const int n_live = a.step->n_live, n_splits = n_splits_of(n_live, a), split = blockIdx.y;
    const int len = (n_live + n_splits - 1) / n_splits, c0 = split * len, c1 = min(c0 + len, n_live);
    const int h0 = blockIdx.x * gb, hk = h0 / (a.n_head / a.n_head_kv);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r = lane / 4, c = lane % 4;
    if (!dec_enter(a, c0, c1, hk, n_splits)) return;
    const int p = a.pos[0], floor = a.floor[0], mode = a.step->mode, n_local = a.step->n_local, own = a.cells[0];
    dec_token<D, GB>(a, gb, h0, hk, split, s_q, s_k, s_v);

    for (int g = warp; g < GB; g += DEC_WARPS) {  // each head's power of two
        float mx = 0;
        if (g < gb)
            for (int j = lane; j < D; j += 32) mx = fmaxf(mx, fabsf(s_q[g][j]));
        mx = warp_max(mx);
        int e = 0;
        frexpf(mx, &e);
        if (lane == 0) s_qs[g] = mx > 0 ? ldexpf(1.0f, min(max(TC_Q_EXP - e, -126), 126)) : 1.0f;
    }
    __syncthreads();
    uint32_t qf[KS][2];  // B fragments of Q^T: head r, the dimensions of k-step kk as the keys' A fragments take them
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        const int j = 8 * (4 * (kk / 2) + c) + 4 * (kk % 2);
        const float s = s_qs[r];
        qf[kk][0] = r < gb ? pack_half2(s_q[r][j] * s, s_q[r][j + 1] * s) : 0u;
        qf[kk][1] = r < gb ? pack_half2(s_q[r][j + 2] * s, s_q[r][j + 3] * s) : 0u;
    }
    const float iq0 = 1.0f / s_qs[2 * c], iq1 = 1.0f / s_qs[2 * c + 1];  // powers of two: exact

    float o[KS][4], m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;  // heads 2 c, 2 c + 1
#pragma unroll
    for (int mt = 0; mt < KS; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][e] = 0;
    const int4 zero = make_int4(0, 0, 0, 0);
    for (int sb = c0; sb < c1; sb += TC_STAGE) {
        const int sn = min(TC_STAGE, c1 - sb);
        __syncthreads();  // the previous stage is done
        se_dcell cl[TC_STAGE / (DEC_WARPS * 32)];
#pragma unroll
        for (int i = 0; i < TC_STAGE / (DEC_WARPS * 32); i++) {  // the whole stage (rows past sn: not visible)
            const int t = tid + i * DEC_WARPS * 32;
            cl[i] = t < sn ? a.live[sb + t] : se_dcell{-1, 0, 0, -1};
        }
#pragma unroll
        for (int i = 0; i < TC_STAGE / (DEC_WARPS * 32); i++) {
            const bool vis = cl[i].cell >= 0 && visible(cl[i], p, floor, mode, n_local);
            s_off[tid + i * DEC_WARPS * 32] = !vis ? -1 : cl[i].cell == own ? -2 : se_kv_at(a, cl[i].cell, hk);
            if (ROT) s_dc[tid + i * DEC_WARPS * 32] = vis && cl[i].delta != 0 ? cl[i].cell : -1;
        }
        __syncthreads();
        for (int base = warp * TC_CELLS; base < sn; base += DEC_WARPS * TC_CELLS) {
            int4 kr[2][CH], vr[4][VQ];  // every load of the step in flight before any arithmetic
            bool vis[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {  // keys of cells r, r + 8
                const int64_t off = s_off[base + r + 8 * u];
                const __half * row = off == -2 ? s_k : a.k + off;  // the token's own: its store may not be seen yet
                vis[u] = off != -1;
#pragma unroll
                for (int h = 0; h < CH; h++) kr[u][h] = vis[u] ? *(const int4 *) (row + 8 * (4 * h + c)) : zero;
            }
            if (ROT) {  // the keys of cells r, r + 8 turned by their deltas, where the step has any
                const int dc0 = s_dc[base + r], dc1 = s_dc[base + r + 8];
                if (__any_sync(0xffffffffu, dc0 >= 0 || dc1 >= 0)) {
                    // the rows' pieces in the keys' round trip, through shared memory (no registers held)
                    int4 * tab = (int4 *) s_acc + warp * (2 * (D / 16) * 32) + lane;
#pragma unroll
                    for (int u = 0; u < 2; u++) {
                        const int dc = u ? dc1 : dc0;
                        const float2 * row = dc >= 0 ? a.dtab + (int64_t) dc * (D / 2) : nullptr;
                        tc_delta_rows<D>(tab + u * (D / 16) * 32, row, c, a.rope_type);
                    }
                    asm volatile("cp.async.wait_all;" ::: "memory");
#pragma unroll
                    for (int u = 0; u < 2; u++) tc_rotate<D>(kr[u], tab + u * (D / 16) * 32, a.rope_type);
                }
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {  // values of cells 2 c, 2 c + 1, 2 c + 8, 2 c + 9
                const int64_t off = s_off[base + 2 * c + (u & 1) + 8 * (u >> 1)];
                const __half * row = off == -2 ? s_v : a.v + off;
#pragma unroll
                for (int q = 0; q < VQ; q++) vr[u][q] = off != -1 ? *(const int4 *) (row + W * r + 8 * q) : zero;
            }
            float sa[4] = {0, 0, 0, 0}, sb2[4] = {0, 0, 0, 0};  // even and odd k-steps: two shorter chains
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                const uint32_t * k0 = (const uint32_t *) &kr[0][kk / 2], * k1 = (const uint32_t *) &kr[1][kk / 2];
                const int t = 2 * (kk % 2);
                const uint32_t af[4] = {k0[t], k1[t], k0[t + 1], k1[t + 1]};
                mma_f16(kk % 2 ? sb2 : sa, af, qf[kk][0], qf[kk][1]);
            }
            // scores of cells r (x0: head 2 c, x1: 2 c + 1) and r + 8 (x2, x3); the step's max per head
            const float x0 = vis[0] ? (sa[0] + sb2[0]) * iq0 : -INFINITY, x1 = vis[0] ? (sa[1] + sb2[1]) * iq1 : -INFINITY;
            const float x2 = vis[1] ? (sa[2] + sb2[2]) * iq0 : -INFINITY, x3 = vis[1] ? (sa[3] + sb2[3]) * iq1 : -INFINITY;
            float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
#pragma unroll
            for (int off = 4; off < 32; off *= 2) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            mx0 = fmaxf(m0, mx0);
            mx1 = fmaxf(m1, mx1);
            // nothing visible yet for a head: its max stays -inf, its weights 0, its sums unscaled
            const float al0 = mx0 == -INFINITY ? 1.0f : __expf(m0 - mx0), al1 = mx1 == -INFINITY ? 1.0f : __expf(m1 - mx1);
            const float p0 = mx0 == -INFINITY ? 0.0f : __expf(x0 - mx0), p2 = mx0 == -INFINITY ? 0.0f : __expf(x2 - mx0);
            const float p1 = mx1 == -INFINITY ? 0.0f : __expf(x1 - mx1), p3 = mx1 == -INFINITY ? 0.0f : __expf(x3 - mx1);
            m0 = mx0;
            m1 = mx1;
            l0 = l0 * al0 + (p0 + p2);
            l1 = l1 * al1 + (p1 + p3);
            const uint32_t pb0 = movmatrix_trans(pack_half2(p0, p1)), pb1 = movmatrix_trans(pack_half2(p2, p3));
#pragma unroll
            for (int mt = 0; mt < KS; mt++) {
                o[mt][0] *= al0, o[mt][1] *= al1, o[mt][2] *= al0, o[mt][3] *= al1;
                const int i0 = mt, i1 = KS + mt;  // the lane's halves of rows r, r + 8
                auto w = [&](int u, int i) { return ((const uint32_t *) &vr[u][i / 8])[(i % 8) / 2]; };
                const uint32_t af[4] = {pair_halves(w(0, i0), w(1, i0), i0), pair_halves(w(0, i1), w(1, i1), i1),
                                        pair_halves(w(2, i0), w(3, i0), i0), pair_halves(w(2, i1), w(3, i1), i1)};
                mma_f16(o[mt], af, pb0, pb1);
            }
        }
    }
    if (ROT) __syncthreads();  // every warp is done with its pieces in s_acc
    // the warp's sums per head (the 8 lanes of a column), then its partials for dec_finish
#pragma unroll
    for (int off = 4; off < 32; off *= 2) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    if (r == 0) {
        if (2 * c < gb) s_m[warp][2 * c] = m0, s_l[warp][2 * c] = l0;
        if (2 * c + 1 < gb) s_m[warp][2 * c + 1] = m1, s_l[warp][2 * c + 1] = l1;
    }
#pragma unroll
    for (int mt = 0; mt < KS; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int g = 2 * c + (e & 1), j = W * r + mt + KS * (e >> 1);
            if (g < gb) s_acc[(warp * GB + g) * D + j] = o[mt][e];
        }
    dec_finish<D, GB, MERGE>(a, gb, h0, split, n_splits, DEC_WARPS, &s_m[0][0], &s_l[0][0], s_acc, s_q, qx, ds);
}

// Other head sizes (tests' tiny models): the token is rotated and stored first (k_rope_store); a
// warp takes the cells of its split one by one, a lane dimensions lane, lane + 32, ...
#define ROW_MAX_E 4

__global__ void __launch_bounds__(DEC_WARPS * 32) k_attn_split(const se_dattn a, int gb) {
    __shared__ float s_m[DEC_WARPS][DEC_MAX_G], s_l[DEC_WARPS][DEC_MAX_G];
    __shared__ float s_acc[DEC_WARPS][DEC_MAX_G][128];
    const int n_live = a.step->n_live, n_splits = n_splits_of(n_live, a), split = blockIdx.y;
    if (split >= n_splits) return;
    const int len = (n_live + n_splits - 1) / n_splits, c0 = split * len, c1 = min(c0 + len, n_live);
    const int d = a.head_dim, group = a.n_head / a.n_head_kv;
    const int h0 = blockIdx.x * gb, hk = h0 / group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int p = a.pos[0], floor = a.floor[0], mode = a.step->mode, n_local = a.step->n_local;

    float q[DEC_MAX_G][ROW_MAX_E], acc[DEC_MAX_G][ROW_MAX_E], m[DEC_MAX_G], l[DEC_MAX_G];
#pragma unroll
    for (int g = 0; g < DEC_MAX_G; g++) {
        m[g] = -INFINITY;
        l[g] = 0;
#pragma unroll
        for (int e = 0; e < ROW_MAX_E; e++) {
            const int j = lane + 32 * e;
            q[g][e] = g < gb && j < d ? a.q[(int64_t) (h0 + g) * d + j] * a.scale : 0.0f;
            acc[g][e] = 0;
        }
    }
    for (int i = c0 + warp; i < c1; i += DEC_WARPS) {
        const se_dcell c = a.live[i];
        if (!visible(c, p, floor, mode, n_local)) continue;
        const __half * kr = a.k + se_kv_at(a, c.cell, hk);
        const __half * vr = a.v + se_kv_at(a, c.cell, hk);
        const float2 * t = a.dtab + (int64_t) c.cell * (d / 2);
        float k[ROW_MAX_E], v[ROW_MAX_E];
#pragma unroll
        for (int e = 0; e < ROW_MAX_E; e++) {
            const int j = lane + 32 * e;
            k[e] = j >= d ? 0.0f : c.delta == 0 ? __half2float(kr[j]) : rope_rotated(kr, j, d, t, a.rope_type);
            v[e] = j < d ? __half2float(vr[j]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < DEC_MAX_G; g++) {
            if (g >= gb) break;
            float s = 0;
#pragma unroll
            for (int e = 0; e < ROW_MAX_E; e++) s += q[g][e] * k[e];
            s = warp_sum(s);
            const float m_new = fmaxf(m[g], s), alpha = __expf(m[g] - m_new), w = __expf(s - m_new);
            m[g] = m_new;
            l[g] = l[g] * alpha + w;
#pragma unroll
            for (int e = 0; e < ROW_MAX_E; e++) acc[g][e] = acc[g][e] * alpha + w * v[e];
        }
    }
#pragma unroll
    for (int g = 0; g < DEC_MAX_G; g++) {
        if (g >= gb) break;
        if (lane == 0) s_m[warp][g] = m[g], s_l[warp][g] = l[g];
#pragma unroll
        for (int e = 0; e < ROW_MAX_E; e++)
            if (lane + 32 * e < d) s_acc[warp][g][lane + 32 * e] = acc[g][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < gb * d; idx += blockDim.x) {
        const int g = idx / d, j = idx % d;
        float mx = -INFINITY;
        for (int w = 0; w < DEC_WARPS; w++) mx = fmaxf(mx, s_m[w][g]);
        float sum = 0, val = 0;
        if (mx != -INFINITY) {
            for (int w = 0; w < DEC_WARPS; w++) {
                const float f = __expf(s_m[w][g] - mx);
                sum += s_l[w][g] * f;
                val += s_acc[w][g][j] * f;
            }
        }
        float * part = a.part + ((int64_t) (h0 + g) * a.max_splits + split) * (d + 2);
        part[j] = val;
        if (j == 0) part[d] = mx, part[d + 1] = sum;
    }
}

// grid n_head, block head_dim rounded up to warps: merge the splits of k_attn_split.
__global__ void k_attn_merge(const se_dattn a, int8_t * qx, float2 * ds) {
    const int h = blockIdx.x, j = threadIdx.x, d = a.head_dim;
    const int n_splits = n_splits_of(a.step->n_live, a);
    const float * part = a.part + (int64_t) h * a.max_splits * (d + 2);
    float mx = -INFINITY;
    for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, part[s * (d + 2) + d]);
    float sum = 0, val = 0;
    for (int s = 0; s < n_splits && mx != -INFINITY; s++) {
        const float ms = part[s * (d + 2) + d];
        if (ms == -INFINITY) continue;
        const float f = __expf(ms - mx);
        sum += part[s * (d + 2) + d + 1] * f;
        if (j < d) val += part[s * (d + 2) + j] * f;
    }
    const float out = sum > 0 ? val / sum : 0.0f;
    if (j < d) a.out[(int64_t) h * d + j] = out;
    if (qx) {  // head_dim is a multiple of 32 here
        float dq;
        const int q = q8_lane(out, dq);
        qx[(int64_t) h * d + j] = (int8_t) q;
        const float qsum = warp_sum((float) q);
        if (j % 32 == 0) ds[((int64_t) h * d + j) / 32] = make_float2(dq, dq * qsum);
    }
}

static int heads_per_block(int group) {
    int gb = group < DEC_MAX_G ? group : DEC_MAX_G;
    while (group % gb) gb--;
    return gb;
}

// One wave: the splits of a column are capped so that every block of the grid is resident at once
// (blocks past the live cells return at once, but a second wave of them still costs its start, and
// a split left for a second wave doubles the kernel's time). SEPEDGE_CUDA_ATTN_SPLITS sets the cap (measurements).
// SEPEDGE_CUDA_ATTN_RING=1: keys and values through the cp.async ring (measured on the H200 after 32K
// tokens: 5.81 ms a token against 5.35 through registers, equal with sepllm-stream's deltas:
// cuda_kernels_log.md, session 5), else through registers; SEPEDGE_CUDA_ATTN_STAGES: ring slots (2..4;
// default 3, 2 with deltas, whose slots also hold the delta rows).
static int env_int(const char * name, int fallback) {
    const char * env = getenv(name);
    return env && *env ? atoi(env) : fallback;
}

// SE_ATTN_SPLIT unless SEPEDGE_CUDA_ATTN_SPLIT_CELLS says otherwise (measurements).
int se_cuda_split_cells(void) {
    const int n = env_int("SEPEDGE_CUDA_ATTN_SPLIT_CELLS", SE_ATTN_SPLIT);
    return n < 16 ? 16 : n > (1 << 20) ? (1 << 20) : n;
}

// SEPEDGE_CUDA_ATTN_MERGE >= 1 takes the kernels made with MERGE (dec_finish) only where a column has
// fewer than 32 splits (a sparse mode's cache: 7 at 8B's 128 cells a split): there 0's merge loop, unrolled
// by 32, is all remainder, a dependent round trip a split; with more splits it keeps 32 loads in flight,
// and MERGE's batches of 8 measured slower (H200, 8B Q4_0, full cache after 32K tokens: 4.249 -> 4.596 ms
// a token, the attention 1,879 -> 2,233 us). Decided on the cache's splits, before one_wave caps them.
static bool decode_merge(const se_dattn & a) { return a.merge >= 1 && a.max_splits < 32; }

// The splits of a column capped at one wave of blocks (per_sm of them resident a multiprocessor), or
// at SEPEDGE_CUDA_ATTN_SPLITS (measurements); a.prefetch for the one-token kernels.
static void one_wave(se_dattn & a, int columns, int per_sm) {
    int wave = (per_sm > 0 ? per_sm : 1) * se_cuda_n_sms() / columns;
    const int cap = env_int("SEPEDGE_CUDA_ATTN_SPLITS", 0);
    if (cap > 0) wave = cap;
    a.prefetch = se_cuda_opts.prefetch;
    if (wave >= 1 && wave < a.max_splits) a.max_splits = wave;  // part's stride: the same in every block
}

template <int DP, int GB, bool RING>
static cudaError_t launch_decode_ring(se_dattn a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    const bool rot = a.dtab != nullptr;
    int slots = env_int("SEPEDGE_CUDA_ATTN_STAGES", rot ? 2 : 3);
    slots = slots < 2 ? 2 : slots > DEC_MAX_SLOTS ? DEC_MAX_SLOTS : slots;
    const size_t smem = dec_smem<DP, GB>::bytes(RING, rot, slots);
    // SEPEDGE_CUDA_ATTN_MERGE >= 1: the kernel made for it, on the register path only (the ring is an
    // A/B switch of its own, measured slower)
    const bool merge = !RING && decode_merge(a);
    void (*kernel)(const se_dattn, int, int8_t *, float2 *, int) = k_attn_decode<DP, GB, RING>;
    if (merge) kernel = k_attn_decode<DP, GB, false, true>;
    static int per_sm[2][2][DEC_MAX_SLOTS + 1];
    int & n = per_sm[merge][rot][slots];
    if (!n && cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, DEC_WARPS * 32, smem) != cudaSuccess) {
        cudaGetLastError();
        n = 1;
    }
    const int columns = a.n_head / gb;
    one_wave(a, columns, n);
    return se_launch(kernel, dim3((unsigned) columns, (unsigned) a.max_splits), dim3(DEC_WARPS * 32), smem, s, se_cuda_opts.pdl, a,
                     gb, qx, ds, slots);
}

template <int DP, int GB>
static cudaError_t launch_decode_gb(const se_dattn & a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    const bool ring = env_int("SEPEDGE_CUDA_ATTN_RING", 0) != 0;
    return ring ? launch_decode_ring<DP, GB, true>(a, gb, qx, ds, s) : launch_decode_ring<DP, GB, false>(a, gb, qx, ds, s);
}

template <int DP>
static cudaError_t launch_decode(const se_dattn * a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    if (gb == 1) return launch_decode_gb<DP, 1>(*a, gb, qx, ds, s);
    if (gb == 2) return launch_decode_gb<DP, 2>(*a, gb, qx, ds, s);
    if (gb <= 4) return launch_decode_gb<DP, 4>(*a, gb, qx, ds, s);
    return launch_decode_gb<DP, 8>(*a, gb, qx, ds, s);
}

// The one place that picks the tensor-core decode kernel (k_attn_decode_tc): SEPEDGE_CUDA_ATTN_TC=1
// or 2 (se_cuda_opts.attn_tc, read when the context is made: 3 or 4 blocks a multiprocessor; unset:
// 2 at head_dim 128, SE_ATTN_TC_AUTO) and head_dim 64 or 128, in every cache mode: the modes whose
// cells' keys turn by a delta as they are read (sepllm-stream, streamingllm, sepllm-slide,
// sepllm-runs: a.dtab set) take the variant that turns them (ROT).
static int decode_tc_variant(const se_dattn & a) {
    if (a.head_dim != 64 && a.head_dim != 128) return 0;
    if (se_cuda_opts.attn_tc == SE_ATTN_TC_AUTO) return a.head_dim == 128 ? 2 : 0;
    return se_cuda_opts.attn_tc;
}

static bool decode_tc_applies(const se_dattn & a) { return decode_tc_variant(a) != 0; }

template <int D, int MINB, bool ROT, bool MERGE>
static cudaError_t launch_decode_tc(se_dattn a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    static int per_sm;
    if (!per_sm && cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k_attn_decode_tc<D, MINB, ROT, MERGE>, DEC_WARPS * 32, 0) != cudaSuccess) {
        cudaGetLastError();
        per_sm = 1;
    }
    const int columns = a.n_head / gb;
    one_wave(a, columns, per_sm);
    return se_launch(k_attn_decode_tc<D, MINB, ROT, MERGE>, dim3((unsigned) columns, (unsigned) a.max_splits), dim3(DEC_WARPS * 32), 0, s,
                     se_cuda_opts.pdl, a, gb, qx, ds);
}

template <int D, bool ROT>
static cudaError_t launch_decode_tc(const se_dattn & a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    if (decode_merge(a))  // SEPEDGE_CUDA_ATTN_MERGE: the kernels made for it
        return decode_tc_variant(a) == 2 ? launch_decode_tc<D, 4, ROT, true>(a, gb, qx, ds, s) : launch_decode_tc<D, 3, ROT, true>(a, gb, qx, ds, s);
    return decode_tc_variant(a) == 2 ? launch_decode_tc<D, 4, ROT, false>(a, gb, qx, ds, s) : launch_decode_tc<D, 3, ROT, false>(a, gb, qx, ds, s);
}

static cudaError_t launch_decode_tc(const se_dattn & a, int gb, int8_t * qx, float2 * ds, cudaStream_t s) {
    if (a.dtab != nullptr) return a.head_dim == 64 ? launch_decode_tc<64, true>(a, gb, qx, ds, s) : launch_decode_tc<128, true>(a, gb, qx, ds, s);
    return a.head_dim == 64 ? launch_decode_tc<64, false>(a, gb, qx, ds, s) : launch_decode_tc<128, false>(a, gb, qx, ds, s);
}

bool se_cuda_decode_fused(int32_t head_dim) { return head_dim % 16 == 0 && head_dim <= 128; }

int se_cuda_attention_decode(const se_dattn * a, int8_t * qx, float2 * ds, cudaStream_t s) {
    const int gb = heads_per_block(a->n_head / a->n_head_kv);
    const dim3 grid((unsigned) (a->n_head / gb), (unsigned) a->max_splits);
    if (decode_tc_applies(*a)) {
        SE_CUDA_CHECK(launch_decode_tc(*a, gb, qx, ds, s));
        return SE_OK;
    }
    if (se_cuda_decode_fused(a->head_dim)) {
        SE_CUDA_CHECK(a->head_dim <= 32 ? launch_decode<32>(a, gb, qx, ds, s)
                      : a->head_dim <= 64 ? launch_decode<64>(a, gb, qx, ds, s)
                      : launch_decode<128>(a, gb, qx, ds, s));
        return SE_OK;
    }
    k_attn_split<<<grid, DEC_WARPS * 32, 0, s>>>(*a, gb);
    SE_CUDA_CHECK(cudaGetLastError());
    k_attn_merge<<<a->n_head, (a->head_dim + 31) / 32 * 32, 0, s>>>(*a, qx, ds);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// many tokens, head_dim a multiple of 16 up to 128: tensor cores

namespace wmma = nvcuda::wmma;

#define PF_ROWS 16    // query rows (token, head) a block
#define PF_CELLS 64   // cells a tile

template <int D>
__global__ void __launch_bounds__(128) k_attn_prefill(const se_dattn a, int32_t n) {
    constexpr int LDH = D + 8, LDS = PF_CELLS + 4, LDP = PF_CELLS + 8;
    __shared__ __align__(32) __half qs[PF_ROWS * LDH];
    __shared__ __align__(32) __half kv[PF_CELLS * LDH];     // the tile's keys, then its values
    __shared__ __align__(32) float sc[PF_ROWS * LDS];       // scores
    __shared__ __align__(32) __half pr[PF_ROWS * LDP];      // probabilities
    __shared__ __align__(32) float o[PF_ROWS * D];          // running output
    __shared__ __align__(32) float pv[PF_ROWS * D];         // this tile's P V
    __shared__ float row_m[PF_ROWS], row_l[PF_ROWS], row_alpha[PF_ROWS];
    __shared__ int row_p[PF_ROWS], row_floor[PF_ROWS];
    __shared__ se_dcell cells[PF_CELLS];

    const int group = a.n_head / a.n_head_kv, hk = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32;
    const int n_rows = n * group, r0 = blockIdx.x * PF_ROWS;
    const int n_live = a.step->n_live, mode = a.step->mode, n_local = a.step->n_local;

    for (int idx = tid; idx < PF_ROWS * D; idx += blockDim.x) {  // queries, scaled
        const int r = idx / D, j = idx % D, R = r0 + r;
        float val = 0;
        if (R < n_rows) val = a.q[((int64_t) (R / group) * a.n_head + hk * group + R % group) * D + j] * a.scale;
        qs[r * LDH + j] = __float2half(val);
        o[idx] = 0;
    }
    if (tid < PF_ROWS) {
        const int R = r0 + tid;
        row_m[tid] = -INFINITY;
        row_l[tid] = 0;
        row_p[tid] = R < n_rows ? a.pos[R / group] : -1;
        row_floor[tid] = R < n_rows ? a.floor[R / group] : 0;
    }

    __syncthreads();
    int p_max = -1;  // the block's latest query position: cells after it are masked for every row
    for (int r = 0; r < PF_ROWS; r++) p_max = max(p_max, row_p[r]);
    for (int j0 = 0; j0 < n_live; j0 += PF_CELLS) {
        __syncthreads();  // the previous tile is done with kv, sc, pr
        bool seen = false;
        if (tid < PF_CELLS) {
            se_dcell c = {-1, 0, 0, -1};
            if (j0 + tid < n_live) c = a.live[j0 + tid];
            cells[tid] = c;
            seen = c.cell >= 0 && c.pos + c.delta <= p_max;
        }
        // causal skip: a tile whose cells all come after every query of the block adds nothing
        if (!__syncthreads_or(seen)) continue;
        // keys, rotated by their delta where they have one
        for (int idx = tid; idx < PF_CELLS * D; idx += blockDim.x) {
            const int ci = idx / D, j = idx % D;
            const se_dcell c = cells[ci];
            const __half * kr = a.k + se_kv_at(a, c.cell, hk);
            kv[ci * LDH + j] = c.cell < 0 ? __float2half(0.0f) : c.delta == 0 ? kr[j]
                             : __float2half(rope_rotated(kr, j, D, a.dtab + (int64_t) c.cell * (D / 2), a.rope_type));
        }
        __syncthreads();
        {  // scores: warp w takes cells [16 w, 16 w + 16)
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
            wmma::fill_fragment(s, 0.0f);
            for (int kk = 0; kk < D; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fq;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fk;
                wmma::load_matrix_sync(fq, qs + kk, LDH);
                wmma::load_matrix_sync(fk, kv + 16 * warp * LDH + kk, LDH);
                wmma::mma_sync(s, fq, fk, s);
            }
            wmma::store_matrix_sync(sc + 16 * warp, s, LDS, wmma::mem_row_major);
        }
        __syncthreads();
        {  // online softmax: 8 threads a row, 8 cells each
            const int r = tid / 8, sub = tid % 8;
            float x[8], mx = -INFINITY;
            for (int e = 0; e < 8; e++) {
                const int ci = 8 * sub + e;
                const bool ok = row_p[r] >= 0 && cells[ci].cell >= 0 &&
                                visible(cells[ci], row_p[r], row_floor[r], mode, n_local);
                x[e] = ok ? sc[r * LDS + ci] : -INFINITY;
                mx = fmaxf(mx, x[e]);
            }
            for (int off = 4; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
            float sum = 0;
            for (int e = 0; e < 8; e++) {
                const float pe = x[e] == -INFINITY ? 0.0f : __expf(x[e] - m_new);
                sum += pe;
                pr[r * LDP + 8 * sub + e] = __float2half(pe);
            }
            for (int off = 4; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            __syncwarp();
            if (sub == 0) {
                const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
                row_alpha[r] = alpha;
                row_l[r] = row_l[r] * alpha + sum;
                row_m[r] = m_new;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < PF_CELLS * D; idx += blockDim.x) {  // values replace the keys
            const int ci = idx / D, j = idx % D;
            const se_dcell c = cells[ci];
            kv[ci * LDH + j] = c.cell >= 0 ? a.v[se_kv_at(a, c.cell, hk) + j] : __float2half(0.0f);
        }
        __syncthreads();
        for (int nb = warp; nb < D / 16; nb += 4) {  // P V: warp takes output columns [16 nb, +16)
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> t;
            wmma::fill_fragment(t, 0.0f);
            for (int kk = 0; kk < PF_CELLS; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fp;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fv;
                wmma::load_matrix_sync(fp, pr + kk, LDP);
                wmma::load_matrix_sync(fv, kv + kk * LDH + 16 * nb, LDH);
                wmma::mma_sync(t, fp, fv, t);
            }
            wmma::store_matrix_sync(pv + 16 * nb, t, D, wmma::mem_row_major);
        }
        __syncthreads();
        for (int idx = tid; idx < PF_ROWS * D; idx += blockDim.x) o[idx] = o[idx] * row_alpha[idx / D] + pv[idx];
    }
    __syncthreads();
    for (int idx = tid; idx < PF_ROWS * D; idx += blockDim.x) {
        const int r = idx / D, j = idx % D, R = r0 + r;
        if (R >= n_rows) continue;
        const float l = row_l[r];
        a.out[((int64_t) (R / group) * a.n_head + hk * group + R % group) * D + j] = l > 0 ? o[idx] / l : 0.0f;
    }
}

// Other head sizes: a warp per query row, the cells one by one (tests' tiny models).
__global__ void k_attn_rows(const se_dattn a, int32_t n) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int R = blockIdx.x * 4 + warp;  // (token, head)
    if (R >= n * a.n_head) return;
    const int t = R / a.n_head, h = R % a.n_head, hk = h / (a.n_head / a.n_head_kv), d = a.head_dim;
    const int p = a.pos[t], floor = a.floor[t], mode = a.step->mode, n_local = a.step->n_local;
    float q[ROW_MAX_E], acc[ROW_MAX_E], m = -INFINITY, l = 0;
    for (int e = 0; e < ROW_MAX_E; e++) {
        const int j = lane + 32 * e;
        q[e] = j < d ? a.q[((int64_t) t * a.n_head + h) * d + j] * a.scale : 0.0f;
        acc[e] = 0;
    }
    for (int i = 0; i < a.step->n_live; i++) {
        const se_dcell c = a.live[i];
        if (!visible(c, p, floor, mode, n_local)) continue;
        const __half * kr = a.k + se_kv_at(a, c.cell, hk);
        float k[ROW_MAX_E];
        for (int e = 0; e < ROW_MAX_E; e++) {
            const int j = lane + 32 * e;
            k[e] = j >= d ? 0.0f : c.delta == 0 ? __half2float(kr[j]) : rope_rotated(kr, j, d, a.dtab + (int64_t) c.cell * (d / 2), a.rope_type);
        }
        float s = 0;
        for (int e = 0; e < ROW_MAX_E; e++) s += q[e] * k[e];
        s = warp_sum(s);
        const float m_new = fmaxf(m, s), alpha = __expf(m - m_new), w = __expf(s - m_new);
        m = m_new;
        l = l * alpha + w;
        for (int e = 0; e < ROW_MAX_E; e++) {
            const int j = lane + 32 * e;
            const float v = j < d ? __half2float(a.v[se_kv_at(a, c.cell, hk) + j]) : 0.0f;
            acc[e] = acc[e] * alpha + w * v;
        }
    }
    for (int e = 0; e < ROW_MAX_E; e++) {
        const int j = lane + 32 * e;
        if (j < d) a.out[((int64_t) t * a.n_head + h) * d + j] = l > 0 ? acc[e] / l : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// many tokens, head_dim 64 or 128: mma.sync m16n8k16 (f16 in, f32 accumulation) with the scores,
// the online softmax and the output in registers, as FlashAttention-2 lays it out (facts, not code):
// a block takes 64 query rows (token, head) of one KV head, a warp 16 of them; each tile of 64 cells
// (keys rotated by their deltas, values) goes through shared memory once for all 64 rows. The
// scores' accumulator layout is the A-operand layout of the next product, so P never leaves
// registers; V's fragments come transposed by ldmatrix. Tiles after every query of the block are
// skipped (causal).

#define FA_WARPS 4
#define FA_ROWS (16 * FA_WARPS)
#define FA_CELLS 64

template <int D>
__global__ void __launch_bounds__(FA_WARPS * 32) k_attn_prefill_mma(const se_dattn a, int32_t n) {
    constexpr int LD = D + 8;         // f16 row stride of the tiles: 16-byte rows, fragment loads in distinct banks
    constexpr int KS = D / 16;        // k-steps of Q K^T
    constexpr int NT = FA_CELLS / 8;  // score tiles of 8 cells
    constexpr int DT = D / 8;         // output tiles of 8 dimensions
    __shared__ __align__(16) __half ks[FA_CELLS * LD];
    __shared__ __align__(16) __half vs[FA_CELLS * LD];
    __shared__ se_dcell cells[FA_CELLS];
    __shared__ int s_pmax[FA_WARPS];

    const int group = a.n_head / a.n_head_kv, hk = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
    const int n_rows = n * group, n_live = a.step->n_live, mode = a.step->mode, n_local = a.step->n_local;

    // this thread's two query rows (g and g + 8 of its warp's 16): position, sepllm floor, output row
    int rp[2], rf[2];
    int64_t ro[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int R = blockIdx.x * FA_ROWS + warp * 16 + g + 8 * h;
        const bool ok = R < n_rows;
        rp[h] = ok ? a.pos[R / group] : -1;
        rf[h] = ok ? a.floor[R / group] : 0;
        ro[h] = ok ? ((int64_t) (R / group) * a.n_head + hk * group + R % group) * D : -1;
    }
    // the queries, scaled, as A fragments: a0 (g, 2 tig..), a1 (g + 8, 2 tig..), a2 / a3 the same 8 on
    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int h = e % 2, col = 16 * kk + 2 * tig + 8 * (e / 2);
            float x0 = 0, x1 = 0;
            if (ro[h] >= 0) {
                const float2 q2 = *(const float2 *) (a.q + ro[h] + col);
                x0 = q2.x * a.scale;
                x1 = q2.y * a.scale;
            }
            qf[kk][e] = pack_half2(x0, x1);
        }
    int pm = max(rp[0], rp[1]);
    for (int off = 16; off > 0; off >>= 1) pm = max(pm, __shfl_xor_sync(0xffffffffu, pm, off));
    if (lane == 0) s_pmax[warp] = pm;

    float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int dt = 0; dt < DT; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[dt][e] = 0.0f;

    for (int j0 = 0; j0 < n_live; j0 += FA_CELLS) {
        __syncthreads();  // the previous tile is done with ks, vs, cells (and s_pmax is written)
        int p_max = s_pmax[0];
#pragma unroll
        for (int w = 1; w < FA_WARPS; w++) p_max = max(p_max, s_pmax[w]);
        bool seen = false;
        if (tid < FA_CELLS) {
            se_dcell c = {-1, 0, 0, -1};
            if (j0 + tid < n_live) c = a.live[j0 + tid];
            cells[tid] = c;
            seen = c.cell >= 0 && c.pos + c.delta <= p_max;
        }
        if (!__syncthreads_or(seen)) continue;  // every cell of the tile comes after every query
        for (int idx = tid; idx < FA_CELLS * DT; idx += FA_WARPS * 32) {  // 8 dimensions (16 bytes) at a time
            const int ci = idx / DT, jd = 8 * (idx % DT);
            const se_dcell c = cells[ci];
            int4 kq = make_int4(0, 0, 0, 0), vq = kq;
            if (c.cell >= 0) {
                const __half * kr = a.k + se_kv_at(a, c.cell, hk);
                kq = *(const int4 *) (kr + jd);
                vq = *(const int4 *) (a.v + se_kv_at(a, c.cell, hk) + jd);
                if (c.delta != 0) {  // rotated by the cell's delta as it is read
                    float k8[8];
                    load8(kr + jd, k8);
                    rope_rotate8(k8, kr, jd, D, a.dtab + (int64_t) c.cell * (D / 2), a.rope_type);
                    __half2 * h2 = (__half2 *) &kq;
#pragma unroll
                    for (int e = 0; e < 4; e++) h2[e] = __floats2half2_rn(k8[2 * e], k8[2 * e + 1]);
                }
            }
            *(int4 *) (ks + ci * LD + jd) = kq;
            *(int4 *) (vs + ci * LD + jd) = vq;
        }
        __syncthreads();

        // scores S = Q K^T: B fragments b0 = K[cell 8 nt + g][dims 16 kk + 2 tig ..], b1 8 dims on
        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sc[nt][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const __half * kp = ks + (nt * 8 + g) * LD + 16 * kk + 2 * tig;
                mma_f16(sc[nt], qf[kk], *(const uint32_t *) kp, *(const uint32_t *) (kp + 8));
            }
        // mask, online softmax (a row's 64 scores lie in the 4 threads of a quad)
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = e / 2;
                const se_dcell c = cells[nt * 8 + 2 * tig + e % 2];
                const bool ok = rp[h] >= 0 && c.cell >= 0 && visible(c, rp[h], rf[h], mode, n_local);
                sc[nt][e] = ok ? sc[nt][e] : -INFINITY;
                mx[h] = fmaxf(mx[h], sc[nt][e]);
            }
        float alpha[2], ls[2] = {0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float mn = fmaxf(m[h], mx[h]);
            alpha[h] = mn == -INFINITY ? 1.0f : __expf(m[h] - mn);
            m[h] = mn;
        }
        uint32_t pf[NT / 2][4];  // P as A fragments of the k-steps of 16 cells
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                p[e] = sc[nt][e] == -INFINITY ? 0.0f : __expf(sc[nt][e] - m[e / 2]);
                ls[e / 2] += p[e];
            }
            pf[nt / 2][2 * (nt % 2)] = pack_half2(p[0], p[1]);      // row g
            pf[nt / 2][2 * (nt % 2) + 1] = pack_half2(p[2], p[3]);  // row g + 8
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            ls[h] += __shfl_xor_sync(0xffffffffu, ls[h], 1);
            ls[h] += __shfl_xor_sync(0xffffffffu, ls[h], 2);
            l[h] = l[h] * alpha[h] + ls[h];
        }
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[dt][e] *= alpha[e / 2];
        // O += P V: ldmatrix.trans gives b0 = V[cells 2 tig, 2 tig + 1][dim g] of each 8 x 8 block
#pragma unroll
        for (int j = 0; j < NT / 2; j++)
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t b[4];
                const int mi = lane / 8;
                ldmatrix_x4_trans(b, vs + (16 * j + 8 * (mi % 2) + lane % 8) * LD + 8 * (dt + mi / 2));
                mma_f16(o[dt], pf[j], b[0], b[1]);
                mma_f16(o[dt + 1], pf[j], b[2], b[3]);
            }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (ro[h] < 0) continue;
        const float inv = l[h] > 0 ? 1.0f / l[h] : 0.0f;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *(float2 *) (a.out + ro[h] + 8 * dt + 2 * tig) = make_float2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
    }
}

// SEPEDGE_CUDA_ATTN_MMA=0: the WMMA kernel above instead (kept as the reference path).
static bool attn_mma() {
    static int on = -1;
    if (on < 0) {
        const char * env = getenv("SEPEDGE_CUDA_ATTN_MMA");
        on = !(env && !strcmp(env, "0"));
    }
    return on;
}

int se_cuda_attention_prefill(const se_dattn * a, int32_t n, cudaStream_t s) {
    const int group = a->n_head / a->n_head_kv;
    const dim3 grid((unsigned) ((n * group + PF_ROWS - 1) / PF_ROWS), (unsigned) a->n_head_kv);
    const dim3 grid_mma((unsigned) ((n * group + FA_ROWS - 1) / FA_ROWS), (unsigned) a->n_head_kv);
    if (attn_mma() && a->head_dim == 128) {
        k_attn_prefill_mma<128><<<grid_mma, FA_WARPS * 32, 0, s>>>(*a, n);
    } else if (attn_mma() && a->head_dim == 64) {
        k_attn_prefill_mma<64><<<grid_mma, FA_WARPS * 32, 0, s>>>(*a, n);
    } else if (a->head_dim == 128) {
        k_attn_prefill<128><<<grid, 128, 0, s>>>(*a, n);
    } else if (a->head_dim == 64) {
        k_attn_prefill<64><<<grid, 128, 0, s>>>(*a, n);
    } else {
        k_attn_rows<<<(unsigned) ((n * a->n_head + 3) / 4), 128, 0, s>>>(*a, n);
    }
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

// The most shared memory a decode launch takes beyond its fixed arrays: 4 slots with delta rows.
template <int DP, int GB>
static void carveout_decode() {
    const int most = (int) dec_smem<DP, GB>::bytes(true, true, DEC_MAX_SLOTS);
    for (const void * k : {(const void *) k_attn_decode<DP, GB, true>, (const void *) k_attn_decode<DP, GB, false>,
                           (const void *) k_attn_decode<DP, GB, false, true>}) {
        cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, most);
    }
}

// One shared-memory carveout for every kernel: a change between two kernels drains the multiprocessor.
void se_cuda_attention_init() {
    carveout_decode<32, 1>(), carveout_decode<32, 2>(), carveout_decode<32, 4>(), carveout_decode<32, 8>();
    carveout_decode<64, 1>(), carveout_decode<64, 2>(), carveout_decode<64, 4>(), carveout_decode<64, 8>();
    carveout_decode<128, 1>(), carveout_decode<128, 2>(), carveout_decode<128, 4>(), carveout_decode<128, 8>();
    const void * kernels[] = {(const void *) k_attn_split, (const void *) k_attn_merge,
                              (const void *) k_attn_decode_tc<64, 3, false>, (const void *) k_attn_decode_tc<128, 3, false>,
                              (const void *) k_attn_decode_tc<64, 4, false>, (const void *) k_attn_decode_tc<128, 4, false>,
                              (const void *) k_attn_decode_tc<64, 3, true>, (const void *) k_attn_decode_tc<128, 3, true>,
                              (const void *) k_attn_decode_tc<64, 4, true>, (const void *) k_attn_decode_tc<128, 4, true>,
                              (const void *) k_attn_decode_tc<64, 3, false, true>, (const void *) k_attn_decode_tc<128, 3, false, true>,
                              (const void *) k_attn_decode_tc<64, 4, false, true>, (const void *) k_attn_decode_tc<128, 4, false, true>,
                              (const void *) k_attn_decode_tc<64, 3, true, true>, (const void *) k_attn_decode_tc<128, 3, true, true>,
                              (const void *) k_attn_decode_tc<64, 4, true, true>, (const void *) k_attn_decode_tc<128, 4, true, true>,
                              (const void *) k_attn_prefill<64>, (const void *) k_attn_prefill<128>,
                              (const void *) k_attn_prefill_mma<64>, (const void *) k_attn_prefill_mma<128>, (const void *) k_attn_rows};
    for (const void * k : kernels) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaGetLastError();
}
