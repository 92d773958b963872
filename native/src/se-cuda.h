// The CUDA backend's internals, shared by its .cu files (C++; the rest of the core is C).
//
//   se-cuda.cu            weights on the device, the per-step upload, the forward pass, graphs
//   se-cuda-matmul.cu     matrix-vector products (decode) and tensor-core matrix products (prefill)
//   se-cuda-attention.cu  attention over the live cells: split-K for one token, tiled for many
//   se-cuda-quants.cuh    the tensor types on the device: dot products and dequantization
//
// Weights keep their quantized formats. Types whose GGUF blocks are not 16-byte multiples are split
// on upload into a plane of codes (16-byte aligned per block) and a plane of scales, so that a warp
// reads a row with 16-byte loads; the values and their order are unchanged.
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
#define SE_CUDA_CHECK(call)                                              \
    do {                                                                 \
        cudaError_t e_ = (call);                                         \
        if (e_ != cudaSuccess) return se_cuda_error(e_, #call);          \
    } while (0)

enum se_dlayout {
    SE_DL_RAW    = 0,  // rows of GGUF blocks as in the file
    SE_DL_PLANES = 1,  // per row: codes of each block (q), then per block its scale(s) (s)
};

// A weight matrix in device memory: (rows, cols), cols the reduction dimension.
struct se_dweight {
    int32_t type;
    int32_t layout;          // se_dlayout
    int64_t rows, cols;
    const uint8_t * q;       // raw rows or the code plane
    const uint8_t * s;       // the scale plane, or NULL
    int64_t q_row;           // bytes per row of q
    int64_t s_row;           // bytes per row of s
};

// Bytes of each plane for one block of `type` once uploaded (s_block 0: raw layout).
void se_cuda_block_layout(int32_t type, int32_t * q_block, int32_t * s_block);
// Split n_blocks GGUF blocks of `type` into their planes (host memory).
void se_cuda_split_blocks(int32_t type, const uint8_t * src, int64_t n_blocks, uint8_t * q, uint8_t * s);

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

// Whether the decode kernels want 8-bit activations for this weight (else float ones).
bool se_cuda_wants_q8(const se_dweight * w, int path);
// Decode: n_outs (<= 3) products sharing the input, one launch, for one token.
int se_cuda_matvec(const se_mm_out * outs, int n_outs, se_dact act, int path, cudaStream_t s);
// The same with the input normalized in the kernel: rmsnorm(x) * norm (dim = the weights' cols).
// With swiglu (outs: gate, up), writes h = silu(gate) * up to outs[0].out and, 8-bit, to hq / hds.
// Returns SE_ERR_UNSUPPORTED, having launched nothing, where the input does not fit shared memory.
int se_cuda_matvec_norm(const se_mm_out * outs, int n_outs, const float * x, const float * norm, float eps, int path,
                        bool swiglu, int8_t * hq, float2 * hds, cudaStream_t s);
// Prefill: out (n, rows) for n tokens through the tensor cores (f16 inputs, f32 accumulation).
int se_cuda_matmul(const se_mm_out * o, const float * x, int32_t n, cudaStream_t s);
// Quantize n rows of cols floats (cols a multiple of 32) for the dp4a kernels.
int se_cuda_quantize_q8(const float * x, int32_t n, int64_t cols, int8_t * qx, float2 * ds, cudaStream_t s);

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
    float scale;
};

// Cells per split of the one-token kernel, at least; at most SE_ATTN_MAX_SPLITS splits.
#define SE_ATTN_SPLIT 32
#define SE_ATTN_MAX_SPLITS 128
// (cos, sin) tables of the step: of the decode token's position, and of each live cell's delta
// (recomputed only for cells whose delta changed: tab_delta holds the delta each row was made for).
int se_cuda_rope_tables(const se_dattn * a, const double * freq, int32_t * tab_delta, float2 * dtab, float2 * rope,
                        cudaStream_t s);
// One token, with its rotation and its store into the cache; with qx, the result is also
// quantized to 8 bits for the output projection (head_dim % 32 == 0).
int se_cuda_attention_decode(const se_dattn * a, int8_t * qx, float2 * ds, cudaStream_t s);
int se_cuda_attention_prefill(const se_dattn * a, int32_t n, cudaStream_t s);
// Whether the one-token kernel rotates and stores the token itself (else k_rope_store first).
bool se_cuda_decode_fused(int32_t head_dim);

// Kernel attributes, once a process (se-cuda.cu calls them).
void se_cuda_attention_init();
void se_cuda_matmul_init();

#endif  // SE_CUDA_H
