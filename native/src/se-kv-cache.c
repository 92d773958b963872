// The KV cache: a fixed number of cells, allocated once when the context is created and reused in
// place. Each cell holds one token's key (rotated with the token's original position) and value for
// every layer, plus the token id, that position, a region and an extra rotation (`delta`) applied
// when the key is read. Which tokens stay is decided from token ids alone (SEPLLM.md):
//
//   full            every token; the cache filling up is an error
//   sepllm          training-free SepLLM: a token stays while it is initial, a separator (the newest
//                   n_sep of those that left the window; 0 = all), or among the last n_local tokens
//                   (the window includes the current one). Original positions, no re-rotation.
//   streamingllm    initial tokens + the last n_local tokens, positions within the cache
//   sepllm-stream   [initial | separators | past window | local window]; when a token arrives at a
//                   full cache, the past window keeps only its separators, the separator region its
//                   newest n_sep, and positions become positions within the cache.
//   sepllm-slide    [initial | separators | window]: the window slides every token as streamingllm's;
//                   a separator leaving it joins the separator region (FIFO, newest n_sep kept),
//                   positions within the cache. Every cell is in use once the stream is long.
//   sepllm-runs     sepllm-slide keeping only the last separator of a run of consecutive ones.
//
// Positions within the cache are realized without touching stored keys: attention depends only on
// query position minus key position, so recent tokens keep their original positions (the query too)
// and only initial and separator cells get a `delta` that places them where their cache slot says.
// Stored keys are never rewritten, so nothing is rotated twice and nothing drifts.
//
// Passes that slide the window (n_spare > 0: streamingllm, sepllm-slide, sepllm-runs). Once the
// window is full it slides every token, which would make every pass one token long. But the same
// argument holds across a pass: a window cell keeps its original position, so query p sees it at
// its true distance and only needs the mask pos > p - n_local; an initial or separator cell sits a
// fixed number of slots before the query as long as the regions do not change, so its delta grows
// by one per query (se_kv_step). The keys the later queries of a pass no longer see stay in their
// cells until the pass ends, as the earlier queries still need them: a pass of T tokens uses T - 1
// cells beyond the budget, the n_spare cells allocated for it. A separator joining the separator
// region changes its slots, so in the SepLLM variants a pass ends before one does.
//
// This is the one implementation of the policy: contexts (CPU and CUDA backends, through se_decode)
// and the public se_cache_policy (se-cache-plan.c: plans for backends that keep K/V themselves)
// both run it.
#include "se-impl.h"

#include <stdlib.h>
#include <string.h>

static size_t elem_size(int32_t kv_type) { return kv_type == SE_KV_F16 ? 2 : 4; }

// --- rings of cell indices, oldest first

static int32_t ring_at(const se_ring * r, int32_t i) { return r->buf[(r->head + i) % r->cap]; }

static void ring_push(se_ring * r, int32_t cell) {
    r->buf[(r->head + r->len) % r->cap] = cell;
    r->len++;
}

static int32_t ring_pop_front(se_ring * r) {
    int32_t cell = r->buf[r->head];
    r->head = (r->head + 1) % r->cap;
    r->len--;
    return cell;
}

static int32_t ring_pop_back(se_ring * r) { return r->buf[(r->head + --r->len) % r->cap]; }

// --- state

static int meta_alloc(se_kv_meta * m, int32_t n_cells, int32_t sep_cap) {
    memset(m, 0, sizeof *m);
    m->cells = calloc((size_t) n_cells, sizeof(se_kv_cell));
    m->init = calloc((size_t) n_cells, sizeof(int32_t));
    m->sep.buf = calloc((size_t) sep_cap, sizeof(int32_t));
    m->recent.buf = calloc((size_t) n_cells, sizeof(int32_t));
    m->free = calloc((size_t) n_cells, sizeof(int32_t));
    m->sep.cap = sep_cap;
    m->recent.cap = n_cells;
    return m->cells && m->init && m->sep.buf && m->recent.buf && m->free ? SE_OK : SE_ERR_OUT_OF_MEMORY;
}

