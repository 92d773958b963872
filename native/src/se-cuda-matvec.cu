// Decode products by row teams, for Q4_0, Q4_K (either layout) and Q6_K weights.
//
// A decode product reads each weight once, so its time is bytes / bandwidth only when enough bytes
// are in flight: at the H200's ~1.5 us loaded memory latency and ~4.1 TB/s, ~6 MB on the chip, ~45
// KB a multiprocessor (benchmarks/results/cuda_kernels_log.md, session 4). The warp-per-row-pair
// kernel of se-cuda-matmul.cu keeps ~30 KB in flight and loads the activations again for every row
// pair. Here a team of threads (a warp, or 4 warps for rows of more than 128 blocks of 32) shares
// one row: thread t takes the units t, t + TEAM, ... (a unit = 32 weights: a Q4_0 block, or an
// eighth of a K-quant superblock, as llama.cpp's mmvq splits them), so
//   - its activations (8-bit codes, scales, for K-quants their sums) are loaded once into registers
//     and serve every row the team takes;
//   - a group of R rows is R independent 16-byte loads a thread (R x NU with NU units a thread),
//     and the next group's loads are issued before this group's reduction;
//   - the first group's loads are issued before the kernel waits for its input (programmatic
//     dependent launch): weights do not depend on the previous kernel, so their latency overlaps
//     the previous kernel's tail and this kernel's RMSNorm prologue.
// With norm, the block normalizes the input and quantizes it to 8 bits into shared memory (a
// thread a block of 32: its maximum needs no shuffles), as the CPU engine does it. With swiglu
// (gate, up), a block takes chunks of 32 rows of both and writes h = silu(gate) * up and its 8-bit
// blocks for the down product.
//
// Measured on the H200 (session 4), this is faster than the warp-per-row kernel only where a team
// makes one round of loads (Q4_0's wo), streams many (output heads) or the rows are short (small
// models, through the chained launches); the 8B shapes' Q + K + V, gate + up and down were slower
// (each extra round ~4-5 us). By default (auto_takes) it serves those shapes alone.
#include "se-cuda-quants.cuh"

#include <stdlib.h>
#include <string.h>

namespace {

constexpr int MVT_THREADS = 256;
constexpr int MVT_WARPS = MVT_THREADS / 32;
constexpr int MVT_MAX_R = 8;  // rows of a group (the thread's loads: R x NU units)

struct mvt_args {
    se_mm_out o[3];
    int n_outs;
    int64_t rows;             // rows of the outputs' concatenation (swiglu: of gate, = of up)
    int64_t n_u;              // units of 32 values a row (cols / 32)
    int64_t n_work;           // groups of R rows (swiglu: chunks of 32 rows)
    const int8_t * qx;        // the 8-bit input (without norm)
    const float2 * ds;
    const float * norm_x;     // with norm: the input is rmsnorm(norm_x) * norm_w
    const float * norm_w;
    float eps;
    int8_t * hq;              // swiglu: h in 8 bits, or NULL
    float2 * hds;
};

// Per type: the activations a unit needs (loaded once), the weights of a unit of one row, and
// their dot product. Weight units past a row's end are never loaded (the caller checks u < n_u).
template <int T> struct mvq;

// Q4_0 (planes): unit u = block u; 16 code bytes (weight j low nibble, j + 16 high), f16 scale.
template <> struct mvq<SE_TYPE_Q4_0> {
    struct act { int4 x0, x1; float2 d; };
    struct wts { int4 q; float d; };
    static __device__ __forceinline__ act load_act(const int8_t * qx, const float2 * ds, int64_t u) {
        return act{*(const int4 *) (qx + 32 * u), *(const int4 *) (qx + 32 * u + 16), ds[u]};
    }
    static __device__ __forceinline__ wts load_w(const se_dweight & w, int64_t r, int64_t u) {
        return wts{*(const int4 *) (w.q + r * w.q_row + Q4_0_QB * u), h2f(w.s + r * w.s_row + Q4_0_SB * u)};
    }
    static __device__ __forceinline__ wts zero() { return wts{make_int4(0, 0, 0, 0), 0.0f}; }
    static __device__ __forceinline__ float dot(const wts & w, const act & a, int64_t) {
        const int q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, xl[4] = {a.x0.x, a.x0.y, a.x0.z, a.x0.w},
                  xh[4] = {a.x1.x, a.x1.y, a.x1.z, a.x1.w};
        int s = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            s = __dp4a(q[i] & 0x0f0f0f0f, xl[i], s);
            s = __dp4a((q[i] >> 4) & 0x0f0f0f0f, xh[i], s);
        }
        return w.d * (a.d.x * (float) s - 8.0f * a.d.y);  // d (q - 8): the offset through d * sum
    }
};

