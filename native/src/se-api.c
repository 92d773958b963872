// The public API: argument checks, model and context lifetimes, decode.
#include "se-impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SE_VERSION "0.1.0"

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
    if (p.device != SE_DEVICE_CPU && p.device != SE_DEVICE_CUDA) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown device %d", p.device);
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
    memcpy(ids, m->separators, (size_t) m->n_separators * sizeof(int32_t));
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
    if (p->kv_mode < SE_KV_MODE_FULL || p->kv_mode > SE_KV_MODE_SEPLLM_STREAM) {
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
    if (cfg->n_cells < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "the KV cache needs at least one cell");
    return se_kv_capacity_check(cfg->mode, cfg->n_cells, cfg->n_init, cfg->n_sep, cfg->n_local);
}

int se_context_new(se_model * m, const se_context_params * params, se_context ** out) {
    if (!out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_new: out is NULL");
    *out = NULL;
    if (!m) return se_error(SE_ERR_INVALID_ARGUMENT, "se_context_new: model is NULL");
    se_context_params p = params ? *params : se_context_default_params();
    if (p.n_ctx < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0, got %d", p.n_ctx);
    if (p.n_batch < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "n_batch must be >= 1, got %d", p.n_batch);
    if (p.n_threads < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "n_threads must be >= 0, got %d", p.n_threads);
    if (p.kv_type != SE_KV_F32 && p.kv_type != SE_KV_F16) return se_error(SE_ERR_INVALID_ARGUMENT, "unknown kv_type %d", p.kv_type);
    if (p.n_ctx == 0) p.n_ctx = m->hp.n_ctx_train;
    se_kv_config cfg;
    int r = kv_config(m, &p, &cfg);
    if (r != SE_OK) return r;
    if (p.n_batch > cfg.n_cells) p.n_batch = cfg.n_cells;
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
    free(ctx);
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
    se_kv_cache * kv = &ctx->kv;
    if (kv->m.n_seen + n > INT32_MAX) return se_error(SE_ERR_CONTEXT_FULL, "position limit reached");
    int r = se_kv_check_fits(kv, m->is_sep, tokens, n, ctx->params.n_batch);  // all or nothing
    if (r != SE_OK) return r;
    se_buffers * b = &ctx->buf;
    for (int32_t s = 0; s < n;) {
        // the cache decides how many tokens share a pass: bounded by free cells, cut at compressions
        const int32_t chunk = se_kv_next_chunk(kv, m->is_sep, tokens + s, n - s, ctx->params.n_batch, b->cells, b->positions);
        se_kv_sep_floors(kv, tokens + s, m->is_sep, chunk, b->sep_floor);
        // the wanted logits are those of tokens [n - n_logits, n); this chunk holds [s, s + chunk)
        const int32_t first = n - n_logits > s ? n - n_logits : s;
        const int32_t n_out = first < s + chunk ? s + chunk - first : 0;
        r = ctx->backend->forward(ctx, tokens + s, chunk, n_out ? logits + (int64_t) (first - (n - n_logits)) * hp->n_vocab : NULL,
                                  n_out);
        if (r != SE_OK) return r;
        for (int32_t t = 0; t < chunk; t++) kv->sum_visible += b->visible[t];
        s += chunk;
    }
    se_kv_finish(kv);
    return SE_OK;
}

int se_cache_clear(se_context * ctx) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_clear: context is NULL");
    se_kv_clear(&ctx->kv);
    return SE_OK;
}

int se_cache_truncate(se_context * ctx, int32_t n_keep) {
    if (!ctx) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_truncate: context is NULL");
    return se_kv_truncate(&ctx->kv, n_keep);
}

int se_cache_keep(se_context * ctx, int32_t n_keep) {
    if (!ctx || n_keep < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_keep: bad arguments");
    return se_kv_keep(&ctx->kv, n_keep);
}

int se_cache_get_info(const se_context * ctx, se_cache_info * out) {
    if (!ctx || !out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_get_info: NULL argument");
    const se_kv_cache * kv = &ctx->kv;
    const se_kv_meta * m = &kv->m;
    *out = (se_cache_info) {
        .kv_mode = kv->cfg.mode, .n_cells = kv->cfg.n_cells, .n_init = m->n_init, .n_sep = kv->cfg.n_sep,
        .n_local = kv->cfg.n_local, .n_live = kv->n_live, .n_live_init = m->n_init_live, .n_live_sep = m->sep.len,
        .n_live_recent = m->recent.len, .n_seen = m->n_seen, .n_evicted = m->n_evicted, .sum_visible = kv->sum_visible,
        .kv_bytes = se_kv_bytes(kv, ctx->model->hp.n_layer),
    };
    return SE_OK;
}

int se_cache_get_cells(const se_context * ctx, int32_t * tokens, int32_t * positions, int32_t * regions, int32_t n) {
    if (!ctx || n < ctx->kv.n_live || (ctx->kv.n_live > 0 && (!tokens || !positions || !regions))) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_get_cells: need room for %d cells", ctx ? ctx->kv.n_live : 0);
    }
    for (int32_t i = 0; i < ctx->kv.n_live; i++) {
        const se_kv_cell * c = &ctx->kv.m.cells[ctx->kv.live[i]];
        tokens[i] = c->token;
        positions[i] = c->pos;
        regions[i] = c->region;
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
#endif
