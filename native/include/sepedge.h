// sepedge: quantized LLM inference over GGUF files, with SepLLM's sparse KV cache.
//
// This header is the whole contract between the C core and its users (the Python package reads it
// as its cffi declarations, so it stays within plain C declarations: no macros in declarations
// other than SE_API, no inline functions).
//
// Conventions
//   - Opaque handles (se_model, se_context, se_sampler) come from *_load / *_new and go back
//     through *_free. Free functions accept NULL.
//   - Functions that can fail return an int status: SE_OK (0) or a negative se_status. The reason
//     is then available from se_last_error() in the same thread, until the next failing call.
//     Nothing in the library exits or aborts on bad input; a failed call changes no state.
//   - Parameter structs come from *_default_params() and are passed by pointer.
#ifndef SEPEDGE_H
#define SEPEDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef SE_BUILD
#define SE_API __attribute__((visibility("default")))
#else
#define SE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum se_status {
    SE_OK                   =  0,
    SE_ERR_INVALID_ARGUMENT = -1,  // a parameter is out of range, or a call is made out of order
    SE_ERR_IO               = -2,  // the file cannot be opened, read or mapped
    SE_ERR_FORMAT           = -3,  // the file is not a well-formed GGUF, or lacks a tensor or key
    SE_ERR_UNSUPPORTED      = -4,  // well-formed, but an architecture or tensor type we do not run
    SE_ERR_OUT_OF_MEMORY    = -5,
    SE_ERR_CONTEXT_FULL     = -6,  // the tokens do not fit in the KV cache; nothing was processed
    SE_ERR_BACKEND          = -7,  // the requested device is not available
};

// Message of the last failed call in this thread ("" if none).
SE_API const char * se_last_error(void);
// Name of a status code, e.g. "SE_ERR_FORMAT".
SE_API const char * se_status_name(int status);
SE_API const char * se_version(void);

// ---------------------------------------------------------------------------------------------
// Model: a GGUF file mapped read-only, its hyperparameters and weights.

enum se_device {
    SE_DEVICE_CPU  = 0,
    SE_DEVICE_CUDA = 1,
};

typedef struct se_model se_model;

typedef struct se_model_params {
    int32_t device;       // se_device: where the weights live
} se_model_params;

SE_API se_model_params se_model_default_params(void);
SE_API int  se_model_load(const char * path, const se_model_params * params, se_model ** out);
SE_API void se_model_free(se_model * model);

typedef struct se_model_info {
    const char * arch;    // general.architecture, e.g. "llama"
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_ff;
    int32_t head_dim;
    int32_t file_type;    // general.file_type, or -1
    int64_t n_params;
    int64_t n_bytes;      // bytes of tensor data
    int64_t n_bytes_packed; // bytes of the CPU backend's repacked copies of matrices, held beside the file's mapping
} se_model_info;

SE_API int se_model_get_info(const se_model * model, se_model_info * out);

// The separator token ids SepLLM keeps in the cache. Loaded from `sepllm.separator_token_ids`
// when the file has it; otherwise empty until set (the Python layer derives them from the vocabulary).
SE_API int32_t se_model_n_separators(const se_model * model);
SE_API int se_model_get_separators(const se_model * model, int32_t * ids, int32_t n);
SE_API int se_model_set_separators(se_model * model, const int32_t * ids, int32_t n);

// GGUF metadata, read-only. Keys are looked up by name; values are converted on the way out.
enum se_meta_type {  // the GGUF value types
    SE_META_UINT8 = 0, SE_META_INT8 = 1, SE_META_UINT16 = 2, SE_META_INT16 = 3, SE_META_UINT32 = 4,
    SE_META_INT32 = 5, SE_META_FLOAT32 = 6, SE_META_BOOL = 7, SE_META_STRING = 8, SE_META_ARRAY = 9,
    SE_META_UINT64 = 10, SE_META_INT64 = 11, SE_META_FLOAT64 = 12,
};