// Q4_K (raw superblocks of 144 bytes): unit u = piece t = u % 8 of superblock u / 8: 16 code bytes
// of chunk t / 2 (the low nibbles are weights [16 (t % 2), +16) of sub-block 2 (t / 2), the high
// ones the same of the next sub-block), with the superblock's 16-byte head (d, dmin, scales).
template <> struct mvq<SE_TYPE_Q4_K> {
    struct act { int4 xl, xh; float al, ah; int sl, sh; };
    struct wts { int4 hd, q; };
    static __device__ __forceinline__ act load_act(const int8_t * qx, const float2 * ds, int64_t u) {
        const int64_t sb = u / 8;
        const int t = (int) (u % 8), chunk = t / 2, h = t % 2;
        const int64_t blo = 8 * sb + 2 * chunk;
        act a;
        a.xl = *(const int4 *) (qx + 32 * blo + 16 * h);
        a.xh = *(const int4 *) (qx + 32 * (blo + 1) + 16 * h);
        a.al = ds[blo].x;
        a.ah = ds[blo + 1].x;
        const int xl[4] = {a.xl.x, a.xl.y, a.xl.z, a.xl.w}, xh[4] = {a.xh.x, a.xh.y, a.xh.z, a.xh.w};
        a.sl = a.sh = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {  // the codes' sums, for the mins
            a.sl = __dp4a(0x01010101, xl[i], a.sl);
            a.sh = __dp4a(0x01010101, xh[i], a.sh);
        }
        return a;
    }
    static __device__ __forceinline__ wts load_w(const se_dweight & w, int64_t r, int64_t u) {
        const int t = (int) (u % 8);
        const uint8_t * b = w.q + r * w.q_row + sizeof(block_q4_K) * (u / 8);
        return wts{*(const int4 *) b, *(const int4 *) (b + Q4_K_QS + 32 * (t / 2) + 16 * (t % 2))};
    }
    static __device__ __forceinline__ wts zero() { return wts{make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)}; }
    static __device__ __forceinline__ float dot(const wts & w, const act & a, int64_t u) {
        const int chunk = (int) (u % 8) / 2;
        const int q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, xl[4] = {a.xl.x, a.xl.y, a.xl.z, a.xl.w},
                  xh[4] = {a.xh.x, a.xh.y, a.xh.z, a.xh.w};
        return q4_K_dot16(q, w.hd, chunk, xl, xh, a.al, a.ah, a.sl, a.sh);
    }
};

