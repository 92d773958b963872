// The CUDA backend's internals, shared by its .cu files (C++; the rest of the core is C).
//
//   se-cuda.cu             the context, the per-step upload, the forward pass, CUDA graphs
//   se-cuda-weights.cu     the weights on the device: upload once, in their quantized formats
//   se-cuda-elementwise.cu RMSNorm, SwiGLU, activations to 8 bits
//   se-cuda-rope.cu/.cuh   rotary position embedding: the tables, the prefill rotation, the helpers
//                          the attention kernels rotate with (the one place RoPE is written)
//   se-cuda-matmul.cu      matrix-vector products (decode) and f16 tensor-core products (prefill)
//   se-cuda-matvec.cu      decode products by row teams (Q4_0, Q4_K, Q6_K)
//   se-cuda-mmq.cu         prefill products on int8 tensor cores over 8-bit activations
//   se-cuda-cublas.cu      prefill products through cuBLAS (loaded at run time) on f16 weights
//   se-cuda-dequant.cu     weights to f16 for that route
//   se-cuda-attention.cu   attention over the live cells: split-K for one token, tiled for many
//   se-cuda-timing.cu      SEPEDGE_CUDA_TIMING per-kernel times, and the entry points for tests
//   se-cuda-quants.cuh     the tensor types on the device: dot products and dequantization
//
// Weights keep their quantized formats. Types whose GGUF blocks are not 16-byte multiples are split
// on upload into a plane of codes (16-byte aligned per block) and a plane of scales (rows padded to
// 16 bytes), so that a warp reads a row with 16-byte loads and the prefill kernels copy tiles with
// aligned asynchronous copies; the values and their order are unchanged.
#ifndef SE_CUDA_H
#define SE_CUDA_H

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "se-impl.h"
}

