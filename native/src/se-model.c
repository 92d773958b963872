// A model: hyperparameters from the GGUF keys, weight views into the mapping, separator set.
//
// Architectures differ in a few facts (se_arch); everything else is the llama family's. Adding one
// means a row in `arches` plus whatever tensors it has beyond llama's.
#include "se-impl.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct se_arch {
    const char * name;
    int32_t rope_type;
    bool    qkv_bias;
} se_arch;

static const se_arch arches[] = {
    {"llama", SE_ROPE_NORM, false},  // converters permute Q/K rows for adjacent-pair RoPE
    {"qwen2", SE_ROPE_NEOX, true},   // Q/K/V biases, rows in HF order
};

static const char * supported_types = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K";

// ---------------------------------------------------------------------------------------------
// keys

// Index of the architecture's key `{arch}.key` (full name in `full`), or -1; a missing required
// key is an error (returned in *r).
static int64_t arch_key(se_model * m, const char * key, bool required, char full[128], int * r) {
    snprintf(full, 128, "%s.%s", m->arch, key);
    int64_t i = se_gguf_find(&m->gguf, full);
    *r = i < 0 && required ? se_error(SE_ERR_FORMAT, "%s: missing key '%s'", m->gguf.path, full) : SE_OK;
    if (i >= 0 && m->gguf.kv[i].count == 0) {
        *r = se_error(SE_ERR_FORMAT, "%s: '%s' is an empty array", m->gguf.path, full);
        return -1;
    }
    return i;
}

static int key_int(se_model * m, const char * key, bool required, int64_t def, int64_t lo, int64_t hi, int64_t * out) {
    char full[128];
    int r;
    int64_t i = arch_key(m, key, required, full, &r);
    if (i < 0) {
        *out = def;
        return r;
    }
    const se_gguf_kv * kv = &m->gguf.kv[i];
    if ((r = se_gguf_int(&m->gguf, i, 0, out)) != SE_OK) return r;
    // per-layer arrays (allowed by llama.cpp) are accepted when every layer has the same value
    for (uint64_t j = 1; kv->type == SE_META_ARRAY && j < kv->count; j++) {
        int64_t v;
        if ((r = se_gguf_int(&m->gguf, i, j, &v)) != SE_OK) return r;
        if (v != *out) return se_error(SE_ERR_UNSUPPORTED, "%s: '%s' varies across layers", m->gguf.path, full);
    }
    if (*out < lo || *out > hi) {
        return se_error(SE_ERR_FORMAT, "%s: '%s' = %lld is out of range [%lld, %lld]", m->gguf.path, full,
                        (long long) *out, (long long) lo, (long long) hi);
    }
    return SE_OK;
}

static int key_float(se_model * m, const char * key, bool required, double def, double * out) {
    char full[128];
    int r;
    int64_t i = arch_key(m, key, required, full, &r);
    if (i < 0) {
        *out = def;
        return r;
    }
    r = se_gguf_float(&m->gguf, i, 0, out);
    if (r == SE_OK && !isfinite(*out)) {
        return se_error(SE_ERR_FORMAT, "%s: '%s' = %g is not a finite number (NaN or infinite)", m->gguf.path, full, *out);
    }
    return r;
}

