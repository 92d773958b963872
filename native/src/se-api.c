// The public API: argument checks, model and context lifetimes, decode.
#include "se-impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SE_VERSION "0.1.0"
#define SE_MAX_THREADS 256  // explicit n_threads above this are refused (a typo, not a machine)

const char * se_version(void) { return SE_VERSION; }

// ---------------------------------------------------------------------------------------------
// model

se_model_params se_model_default_params(void) { return (se_model_params) {.device = SE_DEVICE_CPU}; }

int se_model_load(const char * path, const se_model_params * params, se_model ** out) {
    if (!out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_load: out is NULL");
    *out = NULL;
    if (!path) return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_load: path is NULL");
    se_model_params p = params ? *params : se_model_default_params();
#ifndef SE_CUDA
    if (p.device == SE_DEVICE_CUDA) return se_error(SE_ERR_BACKEND, "this build of sepedge has no CUDA backend");
#endif
    if (p.device != SE_DEVICE_CPU && p.device != SE_DEVICE_CUDA && p.device != SE_DEVICE_NONE) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown device %d", p.device);
    se_quants_init();
    se_model * m = calloc(1, sizeof *m);
    if (!m) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    m->device = p.device;
    int r = se_gguf_open(path, &m->gguf);
    if (r == SE_OK) r = se_model_build(m);
#ifdef SE_CUDA
    if (r == SE_OK && m->device == SE_DEVICE_CUDA) r = se_cuda_model_upload(m);
#endif
    if (r != SE_OK) {
        se_model_free(m);
        return r;
    }
    *out = m;
    return SE_OK;
}

void se_model_free(se_model * m) {
    if (!m) return;
#ifdef SE_CUDA
    se_cuda_model_free(m);
#endif
    se_model_release(m);
    free(m);
}

int se_model_get_info(const se_model * m, se_model_info * out) {
    if (!m || !out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_get_info: NULL argument");
    const se_hparams * hp = &m->hp;
    *out = (se_model_info) {
        .arch = m->arch, .n_vocab = hp->n_vocab, .n_ctx_train = hp->n_ctx_train, .n_embd = hp->n_embd,
        .n_layer = hp->n_layer, .n_head = hp->n_head, .n_head_kv = hp->n_head_kv, .n_ff = hp->n_ff,
        .head_dim = hp->head_dim, .file_type = hp->file_type, .n_params = m->n_params, .n_bytes = m->n_bytes,
    };
    out->n_bytes_packed = m->n_bytes_packed;
    return SE_OK;
}

int32_t se_model_n_separators(const se_model * m) { return m ? m->n_separators : 0; }

int se_model_get_separators(const se_model * m, int32_t * ids, int32_t n) {
    if (!m || (!ids && n > 0) || n < m->n_separators) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_get_separators: need room for %d ids", m ? m->n_separators : 0);
    }
    if (m->n_separators > 0) memcpy(ids, m->separators, (size_t) m->n_separators * sizeof(int32_t));
    return SE_OK;
}

// --- metadata

int32_t se_model_meta_count(const se_model * m) { return m ? (int32_t) m->gguf.n_kv : 0; }

int32_t se_model_meta_find(const se_model * m, const char * key) {
    return m && key ? (int32_t) se_gguf_find(&m->gguf, key) : -1;
}

static int meta_index(const se_model * m, int32_t i) {
    if (!m || i < 0 || i >= m->gguf.n_kv) return se_error(SE_ERR_INVALID_ARGUMENT, "metadata index %d out of range", i);
    return SE_OK;
}

const char * se_model_meta_key(const se_model * m, int32_t i) {
    static _Thread_local char key[65536 + 1];
    if (meta_index(m, i) != SE_OK) return NULL;
    memcpy(key, m->gguf.kv[i].key, m->gguf.kv[i].key_len);
    key[m->gguf.kv[i].key_len] = 0;
    return key;
}

int se_model_meta_type(const se_model * m, int32_t i, int32_t * type, int32_t * elem_type, uint64_t * count) {
    int r = meta_index(m, i);
    if (r != SE_OK) return r;
    if (type) *type = m->gguf.kv[i].type;
    if (elem_type) *elem_type = m->gguf.kv[i].elem_type;
    if (count) *count = m->gguf.kv[i].count;
    return SE_OK;
}

int se_model_meta_ints(const se_model * m, int32_t i, uint64_t first, int64_t * out, uint64_t n) {
    int r = meta_index(m, i);
    for (uint64_t j = 0; j < n && r == SE_OK; j++) r = se_gguf_int(&m->gguf, i, first + j, &out[j]);
    return r;
}

int se_model_meta_floats(const se_model * m, int32_t i, uint64_t first, double * out, uint64_t n) {
    int r = meta_index(m, i);
    for (uint64_t j = 0; j < n && r == SE_OK; j++) r = se_gguf_float(&m->gguf, i, first + j, &out[j]);
    return r;
}

int se_model_meta_strings(const se_model * m, int32_t i, char * buf, uint64_t buf_size, uint64_t * lens, uint64_t n) {
    int r = meta_index(m, i);
    if (r == SE_OK && !lens) r = se_error(SE_ERR_INVALID_ARGUMENT, "se_model_meta_strings: lens is NULL");
    uint64_t used = 0;
    for (uint64_t j = 0; j < n && r == SE_OK; j++) {
        const char * s;
        r = se_gguf_string(&m->gguf, i, j, &s, &lens[j]);
        if (r != SE_OK || !buf) continue;
        if (lens[j] > buf_size - used) return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_meta_strings: buffer too small");
        memcpy(buf + used, s, lens[j]);
        used += lens[j];
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// context

se_context_params se_context_default_params(void) {
    return (se_context_params) {.n_ctx = 0, .n_batch = 512, .n_threads = 0, .kv_type = SE_KV_F16,
                                .kv_mode = SE_KV_MODE_FULL, .n_init = -1, .n_sep = -1, .n_local = -1, .n_cache = -1};
}

static int default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int) n;
}

// The cache configuration: mode, sizes (the model's defaults where -1), capacity.
static int kv_config(const se_model * m, const se_context_params * p, se_kv_config * cfg) {
    if (p->kv_mode < SE_KV_MODE_FULL || p->kv_mode > SE_KV_MODE_SEPLLM_RUNS) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "unknown kv_mode %d", p->kv_mode);
    }
    const int32_t given[4] = {p->n_init, p->n_sep, p->n_local, p->n_cache};
    int32_t v[4];
    for (int k = 0; k < 4; k++) {
        if (given[k] < -1) return se_error(SE_ERR_INVALID_ARGUMENT, "SepLLM sizes must be >= 0 (or -1 for the default)");
        v[k] = given[k] == -1 ? m->sepllm[k] : given[k];
    }
    *cfg = (se_kv_config) {.mode = p->kv_mode, .n_cells = p->kv_mode == SE_KV_MODE_FULL ? p->n_ctx : v[3],
                           .n_init = v[0], .n_sep = v[1], .n_local = v[2], .kv_type = p->kv_type};
    if (cfg->n_cells < 1) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "the KV cache needs at least one cell (%s = %d)",
                        p->kv_mode == SE_KV_MODE_FULL ? "n_ctx" : "n_cache", cfg->n_cells);
    }
    int r = se_kv_capacity_check(cfg->mode, cfg->n_cells, cfg->n_init, cfg->n_sep, cfg->n_local);
    if (r != SE_OK) {  // the sizes in effect (the model's defaults filled in), by name and value
        char why[512];
        snprintf(why, sizeof why, "%s", se_last_error());
        return se_error(r, "%s [in effect: n_init %d, n_sep %d (0 = all), n_local %d, n_cache %d]", why, cfg->n_init,
                        cfg->n_sep, cfg->n_local, cfg->n_cells);
    }
    return SE_OK;
}

