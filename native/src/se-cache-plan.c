// The cache policy on its own: se-kv-cache.c's bookkeeping without K/V storage, driven one forward
// pass at a time exactly as se_decode drives a context's cache (check that all tokens fit, claim a
// chunk, the separator floors of its queries, and after the last chunk evict what the next token
// will not see). A backend that keeps K and V itself follows the plan each step returns; the
// contexts run the same functions, so there is one policy and any backend gets every mode.
#include "se-impl.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct se_cache_policy {
    se_kv_cache kv;           // cells, regions, rings; k, v and row stay empty
    int32_t n_batch;          // most tokens per step
    int32_t n_vocab;          // token ids accepted: [0, n_vocab)
    uint8_t * is_sep;         // (n_vocab) 1 for separator tokens
    int64_t * sep_floor;      // (n_batch) per query of the step: the lowest separator sep_seq it sees
    se_kv_log log;            // what the last step did
};

se_cache_policy_params se_cache_policy_default_params(void) {
    return (se_cache_policy_params) {.kv_mode = SE_KV_MODE_FULL, .n_init = -1, .n_sep = -1, .n_local = -1, .n_cache = -1,
                                     .n_ctx = 0, .n_batch = 512, .n_vocab = 0};
}

// Mode, sizes (the model's defaults where -1), capacity, vocabulary, as se_context_new resolves them.
static int policy_config(const se_model * m, const se_cache_policy_params * p, se_kv_config * cfg, int32_t * n_vocab) {
    if (p->kv_mode < SE_KV_MODE_FULL || p->kv_mode > SE_KV_MODE_SEPLLM_RUNS) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "unknown kv_mode %d", p->kv_mode);
    }
    static const char * names[4] = {"n_init", "n_sep", "n_local", "n_cache"};
    const int32_t given[4] = {p->n_init, p->n_sep, p->n_local, p->n_cache};
    int32_t v[4];
    for (int k = 0; k < 4; k++) {
        if (given[k] < -1) return se_error(SE_ERR_INVALID_ARGUMENT, "%s must be >= 0 (or -1 for the model's default), got %d", names[k], given[k]);
        if (given[k] == -1 && !m) return se_error(SE_ERR_INVALID_ARGUMENT, "%s = -1 takes the model's default: give a model or a size", names[k]);
        v[k] = given[k] == -1 ? m->sepllm[k] : given[k];
    }
    if (p->n_ctx < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "n_ctx must be >= 0, got %d", p->n_ctx);
    if (p->n_batch < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "n_batch must be >= 1, got %d", p->n_batch);
    if (p->n_vocab < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "n_vocab must be >= 0, got %d", p->n_vocab);
    if (p->n_vocab == 0 && !m) return se_error(SE_ERR_INVALID_ARGUMENT, "n_vocab = 0 takes the model's vocabulary: give a model or n_vocab");
    if (m && p->n_vocab != 0 && p->n_vocab != m->hp.n_vocab) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "n_vocab %d differs from the model's %d", p->n_vocab, m->hp.n_vocab);
    }
    *n_vocab = p->n_vocab ? p->n_vocab : m->hp.n_vocab;
    int32_t n_ctx = p->n_ctx;
    if (p->kv_mode == SE_KV_MODE_FULL && n_ctx == 0) {
        if (!m) return se_error(SE_ERR_INVALID_ARGUMENT, "full mode: n_ctx = 0 takes the model's context: give a model or n_ctx");
        n_ctx = m->hp.n_ctx_train;
    }
    *cfg = (se_kv_config) {.mode = p->kv_mode, .n_cells = p->kv_mode == SE_KV_MODE_FULL ? n_ctx : v[3],
                           .n_init = v[0], .n_sep = v[1], .n_local = v[2], .kv_type = SE_KV_F32};
    if (cfg->n_cells < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "the KV cache needs at least one cell");
    return se_kv_capacity_check(cfg->mode, cfg->n_cells, cfg->n_init, cfg->n_sep, cfg->n_local);
}

