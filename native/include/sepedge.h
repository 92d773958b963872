// sepedge: quantized LLM inference over GGUF files, with SepLLM's sparse KV cache.
//
// This header is the whole contract between the C core and its users (the Python package reads it
// as its cffi declarations, so it stays within plain C declarations: no macros in declarations
// other than SE_API, no inline functions).
//
// Conventions
//   - Opaque handles (se_model, se_context, se_sampler, se_cache_policy) come from *_load / *_new and go back
//     through *_free. Free functions accept NULL.
//   - Functions that can fail return an int status: SE_OK (0) or a negative se_status. The reason
//     is then available from se_last_error() in the same thread, until the next failing call.
//     Nothing in the library exits or aborts on bad input; a failed call changes no state (se_decode
//     says precisely what it leaves when it fails part-way).
//   - Threads: a model may be shared by contexts in different threads. A context takes one call at
//     a time: a call made while another thread runs one on the same context fails with SE_ERR_BUSY
//     (se_context_cancel is the exception, callable at any time). se_context_free must not overlap
//     a running call: cancel it, wait for it to return, then free.
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
    SE_ERR_CANCELLED        = -8,  // se_context_cancel stopped the call
    SE_ERR_NUMERICAL        = -9,  // a hidden state or logit is NaN or infinite (weights or inputs out of range)
    SE_ERR_BUSY             = -10, // another thread is running a call on the same context
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
    SE_DEVICE_NONE = 2,  // no backend of this library: the file is mapped and checked, its metadata,
                         // vocabulary and separators read, nothing repacked or uploaded (a backend
                         // outside the library, e.g. Triton, reads the weights); no contexts
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
    // Variants of SepLLM's streaming cache with the same bounded memory (issue J): the window
    // slides every token, as StreamingLLM's, and each separator that leaves it joins the separator
    // region (the newest n_sep kept, n_sep >= 1), placed right before the window; n_init + n_sep +
    // n_local <= n_cache, every cell is used once the stream is long, none is left to refill.
    SE_KV_MODE_SEPLLM_SLIDE  = 4,
    // as SEPLLM_SLIDE, but of a run of consecutive separators (". \n", "\n\n  ") only the last one
    // is kept: the n_sep cells then reach further back in the text
    SE_KV_MODE_SEPLLM_RUNS   = 5,
};

typedef struct se_context_params {
    int32_t n_ctx;        // full mode: cells in the KV cache; 0 = the model's training context
    int32_t n_batch;      // tokens per forward pass when a prompt is processed in chunks
    int32_t n_threads;    // 0 = one per core (at most 64); explicit values 1..256
    int32_t kv_type;      // se_kv_type
    int32_t kv_mode;      // se_kv_mode
    // SepLLM sizes; -1 = the model's `sepllm.*` defaults (else 4, 64, 256, 800)
    int32_t n_init;       // initial (attention-sink) tokens
    int32_t n_sep;        // separators kept, newest first; 0 = all
    int32_t n_local;      // the window of recent tokens, the current one included
    int32_t n_cache;      // cells in the KV cache of the sparse modes
    // 1: a pass may slide the window (streamingllm, sepllm-slide, sepllm-runs), so a long prompt
    // takes up to 64 tokens per forward pass instead of one once the window is full; the cache then
    // allocates min(n_batch, 64) - 1 spare cells beyond n_cache (se_cache_info.n_spare), which hold
    // the keys the later tokens of a pass have left behind while the earlier ones still see them.
    // What each token attends to is unchanged. CPU backend only (the CUDA backend ignores it).
    int32_t slide_in_pass;
} se_context_params;

typedef struct se_context se_context;

SE_API se_context_params se_context_default_params(void);
SE_API int  se_context_new(se_model * model, const se_context_params * params, se_context ** out);
SE_API void se_context_free(se_context * ctx);

// Process n_tokens tokens after those already in the cache. The logits of the last n_logits of
// them (0 <= n_logits <= n_tokens) are written to `logits`, n_logits * n_vocab floats, in order.
// Failures:
//   - bad arguments, tokens outside the vocabulary, SE_ERR_CONTEXT_FULL (the tokens do not fit),
//     SE_ERR_BUSY: found before any work; the cache is untouched.
//   - SE_ERR_CANCELLED (se_context_cancel), SE_ERR_NUMERICAL (a non-finite hidden state or logit),
//     a backend error: found part-way. The cache is then put back as it was before the call when
//     no token was evicted during it (always in the full mode, and whenever the tokens fit in the
//     free cells); otherwise it is cleared. The message ends with "the cache is as it was" or "the
//     cache was cleared", and se_cache_get_info's n_seen tells which. `logits` is undefined.
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
    int32_t n_cells;      // capacity: n_cache (n_ctx in the full mode), the cells a token may attend to
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
    int64_t kv_bytes;     // bytes allocated for K and V (spare cells included)
    int32_t n_spare;      // cells beyond n_cells, used only inside a pass that slides the window (slide_in_pass)
} se_cache_info;