int se_context_new(se_model * m, const se_context_params * params, se_context ** out) {
    if (!out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_new: out is NULL");
    *out = NULL;
    if (!m) return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_new: model is NULL");
    if (m->device == SE_DEVICE_NONE) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_new: the model was loaded without a backend (SE_DEVICE_NONE)");
    }
    se_context_params p = params ? *params : se_context_default_params();
    if (p.n_ctx < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0, got %d", p.n_ctx);
    if (p.n_batch < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "n_batch must be >= 1, got %d", p.n_batch);
    if (p.n_threads < 0 || p.n_threads > SE_MAX_THREADS) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "n_threads must be in [0, %d] (0 = one per core), got %d", SE_MAX_THREADS,
                        p.n_threads);
    }
    if (p.kv_type != SE_KV_F32 && p.kv_type != SE_KV_F16) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown kv_type %d", p.kv_type);
    if (p.n_ctx == 0) p.n_ctx = m->hp.n_ctx_train;
    se_kv_config cfg;
    int r = kv_config(m, &p, &cfg);
    if (r != SE_OK) return r;
    if (p.n_batch > cfg.n_cells) p.n_batch = cfg.n_cells;
    // spare cells for passes that slide the window: the CPU backend reads keys with per-query steps
    const bool cuda = m->device != SE_DEVICE_CPU;
    if (p.slide_in_pass && !cuda) {
        cfg.n_spare = se_kv_spare(cfg.mode, p.n_batch);
        cfg.n_cells += cfg.n_spare;
    }
    if (p.n_threads == 0) p.n_threads = default_threads();
    se_context * ctx = calloc(1, sizeof *ctx);
    if (!ctx) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    ctx->model = m;
    ctx->params = p;
