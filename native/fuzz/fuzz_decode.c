// libFuzzer harness: the decode API driven by a byte program.
//
// The models are real, tiny ones (make_seeds.py; paths in $SEPEDGE_FUZZ_MODELS, colon-separated),
// loaded once. An input picks a model and context parameters (every kv_mode, sizes around their
// limits, including invalid ones), then runs a sequence of calls: decode with tokens in and out of
// the vocabulary and any n_logits, clear, truncate, keep, info and cells, a cancelled decode, and
// sampling with fuzzed parameters and logits (NaN, inf included). After every call the cache must be
// self-consistent: n_live within capacity, cells' positions below n_seen.
#define _GNU_SOURCE
#include "sepedge.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 16

static se_model * models[MAX_MODELS];
static int n_models;

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    const char * env = getenv("SEPEDGE_FUZZ_MODELS");
    if (!env || !*env) {
        fprintf(stderr, "fuzz_decode: set SEPEDGE_FUZZ_MODELS to model paths (native/fuzz/make_seeds.py)\n");
        exit(1);
    }
    char * paths = strdup(env);
    for (char * save = NULL, * p = strtok_r(paths, ":", &save); p && n_models < MAX_MODELS; p = strtok_r(NULL, ":", &save)) {
        if (se_model_load(p, NULL, &models[n_models]) != SE_OK) {
            fprintf(stderr, "fuzz_decode: %s\n", se_last_error());
            exit(1);
        }
        n_models++;
    }
    free(paths);
    return 0;
}

typedef struct input {
    const uint8_t * p;
    size_t n;
} input;

static uint8_t u8(input * in) {
    if (!in->n) return 0;
    in->n--;
    return *in->p++;
}

static int32_t i16(input * in) { return (int16_t) (u8(in) | u8(in) << 8); }

static void check_cache(const se_context * ctx) {
    se_cache_info info;
    if (se_cache_get_info(ctx, &info) != SE_OK) abort();
    if (info.n_live < 0 || info.n_live > info.n_cells || info.n_seen < 0) abort();
    if (info.n_live_init + info.n_live_sep + info.n_live_recent != info.n_live) abort();
    int32_t * t = malloc(sizeof(int32_t) * 3 * (size_t) (info.n_live + 1));
    if (!t) return;
    if (se_cache_get_cells(ctx, t, t + info.n_live + 1, t + 2 * (info.n_live + 1), info.n_live) != SE_OK) abort();
    for (int32_t i = 0; i < info.n_live; i++) {
        if (t[info.n_live + 1 + i] < 0 || t[info.n_live + 1 + i] >= info.n_seen) abort();
    }
    free(t);
}

