// libFuzzer harness: the GGUF loader and everything a caller can reach right after a load.
//
// Each input is a whole file. It is written to an in-memory file (memfd) and loaded through the
// public API like any model path, then every metadata value is read back in every representation,
// and where the model loads, a context is made and two tokens are decoded. Any crash, sanitizer
// report or hang is a finding; error returns are the expected outcome for almost every input.
#define _GNU_SOURCE
#include "sepedge.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static void read_metadata(const se_model * m) {
    const int32_t n = se_model_meta_count(m);
    for (int32_t i = 0; i < n; i++) {
        const char * key = se_model_meta_key(m, i);
        if (key) se_model_meta_find(m, key);
        int32_t type = 0, elem = 0;
        uint64_t count = 0;
        if (se_model_meta_type(m, i, &type, &elem, &count) != SE_OK) continue;
        const uint64_t k = count < 64 ? count : 64;  // enough to cover first, middle and bounds checks
        int64_t ints[64];
        double floats[64];
        uint64_t lens[64];
        se_model_meta_ints(m, i, 0, ints, k);
        se_model_meta_floats(m, i, 0, floats, k);
        se_model_meta_ints(m, i, count, ints, 1);  // one past the end: must be refused
        if (se_model_meta_strings(m, i, NULL, 0, lens, k) == SE_OK) {
            uint64_t total = 0;
            for (uint64_t j = 0; j < k; j++) total += lens[j];
            if (total < (1u << 24)) {
                char * buf = malloc(total + 1);
                if (buf) se_model_meta_strings(m, i, buf, total, lens, k);
                if (buf && total > 0) se_model_meta_strings(m, i, buf, total - 1, lens, k);  // too small
                free(buf);
            }
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    int fd = memfd_create("fuzz.gguf", 0);
    if (fd < 0) return 0;
    if (size && write(fd, data, size) != (ssize_t) size) {
        close(fd);
        return 0;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    se_model * m = NULL;
    if (se_model_load(path, NULL, &m) == SE_OK) {
        se_model_info info;
        se_model_get_info(m, &info);
        read_metadata(m);
        int32_t seps[16];
        se_model_get_separators(m, seps, 16);
        se_context_params cp = se_context_default_params();
        cp.n_ctx = 8;
        cp.n_batch = 4;
        cp.n_threads = 1;
        se_context * ctx = NULL;
        if (se_context_new(m, &cp, &ctx) == SE_OK) {
            const int32_t tokens[2] = {0, info.n_vocab - 1};
            float * logits = malloc((size_t) info.n_vocab * 2 * sizeof(float));
            if (logits) se_decode(ctx, tokens, 2, logits, 2);
            free(logits);
            se_context_free(ctx);
        }
        se_model_free(m);
    }
    close(fd);
    return 0;
}