#ifdef SE_CUDA
    ctx->backend = m->device == SE_DEVICE_CUDA ? &se_backend_cuda : &se_backend_cpu;
#else
    ctx->backend = &se_backend_cpu;
#endif
    ctx->pool = se_pool_new(p.n_threads);
    r = ctx->pool ? SE_OK : se_error(SE_ERR_OUT_OF_MEMORY, "cannot start %d threads", p.n_threads);
    if (r == SE_OK) r = se_kv_init(&ctx->kv, &m->hp, &cfg);
    if (r == SE_OK) r = ctx->backend->init(ctx);
    if (r != SE_OK) {
        se_context_free(ctx);
        return r;
    }
    *out = ctx;
    return SE_OK;
}

void se_context_free(se_context * ctx) {
    if (!ctx) return;
    if (ctx->backend) ctx->backend->free(ctx);
    se_kv_free(&ctx->kv);
    se_pool_free(ctx->pool);
    free(ctx->embd.sum);
    free(ctx->embd.last);
    free(ctx);
}

// The one-caller rule: a call claims the context or fails with SE_ERR_BUSY, never waits.
static int enter(const se_context * ctx, const char * fn) {
    int32_t idle = 0;
    if (!__atomic_compare_exchange_n((int32_t *) &ctx->busy, &idle, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        return se_error(SE_ERR_BUSY, "%s: another thread is running a call on this context (one caller at a time)", fn);
    }
    return SE_OK;
}

static void leave(const se_context * ctx) { __atomic_store_n((int32_t *) &ctx->busy, 0, __ATOMIC_RELEASE); }

static bool all_finite(const float * x, int64_t n) {
    float acc = 0;  // NaN and inf survive a sum of x * 0; finite values give 0 (one branch, vectorizable)
    for (int64_t i = 0; i < n; i++) acc += x[i] * 0.0f;
    return acc == 0;
}

// Run the chunks of a decode. Errors found part-way are returned as they are; se_decode undoes them.
static int decode_chunks(se_context * ctx, const int32_t * tokens, int32_t n, float * logits, int32_t n_logits) {
    const se_model * m = ctx->model;
    const se_hparams * hp = &m->hp;
    se_kv_cache * kv = &ctx->kv;
    se_buffers * b = &ctx->buf;
    for (int32_t s = 0; s < n;) {
        if (se_cancelled(ctx)) return se_error(SE_ERR_CANCELLED, "cancelled (after %d of %d tokens)", s, n);
        // the cache decides how many tokens share a pass: bounded by free cells, cut at compressions
        const int32_t chunk = se_kv_next_chunk(kv, m->is_sep, tokens + s, n - s, ctx->params.n_batch, b->cells, b->positions);
        se_kv_sep_floors(kv, tokens + s, m->is_sep, chunk, b->sep_floor);
        // the wanted logits are those of tokens [n - n_logits, n); this chunk holds [s, s + chunk)
        const int32_t first = n - n_logits > s ? n - n_logits : s;
        const int32_t n_out = first < s + chunk ? s + chunk - first : 0;
        float * out = n_out ? logits + (int64_t) (first - (n - n_logits)) * hp->n_vocab : NULL;
        int r = ctx->backend->forward(ctx, tokens + s, chunk, out, n_out);
        if (r != SE_OK) return r;
        // non-finite numbers never reach the caller or a later token silently: the CPU backend's
        // hidden states of the whole chunk (what the cache was filled from), and the logits
        if (ctx->backend == &se_backend_cpu && b->x && !all_finite(b->x, (int64_t) chunk * hp->n_embd)) {
            return se_error(SE_ERR_NUMERICAL, "a hidden state is NaN or infinite (tokens %d..%d): the weights or the "
                            "inputs are out of range", s, s + chunk - 1);
        }
        if (n_out && !all_finite(out, (int64_t) n_out * hp->n_vocab)) {
            return se_error(SE_ERR_NUMERICAL, "a logit is NaN or infinite (tokens %d..%d): the weights or the inputs "
                            "are out of range", first, s + chunk - 1);
        }
        for (int32_t t = 0; t < chunk; t++) kv->sum_visible += b->visible[t];
        s += chunk;
    }
    se_kv_finish(kv);
    return SE_OK;
}

int se_decode(se_context * ctx, const int32_t * tokens, int32_t n, float * logits, int32_t n_logits) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_decode: context is NULL");
    if (n < 0 || (n > 0 && !tokens)) return se_error(SE_ERR_INVALID_ARGUMENT, "se_decode: bad token array");
    if (n_logits < 0 || n_logits > n || (n_logits > 0 && !logits)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_decode: n_logits must be in [0, %d] with a logits buffer", n);
    }
    const se_model * m = ctx->model;
    const se_hparams * hp = &m->hp;
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "token %d at index %d is outside the vocabulary (%d tokens)",
                            tokens[i], i, hp->n_vocab);
        }
    }
    int r = enter(ctx, "se_decode");
    if (r != SE_OK) return r;
    se_kv_cache * kv = &ctx->kv;
    if (kv->m.n_seen + n > INT32_MAX) {
        r = se_error(SE_ERR_CONTEXT_FULL, "position limit reached");
    } else if (se_cancelled(ctx)) {
        r = se_error(SE_ERR_CANCELLED, "cancelled (before the first token; se_context_uncancel clears the request); the cache is as it was");
    } else {
        r = se_kv_check_fits(kv, m->is_sep, tokens, n, ctx->params.n_batch);  // all or nothing
    }
    if (r == SE_OK) {
        const int64_t n_seen = kv->m.n_seen, sum_visible = kv->sum_visible;
        r = decode_chunks(ctx, tokens, n, logits, n_logits);
        if (r != SE_OK) {
            // part-way: undo the chunks that ran. Truncation restores the cache exactly when nothing
            // was evicted during the call (new tokens took free cells only); else start over empty.
            char why[512];
            snprintf(why, sizeof why, "%s", se_last_error());
            const bool restored = se_kv_truncate(kv, n_seen) == SE_OK;
            if (restored) {
                kv->sum_visible = sum_visible;
            } else {
                se_kv_clear(kv);
            }
            se_error(r, "%s; %s", why, restored ? "the cache is as it was" : "the cache was cleared");
        }
    }
    leave(ctx);
    return r;
}