static int key_string(se_model * m, const char * key, char * out, size_t out_size) {
    int64_t i = se_gguf_find(&m->gguf, key);
    out[0] = 0;
    if (i < 0) return SE_OK;
    const char * s;
    uint64_t n;
    int r = se_gguf_string(&m->gguf, i, 0, &s, &n);
    if (r != SE_OK) return r;
    if (n >= out_size) n = out_size - 1;
    memcpy(out, s, n);
    out[n] = 0;
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// tensors

static int bind_weight(se_model * m, const char * name, int64_t cols, int64_t rows, bool optional, se_weight * w) {
    memset(w, 0, sizeof *w);
    const se_gguf_tensor * t = se_gguf_find_tensor(&m->gguf, name);
    if (!t) return optional ? SE_OK : se_error(SE_ERR_FORMAT, "%s: missing tensor '%s'", m->gguf.path, name);
    if (t->ne[0] != cols || t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1) {
        return se_error(SE_ERR_FORMAT, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]",
                        m->gguf.path, name, (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                        (long long) t->ne[3], (long long) cols, (long long) rows);
    }
    const se_type_traits * tt = se_type_get(t->type);
    if (!tt->dot) {
        return se_error(SE_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s, which sepedge cannot run yet (supported: %s)",
                        m->gguf.path, name, tt->name, supported_types);
    }
    w->type = t->type;
    w->cols = cols;
    w->rows = rows;
    w->row_bytes = (uint64_t) (cols / tt->block) * (uint64_t) tt->size;
    w->data = t->data;
    return SE_OK;
}

// A small vector (norm, bias, rope factors), converted to float.
static int bind_vector(se_model * m, const char * name, int64_t n, bool optional, float ** out) {
    se_weight w;
    *out = NULL;
    int r = bind_weight(m, name, n, 1, optional, &w);
    if (r != SE_OK || !w.data) return r;
    *out = malloc((size_t) n * sizeof(float));
    if (!*out) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory loading '%s'", name);
    se_type_get(w.type)->to_float(w.data, *out, n);
    return SE_OK;
}

static int bind_layer(se_model * m, const se_arch * arch, int il, se_layer * l) {
    const se_hparams * hp = &m->hp;
    const int64_t q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    char name[SE_MAX_NAME];
    int r = SE_OK;
#define NAME(s) (snprintf(name, sizeof name, "blk.%d." s, il), name)
    if (r == SE_OK) r = bind_vector(m, NAME("attn_norm.weight"), hp->n_embd, false, &l->attn_norm);
    if (r == SE_OK) r = bind_weight(m, NAME("attn_q.weight"), hp->n_embd, q_dim, false, &l->wq);
    if (r == SE_OK) r = bind_weight(m, NAME("attn_k.weight"), hp->n_embd, kv_dim, false, &l->wk);
    if (r == SE_OK) r = bind_weight(m, NAME("attn_v.weight"), hp->n_embd, kv_dim, false, &l->wv);
    if (r == SE_OK) r = bind_weight(m, NAME("attn_output.weight"), q_dim, hp->n_embd, false, &l->wo);
    if (r == SE_OK && arch->qkv_bias) {
        r = bind_vector(m, NAME("attn_q.bias"), q_dim, false, &l->bq);
        if (r == SE_OK) r = bind_vector(m, NAME("attn_k.bias"), kv_dim, false, &l->bk);
        if (r == SE_OK) r = bind_vector(m, NAME("attn_v.bias"), kv_dim, false, &l->bv);
    }
    if (r == SE_OK) r = bind_vector(m, NAME("ffn_norm.weight"), hp->n_embd, false, &l->ffn_norm);
    if (r == SE_OK) r = bind_weight(m, NAME("ffn_gate.weight"), hp->n_embd, hp->n_ff, false, &l->w_gate);
    if (r == SE_OK) r = bind_weight(m, NAME("ffn_up.weight"), hp->n_embd, hp->n_ff, false, &l->w_up);
    if (r == SE_OK) r = bind_weight(m, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, false, &l->w_down);
#undef NAME
    return r;
}

// ---------------------------------------------------------------------------------------------

static int load_hparams(se_model * m, const se_arch * arch) {
    se_hparams * hp = &m->hp;
    const se_gguf_tensor * embd = se_gguf_find_tensor(&m->gguf, "token_embd.weight");
    if (!embd) return se_error(SE_ERR_FORMAT, "%s: missing tensor 'token_embd.weight'", m->gguf.path);
    int64_t v;
    double f;
    int r;
#define INT(key, req, def, lo, hi, field) \
    if ((r = key_int(m, key, req, def, lo, hi, &v)) != SE_OK) return r; \
    hp->field = (int32_t) v;
    INT("embedding_length", true, 0, 1, 1 << 20, n_embd)
    INT("block_count", true, 0, 1, 4096, n_layer)
    INT("feed_forward_length", true, 0, 1, 1 << 22, n_ff)
    INT("attention.head_count", true, 0, 1, 4096, n_head)
    INT("attention.head_count_kv", false, hp->n_head, 1, hp->n_head, n_head_kv)
    INT("context_length", false, 2048, 1, INT32_MAX, n_ctx_train)
    INT("attention.key_length", false, hp->n_embd / hp->n_head, 2, 1 << 16, head_dim)
#undef INT
    if (hp->n_head % hp->n_head_kv) {
        return se_error(SE_ERR_FORMAT, "%s: %d heads are not a multiple of %d KV heads", m->gguf.path, hp->n_head, hp->n_head_kv);
    }
    if (hp->head_dim < 2 || hp->head_dim % 2) {
        return se_error(SE_ERR_FORMAT, "%s: head size %d is not a positive even number", m->gguf.path, hp->head_dim);
    }
    if ((r = key_int(m, "attention.value_length", false, hp->head_dim, 1, 1 << 16, &v)) != SE_OK) return r;
    if (v != hp->head_dim) return se_error(SE_ERR_UNSUPPORTED, "%s: key and value head sizes differ", m->gguf.path);
    if ((r = key_int(m, "rope.dimension_count", false, hp->head_dim, 1, 1 << 16, &v)) != SE_OK) return r;
    if (v != hp->head_dim) {
        return se_error(SE_ERR_UNSUPPORTED, "%s: partial RoPE (%lld of %d dimensions) is not supported", m->gguf.path,
                        (long long) v, hp->head_dim);
    }
    if ((r = key_float(m, "attention.layer_norm_rms_epsilon", true, 0, &f)) != SE_OK) return r;
    if (!(f > 0 && f < 1)) return se_error(SE_ERR_FORMAT, "%s: rms epsilon %g out of range", m->gguf.path, f);
    hp->rms_eps = (float) f;
    if ((r = key_float(m, "rope.freq_base", false, 10000.0, &f)) != SE_OK) return r;
    if (!(f > 1)) return se_error(SE_ERR_FORMAT, "%s: rope base %g out of range", m->gguf.path, f);
    hp->rope_base = (float) f;

    char key[64], scaling[32];
    snprintf(key, sizeof key, "%s.rope.scaling.type", m->arch);
    if ((r = key_string(m, key, scaling, sizeof scaling)) != SE_OK) return r;
    double factor = 0;
    if ((r = key_float(m, "rope.scaling.factor", false, 0, &factor)) != SE_OK) return r;
    if (factor == 0 && (r = key_float(m, "rope.scale_linear", false, 0, &factor)) != SE_OK) return r;
    if (scaling[0] && strcmp(scaling, "none") != 0 && strcmp(scaling, "linear") != 0) {
        return se_error(SE_ERR_UNSUPPORTED, "%s: rope scaling '%s' is not supported (none, linear)", m->gguf.path, scaling);
    }
    if (factor < 0) return se_error(SE_ERR_FORMAT, "%s: negative rope scaling factor", m->gguf.path);
    hp->rope_freq_scale = strcmp(scaling, "none") != 0 && factor > 0 ? (float) (1.0 / factor) : 1.0f;
    hp->rope_type = arch->rope_type;

    if (embd->ne[0] != hp->n_embd || embd->ne[2] != 1 || embd->ne[3] != 1 || embd->ne[1] > INT32_MAX) {
        return se_error(SE_ERR_FORMAT, "%s: tensor 'token_embd.weight' does not match n_embd %d", m->gguf.path, hp->n_embd);
    }
    hp->n_vocab = (int32_t) embd->ne[1];
    int64_t it = se_gguf_find(&m->gguf, "tokenizer.ggml.tokens");
    if (it >= 0 && m->gguf.kv[it].count != (uint64_t) hp->n_vocab) {
        return se_error(SE_ERR_FORMAT, "%s: %llu tokens in the vocabulary but %d rows in token_embd.weight", m->gguf.path,
                        (unsigned long long) m->gguf.kv[it].count, hp->n_vocab);
    }
    int64_t ift = se_gguf_find(&m->gguf, "general.file_type");
    hp->file_type = -1;
    if (ift >= 0 && se_gguf_int(&m->gguf, ift, 0, &v) == SE_OK && v >= 0 && v < INT32_MAX) hp->file_type = (int32_t) v;
    return SE_OK;
}

static int cmp_int32(const void * a, const void * b) {
    int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    return (x > y) - (x < y);
}

int se_model_set_separators(se_model * m, const int32_t * ids, int32_t n) {
    if (!m || n < 0 || (n > 0 && !ids)) return se_error(SE_ERR_INVALID_ARGUMENT, "se_model_set_separators: bad arguments");
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= m->hp.n_vocab) {
            return se_error(SE_ERR_INVALID_ARGUMENT, "separator id %d is outside the vocabulary (%d tokens)", ids[i], m->hp.n_vocab);
        }
    }
    int32_t * sorted = malloc(((size_t) n + 1) * sizeof(int32_t));
    if (!sorted) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    if (n) memcpy(sorted, ids, (size_t) n * sizeof(int32_t));
    qsort(sorted, (size_t) n, sizeof(int32_t), cmp_int32);
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++) {
        if (k == 0 || sorted[k - 1] != sorted[i]) sorted[k++] = sorted[i];
    }
    free(m->separators);
    m->separators = sorted;
    m->n_separators = k;
    memset(m->is_sep, 0, (size_t) m->hp.n_vocab);
    for (int32_t i = 0; i < k; i++) m->is_sep[sorted[i]] = 1;
    return SE_OK;
}