static void meta_free(se_kv_meta * m) {
    free(m->cells);
    free(m->init);
    free(m->sep.buf);
    free(m->recent.buf);
    free(m->free);
    memset(m, 0, sizeof *m);
}

static void meta_copy(se_kv_meta * dst, const se_kv_meta * src, int32_t n_cells) {
    se_kv_meta keep = *dst;  // the destination's buffers
    *dst = *src;
    dst->cells = keep.cells;
    dst->init = keep.init;
    dst->sep.buf = keep.sep.buf;
    dst->recent.buf = keep.recent.buf;
    dst->free = keep.free;
    memcpy(dst->cells, src->cells, (size_t) n_cells * sizeof(se_kv_cell));
    memcpy(dst->init, src->init, (size_t) src->n_init_live * sizeof(int32_t));
    memcpy(dst->sep.buf, src->sep.buf, (size_t) src->sep.cap * sizeof(int32_t));
    memcpy(dst->recent.buf, src->recent.buf, (size_t) n_cells * sizeof(int32_t));
    memcpy(dst->free, src->free, (size_t) src->n_free * sizeof(int32_t));
}

static void meta_reset(se_kv_meta * m, int32_t n_cells, int32_t n_init) {
    m->n_init_live = 0;
    m->sep.head = m->sep.len = 0;
    m->recent.head = m->recent.len = 0;
    m->n_free = n_cells;
    for (int32_t i = 0; i < n_cells; i++) {
        m->free[i] = n_cells - 1 - i;  // pop from the end: cell 0 first
        m->cells[i] = (se_kv_cell) {.token = -1, .pos = -1, .region = SE_REGION_FREE, .sep_seq = -1};
    }
    m->n_seen = m->n_evicted = m->n_sep_seen = m->n_sep_left = m->rewind_floor = 0;
    m->n_init = n_init;
}

// The sliding SepLLM variants: the window moves every token, separators leave it one by one.
static bool is_slide(int32_t mode) { return mode == SE_KV_MODE_SEPLLM_SLIDE || mode == SE_KV_MODE_SEPLLM_RUNS; }

int32_t se_kv_capacity_check(int32_t mode, int32_t n_cells, int32_t n_init, int32_t n_sep, int32_t n_local) {
    if (mode == SE_KV_MODE_FULL) return SE_OK;
    if (n_init < 0 || n_sep < 0 || n_local < 1) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "n_init and n_sep must be >= 0 and n_local >= 1 (got %d, %d, %d)",
                        n_init, n_sep, n_local);
    }
    if (is_slide(mode)) {
        if (n_sep < 1 || (int64_t) n_init + n_sep + n_local > n_cells) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "%s needs n_sep >= 1 and n_init + n_sep + n_local <= n_cache "
                            "(%d + %d + %d <= %d)", mode == SE_KV_MODE_SEPLLM_SLIDE ? "sepllm-slide" : "sepllm-runs",
                            n_init, n_sep, n_local, n_cells);
        }
        return SE_OK;
    }
    const int64_t need = (int64_t) n_init + (mode == SE_KV_MODE_STREAMINGLLM ? 0 : n_sep) + n_local;
    if (mode == SE_KV_MODE_SEPLLM_STREAM ? need >= n_cells : need > n_cells) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "%s needs n_init + %sn_local %s n_cache (%d + %s%d %s %d)",
                        mode == SE_KV_MODE_STREAMINGLLM ? "streamingllm" : mode == SE_KV_MODE_SEPLLM ? "sepllm" : "sepllm-stream",
                        mode == SE_KV_MODE_STREAMINGLLM ? "" : "n_sep + ", mode == SE_KV_MODE_SEPLLM_STREAM ? "<" : "<=",
                        n_init, mode == SE_KV_MODE_STREAMINGLLM ? "" : (n_sep ? "n_sep + " : "0 + "), n_local,
                        mode == SE_KV_MODE_SEPLLM_STREAM ? "<" : "<=", n_cells);
    }
    return SE_OK;
}

// At most this many tokens share a pass that slides the window: T - 1 spare cells per context
// (63 of 864 for StreamingLLM c=800) for up to 64x fewer forward passes.
#define SE_KV_MAX_SLIDE 64