int se_context_cancel(se_context * ctx) {
    if (!ctx) return SE_ERR_INVALID_ARGUMENT;  // no message: this may run in a signal handler
    __atomic_store_n(&ctx->cancel, 1, __ATOMIC_RELAXED);
    return SE_OK;
}

int se_context_uncancel(se_context * ctx) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_uncancel: context is NULL");
    __atomic_store_n(&ctx->cancel, 0, __ATOMIC_RELAXED);
    return SE_OK;
}

int32_t se_context_cancelled(const se_context * ctx) { return ctx && se_cancelled(ctx) ? 1 : 0; }

int se_cache_clear(se_context * ctx) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_clear: context is NULL");
    int r = enter(ctx, "se_cache_clear");
    if (r != SE_OK) return r;
    se_kv_clear(&ctx->kv);
    leave(ctx);
    return SE_OK;
}

int se_cache_truncate(se_context * ctx, int32_t n_keep) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_truncate: context is NULL");
    if (n_keep < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_truncate: n_keep must be >= 0, got %d", n_keep);
    int r = enter(ctx, "se_cache_truncate");
    if (r != SE_OK) return r;
    r = se_kv_truncate(&ctx->kv, n_keep);
    leave(ctx);
    return r;
}

int se_cache_keep(se_context * ctx, int32_t n_keep) {
    if (!ctx || n_keep < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_keep: bad arguments");
    int r = enter(ctx, "se_cache_keep");
    if (r != SE_OK) return r;
    r = se_kv_keep(&ctx->kv, n_keep);
    leave(ctx);
    return r;
}

int se_cache_get_info(const se_context * ctx, se_cache_info * out) {
    if (!ctx || !out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_get_info: NULL argument");
    int r = enter(ctx, "se_cache_get_info");
    if (r != SE_OK) return r;
    const se_kv_cache * kv = &ctx->kv;
    const se_kv_meta * m = &kv->m;
    *out = (se_cache_info) {
        .kv_mode = kv->cfg.mode, .n_cells = kv->cfg.n_cells - kv->cfg.n_spare, .n_spare = kv->cfg.n_spare, .n_init = m->n_init, .n_sep = kv->cfg.n_sep,
        .n_local = kv->cfg.n_local, .n_live = kv->n_live, .n_live_init = m->n_init_live, .n_live_sep = m->sep.len,
        .n_live_recent = m->recent.len, .n_seen = m->n_seen, .n_evicted = m->n_evicted, .sum_visible = kv->sum_visible,
        .kv_bytes = se_kv_bytes(kv, ctx->model->hp.n_layer),
    };
    leave(ctx);
    return SE_OK;
}

int se_cache_get_cells(const se_context * ctx, int32_t * tokens, int32_t * positions, int32_t * regions, int32_t n) {
    if (!ctx || n < ctx->kv.n_live || (ctx->kv.n_live > 0 && (!tokens || !positions || !regions))) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_get_cells: need room for %d cells", ctx ? ctx->kv.n_live : 0);
    }
    int r = enter(ctx, "se_cache_get_cells");
    if (r != SE_OK) return r;
    for (int32_t i = 0; i < ctx->kv.n_live; i++) {
        const se_kv_cell * c = &ctx->kv.m.cells[ctx->kv.live[i]];
        tokens[i] = c->token;
        positions[i] = c->pos;
        regions[i] = c->region;
    }
    leave(ctx);
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// embeddings: the final hidden states (after the output norm, as llama.cpp's embeddings), pooled

static int embeddings_enable_unlocked(se_context * ctx, int32_t enable) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_embeddings_enable: context is NULL");
    if (ctx->backend != &se_backend_cpu) return se_error(SE_ERR_UNSUPPORTED, "embeddings are not available on the %s backend", ctx->backend->name);
    se_embd * e = &ctx->embd;
    if (enable && !e->sum) {
        const int32_t d = ctx->model->hp.n_embd;
        e->sum = calloc((size_t) d, sizeof(double));
        e->last = calloc((size_t) d, sizeof(float));
        if (!e->sum || !e->last) {
            free(e->sum);
            free(e->last);
            e->sum = NULL;
            e->last = NULL;
            return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for embeddings");
        }
    }
    if (enable) {
        memset(e->sum, 0, (size_t) ctx->model->hp.n_embd * sizeof(double));
        e->n = 0;
    }
    e->on = enable != 0;
    return SE_OK;
}

void se_embd_collect(se_context * ctx, const float * x, int32_t n) {
    const se_model * m = ctx->model;
    const int64_t d = m->hp.n_embd;
    se_embd * e = &ctx->embd;
    for (int32_t t = 0; t < n; t++, x += d) {
        double ss = 0;  // rmsnorm with the output norm's weights, in double as the forward pass's
        for (int64_t i = 0; i < d; i++) ss += (double) x[i] * x[i];
        const float scale = (float) (1.0 / sqrt(ss / (double) d + m->hp.rms_eps));
        for (int64_t i = 0; i < d; i++) {
            e->last[i] = x[i] * scale * m->output_norm[i];
            e->sum[i] += e->last[i];
        }
    }
    e->n += n;
}

static int embeddings_get_unlocked(const se_context * ctx, int32_t pooling, float * out, int32_t n_embd) {
    if (!ctx || !out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_embeddings_get: NULL argument");
    if (n_embd != ctx->model->hp.n_embd) return se_error(SE_ERR_INVALID_ARGUMENT, "se_embeddings_get: the model has %d dimensions, not %d", ctx->model->hp.n_embd, n_embd);
    if (pooling != SE_POOLING_MEAN && pooling != SE_POOLING_LAST) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown pooling %d", pooling);
    const se_embd * e = &ctx->embd;
    if (!e->sum || e->n == 0) return se_error(SE_ERR_INVALID_ARGUMENT, "no tokens were processed with embeddings enabled");
    for (int32_t i = 0; i < n_embd; i++) out[i] = pooling == SE_POOLING_MEAN ? (float) (e->sum[i] / (double) e->n) : e->last[i];
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// cache state: [header | live cells in cache order | K rows of the live cells per layer | V rows]
// Everything is int64 so the layout has no padding; the cells are renumbered 0..n_live-1 on load.

#define SE_STATE_MAGIC 0x54534553  // "SEST"
#define SE_STATE_VERSION 1

typedef struct se_state_header {
    int64_t magic, version;
    int64_t n_layer, row, kv_type, mode, n_cells, n_init_cfg, n_sep_cfg, n_local_cfg;  // must match the context
    int64_t n_seen, n_evicted, n_sep_seen, n_sep_left, rewind_floor, n_init, sum_visible;
    int64_t n_live_init, n_live_sep, n_live_recent;
} se_state_header;

typedef struct se_state_cell {
    int64_t token, pos, delta, region, sep_seq;
} se_state_cell;

static int state_backend(const se_context * ctx, const char * fn) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "%s: context is NULL", fn);
    if (ctx->backend != &se_backend_cpu) return se_error(SE_ERR_UNSUPPORTED, "cache state is not available on the %s backend", ctx->backend->name);
    return SE_OK;
}

static uint64_t state_bytes(const se_context * ctx, int64_t n_live) {
    const uint64_t esize = ctx->kv.kv_type == SE_KV_F16 ? 2 : 4;
    return sizeof(se_state_header) + (uint64_t) n_live * sizeof(se_state_cell) +
           2 * (uint64_t) ctx->model->hp.n_layer * (uint64_t) n_live * (uint64_t) ctx->kv.row * esize;
}

static int state_size_unlocked(const se_context * ctx, uint64_t * size) {
    int r = state_backend(ctx, "se_state_size");
    if (r != SE_OK) return r;
    if (!size) return se_error(SE_ERR_INVALID_ARGUMENT, "se_state_size: size is NULL");
    *size = state_bytes(ctx, ctx->kv.n_live);
    return SE_OK;
}

static int state_save_unlocked(const se_context * ctx, void * buf, uint64_t size) {
    int r = state_backend(ctx, "se_state_save");
    if (r != SE_OK) return r;
    const se_kv_cache * kv = &ctx->kv;
    const se_kv_meta * m = &kv->m;
    if (!buf || size != state_bytes(ctx, kv->n_live)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_state_save: the buffer must be se_state_size() bytes");
    }
    const int32_t n_layer = ctx->model->hp.n_layer;
    se_state_header h = {
        .magic = SE_STATE_MAGIC, .version = SE_STATE_VERSION, .n_layer = n_layer, .row = kv->row, .kv_type = kv->kv_type,
        .mode = kv->cfg.mode, .n_cells = kv->cfg.n_cells, .n_init_cfg = kv->cfg.n_init, .n_sep_cfg = kv->cfg.n_sep,
        .n_local_cfg = kv->cfg.n_local, .n_seen = m->n_seen, .n_evicted = m->n_evicted, .n_sep_seen = m->n_sep_seen,
        .n_sep_left = m->n_sep_left, .rewind_floor = m->rewind_floor, .n_init = m->n_init, .sum_visible = kv->sum_visible,
        .n_live_init = m->n_init_live, .n_live_sep = m->sep.len, .n_live_recent = m->recent.len,
    };
    char * p = buf;
    memcpy(p, &h, sizeof h);
    p += sizeof h;
    for (int32_t i = 0; i < kv->n_live; i++, p += sizeof(se_state_cell)) {
        const se_kv_cell * c = &m->cells[kv->live[i]];
        const se_state_cell s = {c->token, c->pos, c->delta, c->region, c->sep_seq};
        memcpy(p, &s, sizeof s);
    }
    const size_t row_bytes = (size_t) kv->row * (kv->kv_type == SE_KV_F16 ? 2 : 4);
    for (int kind = 0; kind < 2; kind++) {
        for (int32_t l = 0; l < n_layer; l++) {
            for (int32_t i = 0; i < kv->n_live; i++, p += row_bytes) {
                memcpy(p, kind == 0 ? se_kv_k(kv, l, kv->live[i]) : se_kv_v(kv, l, kv->live[i]), row_bytes);
            }
        }
    }
    return SE_OK;
}

// Whether a saved state fits this context and is consistent; nothing is changed.
static int state_check(const se_context * ctx, const se_state_header * h, const char * cells, uint64_t size) {
    const se_kv_cache * kv = &ctx->kv;
    if (h->magic != SE_STATE_MAGIC || h->version != SE_STATE_VERSION) return se_error(SE_ERR_INVALID_ARGUMENT, "not a sepedge cache state (or another version)");
    if (h->n_layer != ctx->model->hp.n_layer || h->row != kv->row || h->kv_type != kv->kv_type || h->mode != kv->cfg.mode ||
        h->n_cells != kv->cfg.n_cells || h->n_init_cfg != kv->cfg.n_init || h->n_sep_cfg != kv->cfg.n_sep || h->n_local_cfg != kv->cfg.n_local) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "the state was saved from another model or cache configuration");
    }
    const int64_t sep_cap = kv->cfg.n_sep > 0 ? kv->cfg.n_sep : kv->cfg.n_cells;
    if (h->n_live_init < 0 || h->n_live_sep < 0 || h->n_live_recent < 0 || h->n_live_sep > sep_cap ||
        h->n_live_init + h->n_live_sep + h->n_live_recent > kv->cfg.n_cells) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: bad cell counts");
    }
    const int64_t n_live = h->n_live_init + h->n_live_sep + h->n_live_recent;
    if (size != state_bytes(ctx, n_live)) return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: %llu bytes, expected %llu", (unsigned long long) size, (unsigned long long) state_bytes(ctx, n_live));
    if (h->n_seen < n_live || h->n_seen > INT32_MAX || h->n_evicted < 0 || h->n_sep_seen < 0 || h->n_sep_left < 0 ||
        h->n_sep_left > h->n_sep_seen || h->rewind_floor < 0 || h->rewind_floor > h->n_seen || h->sum_visible < 0 ||
        h->n_init < kv->cfg.n_init || h->n_init > kv->cfg.n_cells || h->n_live_init > h->n_init) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: bad counters");
    }
    if (kv->cfg.mode != SE_KV_MODE_FULL &&
        se_kv_capacity_check(kv->cfg.mode, kv->cfg.n_cells - kv->cfg.n_spare, (int32_t) h->n_init, kv->cfg.n_sep, kv->cfg.n_local) != SE_OK) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: initial region of %lld does not fit", (long long) h->n_init);
    }
    for (int64_t i = 0; i < n_live; i++) {
        se_state_cell c;
        memcpy(&c, cells + i * (int64_t) sizeof c, sizeof c);
        const int64_t region = i < h->n_live_init ? SE_REGION_INIT : i < h->n_live_init + h->n_live_sep ? SE_REGION_SEP : SE_REGION_RECENT;
        if (c.region != region || c.token < 0 || c.token >= ctx->model->hp.n_vocab || c.pos < 0 || c.pos >= h->n_seen ||
            c.delta < INT32_MIN || c.delta > INT32_MAX || c.sep_seq < -1 || c.sep_seq >= h->n_sep_seen ||
            (region == SE_REGION_SEP && c.sep_seq < 0)) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: cell %lld is inconsistent", (long long) i);
        }
    }
    return SE_OK;
}