static void sample(input * in, int32_t n_vocab, const float * logits) {
    se_sampler_params sp = se_sampler_default_params();
    static const float temps[] = {0, 0.5f, 1, 2, -1, NAN, INFINITY};
    sp.temperature = temps[u8(in) % 7];
    sp.top_k = i16(in);
    sp.top_p = (float) u8(in) / 200.0f;
    sp.min_p = (float) u8(in) / 200.0f;
    sp.repeat_penalty = (float) u8(in) / 64.0f;
    sp.repeat_last_n = u8(in) % 80;
    sp.seed = u8(in);
    se_sampler * s = NULL;
    if (se_sampler_new(&sp, n_vocab, &s) != SE_OK) return;
    for (int k = u8(in) % 8; k > 0; k--) se_sampler_accept(s, i16(in));
    float * row = malloc((size_t) n_vocab * sizeof(float));
    if (row) {
        for (int32_t i = 0; i < n_vocab; i++) row[i] = logits ? logits[i] : (float) (i % 7);
        static const float specials[] = {NAN, INFINITY, -INFINITY, 0, 1e30f, -1e30f, 1e-30f};
        for (int k = u8(in) % 4; k > 0; k--) row[(uint32_t) i16(in) % (uint32_t) n_vocab] = specials[u8(in) % 7];
        if (u8(in) & 1) for (int32_t i = 0; i < n_vocab; i++) row[i] = -INFINITY;
        int32_t tok = -1;
        if (se_sampler_sample(s, row, &tok) == SE_OK && (tok < 0 || tok >= n_vocab)) abort();
        if (se_sampler_sample(s, row, &tok) == SE_OK && row[tok] == -INFINITY) abort();  // a banned token drawn
    }
    free(row);
    se_sampler_free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    input in = {data, size};
    se_model * m = models[u8(&in) % n_models];
    se_model_info mi;
    se_model_get_info(m, &mi);
    const int32_t n_vocab = mi.n_vocab;
    se_context_params cp = se_context_default_params();
    const uint8_t mode = u8(&in);
    cp.kv_mode = mode % 5 == 4 ? 7 : mode % 5;  // 7: an invalid mode
    cp.kv_type = (mode >> 4) & 1;
    cp.n_ctx = u8(&in) % 80;
    cp.n_batch = (int32_t) (u8(&in) % 20) - 1;
    cp.n_init = (int32_t) (u8(&in) % 10) - 1;
    cp.n_sep = (int32_t) (u8(&in) % 10) - 1;
    cp.n_local = (int32_t) (u8(&in) % 20) - 1;
    cp.n_cache = (int32_t) (u8(&in) % 70) - 1;
    cp.n_threads = u8(&in) % 8 == 7 ? 2 : 1;  // a second thread now and then: the pool, without its start-up cost each run
    if (cp.n_ctx == 0) cp.n_ctx = 1;  // 0 means the training context: too big for a fuzz run
    se_context * ctx = NULL;
    if (se_context_new(m, &cp, &ctx) != SE_OK) return 0;
    float * logits = malloc(sizeof(float) * (size_t) n_vocab * 24);
    int have_logits = 0;
    int32_t tokens[24];
    for (int steps = 0; in.n > 0 && steps < 64; steps++) {
        switch (u8(&in) % 8) {
            case 0: case 1: {  // decode (twice as likely as the rest)
                const int32_t n = u8(&in) % 24;
                for (int32_t i = 0; i < n; i++) {
                    const int32_t v = i16(&in);
                    tokens[i] = v >= 0 && (v & 0x4000) ? v : (int32_t) ((uint32_t) v % (uint32_t) n_vocab);
                }
                const int32_t n_logits = (int32_t) (u8(&in) % (n + 2)) - (n > 0 ? 0 : 1);
                se_cache_info before, after;
                se_cache_get_info(ctx, &before);
                int r = se_decode(ctx, tokens, n, logits, n_logits);
                se_cache_get_info(ctx, &after);
                if (r != SE_OK && r != SE_ERR_CONTEXT_FULL && r != SE_ERR_INVALID_ARGUMENT && r != SE_ERR_NUMERICAL) abort();
                // errors found before any work leave the cache as it was
                if ((r == SE_ERR_CONTEXT_FULL || r == SE_ERR_INVALID_ARGUMENT) && after.n_seen != before.n_seen) abort();
                if (r == SE_OK && after.n_seen != before.n_seen + n) abort();
                have_logits = r == SE_OK && n_logits > 0;
                break;
            }
            case 2: se_cache_clear(ctx); break;
            case 3: se_cache_truncate(ctx, i16(&in)); break;
            case 4: se_cache_keep(ctx, (int32_t) (u8(&in) % 12) - 1); break;
            case 5: {  // a cancelled decode fails, and undoes itself
                se_cache_info before, after;
                se_cache_get_info(ctx, &before);
                se_context_cancel(ctx);
                tokens[0] = u8(&in) % n_vocab;
                const int r = se_decode(ctx, tokens, 1, logits, 1);
                se_context_uncancel(ctx);
                se_cache_get_info(ctx, &after);
                if (r != SE_ERR_CANCELLED && r != SE_ERR_CONTEXT_FULL) abort();
                if (after.n_seen != before.n_seen) abort();
                break;
            }
            case 6: sample(&in, n_vocab, have_logits ? logits : NULL); break;
            default: check_cache(ctx); break;
        }
    }
    check_cache(ctx);
    free(logits);
    se_context_free(ctx);
    return 0;
}