// Q4_K split (se-common.h; the default upload): unit u = piece t = u % 8 of superblock u / 8,
// code bytes [16 t, +16) of its 128 (as the raw piece t), with the head's word 1 + t / 2 (scale, min
// of both sub-blocks as bytes) and word 0 (d, dmin): 24 bytes a unit instead of 32, no six-bit
// unpacking. The activations carry their blocks' d * sum for the mins, zero in the odd pieces so
// that each block's mins are added once.
template <> struct mvq<SE_DK_Q4_K_SPLIT> {
    struct act { int4 xl, xh; float2 al, ah; };
    struct wts { int4 q; int scm, dm; };
    static __device__ __forceinline__ act load_act(const int8_t * qx, const float2 * ds, int64_t u) {
        const int64_t sb = u / 8;
        const int t = (int) (u % 8), chunk = t / 2, h = t % 2;
        const int64_t blo = 8 * sb + 2 * chunk;
        act a{*(const int4 *) (qx + 32 * blo + 16 * h), *(const int4 *) (qx + 32 * (blo + 1) + 16 * h), ds[blo], ds[blo + 1]};
        if (h) a.al.y = a.ah.y = 0.0f;
        a.ah.x *= 0.0625f;  // q4_K_split_dot16's 16 dh
        return a;
    }
    static __device__ __forceinline__ wts load_w(const se_dweight & w, int64_t r, int64_t u) {
        const int t = (int) (u % 8);
        const uint8_t * hd = w.s + r * w.s_row + SE_Q4K_SPLIT_SB * (u / 8);
        return wts{*(const int4 *) (w.q + r * w.q_row + SE_Q4K_SPLIT_QB * (u / 8) + 16 * t), load_i32(hd + 4 + 4 * (t / 2)),
                   load_i32(hd)};
    }
    static __device__ __forceinline__ wts zero() { return wts{make_int4(0, 0, 0, 0), 0, 0}; }
    static __device__ __forceinline__ float dot(const wts & w, const act & a, int64_t) {
        const int q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, xl[4] = {a.xl.x, a.xl.y, a.xl.z, a.xl.w},
                  xh[4] = {a.xh.x, a.xh.y, a.xh.z, a.xh.w};
        return q4_K_split_dot16(q, w.scm, w.dm, xl, xh, a.al, a.ah);
    }
};

// Q6_K (planes: ql[128] qh[64] scales[16] of a superblock | f16 d): unit u = piece t = u % 8 of
// superblock u / 8: l in [8 (t % 4), +8) of half t / 4, i.e. 8 weights of each of the half's four
// 32-blocks, from 8 bytes of ql, 8 more 32 bytes on, 8 of qh. Codes 0..63 against the activations,
// the -32 through the activations' sums (no per-byte subtraction).
template <> struct mvq<SE_TYPE_Q6_K> {
    struct act { int2 x[4]; float d[4]; int s[4]; };
    struct wts { int2 a, b, h, sc; float d; };
    static __device__ __forceinline__ act load_act(const int8_t * qx, const float2 * ds, int64_t u) {
        const int64_t sb = u / 8;
        const int t = (int) (u % 8), half = t / 4, l0 = 8 * (t % 4);
        act a;
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const int64_t blk = 8 * sb + 4 * half + g;
            a.x[g] = *(const int2 *) (qx + 32 * blk + l0);
            a.d[g] = ds[blk].x;
            a.s[g] = __dp4a(0x01010101, a.x[g].y, __dp4a(0x01010101, a.x[g].x, 0));
        }
        return a;
    }
    static __device__ __forceinline__ wts load_w(const se_dweight & w, int64_t r, int64_t u) {
        const int64_t sb = u / 8;
        const int t = (int) (u % 8), half = t / 4, l0 = 8 * (t % 4);
        const uint8_t * b = w.q + r * w.q_row + Q6_K_QB * sb;
        return wts{*(const int2 *) (b + 64 * half + l0), *(const int2 *) (b + 64 * half + 32 + l0),
                   *(const int2 *) (b + Q6_K_QH + 32 * half + l0), *(const int2 *) (b + Q6_K_SC + 8 * half),
                   h2f(w.s + r * w.s_row + Q6_K_SB * sb)};
    }
    static __device__ __forceinline__ wts zero() { return wts{make_int2(0, 0), make_int2(0, 0), make_int2(0, 0), make_int2(0, 0), 0.0f}; }
    static __device__ __forceinline__ float dot(const wts & w, const act & a, int64_t u) {
        const int o = (int) (u % 4) / 2;  // this lane's scales: bytes o + 2 g of the half's eight
        const int av[2] = {w.a.x, w.a.y}, bv[2] = {w.b.x, w.b.y}, hv[2] = {w.h.x, w.h.y};
        float part = 0;
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const int xg[2] = {a.x[g].x, a.x[g].y};
            int s = 0;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int lo = g == 0 ? av[i] & 0x0f0f0f0f : g == 1 ? bv[i] & 0x0f0f0f0f
                             : g == 2 ? (av[i] >> 4) & 0x0f0f0f0f : (bv[i] >> 4) & 0x0f0f0f0f;
                const int hi = ((hv[i] >> (2 * g)) << 4) & 0x30303030;
                s = __dp4a(lo | hi, xg[i], s);
            }
            const int scw = g < 2 ? w.sc.x : w.sc.y;
            const int sc = (int8_t) (scw >> (8 * (o + 2 * (g & 1))));
            part += (float) sc * a.d[g] * (float) (s - 32 * a.s[g]);
        }
        return w.d * part;
    }
};