// Record a failed CUDA call as SE_ERR_BACKEND; evaluates to the status.
int se_cuda_error(cudaError_t e, const char * what);
// Number of usable GPUs in *count; SE_ERR_BACKEND (with a message) where there are none.
int se_cuda_check_device(int * count);
// Multiprocessors of the current device (cached).
int se_cuda_n_sms();
#define SE_CUDA_CHECK(call)                                              \
    do {                                                                 \
        cudaError_t e_ = (call);                                         \
        if (e_ != cudaSuccess) return se_cuda_error(e_, #call);          \
    } while (0)

enum se_dlayout {
    SE_DL_RAW    = 0,  // rows of GGUF blocks as in the file
    SE_DL_PLANES = 1,  // per row: codes of each block (q), then per block its scale(s) (s); Q4_K:
                       // the split layout of se-common.h (unless SEPEDGE_CUDA_Q4K_REPACK=0)
};

// A weight matrix in device memory: (rows, cols), cols the reduction dimension.
struct se_dweight {
    int32_t type;
    int32_t layout;          // se_dlayout
    int64_t rows, cols;
    const uint8_t * q;       // raw rows or the code plane
    const uint8_t * s;       // the scale plane, or NULL
    int64_t q_row;           // bytes per row of q
    int64_t s_row;           // bytes per row of s (a multiple of 16)
};

// The kernels' dispatch key of a weight: its type, or SE_DK_Q4_K_SPLIT for Q4_K in the split layout.
#define SE_DK_Q4_K_SPLIT (256 + SE_TYPE_Q4_K)
__host__ __device__ inline int se_dkind(const se_dweight & w) {
    return w.type == SE_TYPE_Q4_K && w.layout == SE_DL_PLANES ? SE_DK_Q4_K_SPLIT : w.type;
}

// Q4_K weights uploaded in the split layout of se-common.h (codes apart, scales and mins unpacked to
// bytes) unless SEPEDGE_CUDA_Q4K_REPACK=0 (the file's superblocks); read when a model's weights are
// uploaded.
bool se_cuda_q4k_split_env();
// Bytes of each plane for one block of `type` once uploaded (s_block 0: raw layout); q4k_split: Q4_K
// in the split layout. Rows of the scale plane take se_align16(blocks * s_block) bytes.
void se_cuda_block_layout(int32_t type, bool q4k_split, int32_t * q_block, int32_t * s_block);
// Split n_blocks GGUF blocks of `type` into their planes (host memory).
void se_cuda_split_blocks(int32_t type, bool q4k_split, const uint8_t * src, int64_t n_blocks, uint8_t * q, uint8_t * s);

// Bytes to 256-byte alignment (every device allocation and arena slice).
static inline size_t se_align256(size_t n) { return (n + 255) & ~(size_t) 255; }
static inline int64_t se_align16(int64_t n) { return (n + 15) & ~(int64_t) 15; }

// The model's weights on the device (se-cuda-weights.cu), one arena.
struct se_cuda_layer {
    float * attn_norm, * ffn_norm;   // (n_embd)
    float * bq, * bk, * bv;          // or NULL
    se_dweight wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct se_cuda_model {
    int device;
    uint8_t * arena;                 // every weight, one allocation
    size_t size, used;
    se_cuda_layer * layers;          // (n_layer)
    float * output_norm;
    se_dweight output;
    uint8_t * staging;               // pinned, for the upload
    size_t staging_size;
};

// Activations of a matrix product: float rows, and the same quantized to 8 bits per value in
// blocks of 32 (codes in qx, per block its scale d and d * sum of codes in ds) for the dp4a kernels.
struct se_dact {
    const float * x;         // (n, cols)
    const int8_t * qx;       // (n, cols)
    const float2 * ds;       // (n, cols / 32)
};

// One output of a matrix product: out (n, rows) = x W^T (+ bias) (+ out, when accumulate).
struct se_mm_out {
    se_dweight w;
    float * out;
    const float * bias;      // (rows) or NULL
    int32_t accumulate;
};

enum se_mv_path {
    SE_MV_AUTO  = 0,         // 8-bit activations and dp4a where the type has a kernel for it
    SE_MV_FLOAT = 1,         // every type dequantized in registers against float activations
};

// How the one-token kernels are launched (se-cuda.cu sets it before each pass, on the thread that
// launches). pdl: programmatic dependent launch (sm_90): a decode kernel starts while the one
// before it finishes, prefetches its weights into L2 and waits (griddepcontrol.wait) before it
// reads anything that kernel wrote; off while SEPEDGE_CUDA_TIMING puts events between kernels.
// prefetch: L2 prefetch of the decode kernels' weight rows and cache rows: 1 the first ones, asked
// for before the kernel waits for its inputs; 2 also those of a warp's next task inside the loop;
// 0 none (SEPEDGE_CUDA_PREFETCH=0/1/2; SEPEDGE_CUDA_PDL=0 turns the chaining off).
// attn_tc: the one-token attention on the tensor cores where it applies (se-cuda-attention.cu,
// decode_tc_applies): 0 off, 1 three blocks a multiprocessor, 2 four (SEPEDGE_CUDA_ATTN_TC); unset,
// SE_ATTN_TC_AUTO: 2 at head_dim 128, where it measured faster on the H200 at 0 and at 32K tokens of
// history with a full cache (cuda_kernels_log.md, session 7), in every cache mode (the modes with
// deltas: session 8, not yet measured), off at 64 (not measured apart there).
#define SE_ATTN_TC_AUTO (-1)
// mv_typed: the one-token products' kernel made for the outputs' one weight type where they share
// one (SEPEDGE_CUDA_MV_SPEC=1; measured on the H200, session 9: 72-93 registers instead of 123, but 8B
// Q4_0 10% slower a token, Q4_K_M 2% faster, so off by default).
// attn_merge: how the one-token attention's last block of a column merges the splits
// (SEPEDGE_CUDA_ATTN_MERGE, se-cuda-attention.cu dec_finish): 0 a thread's outputs one after another, each
// split's partial a dependent L2 round trip; 1 (the default) every partial of a thread's outputs in flight
// at once (the same sums in the same order: the same bits); 2 as 1, and the splits' handshake by one
// thread's acquire-release atomic instead of every thread's two sequentially consistent fences; 1 and 2
// only where a column has fewer than 32 splits (decode_merge). Measured on the H200 (cuda_kernels_log.md,
// session 12): after 32K tokens of sepllm-stream the attention 777 -> 700 us a token at 1, 2 no better
// than 1, so 1, whose memory ordering is 0's; with the full cache's splits slower, hence the 32.
struct se_cuda_launch_opts {
    bool pdl;
    int prefetch;
    int attn_tc;
    bool mv_typed;
    int attn_merge;
};
extern thread_local se_cuda_launch_opts se_cuda_opts;

// Whether the decode kernels want 8-bit activations for this weight (else float ones).
bool se_cuda_wants_q8(const se_dweight * w, int path);
// Decode: n_outs (<= 3) products sharing the input, one launch, for one token.
int se_cuda_matvec(const se_mm_out * outs, int n_outs, se_dact act, int path, cudaStream_t s);
// The same with the input normalized in the kernel: rmsnorm(x) * norm (dim = the weights' cols).
// With swiglu (outs: gate, up), writes h = silu(gate) * up to outs[0].out and, 8-bit, to hq / hds.
// Returns SE_ERR_UNSUPPORTED, having launched nothing, where the input does not fit shared memory.
int se_cuda_matvec_norm(const se_mm_out * outs, int n_outs, const float * x, const float * norm, float eps, int path,
                        bool swiglu, int8_t * hq, float2 * hds, cudaStream_t s);
// Decode by row teams (se-cuda-matvec.cu) for Q4_0, Q4_K, Q6_K with cols / 32 <= 512: n_outs (<= 3)
// products of one type and K in one launch, from the 8-bit input (qx, ds) or, with norm_x, from
// rmsnorm(norm_x) * norm_w made in the kernel; swiglu as se_cuda_matvec_norm. SE_ERR_UNSUPPORTED,
// having launched nothing, for what they do not take (SE_MVT_AUTO: the shapes where they measured
// faster; SEPEDGE_CUDA_MV=rows: none, =teams: every shape they can).
enum { SE_MVT_OFF = 0, SE_MVT_AUTO = 1, SE_MVT_ALL = 2 };
int se_cuda_mvt_mode();
bool se_cuda_mvt_takes(const se_dweight * w);
// Whether the row-team kernel serves a product of w's type and shape (rows: of all its outputs).
bool se_cuda_mvt_serves(const se_dweight * w, int64_t rows, bool norm, bool swiglu);
// The rows a block of the one-token product reads in turn from its first (0: the rows in order).
int64_t se_cuda_matvec_period(const se_mm_out * outs, int n_outs, bool swiglu, int path);
int se_cuda_mvt(const se_mm_out * outs, int n_outs, const int8_t * qx, const float2 * ds, const float * norm_x,
                const float * norm_w, float eps, bool swiglu, int8_t * hq, float2 * hds, cudaStream_t s);
// Prefill: out (n, rows) for n tokens through the tensor cores (f16 inputs, f32 accumulation).
int se_cuda_matmul(const se_mm_out * o, const float * x, int32_t n, cudaStream_t s);

// Prefill on int8 tensor cores (se-cuda-mmq.cu): out (n, rows) from the 8-bit activations of n
// tokens (act.qx, act.ds as se_cuda_quantize_q8 makes them; cols % 32 == 0), for n_outs outputs
// of that input (those of the same type and K in one launch). SE_ERR_UNSUPPORTED, having launched
// nothing, when a type has no such kernel. SEPEDGE_CUDA_MMQ=0 turns it off (the f16 tensor-core
// kernel then serves every type).
bool se_cuda_has_mmq(int32_t type);
bool se_cuda_mmq_enabled();
int se_cuda_mmq(const se_mm_out * outs, int n_outs, se_dact act, int32_t n, cudaStream_t s);

// The cuBLAS route of the prefill products (se-cuda-cublas.cu): weights dequantized to f16 a slice
// of rows at a time (se-cuda-dequant.cu), activations to f16 with a power-of-two scale a row, and
// cublasGemmEx with f32 accumulation. cuBLAS is loaded at run time (SEPEDGE_CUBLAS, else
// libcublas.so.13, else .12); se_cublas_load: SE_OK, or SE_ERR_BACKEND (with the reason as the
// message where report).
struct se_f16_route {
    void * handle;           // cublasHandle_t, on the context's stream
    __half * w16;            // scratch: a slice of a weight's rows in f16
    int64_t w16_elems;
    __half * x16;            // (n, cols) the activations in f16, each row divided by its scale
    int64_t x16_elems;
    float * xscale;          // (n_batch) the rows' power-of-two scales
    int64_t n_batch;
};
int se_cublas_load(bool report);
int se_cuda_f16_init(se_f16_route * r, int64_t n_batch, int64_t widest, cudaStream_t s);
void se_cuda_f16_free(se_f16_route * r);
// Whether the route takes weights of w's type and shape.
bool se_cuda_f16_takes(const se_dweight * w);
// Whether every value of the n weights (NULL entries skipped) fits f16 (|v| <= 65504); synchronizes s.
int se_cuda_f16_weights_fit(const se_dweight * const * ws, int n, bool * fit, cudaStream_t s);
// x (n, cols) into the route's f16 activations and row scales (every product of this input then reads them).
int se_cuda_f16_act(se_f16_route * r, const float * x, int32_t n, int64_t cols, cudaStream_t s);
// out (n, rows) = x W^T (+ bias) (+ out, when accumulate) for n_outs products of the input x (same K).
int se_cuda_f16_products(se_f16_route * r, const se_mm_out * outs, int n_outs, const float * x, int32_t n, cudaStream_t s);
// Rows [r0, r0 + rows) of w as f16 values into out (rows, w.cols), row-major.
int se_cuda_dequant_f16(const se_dweight * w, int64_t r0, int64_t rows, __half * out, cudaStream_t s);
// The largest |value| of w, as float bits, into *max_bits (atomicMax: set it to 0 first).
int se_cuda_weight_max(const se_dweight * w, unsigned * max_bits, cudaStream_t s);

// Element-wise kernels (se-cuda-elementwise.cu).
// Quantize n rows of cols floats (cols a multiple of 32) for the dp4a and int8 tensor-core kernels.
int se_cuda_quantize_q8(const float * x, int32_t n, int64_t cols, int8_t * qx, float2 * ds, cudaStream_t s);
// out = rmsnorm(x) * w for n rows of dim; with qx also in 8-bit blocks (dim % 32 == 0).
int se_cuda_rmsnorm(const float * x, const float * w, int32_t n, int64_t dim, float eps, float * out, int8_t * qx,
                    float2 * ds, cudaStream_t s);
// g = silu(g) * u over n values; with qx also in 8-bit blocks (n % 32 == 0).
int se_cuda_swiglu(float * g, const float * u, int64_t n, int8_t * qx, float2 * ds, cudaStream_t s);
void se_cuda_elementwise_init();

// What the attention kernels read about the step, in device memory (the per-step upload).
struct se_dcell {            // a live cell, in cache order
    int32_t cell;
    int32_t pos;             // original position
    int32_t delta;           // extra rotation when read (positions within the cache)
    int32_t sep;             // INT32_MAX initial, >= 0 the separator's sep_seq, -1 other tokens
};

struct se_dstep {            // header of the upload
    int32_t n;               // tokens in this pass
    int32_t n_live;          // live cells (the pass's own included)
    int32_t mode;            // se_kv_mode
    int32_t n_local;
};

// Bytes a kernel asks L2 for on behalf of a later kernel: n chunks of `chunk` bytes, `stride` apart.
struct se_l2_span {
    const uint8_t * p;
    int64_t stride;
    int64_t chunk;
    int64_t n;
};
#define SE_L2_SPANS 6

struct se_dattn {
    const se_dstep * step;
    const int32_t * pos;     // (n) query positions
    const int32_t * floor;   // (n) training-free sepllm: lowest visible sep_seq
    const int32_t * cells;   // (n) the tokens' cells
    const se_dcell * live;   // (n_live)
    const float2 * dtab;     // (n_cells, head_dim / 2) (cos, sin) of each cell's delta, or NULL (no deltas)
    const float2 * rope;     // (head_dim / 2) (cos, sin) of the decode token's position
    __half * k;              // this layer's keys (n_cells, n_head_kv * head_dim)
    __half * v;
    const float * q;         // (n, n_head * head_dim); prefill: rotated; decode: as projected
    const float * k_new;     // decode: the token's key and value as projected (n_head_kv * head_dim)
    const float * v_new;
    float * out;             // (n, n_head * head_dim)
    float * part;            // split-K partials (n_head, max_splits, head_dim + 2)
    unsigned * count;        // (n_head) splits done per block column; 0 between launches
    int32_t n_head, n_head_kv, head_dim, rope_type;
    int32_t max_splits;
    int32_t split_cells;     // cells a split of the one-token kernel takes at least (se_cuda_split_cells)
    int32_t prefetch;        // se_cuda_opts.prefetch, for the one-token kernel
    float scale;
    // one token: the next products' weights (wo, the first rows of gate and up), asked of L2 by the
    // blocks with no cells while the others work, unless n_live * cache_row_bytes > next_max_cache
    se_l2_span next[SE_L2_SPANS];
    int32_t n_next;
    int64_t cache_row_bytes; // a layer's key and value bytes of one cell
    int64_t next_max_cache;
    // a layer's keys (values alike): KV head hk of cell c at c * kv_cell + hk * kv_head (se_kv_at)
    int64_t kv_cell, kv_head;
    // se_cuda_opts.attn_merge: which one-token kernels (made with or without MERGE, dec_finish) and how
    // their splits meet; last, so that the other fields keep their offsets
    int32_t merge;
};

// Where KV head hk of a cell's key (or value) starts in a layer's cache. Two layouts
// (SEPEDGE_CUDA_KV_LAYOUT): cells (cell-major: a cell's heads side by side, kv_cell = n_head_kv *
// head_dim, kv_head = head_dim) and heads (head-major: a head's cells side by side, kv_cell =
// head_dim, kv_head = n_cells * head_dim), which makes the rows one block of the decode attention
// reads, consecutive cells of one head, consecutive in memory.
__host__ __device__ inline int64_t se_kv_at(const se_dattn & a, int64_t cell, int64_t hk) { return cell * a.kv_cell + hk * a.kv_head; }

// Cells per split of the one-token kernel, at least (SEPEDGE_CUDA_ATTN_SPLIT_CELLS overrides it when a
// context is made); at most SE_ATTN_MAX_SPLITS splits. 128 measured best of 32 / 128 / 256 on the H200
// (cuda_kernels_log.md, session 9): 8B decode at 0 history -7%, SmolLM2 -10%, sepllm-stream after 32K
// tokens -3% against 32, each split's partial store, fence, atomic and merge costing more than the
// parallelism of a few dozen cells gains; 32K of full cache stays capped at one wave of splits.
#define SE_ATTN_SPLIT 128
int se_cuda_split_cells(void);
#define SE_ATTN_MAX_SPLITS 128
// Rotary embedding (se-cuda-rope.cu).
// (cos, sin) tables of the step: of the decode token's position, and of each live cell's delta
// (recomputed only for cells whose delta changed: tab_delta holds the delta each row was made for).
int se_cuda_rope_tables(const se_dattn * a, const double * freq, int32_t * tab_delta, float2 * dtab, float2 * rope,
                        cudaStream_t s);
// Rotate n tokens' queries (in place) and keys by their positions and store keys and values (f16)
// in their cells: the prefill path, and decode for head sizes the fused attention kernel does not take.
int se_cuda_rope_store(const se_dattn * a, float * q, const double * freq, int32_t n, cudaStream_t s);
void se_cuda_rope_init();

// Attention (se-cuda-attention.cu).
// One token, with its rotation and its store into the cache; with qx, the result is also
// quantized to 8 bits for the output projection (head_dim % 32 == 0).
int se_cuda_attention_decode(const se_dattn * a, int8_t * qx, float2 * ds, cudaStream_t s);
int se_cuda_attention_prefill(const se_dattn * a, int32_t n, cudaStream_t s);
// Whether the one-token kernel rotates and stores the token itself (else k_rope_store first).
bool se_cuda_decode_fused(int32_t head_dim);

// Kernel attributes, once a process (se-cuda.cu calls them).
void se_cuda_attention_init();
void se_cuda_matmul_init();

// SEPEDGE_CUDA_TIMING (se-cuda-timing.cu): CUDA events between the launches of one-token passes,
// summed per kernel name and printed when the context is freed.
#define SE_TIMING_EVENTS 4096
#define SE_TIMING_NAMES 24
struct se_cuda_timing {
    bool on, marking;        // marking: the pass in flight is timed
    bool prefill;            // SEPEDGE_CUDA_TIMING=prefill: time passes of many tokens instead
    cudaEvent_t ev[SE_TIMING_EVENTS];
    const char * ev_name[SE_TIMING_EVENTS];
    int n_ev;
    struct { const char * name; double us; long long count; } tt[SE_TIMING_NAMES];
    int n_tt;
    long long steps;
};
int  se_cuda_timing_init(se_cuda_timing * t);        // events, when SEPEDGE_CUDA_TIMING is set
void se_cuda_timing_begin(se_cuda_timing * t, cudaStream_t s);  // hold the stream, first event
void se_cuda_timing_mark(se_cuda_timing * t, const char * name, cudaStream_t s);
void se_cuda_timing_end(se_cuda_timing * t);         // after the pass: sum the intervals
void se_cuda_timing_free(se_cuda_timing * t);        // report and destroy

#endif  // SE_CUDA_H