int se_cache_policy_new(const se_model * m, const se_cache_policy_params * params, const int32_t * separators,
                        int32_t n_separators, se_cache_policy ** out) {
    if (!out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_new: out is NULL");
    *out = NULL;
    const se_cache_policy_params p = params ? *params : se_cache_policy_default_params();
    se_kv_config cfg;
    int32_t n_vocab = 0;
    int r = policy_config(m, &p, &cfg, &n_vocab);
    if (r != SE_OK) return r;
    if (n_separators == -1) {
        if (!m) return se_error(SE_ERR_INVALID_ARGUMENT, "n_separators = -1 takes the model's separators: give a model or the ids");
        separators = m->separators;
        n_separators = m->n_separators;
    } else if (n_separators < 0 || (n_separators > 0 && !separators)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_new: bad separator array (%d ids)", n_separators);
    }
    for (int32_t i = 0; i < n_separators; i++) {
        if (separators[i] < 0 || separators[i] >= n_vocab) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "separator id %d is outside the vocabulary (%d tokens)", separators[i], n_vocab);
        }
    }
    se_cache_policy * pol = calloc(1, sizeof *pol);
    if (!pol) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    const int32_t n_batch = p.n_batch < cfg.n_cells ? p.n_batch : cfg.n_cells;  // as se_context_new
    if (p.slide_in_pass) {  // as se_context_new on the CPU backend
        cfg.n_spare = se_kv_spare(cfg.mode, n_batch);
        cfg.n_cells += cfg.n_spare;
    }
    pol->n_batch = n_batch;
    pol->n_vocab = n_vocab;
    pol->is_sep = calloc((size_t) n_vocab, 1);
    pol->sep_floor = calloc((size_t) n_batch, sizeof(int64_t));
    // a step gives up at most the cells live before it and the tokens it admits
    if (cfg.n_cells > INT32_MAX / 2) {
        free(pol);
        return se_error(SE_ERR_INVALID_ARGUMENT, "%d cells are more than a policy can log", cfg.n_cells);
    }
    pol->log.cap = 2 * cfg.n_cells;
    pol->log.evicted = calloc((size_t) pol->log.cap, sizeof(se_kv_evicted));
    const se_hparams no_storage = {0};  // row 0: the policy holds no keys or values
    r = pol->is_sep && pol->sep_floor && pol->log.evicted ? se_kv_init(&pol->kv, &no_storage, &cfg)
                                                          : se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for a cache policy");
    if (r != SE_OK) {
        se_cache_policy_free(pol);
        return r;
    }
    for (int32_t i = 0; i < n_separators; i++) pol->is_sep[separators[i]] = 1;
    *out = pol;
    return SE_OK;
}

void se_cache_policy_free(se_cache_policy * pol) {
    if (!pol) return;
    se_kv_free(&pol->kv);
    free(pol->is_sep);
    free(pol->sep_floor);
    free(pol->log.evicted);
    free(pol);
}

static int check_plan(const se_cache_policy * pol, const int32_t * tokens, int32_t n, const se_cache_plan * plan) {
    if (!pol || !plan) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_step: NULL argument");
    if (n < 1 || !tokens) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_step: need at least one token, got %d", n);
    const int32_t n_cells = pol->kv.cfg.n_cells, most = n < pol->n_batch ? n : pol->n_batch;
    if (!plan->cells || !plan->positions || plan->max_tokens < most) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_step: cells and positions need room for %d tokens (max_tokens %d)",
                        most, plan->max_tokens);
    }
    if (!plan->live_cells || !plan->live_positions || !plan->live_deltas || !plan->live_regions || plan->max_live < n_cells ||
        (pol->kv.cfg.n_spare > 0 && !plan->live_steps)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_step: the live arrays need room for %d cells (max_live %d)%s",
                        n_cells, plan->max_live, pol->kv.cfg.n_spare > 0 ? ", live_steps included (slide_in_pass)" : "");
    }
    if (plan->mask && plan->mask_size < (int64_t) most * n_cells) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_step: the mask needs %lld bytes (mask_size %lld)",
                        (long long) most * n_cells, (long long) plan->mask_size);
    }
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= pol->n_vocab) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "token %d at index %d is outside the vocabulary (%d tokens)", tokens[i], i,
                            pol->n_vocab);
        }
    }
    if (pol->kv.m.n_seen + n > INT32_MAX) return se_error(SE_ERR_CONTEXT_FULL, "position limit reached");
    return SE_OK;
}