SE_API int se_cache_get_info(const se_context * ctx, se_cache_info * out);
// Token id, original position and region (se_cache_region) of every live cell, in cache order
// [initial | separators | recent] (n >= n_live entries).
SE_API int se_cache_get_cells(const se_context * ctx, int32_t * tokens, int32_t * positions, int32_t * regions, int32_t n);

// ---------------------------------------------------------------------------------------------
// Cache policy: SepLLM's retention rule as a plan that any backend follows.
//
// The one implementation of which KV cells live (the contexts above run the same code), usable
// with or without a model by a backend that keeps K and V itself (Triton, the torch reference).
// Per forward pass, a step says where each new token's K/V go, which cells the pass attends to
// (with the extra rotation of each key and, optionally, the query x cell mask), and which cells
// were given up. The policy never sees keys or values: retention is decided from token ids alone.
//
// How a backend runs n tokens:
//     for (s = 0; s < n; s += plan.n_tokens) {
//         se_cache_policy_step(policy, tokens + s, n - s, &plan);   // SE_ERR_CONTEXT_FULL: nothing done
//         // rotate the new keys with plan.positions and write K/V to plan.cells, then for every
//         // new token t attend to plan.live_cells[i] where mask[t * n_live + i], the key of that
//         // cell rotated by a further plan.live_deltas[i]; the query's position is positions[t]
//         // (with slide_in_pass: plan.live_deltas[i] + t * plan.live_steps[i], the same as reading
//         // those keys without the steps against query t rotated at positions[0] instead)
//     }
// Cells given up in a step keep their K/V until a later step hands them out again.
//
// Sizes. n_local counts the window with the token being evaluated, n_cache every cell including
// that token's. The streaming reference code (Streaming-SepLLM's kv_cache_manager, StreamingLLM)
// appends a token, runs it, and only then compresses when the cache holds more than cache_size; so
// a token attends to up to cache_size + 1 entries and to a window of local_size + 1. A sepedge
// cache of (n_cache, n_local) therefore behaves as the reference's cache_size = n_cache - 1,
// local_size = n_local - 1 (n_init and n_sep are the same): the paper's c = 800, w = 256 run is
// n_cache 801, n_local 257 here, and the reference's a + s + w < c reads n_init + n_sep + n_local
// < n_cache. Training-free sepllm's window n (the mask rule of SepAttention) includes the current
// token already: n_local = n.
//
// A policy copies what it needs from the model (it may be freed first) and is used by one thread
// at a time.

// Region of a live cell (se_cache_get_cells, se_cache_plan.live_regions).
enum se_cache_region {
    SE_REGION_FREE   = 0,
    SE_REGION_INIT   = 1,  // the first n_init tokens (or a pinned prefix: se_cache_keep)
    SE_REGION_SEP    = 2,  // separators that left the window
    SE_REGION_RECENT = 3,  // everything else: the window (and, streaming, the past window)
};

typedef struct se_cache_policy se_cache_policy;

typedef struct se_cache_policy_params {
    int32_t kv_mode;      // se_kv_mode
    // SepLLM sizes as in se_context_params; -1 = the model's `sepllm.*` defaults (needs a model)
    int32_t n_init;
    int32_t n_sep;
    int32_t n_local;
    int32_t n_cache;
    int32_t n_ctx;        // full mode: cells; 0 = the model's training context (needs a model)
    int32_t n_batch;      // most tokens per forward pass, so per step
    int32_t n_vocab;      // token ids are accepted in [0, n_vocab); 0 = the model's vocabulary (needs a model)
    int32_t slide_in_pass;  // as in se_context_params, default 0; a backend that sets it follows live_steps
} se_cache_policy_params;

// kv_mode full, sizes -1, n_ctx 0, n_batch 512, n_vocab 0: the defaults of a context.
SE_API se_cache_policy_params se_cache_policy_default_params(void);
// model may be NULL. separators: the separator token ids; n_separators = -1 takes the model's set.
SE_API int  se_cache_policy_new(const se_model * model, const se_cache_policy_params * params,
                                const int32_t * separators, int32_t n_separators, se_cache_policy ** out);