SE_API int32_t se_model_meta_count(const se_model * model);
// Index of a key, or -1.
SE_API int32_t se_model_meta_find(const se_model * model, const char * key);
SE_API const char * se_model_meta_key(const se_model * model, int32_t i);
// Value type; for arrays, *elem_type and *count describe the elements (count is 1 for scalars).
SE_API int se_model_meta_type(const se_model * model, int32_t i, int32_t * type, int32_t * elem_type, uint64_t * count);
// Numeric scalar or array values converted to int64 / double (bools as 0/1), n values from `first`.
SE_API int se_model_meta_ints(const se_model * model, int32_t i, uint64_t first, int64_t * out, uint64_t n);
SE_API int se_model_meta_floats(const se_model * model, int32_t i, uint64_t first, double * out, uint64_t n);
// Strings (a scalar string, or a string array) copied back to back into `buf` without terminators,
// their lengths into `lens`. With buf == NULL, only `lens` is filled (to size the buffer).
SE_API int se_model_meta_strings(const se_model * model, int32_t i, char * buf, uint64_t buf_size,
                                 uint64_t * lens, uint64_t n);

// ---------------------------------------------------------------------------------------------
// Context: a KV cache and the buffers to run the model over it.

enum se_kv_type {
    SE_KV_F32 = 0,
    SE_KV_F16 = 1,
};

// Which tokens the KV cache keeps (SEPLLM.md). Retention is decided from token ids alone.
enum se_kv_mode {
    SE_KV_MODE_FULL          = 0,  // every token, up to n_ctx
    SE_KV_MODE_STREAMINGLLM  = 1,  // initial + last n_local tokens, positions within the cache
    SE_KV_MODE_SEPLLM        = 2,  // training-free SepLLM: initial + separators + last n_local, original positions
    SE_KV_MODE_SEPLLM_STREAM = 3,  // streaming SepLLM: compresses the past window into its separators
};

typedef struct se_context_params {
    int32_t n_ctx;        // full mode: cells in the KV cache; 0 = the model's training context
    int32_t n_batch;      // tokens per forward pass when a prompt is processed in chunks
    int32_t n_threads;    // 0 = one per core
    int32_t kv_type;      // se_kv_type
    int32_t kv_mode;      // se_kv_mode
    // SepLLM sizes; -1 = the model's `sepllm.*` defaults (else 4, 64, 256, 800)
    int32_t n_init;       // initial (attention-sink) tokens
    int32_t n_sep;        // separators kept, newest first; 0 = all
    int32_t n_local;      // the window of recent tokens, the current one included
    int32_t n_cache;      // cells in the KV cache of the sparse modes
} se_context_params;

typedef struct se_context se_context;

SE_API se_context_params se_context_default_params(void);
SE_API int  se_context_new(se_model * model, const se_context_params * params, se_context ** out);
SE_API void se_context_free(se_context * ctx);

// Process n_tokens tokens after those already in the cache. The logits of the last n_logits of
// them (0 <= n_logits <= n_tokens) are written to `logits`, n_logits * n_vocab floats, in order.
// Returns SE_ERR_CONTEXT_FULL, with the cache untouched, when the tokens do not fit.
SE_API int se_decode(se_context * ctx, const int32_t * tokens, int32_t n_tokens, float * logits, int32_t n_logits);

// Forget everything in the cache.
SE_API int se_cache_clear(se_context * ctx);
// Keep the first n_keep tokens seen and drop the rest, so that a new suffix can follow. In the
// sparse modes only back to the last eviction (SE_ERR_INVALID_ARGUMENT otherwise).
SE_API int se_cache_truncate(se_context * ctx, int32_t n_keep);
// Make the first n_keep tokens initial ones, never evicted (e.g. a chat's system prompt). Only while
// the cache holds initial tokens alone; n_keep must fit the mode's size constraint.
SE_API int se_cache_keep(se_context * ctx, int32_t n_keep);

typedef struct se_cache_info {
    int32_t kv_mode;      // se_kv_mode
    int32_t n_cells;      // capacity
    int32_t n_init;       // sizes in effect (n_init includes a pinned prefix)
    int32_t n_sep;
    int32_t n_local;
    int32_t n_live;       // cells holding a token
    int32_t n_live_init;  // ... per region
    int32_t n_live_sep;
    int32_t n_live_recent;
    int64_t n_seen;       // tokens processed since the cache was cleared
    int64_t n_evicted;    // tokens whose cells were given up
    int64_t sum_visible;  // sum over those tokens of the cells each one attended to
    int64_t kv_bytes;     // bytes allocated for K and V
} se_cache_info;

