// llama.cpp's logits for a token sequence, every position, as raw float32 rows: the peer's side of
// the logit comparisons in test_llama_cpp.py.
//
//   llama-logits MODEL.gguf OUT.f32 < token-ids       (ids separated by whitespace)
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL OUT < token ids\n", argv[0]);
        return 2;
    }
    int cap = 256, n = 0;
    llama_token * ids = malloc(cap * sizeof *ids);
    while (scanf("%d", &ids[n]) == 1) {
        if (++n == cap) ids = realloc(ids, (cap *= 2) * sizeof *ids);
    }
    if (n == 0) { fprintf(stderr, "no tokens on stdin\n"); return 2; }

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "%s: llama.cpp could not load the model\n", argv[1]); return 1; }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.type_k = cp.type_v = GGML_TYPE_F32;  // an f16 cache would round K and V
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;  // the CPU flash-attention kernel rounds Q to f16
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "llama.cpp could not create a context\n"); return 1; }

    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = ids[i];
        b.pos[i] = i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 1; }
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
    fclose(out);

    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    free(ids);
    return 0;
}