int32_t se_kv_spare(int32_t mode, int32_t n_batch) {
    if (mode != SE_KV_MODE_STREAMINGLLM && !is_slide(mode)) return 0;
    return (n_batch < SE_KV_MAX_SLIDE ? n_batch : SE_KV_MAX_SLIDE) - 1;
}

int se_kv_init(se_kv_cache * kv, const se_hparams * hp, const se_kv_config * cfg) {
    memset(kv, 0, sizeof *kv);
    kv->cfg = *cfg;
    kv->kv_type = cfg->kv_type;
    kv->row = (int64_t) hp->n_head_kv * hp->head_dim;
    const int32_t n = cfg->n_cells, sep_cap = cfg->n_sep > 0 ? cfg->n_sep : n;
    if (meta_alloc(&kv->m, n, sep_cap) != SE_OK || meta_alloc(&kv->scratch, n, sep_cap) != SE_OK ||
        !(kv->live = calloc((size_t) n, sizeof(int32_t)))) {
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for %d KV cells", n);
    }
    meta_reset(&kv->m, n, cfg->n_init);
    return SE_OK;
}

int64_t se_kv_bytes(const se_kv_cache * kv, int32_t n_layer) {
    return 2 * (int64_t) n_layer * kv->cfg.n_cells * kv->row * (int64_t) elem_size(kv->kv_type);
}

int se_kv_alloc_host(se_kv_cache * kv, int32_t n_layer) {
    // calloc: pages are only backed by memory once a cell is first written
    size_t n = (size_t) n_layer * (size_t) kv->cfg.n_cells * (size_t) kv->row;
    kv->k = calloc(n, elem_size(kv->kv_type));
    kv->v = calloc(n, elem_size(kv->kv_type));
    if (!kv->k || !kv->v) {
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for a KV cache of %d cells (%.1f MiB)", kv->cfg.n_cells,
                        (double) se_kv_bytes(kv, n_layer) / (1 << 20));
    }
    return SE_OK;
}

void se_kv_free(se_kv_cache * kv) {
    meta_free(&kv->m);
    meta_free(&kv->scratch);
    free(kv->live);
    free(kv->k);
    free(kv->v);
    memset(kv, 0, sizeof *kv);
}

void se_kv_clear(se_kv_cache * kv) {
    meta_reset(&kv->m, kv->cfg.n_cells, kv->cfg.n_init);
    kv->n_live = 0;
    kv->sum_visible = 0;
    kv->sliding = false;
}

// --- the policies

// The log, when one is set, records what happens to the live state; dry runs on the scratch copy
// and rewinds (se_kv_truncate) are not policy decisions and go unrecorded.
static se_kv_log * log_of(const se_kv_cache * kv, const se_kv_meta * m) { return m == &kv->m ? kv->log : NULL; }

static void release(const se_kv_cache * kv, se_kv_meta * m, int32_t cell) {
    se_kv_log * log = log_of(kv, m);
    if (log && log->n_evicted < log->cap) {
        const se_kv_cell * c = &m->cells[cell];
        log->evicted[log->n_evicted++] = (se_kv_evicted) {.cell = cell, .token = c->token, .pos = c->pos, .region = c->region};
    }
    m->cells[cell] = (se_kv_cell) {.token = -1, .pos = -1, .region = SE_REGION_FREE, .sep_seq = -1};
    m->free[m->n_free++] = cell;
    m->n_evicted++;
}

// A separator cell joins the separator region; the oldest goes when the region is over n_sep.
static void keep_separator(const se_kv_cache * kv, se_kv_meta * m, int32_t cell) {
    m->cells[cell].region = SE_REGION_SEP;
    m->n_sep_left++;
    if (kv->cfg.n_sep > 0 && m->sep.len == kv->cfg.n_sep) release(kv, m, ring_pop_front(&m->sep));
    ring_push(&m->sep, cell);
}