SE_API void se_cache_policy_free(se_cache_policy * policy);

typedef struct se_cache_plan {
    // Buffers the caller provides, their sizes in entries (checked before anything changes).
    int32_t * cells;          // (max_tokens) the cell each new token's K and V are written to
    int32_t * positions;      // (max_tokens) the token's original position: its key is rotated with it
    int32_t   max_tokens;     // >= min(n_tokens, n_batch)
    int32_t * live_cells;     // (max_live) cells the pass attends to, in cache order [initial | separators | recent]
    int32_t * live_positions; // (max_live) their original positions
    int32_t * live_deltas;    // (max_live) extra rotation when read: the key acts as if at position + delta
    int32_t * live_regions;   // (max_live) se_cache_region
    int32_t * live_steps;     // (max_live) slide_in_pass only (else may be NULL): new token t reads the key of
                              // live cell i at position + live_deltas[i] + t * live_steps[i] (steps are 0 or 1)
    int32_t   max_live;       // >= the number of cells (se_cache_info.n_cells + n_spare)
    uint8_t * mask;           // NULL, or (mask_size): mask[t * n_live + i] = 1 when new token t attends live cell i
    int64_t   mask_size;      // >= min(n_tokens, n_batch) * (n_cells + n_spare)
    // Results.
    int32_t n_tokens;         // tokens planned for this pass: the first n_tokens of those given
    int32_t n_live;           // live cells, the new tokens' included
    int32_t n_evicted;        // cells given up in this step, before or after the pass (se_cache_policy_get_evicted)
    int32_t n_compressions;   // sepllm-stream compressions in this step
    int64_t n_visible;        // sum over the new tokens of the cells each one attends to
} se_cache_plan;

// Plan the next forward pass over up to n_tokens tokens (n_tokens >= 1) after those already seen:
// make room as the mode says, claim cells for the tokens that share the pass, and, when the pass
// takes all n_tokens, evict what the next token will not see (as se_decode does at its end).
// SE_ERR_CONTEXT_FULL, with nothing changed, when the n_tokens tokens would not all fit.
SE_API int se_cache_policy_step(se_cache_policy * policy, const int32_t * tokens, int32_t n_tokens, se_cache_plan * plan);
// The cells given up by the last step: cell, token, original position and the region it left
// (n >= plan.n_evicted entries; NULL arrays are skipped).
SE_API int se_cache_policy_get_evicted(const se_cache_policy * policy, int32_t * cells, int32_t * tokens,
                                       int32_t * positions, int32_t * regions, int32_t n);
// As se_cache_get_info and se_cache_get_cells for a context (kv_bytes is 0: a policy stores no K/V).
SE_API int se_cache_policy_get_info(const se_cache_policy * policy, se_cache_info * out);
SE_API int se_cache_policy_get_cells(const se_cache_policy * policy, int32_t * tokens, int32_t * positions,
                                     int32_t * regions, int32_t n);
// As se_cache_clear, se_cache_truncate and se_cache_keep.
SE_API int se_cache_policy_clear(se_cache_policy * policy);
SE_API int se_cache_policy_truncate(se_cache_policy * policy, int32_t n_keep);
SE_API int se_cache_policy_keep(se_cache_policy * policy, int32_t n_keep);

// Embeddings and cache state (the server and the llama-cpp-python drop-in). The CPU backend has
// them; the CUDA backend returns SE_ERR_UNSUPPORTED.

enum se_pooling {
    SE_POOLING_MEAN = 0,  // the mean over the tokens
    SE_POOLING_LAST = 1,  // the last token's (what a causal model has read everything by)
};

// enable = 1: collect the final hidden states (after the output norm, as llama.cpp's embeddings) of
// the tokens the following decodes process, forgetting what was collected before; 0: stop.
SE_API int se_embeddings_enable(se_context * ctx, int32_t enable);
// The collected states pooled over the tokens: n_embd floats. SE_ERR_INVALID_ARGUMENT when no
// token was processed since se_embeddings_enable(ctx, 1).
SE_API int se_embeddings_get(const se_context * ctx, int32_t pooling, float * out, int32_t n_embd);

// The cache's state: its live cells (token, position, region, keys and values) and counters. A
// sparse cache's state is bounded by its n_cache cells however many tokens it has seen.
SE_API int se_state_size(const se_context * ctx, uint64_t * size);
SE_API int se_state_save(const se_context * ctx, void * buf, uint64_t size);
// Restore a state saved from a context of the same model and cache configuration; every count and
// value in `buf` is checked first, and a rejected state leaves the cache as it was.
SE_API int se_state_load(se_context * ctx, const void * buf, uint64_t size);

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
// `logits` holds n_vocab floats (the n_vocab of se_sampler_new). NaN or +inf among them, or all of
// them -inf, give SE_ERR_NUMERICAL; -inf alone marks a token that must not be drawn.
SE_API int  se_sampler_sample(se_sampler * sampler, const float * logits, int32_t * token);