static int load_sepllm_defaults(se_model * m) {
    static const char * keys[4] = {"sepllm.n_init", "sepllm.n_sep", "sepllm.n_local", "sepllm.n_cache"};
    static const int32_t builtin[4] = {4, 64, 256, 800};  // the paper's main streaming setup
    for (int k = 0; k < 4; k++) {
        m->sepllm[k] = builtin[k];
        int64_t i = se_gguf_find(&m->gguf, keys[k]), v;
        if (i < 0) continue;
        int r = se_gguf_int(&m->gguf, i, 0, &v);
        if (r != SE_OK) return r;
        const int64_t lo = k >= 2 ? 1 : 0;  // a window and a cache of at least one cell (n_init, n_sep may be 0)
        if (v < lo || v > (1 << 24)) {
            return se_error(SE_ERR_FORMAT, "%s: '%s' = %lld is out of range [%lld, %d]", m->gguf.path, keys[k], (long long) v,
                            (long long) lo, 1 << 24);
        }
        m->sepllm[k] = (int32_t) v;
    }
    return SE_OK;
}

static int load_separators(se_model * m) {
    m->is_sep = calloc((size_t) m->hp.n_vocab, 1);
    if (!m->is_sep) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    int64_t i = se_gguf_find(&m->gguf, "sepllm.separator_token_ids");
    if (i < 0) return SE_OK;
    const se_gguf_kv * kv = &m->gguf.kv[i];
    if (kv->type != SE_META_ARRAY || kv->count > (uint64_t) m->hp.n_vocab * 2) {
        return se_error(SE_ERR_FORMAT, "%s: 'sepllm.separator_token_ids' is not an array of token ids", m->gguf.path);
    }
    int32_t * ids = malloc((kv->count + 1) * sizeof(int32_t));
    if (!ids) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    int r = SE_OK;
    for (uint64_t j = 0; j < kv->count && r == SE_OK; j++) {
        int64_t v;
        r = se_gguf_int(&m->gguf, i, j, &v);
        if (r == SE_OK && (v < 0 || v >= m->hp.n_vocab)) {
            r = se_error(SE_ERR_FORMAT, "%s: separator id %lld is outside the vocabulary", m->gguf.path, (long long) v);
        }
        if (r == SE_OK) ids[j] = (int32_t) v;
    }
    if (r == SE_OK) r = se_model_set_separators(m, ids, (int32_t) kv->count);
    free(ids);
    return r;
}