// Tokens of the window that the query at position p no longer sees.
static bool evict_window(const se_kv_cache * kv, se_kv_meta * m, int64_t p, bool keep_seps) {
    bool changed = false;
    while (m->recent.len > 0 && m->cells[ring_at(&m->recent, 0)].pos <= p - kv->cfg.n_local) {
        const int32_t cell = ring_pop_front(&m->recent);
        // sepllm-runs: the separator right after this one (still in the window, which holds
        // consecutive positions) will stand for the run
        const bool superseded = kv->cfg.mode == SE_KV_MODE_SEPLLM_RUNS && m->recent.len > 0 &&
                                m->cells[ring_at(&m->recent, 0)].sep_seq >= 0;
        if (keep_seps && m->cells[cell].sep_seq >= 0 && !superseded) {
            keep_separator(kv, m, cell);
        } else {
            if (m->cells[cell].sep_seq >= 0) m->n_sep_left++;
            release(kv, m, cell);
        }
        changed = true;
    }
    return changed;
}

// sepllm-stream: the cache is full and a token arrives. The past window (everything recent but the
// newest n_local - 1 tokens) keeps only its separators; then every cell gets the position of its slot
// in [initial | separators | recent], expressed as a delta for the initial and separator cells.
static void compress(const se_kv_cache * kv, se_kv_meta * m, int64_t p) {
    se_kv_log * log = log_of(kv, m);
    if (log) log->n_compressions++;
    while (m->recent.len > kv->cfg.n_local - 1) {
        const int32_t cell = ring_pop_front(&m->recent);
        if (m->cells[cell].sep_seq >= 0) {
            keep_separator(kv, m, cell);
        } else {
            release(kv, m, cell);
        }
    }
    const int64_t live = m->n_init_live + m->sep.len + m->recent.len;  // the query takes slot `live`
    int64_t slot = 0;
    for (int32_t i = 0; i < m->n_init_live; i++, slot++) {
        se_kv_cell * c = &m->cells[m->init[i]];
        c->delta = (int32_t) (p - live + slot - c->pos);
    }
    for (int32_t i = 0; i < m->sep.len; i++, slot++) {
        se_kv_cell * c = &m->cells[ring_at(&m->sep, i)];
        c->delta = (int32_t) (p - live + slot - c->pos);
    }
}

// Make room for the query at position p, as the mode says. SE_ERR_CONTEXT_FULL when no cell is free.
static int prepare(const se_kv_cache * kv, se_kv_meta * m, int64_t p) {
    switch (kv->cfg.mode) {
        case SE_KV_MODE_SEPLLM:
            if (evict_window(kv, m, p, true)) m->rewind_floor = p;
            break;
        case SE_KV_MODE_STREAMINGLLM: {
            if (evict_window(kv, m, p, false)) m->rewind_floor = p;
            // slots [initial | window]: once the window is full, the initial tokens sit n_local - 1
            // slots before the query although it is further away in the text
            const int64_t shift = p - (m->n_init + kv->cfg.n_local - 1);
            for (int32_t i = 0; i < m->n_init_live; i++) m->cells[m->init[i]].delta = shift > 0 ? (int32_t) shift : 0;
            break;
        }
        case SE_KV_MODE_SEPLLM_SLIDE:
        case SE_KV_MODE_SEPLLM_RUNS: {
            if (evict_window(kv, m, p, true)) m->rewind_floor = p;
            // slots [initial | separators | window]: the window keeps its original positions (the
            // query's too), the others sit right before its oldest token
            const int64_t first = m->recent.len > 0 ? m->cells[ring_at(&m->recent, 0)].pos : p;
            int64_t slot = first - m->n_init_live - m->sep.len;
            for (int32_t i = 0; i < m->n_init_live; i++, slot++) {
                se_kv_cell * c = &m->cells[m->init[i]];
                c->delta = (int32_t) (slot - c->pos);
            }
            for (int32_t i = 0; i < m->sep.len; i++, slot++) {
                se_kv_cell * c = &m->cells[ring_at(&m->sep, i)];
                c->delta = (int32_t) (slot - c->pos);
            }
            break;
        }
        case SE_KV_MODE_SEPLLM_STREAM:
            if (m->n_free == kv->cfg.n_spare) {
                compress(kv, m, p);
                m->rewind_floor = p;
            }
            break;
        default:
            break;
    }
    if (m->n_free <= kv->cfg.n_spare) {  // spare cells are for passes that slide the window only
        return se_error(SE_ERR_CONTEXT_FULL, "the KV cache is full: %d cells (%lld tokens seen%s)", kv->cfg.n_cells - kv->cfg.n_spare,
                        (long long) m->n_seen, kv->cfg.mode == SE_KV_MODE_FULL ? "" : "; separators fill it: set n_sep");
    }
    return SE_OK;
}

