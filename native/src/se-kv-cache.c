// The KV cache: a fixed number of cells, allocated once when the context is created. Each cell
// holds one token's post-RoPE key and its value for every layer, plus the token id, the position
// its key was rotated with, and whether the token is a separator: everything a retention policy
// needs to decide, by token id alone, which cells to keep.
#include "se-impl.h"

#include <stdlib.h>
#include <string.h>

static size_t elem_size(int32_t kv_type) { return kv_type == SE_KV_F16 ? 2 : 4; }

int se_kv_init(se_kv_cache * kv, const se_hparams * hp, int32_t n_cells, int32_t kv_type) {
    memset(kv, 0, sizeof *kv);
    kv->n_cells = n_cells;
    kv->kv_type = kv_type;
    kv->row = (int64_t) hp->n_head_kv * hp->head_dim;
    kv->cells = calloc((size_t) n_cells, sizeof(se_kv_cell));
    if (!kv->cells) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for %d KV cells", n_cells);
    return SE_OK;
}

int64_t se_kv_bytes(const se_kv_cache * kv, int32_t n_layer) {
    return 2 * (int64_t) n_layer * kv->n_cells * kv->row * (int64_t) elem_size(kv->kv_type);
}

int se_kv_alloc_host(se_kv_cache * kv, int32_t n_layer) {
    // calloc: pages are only backed by memory once a cell is first written
    size_t n = (size_t) n_layer * (size_t) kv->n_cells * (size_t) kv->row;
    kv->k = calloc(n, elem_size(kv->kv_type));
    kv->v = calloc(n, elem_size(kv->kv_type));
    if (!kv->k || !kv->v) {
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for a KV cache of %d cells (%.1f MiB)", kv->n_cells,
                        (double) se_kv_bytes(kv, n_layer) / (1 << 20));
    }
    return SE_OK;
}

void se_kv_free(se_kv_cache * kv) {
    free(kv->cells);
    free(kv->k);
    free(kv->v);
    memset(kv, 0, sizeof *kv);
}

void se_kv_clear(se_kv_cache * kv) {
    kv->n_used = 0;
    kv->n_seen = 0;
    kv->n_evicted = 0;
}

void se_kv_append(se_kv_cache * kv, const se_model * m, const int32_t * tokens, int32_t n, int32_t * cells,
                  int32_t * positions) {
    for (int32_t i = 0; i < n; i++) {
        const int32_t c = kv->n_used++;
        kv->cells[c] = (se_kv_cell) {tokens[i], (int32_t) kv->n_seen, m->is_sep[tokens[i]]};
        cells[i] = c;
        positions[i] = (int32_t) kv->n_seen++;
    }
}

void * se_kv_k(const se_kv_cache * kv, int32_t l, int32_t cell) {
    return (char *) kv->k + (((size_t) l * (size_t) kv->n_cells + (size_t) cell) * (size_t) kv->row) * elem_size(kv->kv_type);
}

void * se_kv_v(const se_kv_cache * kv, int32_t l, int32_t cell) {
    return (char *) kv->v + (((size_t) l * (size_t) kv->n_cells + (size_t) cell) * (size_t) kv->row) * elem_size(kv->kv_type);
}