// Output k and its row for row v of the outputs' concatenation; false past the end.
__device__ __forceinline__ bool mvt_locate(const mvt_args & a, int64_t v, int & k, int64_t & r) {
    k = 0;
    r = v;
    while (k < a.n_outs && r >= a.o[k].w.rows) r -= a.o[k].w.rows, k++;
    return k < a.n_outs;
}

// The weights of group g (R rows; swiglu: R / 2 rows of gate, then the same of up) for thread t.
template <int T, int TEAM, int NU, int R, bool SWIGLU>
__device__ __forceinline__ void load_group(const mvt_args & a, int64_t g, int t, typename mvq<T>::wts (&w)[R][NU]) {
    using Q = mvq<T>;
    constexpr int RG = SWIGLU ? R / 2 : 1;
#pragma unroll
    for (int i = 0; i < R; i++) {
        int k;
        int64_t r;
        bool ok;
        if (SWIGLU) {
            k = i < RG ? 0 : 1;
            r = g * RG + i % RG;
            ok = r < a.rows;
        } else {
            ok = mvt_locate(a, g * R + i, k, r);
        }
#pragma unroll
        for (int j = 0; j < NU; j++) {
            const int64_t u = t + TEAM * j;
            w[i][j] = ok && u < a.n_u ? Q::load_w(a.o[k].w, r, u) : Q::zero();
        }
    }
}

// A team's barrier: one warp, or named barriers 1 and 2 for the two 4-warp teams of a block. The
// barrier ids are immediates: with an id in a register the compiler reserves all 16 barriers, and
// barriers are a resource of the multiprocessor that the occupancy query does not count (measured
// on the H200: such a kernel ran as if one block a multiprocessor fit; cuda_kernels_log.md).
template <int TEAM>
__device__ __forceinline__ void team_sync(int team) {
    static_assert(TEAM == 32 || MVT_THREADS / TEAM == 2, "one-warp teams, or two teams a block");
    if (TEAM == 32) {
        __syncwarp();
    } else if (team == 0) {
        asm volatile("bar.sync 1, %0;" ::"n"(TEAM) : "memory");
    } else {
        asm volatile("bar.sync 2, %0;" ::"n"(TEAM) : "memory");
    }
}

// rmsnorm(x) * w of dim values to 8-bit blocks in shared memory (qs, ds), a thread a block of 32;
// the same arithmetic as the warp-per-row kernel's prologue (v = x * scale * w, d = max |v| / 127,
// round to even), every thread of the block taking part.
__device__ void norm_q8(const mvt_args & a, int64_t dim, int8_t * qs, float2 * ds) {
    __shared__ float partial[MVT_WARPS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float4 * x4 = (const float4 *) a.norm_x, * w4 = (const float4 *) a.norm_w;
    const int64_t nb = dim / 32;
    float ss = 0;
    for (int64_t c = threadIdx.x; c < nb; c += MVT_THREADS) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float4 v = x4[8 * c + j];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float total = 0;
#pragma unroll
    for (int w = 0; w < MVT_WARPS; w++) total += partial[w];
    const float scale = rsqrtf(total / (float) dim + a.eps);
    for (int64_t c = threadIdx.x; c < nb; c += MVT_THREADS) {
        float v[32];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float4 x = x4[8 * c + j], w = w4[8 * c + j];
            v[4 * j] = x.x * scale * w.x;
            v[4 * j + 1] = x.y * scale * w.y;
            v[4 * j + 2] = x.z * scale * w.z;
            v[4 * j + 3] = x.w * scale * w.w;
        }
        float amax = 0;
#pragma unroll
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f, inv = d == 0.0f ? 0.0f : 1.0f / d;
        int packed[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) packed[j] = q8_word(v + 4 * j, inv, sum);
        ((int4 *) qs)[2 * c] = make_int4(packed[0], packed[1], packed[2], packed[3]);
        ((int4 *) qs)[2 * c + 1] = make_int4(packed[4], packed[5], packed[6], packed[7]);
        ds[c] = make_float2(d, d * (float) sum);
    }
}