// How many tokens, starting at p, a pass that slides the window may take (0: it may not slide).
static int32_t slide_limit(const se_kv_cache * kv, const se_kv_meta * m) {
    // the window must be full (it holds p - n_local + 1 .. p - 1), so that it moves by one slot per
    // query from the first; query p + j + 1 sees the window's j-th oldest cell leave
    if (kv->cfg.n_spare == 0 || m->recent.len != kv->cfg.n_local - 1) return 0;
    int32_t t = kv->cfg.n_spare + 1;
    if (t > kv->cfg.n_local - 1) t = kv->cfg.n_local - 1;  // the cells leaving are all old ones, the next one known
    if (t > m->n_free) t = m->n_free;
    if (is_slide(kv->cfg.mode)) {
        // the pass ends before the query that would see a separator join the separator region
        // (evict_window's rule; the cell after it is in the window, so known)
        for (int32_t j = 0; j + 1 < t; j++) {
            const se_kv_cell * c = &m->cells[ring_at(&m->recent, j)];
            const bool superseded = kv->cfg.mode == SE_KV_MODE_SEPLLM_RUNS && m->cells[ring_at(&m->recent, j + 1)].sep_seq >= 0;
            if (c->sep_seq >= 0 && !superseded) t = j + 1;
        }
    }
    return t;
}

// How many tokens, starting at position p, can share one forward pass; *sliding: whether the
// window slides within it.
static int32_t chunk_size(const se_kv_cache * kv, const se_kv_meta * m, int64_t p, int32_t remaining, int32_t n_batch,
                          bool * sliding) {
    int64_t t = remaining < n_batch ? remaining : n_batch;
    const int32_t slide = slide_limit(kv, m);
    *sliding = slide > 1 && t > 1;
    if (slide > 0) return (int32_t) (t < slide ? t : slide);
    if (t > m->n_free - kv->cfg.n_spare) t = m->n_free - kv->cfg.n_spare;
    if (is_slide(kv->cfg.mode)) {
        // within a pass the window may not slide (the other regions' slots hang on its oldest
        // token, which is the pass's first one when the window is empty)
        const int64_t first = m->recent.len > 0 ? m->cells[ring_at(&m->recent, 0)].pos : p > m->n_init ? p : m->n_init;
        const int64_t slide = first + kv->cfg.n_local - p;
        if (t > slide) t = slide;
    }
    if (kv->cfg.mode == SE_KV_MODE_STREAMINGLLM) {
        // within a pass neither the window may slide nor the initial tokens' slots move
        const int64_t still = (int64_t) m->n_init + kv->cfg.n_local - p;
        if (t > still) t = still > 1 ? still : 1;
        if (m->recent.len > 0) {
            const int64_t slide = m->cells[ring_at(&m->recent, 0)].pos + kv->cfg.n_local - p;
            if (t > slide) t = slide;
        }
    }
    return (int32_t) (t < 1 ? 1 : t);
}

static void admit(const se_kv_cache * kv, se_kv_meta * m, const uint8_t * is_sep, const int32_t * tokens, int32_t n,
                  int32_t * cells, int32_t * positions) {
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = m->free[--m->n_free];
        const int64_t pos = m->n_seen++;
        const bool initial = pos < m->n_init;
        m->cells[c] = (se_kv_cell) {.token = tokens[i], .pos = (int32_t) pos, .delta = 0,
                                    .region = initial ? SE_REGION_INIT : SE_REGION_RECENT,
                                    .sep_seq = !initial && is_sep[tokens[i]] ? m->n_sep_seen++ : -1};
        if (initial) {
            m->init[m->n_init_live++] = c;
        } else {
            ring_push(&m->recent, c);
        }
        if (cells) cells[i] = c;
        if (positions) positions[i] = (int32_t) pos;
    }
}