// ---------------------------------------------------------------------------------------------
// Reliability: cancellation.

// Ask the se_decode running on ctx (or the next one) to stop at the next layer or chunk boundary;
// it then returns SE_ERR_CANCELLED as se_decode describes. Callable from any thread, a signal
// handler included, while another thread runs a call on ctx. The request stays until
// se_context_uncancel: every se_decode fails fast meanwhile.
SE_API int se_context_cancel(se_context * ctx);
SE_API int se_context_uncancel(se_context * ctx);
// 1 while a cancel request is pending, else 0 (and 0 for NULL).
SE_API int32_t se_context_cancelled(const se_context * ctx);

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
// The SIMD kernels in use ("avx512", "avx2" or "none"); se_set_simd(0) selects the portable C ones
// (tests), se_set_simd(1) the level chosen at load: the best the CPU has, or lower where the
// environment says SEPEDGE_ISA=avx2|portable (SEPEDGE_SIMD=0: portable). se_set_isa("avx512" |
// "avx2" | "portable") selects one level (SE_ERR_UNSUPPORTED where the CPU lacks it). Not to be
// called during a decode.
SE_API const char * se_simd(void);
SE_API int se_set_simd(int32_t enable);
SE_API int se_set_isa(const char * name);

// ---------------------------------------------------------------------------------------------
// CUDA. Builds without the CUDA backend return SE_ERR_BACKEND from these (se_cuda_repack_q4_K excepted).

// Number of usable CUDA GPUs (0, with SE_OK, where there is no GPU or no driver).
SE_API int se_cuda_device_count(int32_t * count);
// The CUDA kernels of the matrix products, for tests and tools: out (n, rows) = x (n, cols) . W^T
// with W as GGUF bytes of `type`. path 0: what the forward pass runs (n == 1: the decode kernels,
// with 8-bit activations and dp4a where the type has them; n > 1: the int8 or f16 tensor-core kernel);
// path 1: the decode kernel that dequantizes in registers against float activations, per token;
// paths 2 and 3 (n == 2, cols % 32 == 0): one token through the decode kernels' fused RMSNorm
// (eps 1e-5), x row 0 the input and row 1 the norm's weights, the result in out row 0; path 3 with
// SwiGLU: the first rows / 2 rows of W are gate's, the rest up's, out row 0 starts with the rows / 2
// values silu(gate) * up. path 4: the cuBLAS route of long prefill chunks (weights dequantized to
// f16, activations to f16 with a power-of-two scale a row, f32 accumulation; SE_ERR_BACKEND where
// cuBLAS does not load); path 5: the same adding the product to the values out holds on entry (the
// route's residual add).
SE_API int se_cuda_mul_mat(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n,
                           float * out, int32_t path);
// The weights of the cuBLAS route, for tests: W (GGUF bytes of `type`, rows x cols) as the f16 values
// the route's GEMM reads, row-major, into out (rows * cols f16 bit patterns).
SE_API int se_cuda_dequantize_f16(int32_t type, const void * w, int64_t rows, int64_t cols, uint16_t * out);
// The Q4_K layout the CUDA backend uploads (unless SEPEDGE_CUDA_Q4K_REPACK=0), for tests (plain C: every
// build has it, with or without the CUDA backend): n superblocks of GGUF bytes into q (their 128 code
// bytes each, as in the file) and s (20 bytes each: d and dmin as in the file, then per sub-block j =
// 0..7 its six-bit scale and min as the bytes s[4 + 2 j], s[5 + 2 j]).
SE_API int se_cuda_repack_q4_K(const void * src, int64_t n, void * q, void * s);
// Load cuBLAS for the prefill route ($SEPEDGE_CUBLAS alone where set, else libcublas.so.13, else
// .12; once a process): SE_OK, or
// SE_ERR_BACKEND with the reason (then long prefill chunks stay on the int8 / f16 kernels).
// SEPEDGE_CUDA_CUBLAS=0 keeps the route off; SEPEDGE_CUDA_CUBLAS_MIN (default 128) is the fewest
// tokens of a chunk that takes it.
SE_API int se_cuda_cublas_load(void);

#ifdef __cplusplus
}
#endif

#endif  // SEPEDGE_H