__device__ __forceinline__ void mvt_store(const se_mm_out & o, int64_t r, float acc) {
    const float v = o.bias ? acc + o.bias[r] : acc;
    o.out[r] = o.accumulate ? o.out[r] + v : v;
}

// Shared memory: [reduction partials 2 x warps x R floats] [h of each team's chunk: teams x 32]
// [norm: dim 8-bit codes, dim / 32 float2 scales].
template <int T, int TEAM, int NU, int R, bool NORM, bool SWIGLU>
__global__ void __launch_bounds__(MVT_THREADS, 2) k_mvt(const mvt_args a) {
    using Q = mvq<T>;
    constexpr int NTEAM = MVT_THREADS / TEAM, TW = TEAM / 32, RG = SWIGLU ? R / 2 : R;
    // swiglu: a block takes chunks of 32 rows (G groups), each team GT of its groups
    constexpr int64_t G = SWIGLU ? 32 / RG : 1, GT = SWIGLU ? G / NTEAM : 1;
    static_assert(!SWIGLU || (G % NTEAM == 0 && R % 2 == 0), "swiglu: whole groups a team, gate and up rows in pairs");
    extern __shared__ __align__(16) uint8_t smem[];
    float * red = (float *) smem;
    float * hbuf = red + 2 * MVT_WARPS * R;  // swiglu: h of the chunk, double-buffered (2 x 32)
    const int team = threadIdx.x / TEAM, t = threadIdx.x % TEAM, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    // the s-th group of this team, or -1: without swiglu, groups in turn over all teams; with it,
    // the block's chunks in turn over the blocks
    auto group_of = [&](int64_t s) -> int64_t {
        if (SWIGLU) {
            const int64_t chunk = blockIdx.x + (s / GT) * (int64_t) gridDim.x;
            return chunk < a.n_work ? chunk * G + team * GT + s % GT : -1;
        }
        const int64_t wk = (int64_t) blockIdx.x * NTEAM + team + s * (int64_t) gridDim.x * NTEAM;
        return wk < a.n_work ? wk : -1;
    };
    typename Q::wts w[R][NU];
    int64_t s = 0, g = group_of(0);
    if (g >= 0) load_group<T, TEAM, NU, R, SWIGLU>(a, g, t, w);  // before the wait: weights need nothing
    pdl_trigger();
    pdl_wait();
    typename Q::act x[NU];
    if (NORM) {
        const int64_t dim = a.n_u * 32;
        int8_t * qs = (int8_t *) (hbuf + 2 * 32);
        float2 * ds = (float2 *) (qs + dim);
        norm_q8(a, dim, qs, ds);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < NU; j++)
            if (t + TEAM * j < a.n_u) x[j] = Q::load_act(qs, ds, t + TEAM * j);
    } else {
#pragma unroll
        for (int j = 0; j < NU; j++)
            if (t + TEAM * j < a.n_u) x[j] = Q::load_act(a.qx, a.ds, t + TEAM * j);
    }
    while (g >= 0) {
        float acc[R];
#pragma unroll
        for (int i = 0; i < R; i++) {
            acc[i] = 0;
#pragma unroll
            for (int j = 0; j < NU; j++)
                if (t + TEAM * j < a.n_u) acc[i] += Q::dot(w[i][j], x[j], t + TEAM * j);
        }
        const int64_t gn = group_of(++s);
        if (gn >= 0) load_group<T, TEAM, NU, R, SWIGLU>(a, gn, t, w);  // in flight during the reduction
#pragma unroll
        for (int i = 0; i < R; i++) acc[i] = warp_sum(acc[i]);
        // the team's sums of rows i < R: in thread i (every lane of a one-warp team has them)
        float tot = 0;
        if (TW == 1) {
#pragma unroll
            for (int i = 0; i < R; i++)
                if (t == i) tot = acc[i];
        } else {
            float * rb = red + (s & 1) * MVT_WARPS * R;
            if (lane == 0) {
#pragma unroll
                for (int i = 0; i < R; i++) rb[warp * R + i] = acc[i];
            }
            team_sync<TEAM>(team);
            if (t < R) {
#pragma unroll
                for (int ww = 0; ww < TW; ww++) tot += rb[(team * TW + ww) * R + t];
            }
        }
        if (!SWIGLU) {
            int k;
            int64_t r;
            if (t < R && mvt_locate(a, g * R + t, k, r)) mvt_store(a.o[k], r, tot);
        } else {
            // thread i < RG pairs gate row i (its own sum) with up row i (thread RG + i's)
            const float up = __shfl_down_sync(0xffffffffu, tot, RG);
            const int64_t r = g * RG + t, chunk = g / G;
            float h = 0;
            if (t < RG && r < a.rows) {
                h = tot / (1.0f + expf(-tot)) * up;
                a.o[0].out[r] = h;
            }
            float * hb = hbuf + 32 * (chunk & 1);
            if (t < RG) hb[(g % G) * RG + t] = h;
            if ((s - 1) % GT == GT - 1) {  // the team's last group of the chunk: every team's h is in
                __syncthreads();
                if (a.hq && warp == 0) {   // the chunk's 32 rows to 8 bits (rows % 32 == 0)
                    float d;
                    const int q = q8_lane(hb[lane], d);
                    a.hq[32 * chunk + lane] = (int8_t) q;
                    const float sum = warp_sum((float) q);
                    if (lane == 0) a.hds[chunk] = make_float2(d, d * sum);
                }
            }
        }
        g = gn;
    }
}