// Run the bookkeeping of n tokens on a copy of the state: does every one find a cell?
static int dry_run(se_kv_cache * kv, const uint8_t * is_sep, const int32_t * tokens, int32_t n, int32_t n_batch) {
    se_kv_meta * m = &kv->scratch;
    meta_copy(m, &kv->m, kv->cfg.n_cells);
    for (int32_t s = 0; s < n;) {
        int r = prepare(kv, m, m->n_seen);
        if (r != SE_OK) return r;
        bool sliding;
        const int32_t t = chunk_size(kv, m, m->n_seen, n - s, n_batch, &sliding);
        admit(kv, m, is_sep, tokens + s, t, NULL, NULL);
        s += t;
    }
    return SE_OK;
}

int se_kv_check_fits(se_kv_cache * kv, const uint8_t * is_sep, const int32_t * tokens, int32_t n, int32_t n_batch) {
    if (kv->cfg.mode == SE_KV_MODE_FULL) {
        if (n > kv->m.n_free) {
            return se_error(SE_ERR_CONTEXT_FULL, "%d tokens do not fit in the KV cache: %d of %d cells in use", n,
                            kv->cfg.n_cells - kv->m.n_free, kv->cfg.n_cells);
        }
        return SE_OK;
    }
    // bounded separator regions never run out of cells (checked when the context was made)
    if (kv->cfg.n_sep > 0 || kv->cfg.mode == SE_KV_MODE_STREAMINGLLM) return SE_OK;
    return dry_run(kv, is_sep, tokens, n, n_batch);
}

static void rebuild_live(se_kv_cache * kv) {
    const se_kv_meta * m = &kv->m;
    int32_t n = 0;
    for (int32_t i = 0; i < m->n_init_live; i++) kv->live[n++] = m->init[i];
    for (int32_t i = 0; i < m->sep.len; i++) kv->live[n++] = ring_at(&m->sep, i);
    for (int32_t i = 0; i < m->recent.len; i++) kv->live[n++] = ring_at(&m->recent, i);
    kv->n_live = n;
}

int32_t se_kv_next_chunk(se_kv_cache * kv, const uint8_t * is_sep, const int32_t * tokens, int32_t remaining,
                         int32_t n_batch, int32_t * cells, int32_t * positions) {
    se_kv_meta * m = &kv->m;
    if (prepare(kv, m, m->n_seen) != SE_OK) return 0;  // excluded by se_kv_check_fits
    const int32_t t = chunk_size(kv, m, m->n_seen, remaining, n_batch, &kv->sliding);
    admit(kv, m, is_sep, tokens, t, cells, positions);
    rebuild_live(kv);
    return t;
}

void se_kv_finish(se_kv_cache * kv) {
    // evict as soon as tokens leave the window: the cache then holds what the next token will see
    if (kv->cfg.mode == SE_KV_MODE_SEPLLM || kv->cfg.mode == SE_KV_MODE_STREAMINGLLM || is_slide(kv->cfg.mode)) {
        prepare(kv, &kv->m, kv->m.n_seen);
        rebuild_live(kv);
    }
}

void se_kv_sep_floors(const se_kv_cache * kv, const int32_t * tokens, const uint8_t * is_sep, int32_t n, int64_t * out) {
    // training-free sepllm with a capped separator region: query p sees the separators that left
    // the window (pos <= p - n_local) only if they are among the newest n_sep of them
    const se_kv_meta * m = &kv->m;
    if (kv->cfg.mode != SE_KV_MODE_SEPLLM || kv->cfg.n_sep == 0) {
        for (int32_t t = 0; t < n; t++) out[t] = INT64_MIN;
        return;
    }
    const int64_t p0 = m->n_seen - n;  // the chunk's tokens are admitted already
    int64_t left = m->n_sep_left;      // separators gone from the window before the chunk's first query
    // the window before the chunk holds positions (p0 - n_local, p0); recent ring entries are contiguous
    int32_t next = 0;                  // next recent-ring entry that may leave
    for (int32_t t = 0; t < n; t++) {
        const int64_t edge = p0 + t - kv->cfg.n_local;  // positions <= edge have left for query p0 + t
        while (next < m->recent.len) {
            const se_kv_cell * c = &m->cells[ring_at(&m->recent, next)];
            if (c->pos > edge) break;
            if (c->sep_seq >= 0) left++;
            next++;
        }
        out[t] = left - kv->cfg.n_sep;
    }
    (void) tokens;
    (void) is_sep;
}