int se_model_build(se_model * m) {
    int r = key_string(m, "general.architecture", m->arch, sizeof m->arch);
    if (r != SE_OK) return r;
    if (!m->arch[0]) return se_error(SE_ERR_FORMAT, "%s: missing key 'general.architecture'", m->gguf.path);
    const se_arch * arch = NULL;
    for (size_t i = 0; i < sizeof arches / sizeof arches[0]; i++) {
        if (strcmp(arches[i].name, m->arch) == 0) arch = &arches[i];
    }
    if (!arch) return se_error(SE_ERR_UNSUPPORTED, "%s: architecture '%s' is not supported (supported: llama, qwen2)", m->gguf.path, m->arch);
    if ((r = load_hparams(m, arch)) != SE_OK) return r;
    const se_hparams * hp = &m->hp;
    if ((r = bind_weight(m, "token_embd.weight", hp->n_embd, hp->n_vocab, false, &m->tok_embd)) != SE_OK) return r;
    if ((r = bind_vector(m, "output_norm.weight", hp->n_embd, false, &m->output_norm)) != SE_OK) return r;
    if ((r = bind_weight(m, "output.weight", hp->n_embd, hp->n_vocab, true, &m->output)) != SE_OK) return r;
    if (!m->output.data) m->output = m->tok_embd;  // tied embeddings
    if ((r = bind_vector(m, "rope_freqs.weight", hp->head_dim / 2, true, &m->rope_freqs)) != SE_OK) return r;
    m->layers = calloc((size_t) hp->n_layer, sizeof(se_layer));
    if (!m->layers) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    for (int il = 0; il < hp->n_layer && r == SE_OK; il++) r = bind_layer(m, arch, il, &m->layers[il]);
    if (r != SE_OK) return r;
    for (int64_t i = 0; i < m->gguf.n_tensors; i++) {
        const se_gguf_tensor * t = &m->gguf.tensors[i];
        m->n_params += t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
        m->n_bytes += (int64_t) t->nbytes;
    }
    if ((r = load_sepllm_defaults(m)) != SE_OK) return r;
    if ((r = load_separators(m)) != SE_OK) return r;
    return m->device == SE_DEVICE_CPU ? se_model_repack(m) : SE_OK;
}

void se_model_release(se_model * m) {
    if (m->layers) {
        for (int il = 0; il < m->hp.n_layer; il++) {
            se_layer * l = &m->layers[il];
            free(l->attn_norm);
            free(l->ffn_norm);
            free(l->bq);
            free(l->bk);
            free(l->bv);
        }
    }
    free(m->layers);
    free(m->packed);
    free(m->output_norm);
    free(m->rope_freqs);
    free(m->separators);
    free(m->is_sep);
    se_gguf_close(&m->gguf);
}