typedef void (*mvt_kernel)(const mvt_args);

// Teams, units a thread, rows a group for rows of n_u units: a one-warp team up to 64 units, else
// 4 warps; R x NU = L units a thread a group (Q4_0: 8, 16-byte loads; the K-quants, whose units take
// more registers (a Q4_K piece with its head, a Q6_K piece in four 8-byte loads): 4), so that two
// blocks fit a multiprocessor (<= 128 registers).
// SEPEDGE_CUDA_MVT_TEAM=128: 4-warp teams from 65 units (else one-warp teams up to 128 units, the
// faster on the H200); SEPEDGE_CUDA_MVT_LOADS=4: Q4_0 with 4 loads a thread a group (measurements).
bool four_warp_teams() {
    const char * env = getenv("SEPEDGE_CUDA_MVT_TEAM");
    return env && atoi(env) == 128;
}

bool q4_0_loads4() {
    const char * env = getenv("SEPEDGE_CUDA_MVT_LOADS");
    return env && atoi(env) == 4;
}

constexpr int rows_a_group(int loads, int nu, bool swiglu) { return loads / nu < 2 && swiglu ? 2 : loads / nu; }

template <int T, int L, bool NORM, bool SWIGLU>
mvt_kernel pick_l(int64_t n_u, int & team, int & r) {
    constexpr int R1 = rows_a_group(L, 1, SWIGLU), R2 = rows_a_group(L, 2, SWIGLU), R4 = rows_a_group(L, 4, SWIGLU);
    if (n_u <= 32) { team = 32; r = R1; return &k_mvt<T, 32, 1, R1, NORM, SWIGLU>; }
    if (n_u <= 64) { team = 32; r = R2; return &k_mvt<T, 32, 2, R2, NORM, SWIGLU>; }
    if (n_u <= 128 && !four_warp_teams()) { team = 32; r = R4; return &k_mvt<T, 32, 4, R4, NORM, SWIGLU>; }
    if (n_u <= 128) { team = 128; r = R1; return &k_mvt<T, 128, 1, R1, NORM, SWIGLU>; }
    if (n_u <= 256) { team = 128; r = R2; return &k_mvt<T, 128, 2, R2, NORM, SWIGLU>; }
    if (n_u <= 512) { team = 128; r = R4; return &k_mvt<T, 128, 4, R4, NORM, SWIGLU>; }
    return nullptr;
}