int se_kv_truncate(se_kv_cache * kv, int64_t n_keep) {
    se_kv_meta * m = &kv->m;
    if (n_keep < m->rewind_floor || n_keep > m->n_seen) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "cannot keep %lld tokens: the cache holds %lld and has evicted tokens "
                        "needed before position %lld", (long long) n_keep, (long long) m->n_seen, (long long) m->rewind_floor);
    }
    while (m->recent.len > 0 && m->cells[ring_at(&m->recent, m->recent.len - 1)].pos >= n_keep) {
        const int32_t c = ring_pop_back(&m->recent);
        if (m->cells[c].sep_seq >= 0) m->n_sep_seen--;
        release(kv, m, c);
        m->n_evicted--;  // undone, not evicted
    }
    while (m->n_init_live > 0 && m->cells[m->init[m->n_init_live - 1]].pos >= n_keep) {
        release(kv, m, m->init[--m->n_init_live]);
        m->n_evicted--;
    }
    m->n_seen = n_keep;
    rebuild_live(kv);
    return SE_OK;
}

int se_kv_keep(se_kv_cache * kv, int32_t n_keep) {
    se_kv_meta * m = &kv->m;
    const int32_t n_init = n_keep > kv->cfg.n_init ? n_keep : kv->cfg.n_init;
    if (m->n_seen > m->n_init && m->n_seen > 0) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "the initial region can only be set before other tokens are cached "
                        "(%lld tokens in the cache)", (long long) m->n_seen);
    }
    int r = se_kv_capacity_check(kv->cfg.mode, kv->cfg.n_cells - kv->cfg.n_spare, n_init, kv->cfg.n_sep, kv->cfg.n_local);
    if (r != SE_OK) return r;
    m->n_init = n_init;
    return SE_OK;
}

bool se_kv_visible(const se_kv_cache * kv, const se_kv_cell * c, int64_t p, int64_t sep_floor) {
    if ((int64_t) c->pos + c->delta > p) return false;  // causal, in the positions the cell acts at
    if (kv->cfg.mode == SE_KV_MODE_STREAMINGLLM || is_slide(kv->cfg.mode)) {
        // the window, as the query sees it: in a pass that slides it, the cells the later queries
        // have left behind are still there for the earlier ones
        return c->region != SE_REGION_RECENT || c->pos > p - kv->cfg.n_local;
    }
    if (kv->cfg.mode != SE_KV_MODE_SEPLLM) return true;  // the other modes keep only what is seen
    // training-free SepLLM within a chunk: tokens the window left are masked until evicted
    return c->region == SE_REGION_INIT || c->pos > p - kv->cfg.n_local || (c->sep_seq >= 0 && c->sep_seq >= sep_floor);
}

int32_t se_kv_step(const se_kv_cache * kv, const se_kv_cell * c) {
    return kv->sliding && c->region != SE_REGION_RECENT ? 1 : 0;
}

void * se_kv_k(const se_kv_cache * kv, int32_t l, int32_t cell) {
    return (char *) kv->k + (((size_t) l * (size_t) kv->cfg.n_cells + (size_t) cell) * (size_t) kv->row) * elem_size(kv->kv_type);
}

void * se_kv_v(const se_kv_cache * kv, int32_t l, int32_t cell) {
    return (char *) kv->v + (((size_t) l * (size_t) kv->cfg.n_cells + (size_t) cell) * (size_t) kv->row) * elem_size(kv->kv_type);
}