static int state_load_unlocked(se_context * ctx, const void * buf, uint64_t size) {
    int r = state_backend(ctx, "se_state_load");
    if (r != SE_OK) return r;
    if (!buf || size < sizeof(se_state_header)) return se_error(SE_ERR_INVALID_ARGUMENT, "cache state: %llu bytes is too short", (unsigned long long) size);
    se_state_header h;
    memcpy(&h, buf, sizeof h);
    const char * cells = (const char *) buf + sizeof h;
    r = state_check(ctx, &h, cells, size);
    if (r != SE_OK) return r;
    se_kv_cache * kv = &ctx->kv;
    se_kv_meta * m = &kv->m;
    se_kv_clear(kv);
    const int32_t n_live = (int32_t) (h.n_live_init + h.n_live_sep + h.n_live_recent);
    for (int32_t i = 0; i < n_live; i++) {  // cell i holds the i-th live token
        se_state_cell c;
        memcpy(&c, cells + (int64_t) i * (int64_t) sizeof c, sizeof c);
        m->cells[i] = (se_kv_cell) {.token = (int32_t) c.token, .pos = (int32_t) c.pos, .delta = (int32_t) c.delta,
                                    .region = (int32_t) c.region, .sep_seq = c.sep_seq};
        if (c.region == SE_REGION_INIT) m->init[m->n_init_live++] = i;
        else if (c.region == SE_REGION_SEP) m->sep.buf[m->sep.len++] = i;
        else m->recent.buf[m->recent.len++] = i;
        kv->live[i] = i;
    }
    m->n_free = kv->cfg.n_cells - n_live;  // popped from the end: lowest free cell first
    for (int32_t i = 0; i < m->n_free; i++) m->free[i] = kv->cfg.n_cells - 1 - i;
    kv->n_live = n_live;
    m->n_seen = h.n_seen;
    m->n_evicted = h.n_evicted;
    m->n_sep_seen = h.n_sep_seen;
    m->n_sep_left = h.n_sep_left;
    m->rewind_floor = h.rewind_floor;
    m->n_init = (int32_t) h.n_init;
    kv->sum_visible = h.sum_visible;
    const size_t row_bytes = (size_t) kv->row * (kv->kv_type == SE_KV_F16 ? 2 : 4);
    const char * p = cells + (int64_t) n_live * (int64_t) sizeof(se_state_cell);
    for (int kind = 0; kind < 2; kind++) {
        for (int32_t l = 0; l < ctx->model->hp.n_layer; l++) {
            for (int32_t i = 0; i < n_live; i++, p += row_bytes) memcpy(kind == 0 ? se_kv_k(kv, l, i) : se_kv_v(kv, l, i), p, row_bytes);
        }
    }
    return SE_OK;
}