// Teams, units a thread, rows a group for rows of n_u units: one-warp teams up to 128 units, else
// 4 warps; R x NU = L units a thread a group (Q4_0: 8, 16-byte loads; the K-quants, whose units take
// more registers (a Q4_K piece with its head, a Q6_K piece in four 8-byte loads): 4), so that two
// blocks fit a multiprocessor (<= 128 registers).
template <int T, bool NORM, bool SWIGLU>
mvt_kernel pick(int64_t n_u, int & team, int & r) {
    if (T == SE_TYPE_Q4_0 && !q4_0_loads4()) return pick_l<T, 8, NORM, SWIGLU>(n_u, team, r);
    return pick_l<T, 4, NORM, SWIGLU>(n_u, team, r);
}

template <bool NORM, bool SWIGLU>
mvt_kernel pick_type(int32_t kind, int64_t n_u, int & team, int & r) {
    switch (kind) {
        case SE_TYPE_Q4_0: return pick<SE_TYPE_Q4_0, NORM, SWIGLU>(n_u, team, r);
        case SE_TYPE_Q4_K: return pick<SE_TYPE_Q4_K, NORM, SWIGLU>(n_u, team, r);
        case SE_DK_Q4_K_SPLIT: return pick<SE_DK_Q4_K_SPLIT, NORM, SWIGLU>(n_u, team, r);
        case SE_TYPE_Q6_K: return pick<SE_TYPE_Q6_K, NORM, SWIGLU>(n_u, team, r);
        default: return nullptr;
    }
}

// Resident blocks a multiprocessor of a kernel (cached per kernel; 2 where the query fails).
int occupancy(mvt_kernel k, size_t smem) {
    static thread_local struct { mvt_kernel k; size_t smem; int n; } cache[64];
    static thread_local int n_cache = 0;
    for (int i = 0; i < n_cache; i++)
        if (cache[i].k == k && cache[i].smem == smem) return cache[i].n;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, MVT_THREADS, smem) != cudaSuccess || n < 1) {
        cudaGetLastError();
        n = 2;
    }
    if (n_cache < 64) cache[n_cache++] = {k, smem, n};
    return n;
}

int mvt_blocks_cap() {  // SEPEDGE_CUDA_MVT_BLOCKS: blocks a multiprocessor at most (measurements)
    const char * env = getenv("SEPEDGE_CUDA_MVT_BLOCKS");
    return env && atoi(env) > 0 ? atoi(env) : 0;
}

}  // namespace

int se_cuda_mvt_mode() {
    const char * env = getenv("SEPEDGE_CUDA_MV");
    if (env && !strcmp(env, "rows")) return SE_MVT_OFF;
    if (env && !strcmp(env, "teams")) return SE_MVT_ALL;
    return SE_MVT_AUTO;
}

// Where the team kernels measured faster than the warp-per-row kernel on the H200 through CUDA
// graphs (cuda_kernels_log.md, session 4): rows of <= 64 blocks of 32 (SmolLM2-135M: a token 13-18%
// faster), Q4_0's wo (4096 x 4096) and the output heads (many rows: the groups stream). Not: Q + K
// + V, gate + up and down of the 8B shapes, and the K-quants' wo and down (faster alone, but the
// Q4_K_M token 3% slower with them).
static bool auto_takes(int32_t type, int64_t n_u, int64_t rows, bool norm, bool swiglu) {
    if (n_u <= 64) return true;
    if (swiglu) return false;
    if (norm) return rows >= 32768;
    return type == SE_TYPE_Q4_0 && n_u <= 128;
}