SE_API int se_cache_get_info(const se_context * ctx, se_cache_info * out);
// Token id, original position and region (1 initial, 2 separator, 3 recent) of every live cell, in
// cache order [initial | separators | recent] (n >= n_live entries).
SE_API int se_cache_get_cells(const se_context * ctx, int32_t * tokens, int32_t * positions, int32_t * regions, int32_t n);

// ---------------------------------------------------------------------------------------------
// Sampler: picks the next token from logits. Defaults follow llama.cpp.

typedef struct se_sampler_params {
    float    temperature;     // <= 0: greedy
    int32_t  top_k;           // <= 0: off
    float    top_p;           // 1: off
    float    min_p;           // 0: off
    float    repeat_penalty;  // 1: off
    int32_t  repeat_last_n;   // tokens of history the penalty looks at
    uint64_t seed;
} se_sampler_params;

typedef struct se_sampler se_sampler;

SE_API se_sampler_params se_sampler_default_params(void);
SE_API int  se_sampler_new(const se_sampler_params * params, int32_t n_vocab, se_sampler ** out);
SE_API void se_sampler_free(se_sampler * sampler);
// Add a token to the history the repeat penalty looks at (prompt and generated tokens).
SE_API int  se_sampler_accept(se_sampler * sampler, int32_t token);
SE_API int  se_sampler_reset(se_sampler * sampler);
SE_API int  se_sampler_sample(se_sampler * sampler, const float * logits, int32_t * token);

// ---------------------------------------------------------------------------------------------
// Tensor type kernels (ggml type ids), exposed for tests and tools.

// Name, values per block, bytes per block, and whether the core can run the type.
SE_API int se_type_info(int32_t type, const char ** name, int32_t * block, int32_t * size, int32_t * supported);
// n values (a multiple of the block size) from their GGUF bytes.
SE_API int se_dequantize(int32_t type, const void * src, float * dst, int64_t n);
// Dot product of a row of n values in `type` with n floats.
SE_API int se_dot(int32_t type, const void * row, const float * x, int64_t n, float * out);
// IEEE half precision, rounded to nearest even (the f16 KV cache format).
SE_API int se_fp32_to_fp16_row(const float * src, uint16_t * dst, int64_t n);
// The fast path of the forward pass: for quantized types x is first quantized to 8 bits per value
// in blocks of 32 (se_quantize_act_q8: per block a float scale, the int32 sum, 32 int8 codes).
SE_API int se_vec_dot(int32_t type, const void * row, const float * x, int64_t n, float * out);
SE_API int se_quantize_act_q8(const float * x, void * out, int64_t n);
// The forward pass's matrix product: out (n, rows) = x (n, cols) . W^T for W (rows, cols) in `type`,
// x quantized as se_vec_dot does; packed != 0 runs it on the interleaved layout the CPU backend
// builds at load (for types that have one and rows a multiple of 8), else row by row.
SE_API int se_matmul(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n, float * out,
                     int32_t packed);
// The SIMD kernels in use ("avx2" or "none"); se_set_simd(0) selects the portable C ones (tests),
// as does the environment variable SEPEDGE_SIMD=0 at load. Not to be called during a decode.
SE_API const char * se_simd(void);
SE_API int se_set_simd(int32_t enable);

// ---------------------------------------------------------------------------------------------
// CUDA. Builds without the CUDA backend return SE_ERR_BACKEND from these.

// Number of usable CUDA GPUs (0, with SE_OK, where there is no GPU or no driver).
SE_API int se_cuda_device_count(int32_t * count);
// The CUDA kernels of the matrix products, for tests and tools: out (n, rows) = x (n, cols) . W^T
// with W as GGUF bytes of `type`. path 0: what the forward pass runs (n == 1: the decode kernels,
// with 8-bit activations and dp4a where the type has them; n > 1: the tensor-core kernel);
// path 1: the decode kernel that dequantizes in registers against float activations, per token.
SE_API int se_cuda_mul_mat(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n,
                           float * out, int32_t path);

#ifdef __cplusplus
}
#endif

#endif  // SEPEDGE_H