#ifndef SE_CUDA
int se_cuda_device_count(int32_t * count) {
    if (count) *count = 0;
    return se_error(SE_ERR_BACKEND, "this build of sepedge has no CUDA backend");
}

int se_cuda_mul_mat(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n, float * out,
                    int32_t path) {
    return se_error(SE_ERR_BACKEND, "this build of sepedge has no CUDA backend");
}

int se_cuda_dequantize_f16(int32_t type, const void * w, int64_t rows, int64_t cols, uint16_t * out) {
    return se_error(SE_ERR_BACKEND, "this build of sepedge has no CUDA backend");
}

int se_cuda_cublas_load(void) { return se_error(SE_ERR_BACKEND, "this build of sepedge has no CUDA backend"); }
#endif

// The calls above under the one-caller rule.

int se_embeddings_enable(se_context * ctx, int32_t enable) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_embeddings_enable: context is NULL");
    int r = enter(ctx, "se_embeddings_enable");
    if (r != SE_OK) return r;
    r = embeddings_enable_unlocked(ctx, enable);
    leave(ctx);
    return r;
}

int se_embeddings_get(const se_context * ctx, int32_t pooling, float * out, int32_t n_embd) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_embeddings_get: context is NULL");
    int r = enter(ctx, "se_embeddings_get");
    if (r != SE_OK) return r;
    r = embeddings_get_unlocked(ctx, pooling, out, n_embd);
    leave(ctx);
    return r;
}

int se_state_size(const se_context * ctx, uint64_t * size) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_state_size: context is NULL");
    int r = enter(ctx, "se_state_size");
    if (r != SE_OK) return r;
    r = state_size_unlocked(ctx, size);
    leave(ctx);
    return r;
}

int se_state_save(const se_context * ctx, void * buf, uint64_t size) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_state_save: context is NULL");
    int r = enter(ctx, "se_state_save");
    if (r != SE_OK) return r;
    r = state_save_unlocked(ctx, buf, size);
    leave(ctx);
    return r;
}

int se_state_load(se_context * ctx, const void * buf, uint64_t size) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_state_load: context is NULL");
    int r = enter(ctx, "se_state_load");
    if (r != SE_OK) return r;
    r = state_load_unlocked(ctx, buf, size);
    leave(ctx);
    return r;
}