bool se_cuda_mvt_serves(const se_dweight * w, int64_t rows, bool norm, bool swiglu) {
    const int mode = se_cuda_mvt_mode();
    return se_cuda_mvt_takes(w) && mode != SE_MVT_OFF && (mode == SE_MVT_ALL || auto_takes(w->type, w->cols / 32, rows, norm, swiglu));
}

bool se_cuda_mvt_takes(const se_dweight * w) {
    return (w->type == SE_TYPE_Q4_0 || w->type == SE_TYPE_Q4_K || w->type == SE_TYPE_Q6_K) && w->cols % 32 == 0 &&
           w->cols / 32 <= 512;
}

int se_cuda_mvt(const se_mm_out * outs, int n_outs, const int8_t * qx, const float2 * ds, const float * norm_x,
                const float * norm_w, float eps, bool swiglu, int8_t * hq, float2 * hds, cudaStream_t s) {
    if (n_outs < 1 || n_outs > 3 || (swiglu && n_outs != 2)) return SE_ERR_UNSUPPORTED;
    const se_dweight & w0 = outs[0].w;
    if (!se_cuda_mvt_takes(&w0)) return SE_ERR_UNSUPPORTED;
    mvt_args a = {};
    for (int k = 0; k < n_outs; k++) {
        if (se_dkind(outs[k].w) != se_dkind(w0) || outs[k].w.cols != w0.cols) return SE_ERR_UNSUPPORTED;
        a.o[k] = outs[k];
        a.rows += outs[k].w.rows;
    }
    const bool norm = norm_x != nullptr;
    if (norm && ((uintptr_t) norm_x % 16 || (uintptr_t) norm_w % 16)) return SE_ERR_UNSUPPORTED;
    const int mode = se_cuda_mvt_mode();
    if (mode == SE_MVT_OFF || (mode == SE_MVT_AUTO && !auto_takes(w0.type, w0.cols / 32, a.rows, norm, swiglu))) {
        return SE_ERR_UNSUPPORTED;
    }
    if (swiglu) {
        if (outs[1].w.rows != w0.rows) return SE_ERR_UNSUPPORTED;
        a.rows = w0.rows;
    }
    a.n_outs = n_outs;
    a.n_u = w0.cols / 32;
    a.qx = qx;
    a.ds = ds;
    a.norm_x = norm_x;
    a.norm_w = norm_w;
    a.eps = eps;
    a.hq = swiglu && w0.rows % 32 == 0 ? hq : nullptr;
    a.hds = hds;
    int team = 0, r = 0;
    const int kind = se_dkind(w0);
    mvt_kernel k = norm ? (swiglu ? pick_type<true, true>(kind, a.n_u, team, r) : pick_type<true, false>(kind, a.n_u, team, r))
                        : (swiglu ? pick_type<false, true>(kind, a.n_u, team, r) : pick_type<false, false>(kind, a.n_u, team, r));
    if (!k) return SE_ERR_UNSUPPORTED;
    const int nteam = MVT_THREADS / team;
    a.n_work = swiglu ? (a.rows + 31) / 32 : (a.rows + r - 1) / r;
    const size_t smem = (2 * MVT_WARPS * MVT_MAX_R + 2 * 32) * sizeof(float) +
                        (norm ? (size_t) w0.cols + (size_t) (w0.cols / 32) * sizeof(float2) : 0);
    if (smem > (48 << 10)) return SE_ERR_UNSUPPORTED;
    int per_sm = occupancy(k, smem);
    const int cap = mvt_blocks_cap();
    if (cap && per_sm > cap) per_sm = cap;
    int64_t grid = swiglu ? a.n_work : (a.n_work + nteam - 1) / nteam;
    const int64_t most = (int64_t) per_sm * se_cuda_n_sms();
    if (grid > most) grid = most;
    SE_CUDA_CHECK(se_launch(k, dim3((unsigned) grid), dim3(MVT_THREADS), smem, s, se_cuda_opts.pdl, a));
    return SE_OK;
}
