// Sampling, in llama.cpp's default order: repeat penalty -> top-k -> top-p -> min-p -> temperature
// -> draw. Temperature 0 is greedy (argmax after the penalty).
#include "se-impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct candidate {
    int32_t id;
    float logit;
    float p;
} candidate;

struct se_sampler {
    se_sampler_params params;
    int32_t n_vocab;
    candidate * cand;         // (n_vocab)
    int32_t * history;        // ring of the last repeat_last_n accepted tokens
    int32_t n_history;
    int32_t history_head;
    uint8_t * seen;           // (n_vocab) scratch for the penalty
    uint64_t rng;
};

se_sampler_params se_sampler_default_params(void) {
    return (se_sampler_params) {
        .temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
        .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0x5eed5eedULL,
    };
}

static int check(const se_sampler_params * p) {
    if (!(p->temperature >= 0 && isfinite(p->temperature))) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "temperature must be a finite number >= 0, got %g", p->temperature);
    }
    if (p->top_k < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "top_k must be >= 0 (0 = off), got %d", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1)) return se_error(SE_ERR_INVALID_ARGUMENT, "top_p must be in (0, 1], got %g", p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return se_error(SE_ERR_INVALID_ARGUMENT, "min_p must be in [0, 1], got %g", p->min_p);
    if (!(p->repeat_penalty > 0 && isfinite(p->repeat_penalty))) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "repeat_penalty must be a finite number > 0, got %g", p->repeat_penalty);
    }
    if (p->repeat_last_n < 0 || p->repeat_last_n > (1 << 24)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "repeat_last_n must be in [0, 16777216], got %d", p->repeat_last_n);
    }
    return SE_OK;
}

int se_sampler_new(const se_sampler_params * params, int32_t n_vocab, se_sampler ** out) {
    if (!out) return se_error(SE_ERR_INVALID_ARGUMENT, "se_sampler_new: out is NULL");
    *out = NULL;
    se_sampler_params p = params ? *params : se_sampler_default_params();
    int r = check(&p);
    if (r != SE_OK) return r;
    if (n_vocab < 1) return se_error(SE_ERR_INVALID_ARGUMENT, "n_vocab must be positive, got %d", n_vocab);
    se_sampler * s = calloc(1, sizeof *s);
    if (!s) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    s->params = p;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t) n_vocab * sizeof(candidate));
    s->history = malloc(((size_t) p.repeat_last_n + 1) * sizeof(int32_t));
    s->seen = calloc((size_t) n_vocab, 1);
    if (!s->cand || !s->history || !s->seen) {
        se_sampler_free(s);
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    s->rng = p.seed;
    *out = s;
    return SE_OK;
}

void se_sampler_free(se_sampler * s) {
    if (!s) return;
    free(s->cand);
    free(s->history);
    free(s->seen);
    free(s);
}

int se_sampler_reset(se_sampler * s) {
    if (!s) return se_error(SE_ERR_INVALID_ARGUMENT, "se_sampler_reset: sampler is NULL");
    s->n_history = 0;
    s->history_head = 0;
    return SE_OK;
}

int se_sampler_accept(se_sampler * s, int32_t token) {
    if (!s) return se_error(SE_ERR_INVALID_ARGUMENT, "se_sampler_accept: sampler is NULL");
    if (token < 0 || token >= s->n_vocab) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "token %d is outside the vocabulary (%d tokens)", token, s->n_vocab);
    }
    const int32_t cap = s->params.repeat_last_n;
    if (cap == 0) return SE_OK;
    s->history[s->history_head] = token;
    s->history_head = (s->history_head + 1) % cap;
    if (s->n_history < cap) s->n_history++;
    return SE_OK;
}

static uint64_t splitmix64(uint64_t * state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int by_logit_desc(const void * a, const void * b) {
    const float x = ((const candidate *) a)->logit, y = ((const candidate *) b)->logit;
    if (x != y) return (x < y) - (x > y);
    return ((const candidate *) a)->id - ((const candidate *) b)->id;  // ties: lower id first, deterministic
}

// Move the k largest candidates to the front (quickselect), then sort them.
static void top_k(candidate * c, int32_t n, int32_t k) {
    int32_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const candidate pivot = c[(lo + hi) / 2];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (by_logit_desc(&c[i], &pivot) < 0) i++;
            while (by_logit_desc(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                candidate tmp = c[i];
                c[i++] = c[j];
                c[j--] = tmp;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
    qsort(c, (size_t) k, sizeof(candidate), by_logit_desc);
}

static void softmax(candidate * c, int32_t n, float temperature) {
    const float max = c[0].logit;  // sorted: the first is the largest
    double sum = 0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf((c[i].logit - max) / temperature);
        sum += c[i].p;
    }
    for (int32_t i = 0; i < n; i++) c[i].p = (float) (c[i].p / sum);
}

int se_sampler_sample(se_sampler * s, const float * logits, int32_t * token) {
    if (!s || !logits || !token) return se_error(SE_ERR_INVALID_ARGUMENT, "se_sampler_sample: NULL argument");
    const se_sampler_params * p = &s->params;
    candidate * c = s->cand;
    int32_t n = s->n_vocab;
    // NaN compares false and +inf would win every comparison (and make softmax NaN): both mean the
    // numbers upstream went wrong. -inf is a legitimate "never this token", unless every logit is.
    bool any_finite = false;
    for (int32_t i = 0; i < n; i++) {
        if (isnan(logits[i]) || logits[i] == INFINITY) {
            return se_error(SE_ERR_NUMERICAL, "logit %d is %s", i, isnan(logits[i]) ? "NaN" : "+inf");
        }
        any_finite |= logits[i] != -INFINITY;
        c[i] = (candidate) {i, logits[i], 0};
    }
    if (!any_finite) return se_error(SE_ERR_NUMERICAL, "every logit is -inf: no token can be drawn");
    // repeat penalty: each token in the recent history once
    if (p->repeat_penalty != 1.0f) {
        for (int32_t i = 0; i < s->n_history; i++) {
            const int32_t t = s->history[i];
            if (s->seen[t]) continue;
            s->seen[t] = 1;
            c[t].logit = c[t].logit > 0 ? c[t].logit / p->repeat_penalty : c[t].logit * p->repeat_penalty;
        }
        for (int32_t i = 0; i < s->n_history; i++) s->seen[s->history[i]] = 0;
    }
    if (p->temperature == 0) {
        int32_t best = 0;
        for (int32_t i = 1; i < n; i++) {
            if (c[i].logit > c[best].logit) best = i;
        }
        *token = c[best].id;
        return SE_OK;
    }
    const int32_t k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
    top_k(c, n, k);
    n = k;
    softmax(c, n, 1.0f);
    if (p->top_p < 1.0f) {
        double cum = 0;
        for (int32_t i = 0; i < n; i++) {
            cum += c[i].p;
            if (cum >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }
    if (p->min_p > 0) {
        const float floor = p->min_p * c[0].p;
        int32_t keep = 1;
        while (keep < n && c[keep].p >= floor) keep++;
        n = keep;
    }
    softmax(c, n, p->temperature);
    const double u = (double) (splitmix64(&s->rng) >> 11) * 0x1.0p-53;  // uniform in [0, 1)
    double cum = 0;
    *token = c[n - 1].id;
    for (int32_t i = 0; i < n; i++) {
        cum += c[i].p;
        if (u < cum) {
            *token = c[i].id;
            break;
        }
    }
    return SE_OK;
}