int se_cache_policy_step(se_cache_policy * pol, const int32_t * tokens, int32_t n, se_cache_plan * plan) {
    int r = check_plan(pol, tokens, n, plan);
    if (r != SE_OK) return r;
    se_kv_cache * kv = &pol->kv;
    r = se_kv_check_fits(kv, pol->is_sep, tokens, n, pol->n_batch);  // all or nothing, as se_decode
    if (r != SE_OK) return r;
    pol->log.n_evicted = pol->log.n_compressions = 0;
    kv->log = &pol->log;
    const int32_t t_n = se_kv_next_chunk(kv, pol->is_sep, tokens, n, pol->n_batch, plan->cells, plan->positions);
    se_kv_sep_floors(kv, tokens, pol->is_sep, t_n, pol->sep_floor);
    const int32_t n_live = kv->n_live;
    int64_t n_visible = 0;
    for (int32_t i = 0; i < n_live; i++) {
        const se_kv_cell * c = &kv->m.cells[kv->live[i]];
        plan->live_cells[i] = kv->live[i];
        plan->live_positions[i] = c->pos;
        plan->live_deltas[i] = c->delta;
        plan->live_regions[i] = c->region;
        if (plan->live_steps) plan->live_steps[i] = se_kv_step(kv, c);
    }
    // which cells each query sees: se_kv_visible, the test both CPU and CUDA backends apply
    for (int32_t t = 0; t < t_n; t++) {
        for (int32_t i = 0; i < n_live; i++) {
            const bool v = se_kv_visible(kv, &kv->m.cells[kv->live[i]], plan->positions[t], pol->sep_floor[t]);
            if (plan->mask) plan->mask[(int64_t) t * n_live + i] = v;
            n_visible += v;
        }
    }
    kv->sum_visible += n_visible;
    if (t_n == n) se_kv_finish(kv);  // the pass ends the tokens given: as se_decode after its last chunk
    kv->log = NULL;
    plan->n_tokens = t_n;
    plan->n_live = n_live;
    plan->n_evicted = pol->log.n_evicted;
    plan->n_compressions = pol->log.n_compressions;
    plan->n_visible = n_visible;
    return SE_OK;
}

int se_cache_policy_get_evicted(const se_cache_policy * pol, int32_t * cells, int32_t * tokens, int32_t * positions,
                                int32_t * regions, int32_t n) {
    if (!pol || n < pol->log.n_evicted) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_get_evicted: need room for %d cells", pol ? pol->log.n_evicted : 0);
    }
    for (int32_t i = 0; i < pol->log.n_evicted; i++) {
        const se_kv_evicted * e = &pol->log.evicted[i];
        if (cells) cells[i] = e->cell;
        if (tokens) tokens[i] = e->token;
        if (positions) positions[i] = e->pos;
        if (regions) regions[i] = e->region;
    }
    return SE_OK;
}

int se_cache_policy_get_info(const se_cache_policy * pol, se_cache_info * out) {
    if (!pol || !out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_get_info: NULL argument");
    const se_kv_cache * kv = &pol->kv;
    const se_kv_meta * m = &kv->m;
    *out = (se_cache_info) {
        .kv_mode = kv->cfg.mode, .n_cells = kv->cfg.n_cells - kv->cfg.n_spare, .n_spare = kv->cfg.n_spare,
        .n_init = m->n_init, .n_sep = kv->cfg.n_sep,
        .n_local = kv->cfg.n_local, .n_live = kv->n_live, .n_live_init = m->n_init_live, .n_live_sep = m->sep.len,
        .n_live_recent = m->recent.len, .n_seen = m->n_seen, .n_evicted = m->n_evicted, .sum_visible = kv->sum_visible,
        .kv_bytes = 0,
    };
    return SE_OK;
}

int se_cache_policy_get_cells(const se_cache_policy * pol, int32_t * tokens, int32_t * positions, int32_t * regions, int32_t n) {
    if (!pol || n < pol->kv.n_live || (pol->kv.n_live > 0 && (!tokens || !positions || !regions))) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_get_cells: need room for %d cells", pol ? pol->kv.n_live : 0);
    }
    for (int32_t i = 0; i < pol->kv.n_live; i++) {
        const se_kv_cell * c = &pol->kv.m.cells[pol->kv.live[i]];
        tokens[i] = c->token;
        positions[i] = c->pos;
        regions[i] = c->region;
    }
    return SE_OK;
}

int se_cache_policy_clear(se_cache_policy * pol) {
    if (!pol) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_clear: policy is NULL");
    se_kv_clear(&pol->kv);
    pol->log.n_evicted = pol->log.n_compressions = 0;
    return SE_OK;
}

int se_cache_policy_truncate(se_cache_policy * pol, int32_t n_keep) {
    if (!pol) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_truncate: policy is NULL");
    const int r = se_kv_truncate(&pol->kv, n_keep);
    if (r == SE_OK) pol->log.n_evicted = pol->log.n_compressions = 0;  // the last step's cells may be live again
    return r;
}

int se_cache_policy_keep(se_cache_policy * pol, int32_t n_keep) {
    if (!pol || n_keep < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cache_policy_keep: bad arguments");
    return se_kv_keep(&pol->kv, n_keep);
}
