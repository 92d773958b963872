// Internals shared by the C files of the core. One concept per file:
//   se-gguf.c      GGUF parsing over mmap, every count and offset checked
//   se-common.h    quant block layouts, shared with the AVX2 and CUDA code
//   se-quants.c    tensor types: dequantization and dot products
//   se-model.c     hyperparameters and weight views of a model
//   se-kv-cache.c  the KV cache: cells with token, position and separator flag
//   se-cache-plan.c the cache policy on its own (public se_cache_policy): plans for any backend
//   se-forward.c   the transformer forward pass on the CPU backend
//   se-threads.c   a persistent thread pool
//   se-sampler.c   sampling
//   se-error.c     the calling thread's last error message
//   se-api.c       the public API: argument checks, contexts, decode
#ifndef SE_IMPL_H
#define SE_IMPL_H

#include "sepedge.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SE_MAX_NAME 64  // tensor names, as ggml's GGML_MAX_NAME

// Record an error message for se_last_error() and return `status`.
int se_error(int status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// ---------------------------------------------------------------------------------------------
// Tensor types (ggml's numbering)

enum se_type {
    SE_TYPE_F32  = 0,
    SE_TYPE_F16  = 1,
    SE_TYPE_Q4_0 = 2,
    SE_TYPE_Q4_1 = 3,
    SE_TYPE_Q5_0 = 6,
    SE_TYPE_Q8_0 = 8,
    SE_TYPE_Q4_K = 12,
    SE_TYPE_Q5_K = 13,
    SE_TYPE_Q6_K = 14,
    SE_TYPE_BF16 = 30,
    SE_TYPE_COUNT = 42,
};

// Activations as the fast dot products take them: float, or quantized to 8 bits per value in
// blocks of 32 (the integer dot products of llama.cpp's Q8_0 path; f32 scale, sum kept for offsets).
enum se_act {
    SE_ACT_F32 = 0,
    SE_ACT_Q8  = 1,
};

typedef struct se_block_q8 {
    float  d;           // value = d * q
    float  s;           // d * sum of qs: corrects Q4_0's -8 and applies Q4_1's min, one multiply each
    int8_t qs[32];
} se_block_q8;

typedef struct se_type_traits {
    const char * name;
    int32_t block;      // values per block; 0 for ids that are not a ggml type
    int32_t size;       // bytes per block
    // kernels; NULL for types the core cannot run
    void  (*to_float)(const void * src, float * dst, int64_t n);       // n: a multiple of block
    float (*dot)(const void * row, const float * x, int64_t n);        // row . x in float: the exact path
    int32_t act;                                                        // se_act that vec_dot takes
    float (*vec_dot)(const void * row, const void * act, int64_t n);   // row . activations: the fast path
    // the same for 4 activation rows `stride` bytes apart (prefill: each weight block unpacked once)
    void (*vec_dot4)(const void * row, const void * act, size_t stride, int64_t n, float out[4]);
    // Interleaved groups of SE_RP_ROWS rows (se-common.h), for the types that have a layout (0 / NULL
    // otherwise): bytes per block of a group; repack 8 rows `row_bytes` apart into one group; the
    // product of one group with nt (1..SE_RP_TOKENS) activation rows, out[t * ld + r] for row r.
    int32_t packed_size;
    void (*repack)(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group);
    void (*gemm)(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld);
    // the same for two neighbouring groups (`group_bytes` apart), 16 rows: out[t * ld + r], r < 16
    // (NULL where the ISA has no wider kernel); per row bit for bit the result of gemm
    void (*gemm16)(const void * group, uint64_t group_bytes, const void * act, size_t stride, int64_t cols, int32_t nt,
                   float * out, int64_t ld);
} se_type_traits;

#define SE_RP_TOKENS 4  // activation rows per call of a gemm kernel: its register tile is 8 rows x 4 tokens

// Kernels without a tensor type, chosen for the CPU at init like the vec_dots.
typedef struct se_kernels {
    void  (*quantize_q8)(const float * x, se_block_q8 * out, int64_t n);   // n: a multiple of 32
    float (*dot_f32)(const float * a, const float * b, int64_t n);
    float (*dot_f16)(const uint16_t * a, const float * b, int64_t n);
    void  (*axpy_f32)(float * y, float a, const float * x, int64_t n);      // y += a x
    void  (*axpy_f16)(float * y, float a, const uint16_t * x, int64_t n);
    void  (*f16_to_f32)(const uint16_t * x, float * y, int64_t n);
    // Attention over one cell: its key row against nq query rows `q_stride` floats apart (out[i]),
    // and its value row added to nq output rows `y_stride` apart with weights a[i]. The f16 forms
    // convert inside the multiply-add loop; a row is read once for all the query heads sharing it.
    void  (*dot_f16_n)(const uint16_t * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out);
    void  (*axpy_f16_n)(float * y, int64_t y_stride, const float * a, int32_t nq, const uint16_t * v, int64_t d);
    void  (*dot_f32_n)(const float * k, const float * q, int64_t q_stride, int32_t nq, int64_t d, float * out);
    void  (*axpy_f32_n)(float * y, int64_t y_stride, const float * a, int32_t nq, const float * v, int64_t d);
    // The same over n cells of one KV head at once (f16 rows `stride` values apart from `base`, row
    // cells[i]), queries and outputs d floats apart: out[i * nq + j] = key row i . q row j, and
    // y row j += sum_i w[i * nq + j] value row i. One call per head instead of one per cell; each
    // query's result does not depend on nq or on its place among the queries.
    void  (*att_dot_f16)(const uint16_t * base, int64_t stride, const int32_t * cells, int32_t n, const float * q, int32_t nq,
                         int64_t d, float * out);
    void  (*att_axpy_f16)(float * y, const float * w, int32_t nq, const uint16_t * base, int64_t stride, const int32_t * cells,
                          int32_t n, int64_t d);
} se_kernels;

// The 8 six-bit scales and mins of a Q4_K/Q5_K super-block.
void se_k_scales(const uint8_t s[12], uint8_t sc[8], uint8_t m[8]);
// n Q4_K superblocks (GGUF bytes) into the CUDA layout of se-common.h: codes to q (128 bytes each),
// heads to s (SE_Q4K_SPLIT_SB bytes each).
void se_q4_K_split(const void * src, int64_t n, uint8_t * q, uint8_t * s);

extern se_kernels se_kern;

const se_type_traits * se_type_get(int32_t type);  // NULL for unknown ids
float se_fp16_to_fp32(uint16_t h);
uint16_t se_fp32_to_fp16(float f);
void se_quants_init(void);
size_t se_act_row_bytes(int32_t act, int64_t n);
// x86-64 with AVX2, FMA and F16C (se-quants-avx2.c): replaces the portable kernels
bool se_cpu_has_avx2(void);
void se_quants_use_avx2(se_type_traits * types, se_kernels * k);
// and with AVX-512 F/BW/VL + VNNI (se-quants-avx512.c): on top of the AVX2 ones
bool se_cpu_has_avx512(void);
void se_quants_use_avx512(se_type_traits * types, se_kernels * k);
void se_repack_portable(se_type_traits * types);  // the interleaved layouts and their portable kernels

// ---------------------------------------------------------------------------------------------
// GGUF

typedef struct se_gguf_kv {
    const char * key;         // points into the mapping; key_len bytes, not NUL-terminated
    uint64_t key_len;
    int32_t  type;            // se_meta_type
    int32_t  elem_type;       // for arrays
    uint64_t count;           // 1 for scalars
    const uint8_t * data;     // the value (for arrays: the first element)
    uint64_t * str_offsets;   // string arrays: offset of each element's length prefix from `data`
} se_gguf_kv;

typedef struct se_gguf_tensor {
    char name[SE_MAX_NAME];
    int32_t type;
    int32_t n_dims;
    int64_t ne[4];            // ne[0] is the contiguous dimension
    uint64_t nbytes;
    const uint8_t * data;
} se_gguf_tensor;

typedef struct se_gguf {
    char * path;
    uint8_t * map;
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    int64_t n_kv;
    se_gguf_kv * kv;          // (n_kv)
    int64_t n_tensors;
    se_gguf_tensor * tensors; // (n_tensors)
} se_gguf;

int  se_gguf_open(const char * path, se_gguf * out);
void se_gguf_close(se_gguf * g);
int64_t se_gguf_find(const se_gguf * g, const char * key);  // -1 if absent
const se_gguf_tensor * se_gguf_find_tensor(const se_gguf * g, const char * name);
// Typed reads; they fail with SE_ERR_FORMAT (naming the key) on a type mismatch.
int se_gguf_int(const se_gguf * g, int64_t i, uint64_t elem, int64_t * out);
int se_gguf_float(const se_gguf * g, int64_t i, uint64_t elem, double * out);
int se_gguf_string(const se_gguf * g, int64_t i, uint64_t elem, const char ** s, uint64_t * len);

// ---------------------------------------------------------------------------------------------
// Model

enum se_rope_type {
    SE_ROPE_NORM = 0,         // rotate adjacent pairs (x[2i], x[2i+1]): llama GGUFs (Q/K rows permuted)
    SE_ROPE_NEOX = 2,         // rotate (x[i], x[i + d/2]): HF order, qwen2
};

typedef struct se_hparams {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_ff;
    int32_t head_dim;
    float   rms_eps;
    float   rope_base;
    float   rope_freq_scale;  // 1 / linear scaling factor
    int32_t rope_type;        // se_rope_type
    int32_t file_type;
} se_hparams;

typedef struct se_weight {    // a matrix (rows, cols) of any supported type, rows contiguous
    int32_t type;
    int64_t cols;             // ne[0]: the reduction dimension
    int64_t rows;             // ne[1]
    uint64_t row_bytes;
    const uint8_t * data;     // in the host mapping
    const uint8_t * packed;   // (rows / 8, cols / block) interleaved groups (se-repack.c), or NULL
    uint64_t group_bytes;     // bytes of one group of 8 rows in `packed`
} se_weight;

typedef struct se_layer {
    float * attn_norm;        // (n_embd)
    se_weight wq;             // (n_head * head_dim, n_embd)
    se_weight wk;             // (n_head_kv * head_dim, n_embd)
    se_weight wv;             // (n_head_kv * head_dim, n_embd)
    se_weight wo;             // (n_embd, n_head * head_dim)
    float * bq, * bk, * bv;   // QKV biases (qwen2) or NULL
    float * ffn_norm;         // (n_embd)
    se_weight w_gate;         // (n_ff, n_embd)
    se_weight w_up;           // (n_ff, n_embd)
    se_weight w_down;         // (n_embd, n_ff)
} se_layer;

struct se_model {
    se_gguf gguf;
    char arch[32];
    se_hparams hp;
    se_weight tok_embd;       // (n_vocab, n_embd)
    float * output_norm;      // (n_embd)
    se_weight output;         // (n_vocab, n_embd); the embedding matrix when tied
    float * rope_freqs;       // (head_dim / 2) frequency divisors (Llama 3.1) or NULL
    se_layer * layers;        // (n_layer)
    int64_t n_params;
    int64_t n_bytes;
    int64_t n_bytes_packed;   // the repacked copies in host memory, beside the mapping
    uint8_t * packed;         // (n_bytes_packed) all of them
    int32_t * separators;     // sorted separator token ids
    int32_t n_separators;
    int32_t sepllm[4];        // default n_init, n_sep, n_local, n_cache (`sepllm.*` keys or built in)
    uint8_t * is_sep;         // (n_vocab) 1 for separator tokens
    int32_t device;           // se_device
    void * dev;               // the device copy of the weights (CUDA backend) or NULL
};

int  se_model_build(se_model * m);  // after m->gguf is open: hparams, weights, separators
void se_model_release(se_model * m);

// ---------------------------------------------------------------------------------------------
// Matrix products (se-repack.c)

// Interleaved copies of the CPU model's matrices whose type has a layout and whose rows split
// into groups of 8; m->packed, n_bytes_packed. Built once per model at load.
int  se_model_repack(se_model * m);
// out[t * w->rows + r] = row r of w . activation row t (+ bias[r]) for rows [r0, r1) and n tokens;
// act: float rows or Q8 blocks as the type takes them, `stride` bytes apart.
void se_matmul_rows(const se_weight * w, const float * bias, const void * act, size_t stride, int32_t n, float * out,
                    int64_t r0, int64_t r1);

// ---------------------------------------------------------------------------------------------
// Thread pool: fn(arg, ith, nth) runs on the caller (ith 0) and on the workers (ith < nth) that
// reach the job before the caller has finished its own call; it returns when those are done. So fn
// must take its work from a shared counter, never a fixed share per ith (a worker that lost its core
// to another process is not waited for). Workers spin briefly between jobs, then sleep.

typedef void (*se_task_fn)(void * arg, int ith, int nth);
typedef struct se_pool se_pool;

se_pool * se_pool_new(int n_threads);
void se_pool_free(se_pool * pool);
int  se_pool_size(const se_pool * pool);
void se_pool_run(se_pool * pool, se_task_fn fn, void * arg);

// ---------------------------------------------------------------------------------------------
// KV cache (se-kv-cache.c explains the modes)

// Regions of cells: enum se_cache_region in sepedge.h (the cache policy's public plan).

typedef struct se_kv_cell {
    int32_t token;
    int32_t pos;              // original position; the stored key was rotated with it
    int32_t delta;            // extra rotation when read: the key acts as if at pos + delta
    int32_t region;           // se_cache_region
    int64_t sep_seq;          // order among non-initial separators, -1 for other tokens
} se_kv_cell;

typedef struct se_ring {      // cell indices, oldest first
    int32_t * buf;
    int32_t cap, head, len;
} se_ring;

typedef struct se_kv_meta {   // the cache's bookkeeping; copyable, for dry runs
    se_kv_cell * cells;       // (n_cells)
    int32_t * init;           // (n_cells) cells of the initial tokens, in order
    int32_t n_init_live;
    se_ring sep;              // separator region, oldest first
    se_ring recent;           // the other live tokens, oldest first; their positions are contiguous
    int32_t * free;           // (n_cells) stack of free cells
    int32_t n_free;
    int64_t n_seen;           // tokens processed since the last clear (= the next position)
    int64_t n_evicted;
    int64_t n_sep_seen;       // non-initial separators admitted (next sep_seq)
    int64_t n_sep_left;       // of those, how many left the window
    int64_t rewind_floor;     // the cache can be truncated back to no fewer tokens than this
    int32_t n_init;           // size of the initial region (n_init, or more when pinned)
} se_kv_meta;

typedef struct se_kv_config {
    int32_t mode;             // se_kv_mode
    int32_t n_cells;          // cells allocated: the policy's budget (n_cache, n_ctx) + n_spare
    int32_t n_spare;          // cells only a pass that slides the window uses (se_kv_spare; 0: passes never slide)
    int32_t n_init, n_sep, n_local;
    int32_t kv_type;          // se_kv_type
} se_kv_config;

typedef struct se_kv_evicted {  // a cell given up, as it was
    int32_t cell, token, pos, region;
} se_kv_evicted;

typedef struct se_kv_log {    // what the policy did during one step (se-cache-plan.c)
    se_kv_evicted * evicted;  // (cap)
    int32_t n_evicted, cap;
    int32_t n_compressions;
} se_kv_log;

typedef struct se_kv_cache {
    se_kv_config cfg;
    int32_t kv_type;
    int64_t row;              // values per cell and layer: n_head_kv * head_dim
    se_kv_meta m;
    se_kv_meta scratch;       // dry runs
    int32_t * live;           // (n_cells) live cells in cache order [init | sep | recent]
    int32_t n_live;
    int64_t sum_visible;      // sum over processed tokens of the cells each one attended to
    bool sliding;             // the pass being run slides the window: se_kv_step
    se_kv_log * log;          // NULL, or where evictions and compressions of the live state are recorded
    void * k;                 // (n_layer, n_cells, row), keys rotated with the cell's pos
    void * v;                 // (n_layer, n_cells, row)
} se_kv_cache;

int32_t se_kv_capacity_check(int32_t mode, int32_t n_cells, int32_t n_init, int32_t n_sep, int32_t n_local);
// Spare cells for passes that slide the window (slide_in_pass) of n_batch tokens: 0 in the modes
// whose window never slides inside a pass.
int32_t se_kv_spare(int32_t mode, int32_t n_batch);
int  se_kv_init(se_kv_cache * kv, const se_hparams * hp, const se_kv_config * cfg);
int  se_kv_alloc_host(se_kv_cache * kv, int32_t n_layer);  // K/V storage in host memory
void se_kv_free(se_kv_cache * kv);
void se_kv_clear(se_kv_cache * kv);
// SE_OK when n tokens can be processed (without changing anything), else SE_ERR_CONTEXT_FULL.
int  se_kv_check_fits(se_kv_cache * kv, const uint8_t * is_sep, const int32_t * tokens, int32_t n, int32_t n_batch);
// Evict or compress for the next token, then claim cells for as many of `remaining` tokens as can
// share one forward pass; returns that count and their cells and positions.
int32_t se_kv_next_chunk(se_kv_cache * kv, const uint8_t * is_sep, const int32_t * tokens, int32_t remaining,
                         int32_t n_batch, int32_t * cells, int32_t * positions);
void se_kv_finish(se_kv_cache * kv);  // after a decode call: evict what the next token will not see
// Per query of the last chunk (training-free sepllm): the lowest sep_seq it may still see.
void se_kv_sep_floors(const se_kv_cache * kv, const int32_t * tokens, const uint8_t * is_sep, int32_t n, int64_t * out);
int  se_kv_truncate(se_kv_cache * kv, int64_t n_keep);
int  se_kv_keep(se_kv_cache * kv, int32_t n_keep);
int64_t se_kv_bytes(const se_kv_cache * kv, int32_t n_layer);
// Whether the query at position p (lowest visible sep_seq: sep_floor) attends to the cell.
bool se_kv_visible(const se_kv_cache * kv, const se_kv_cell * c, int64_t p, int64_t sep_floor);
// In a pass that slides the window, the rotation of the cell grows by this much per query (0 or 1):
// query t of the pass reads the key at pos + delta + t * step (sepedge.h: se_cache_plan.live_steps).
int32_t se_kv_step(const se_kv_cache * kv, const se_kv_cell * c);
// A cell's key / value row in layer l.
void * se_kv_k(const se_kv_cache * kv, int32_t l, int32_t cell);
void * se_kv_v(const se_kv_cache * kv, int32_t l, int32_t cell);

// ---------------------------------------------------------------------------------------------
// Context and the CPU forward pass

typedef struct se_buffers {   // activations for up to n_batch tokens
    float * x;                // (n_batch, n_embd) residual stream
    float * xb;               // (n_batch, n_embd)
    float * xb2;              // (n_batch, n_embd)
    float * q;                // (n_batch, n_head * head_dim)
    float * k;                // (n_batch, n_head_kv * head_dim)
    float * v;                // (n_batch, n_head_kv * head_dim)
    float * att;              // (n_batch, n_head * head_dim)
    float * hb;               // (n_batch, n_ff)
    float * hb2;              // (n_batch, n_ff)
    float * rope_cos;         // (n_batch, head_dim / 2)
    float * rope_sin;         // (n_batch, head_dim / 2)
    void * xq;                // (n_batch, widest row / 32) activations quantized for a matrix product
    float * scratch;          // (n_threads, scratch_stride) per-thread rows, attention scores and keys
    int64_t scratch_stride;
    int32_t * cells;          // (n_batch) cache cells of the tokens being processed
    int32_t * positions;      // (n_batch)
    int64_t * sep_floor;      // (n_batch) training-free sepllm: lowest separator sep_seq each query sees
    int32_t * visible;        // (n_batch) cells each query attended to (first layer, first head)
    int32_t * step_row;       // (n_cells) in a pass that slides the window, the se_kv_step cells' rows of:
    float * step_cos;         // (rows, step_tokens, head_dim / 2) rotation by delta + t for query t
    float * step_sin;
    int32_t step_tokens;      // n_spare + 1: the longest such pass
    float * delta_cos;        // (n_cells, head_dim / 2) rotation of cells with a delta
    float * delta_sin;        // (n_cells, head_dim / 2)
    int32_t * delta_done;     // (n_cells) the delta delta_cos/sin hold for each cell (0: none)
    int32_t * order;          // (n_cells) the live cells in memory order
    float * att_part;         // split decode attention: per (head group, split) softmax parts (se-forward.c)
} se_buffers;

// A backend owns where the KV data and activations live and how the forward pass runs there. The
// cache's cell bookkeeping (se_kv_cache minus k/v) and the policies deciding which cells live stay
// on the host, shared by all backends.
typedef struct se_backend {
    const char * name;
    int  (*init)(se_context * ctx);   // allocate K/V storage and activation buffers
    void (*free)(se_context * ctx);
    // Run the model over n tokens (n <= n_batch) whose cells are claimed in ctx->buf.cells;
    // logits of tokens [n - n_logits, n) go to `logits` (host memory). A device error leaves the
    // context unusable.
    int  (*forward)(se_context * ctx, const int32_t * tokens, int32_t n, float * logits, int32_t n_logits);
} se_backend;

extern const se_backend se_backend_cpu;
#ifdef SE_CUDA
extern const se_backend se_backend_cuda;
int  se_cuda_model_upload(se_model * m);  // the weights to the GPU (m->dev)
void se_cuda_model_free(se_model * m);
#endif

// Embeddings being collected (se_embeddings_enable): the final hidden states of the tokens processed.
typedef struct se_embd {
    int32_t on;
    int64_t n;                // tokens collected
    double * sum;             // (n_embd) sum of their normalized hidden states
    float * last;             // (n_embd) the last one
} se_embd;

// forward(): hand the final hidden states of n tokens, (n, n_embd), to the embeddings (se-api.c).
void se_embd_collect(se_context * ctx, const float * x, int32_t n);

struct se_context {
    se_model * model;
    const se_backend * backend;
    se_context_params params;
    se_pool * pool;
    se_kv_cache kv;
    se_buffers buf;
    void * dev;               // the backend's device state, or NULL
    se_embd embd;             // embeddings being collected
    // Set by se_context_cancel from any thread, read between chunks and layers (se_cancelled).
    // Plain ints under the GCC __atomic builtins, so that the CUDA (C++) files share the layout.
    int32_t cancel;
    int32_t busy;             // a call is running on the context (the one-caller rule)
};

// Whether se_context_cancel asked the running decode to stop (a relaxed read: a stop request may
// take one more layer to be seen).
static inline bool se_cancelled(const se_context * ctx) { return __atomic_load_n(&ctx->cancel, __ATOMIC_RELAXED) != 0; }

#endif  // SE_IMPL_H
