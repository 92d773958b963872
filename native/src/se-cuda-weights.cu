// The weights on the device: uploaded once, in their quantized formats, into one arena.
//
// Types whose GGUF blocks are not 16-byte multiples (Q4_0: 18 bytes, Q4_1: 20, Q8_0: 34, Q6_K: 210)
// are split on upload into a plane of codes and a plane of scales, so that every block's codes
// start 16-byte aligned and a warp reads a row with 16-byte loads; values and order are unchanged.
// Plane sizes come from the block structs of se-common.h (llama.cpp's ggml-common.h layouts).
//
// Q4_K (144-byte superblocks, already 16-byte multiples) is split too unless SEPEDGE_CUDA_Q4K_REPACK=0,
// into its 128 code bytes and a 20-byte head whose six-bit scales and mins are unpacked to bytes
// (se-common.h, SE_Q4K_SPLIT_*): a decode lane then reads its two scale / min pairs in one 4-byte
// load and d, dmin in another, with no shifts or branches per 32 codes (+2.8% bytes). Every reader
// of a device Q4_K weight (decode products, int8 prefill, dequant32 for the float and cuBLAS paths)
// dispatches on the layout (se_dkind). Measured on an H200 (cuda_kernels_log.md, session 11): 8B Q4_K_M
// decode 3.177 -> 2.854 ms a token (0.90x), interleaved.
#include "se-cuda-quants.cuh"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

bool se_cuda_q4k_split_env() {
    const char * env = getenv("SEPEDGE_CUDA_Q4K_REPACK");
    return !env || !*env || atoi(env) != 0;
}

void se_cuda_block_layout(int32_t type, bool q4k_split, int32_t * q_block, int32_t * s_block) {
    if (type == SE_TYPE_Q4_K && q4k_split) {
        *q_block = SE_Q4K_SPLIT_QB;
        *s_block = SE_Q4K_SPLIT_SB;
        return;
    }
    switch (type) {  // codes | the scales before them (d, and m for Q4_1)
        case SE_TYPE_Q4_0: *q_block = sizeof(block_q4_0::qs); *s_block = offsetof(block_q4_0, qs); break;
        case SE_TYPE_Q4_1: *q_block = sizeof(block_q4_1::qs); *s_block = offsetof(block_q4_1, qs); break;
        case SE_TYPE_Q8_0: *q_block = sizeof(block_q8_0::qs); *s_block = offsetof(block_q8_0, qs); break;
        // ql qh scales | d and two bytes of padding: 4-byte scale units, the smallest asynchronous copy
        case SE_TYPE_Q6_K: *q_block = offsetof(block_q6_K, d); *s_block = 2 * sizeof(block_q6_K::d); break;
        default: *q_block = se_type_get(type)->size; *s_block = 0; break;
    }
}

void se_cuda_split_blocks(int32_t type, bool q4k_split, const uint8_t * src, int64_t n_blocks, uint8_t * q, uint8_t * s) {
    if (type == SE_TYPE_Q4_K && q4k_split) {
        se_q4_K_split(src, n_blocks, q, s);
        return;
    }
    const int32_t size = se_type_get(type)->size;
    int32_t qb, sb;
    se_cuda_block_layout(type, false, &qb, &sb);
    for (int64_t i = 0; i < n_blocks; i++, src += size, q += qb, s += sb) {
        if (type == SE_TYPE_Q6_K) {  // ql qh scales | d, padding
            memcpy(q, src, offsetof(block_q6_K, d));
            memcpy(s, src + offsetof(block_q6_K, d), sizeof(block_q6_K::d));
            memset(s + sizeof(block_q6_K::d), 0, (size_t) sb - sizeof(block_q6_K::d));
        } else {                     // d (m) | codes
            memcpy(s, src, (size_t) sb);
            memcpy(q, src + sb, (size_t) qb);
        }
    }
}

static size_t weight_bytes(const se_weight * w, bool q4k_split) {
    const se_type_traits * tt = se_type_get(w->type);
    int32_t qb, sb;
    se_cuda_block_layout(w->type, q4k_split, &qb, &sb);
    const int64_t nb = w->cols / tt->block;
    return se_align256((size_t) (w->rows * nb * qb)) + se_align256((size_t) (w->rows * se_align16(nb * sb)));
}

static uint8_t * claim(se_cuda_model * cm, size_t n) {
    uint8_t * p = cm->arena + cm->used;
    cm->used += se_align256(n);
    return p;
}

static int upload_weight(se_cuda_model * cm, const se_weight * w, bool q4k_split, se_dweight * out) {
    const se_type_traits * tt = se_type_get(w->type);
    int32_t qb, sb;
    se_cuda_block_layout(w->type, q4k_split, &qb, &sb);
    const int64_t nb = w->cols / tt->block;
    const int64_t s_row = se_align16(nb * sb);
    *out = (se_dweight) {w->type, sb ? SE_DL_PLANES : SE_DL_RAW, w->rows, w->cols, NULL, NULL, nb * qb, s_row};
    uint8_t * q = claim(cm, (size_t) (w->rows * nb * qb)), * s = sb ? claim(cm, (size_t) (w->rows * s_row)) : NULL;
    out->q = q;
    out->s = s;
    if (!sb) {
        SE_CUDA_CHECK(cudaMemcpy(q, w->data, (size_t) (w->rows * nb * qb), cudaMemcpyHostToDevice));
        return SE_OK;
    }
    // split rows into the staging buffer, a batch at a time: codes in the first half, scales after
    const int64_t per_row = nb * (qb + sb);
    int64_t batch = (int64_t) cm->staging_size / per_row;
    if (batch < 1) return se_error(SE_ERR_OUT_OF_MEMORY, "a weight row does not fit the upload buffer");
    for (int64_t r = 0; r < w->rows; r += batch) {
        const int64_t n = w->rows - r < batch ? w->rows - r : batch;
        uint8_t * sq = cm->staging, * ss = cm->staging + n * nb * qb;
        se_cuda_split_blocks(w->type, q4k_split, w->data + (uint64_t) r * w->row_bytes, n * nb, sq, ss);
        SE_CUDA_CHECK(cudaMemcpy(q + r * nb * qb, sq, (size_t) (n * nb * qb), cudaMemcpyHostToDevice));
        SE_CUDA_CHECK(cudaMemcpy2D(s + r * s_row, (size_t) s_row, ss, (size_t) (nb * sb), (size_t) (nb * sb), (size_t) n,
                                   cudaMemcpyHostToDevice));
    }
    return SE_OK;
}

static int upload_floats(se_cuda_model * cm, const float * src, int64_t n, float ** out) {
    *out = NULL;
    if (!src) return SE_OK;
    *out = (float *) claim(cm, (size_t) n * sizeof(float));
    SE_CUDA_CHECK(cudaMemcpy(*out, src, (size_t) n * sizeof(float), cudaMemcpyHostToDevice));
    return SE_OK;
}

static void cuda_model_free(se_cuda_model * cm) {
    if (!cm) return;
    cudaSetDevice(cm->device);
    cudaFree(cm->arena);
    cudaFreeHost(cm->staging);
    free(cm->layers);
    free(cm);
}

void se_cuda_model_free(se_model * m) {
    cuda_model_free((se_cuda_model *) m->dev);
    m->dev = NULL;
}

int se_cuda_model_upload(se_model * m) {
    int count;
    int r = se_cuda_check_device(&count);
    if (r != SE_OK) return r;
    const se_hparams * hp = &m->hp;
    se_cuda_model * cm = (se_cuda_model *) calloc(1, sizeof *cm);
    if (!cm || !(cm->layers = (se_cuda_layer *) calloc((size_t) hp->n_layer, sizeof(se_cuda_layer)))) {
        free(cm);
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    m->dev = cm;
    SE_CUDA_CHECK(cudaSetDevice(cm->device));
    const int64_t dim = hp->n_embd, q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    const bool split = se_cuda_q4k_split_env();
    size_t total = weight_bytes(&m->output, split) + se_align256((size_t) dim * 4);
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const se_layer * l = &m->layers[il];
        total += weight_bytes(&l->wq, split) + weight_bytes(&l->wk, split) + weight_bytes(&l->wv, split) +
                 weight_bytes(&l->wo, split) + weight_bytes(&l->w_gate, split) + weight_bytes(&l->w_up, split) +
                 weight_bytes(&l->w_down, split) +
                 2 * se_align256((size_t) dim * 4) + se_align256((size_t) q_dim * 4) + 2 * se_align256((size_t) kv_dim * 4);
    }
    cudaError_t e = cudaMalloc((void **) &cm->arena, total);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return se_error(SE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of GPU memory for the weights: %s",
                        (double) total / (1 << 20), cudaGetErrorString(e));
    }
    cm->size = total;
    cm->staging_size = 64u << 20;
    SE_CUDA_CHECK(cudaMallocHost((void **) &cm->staging, cm->staging_size));
    for (int32_t il = 0; il < hp->n_layer && r == SE_OK; il++) {
        const se_layer * l = &m->layers[il];
        se_cuda_layer * d = &cm->layers[il];
        if ((r = upload_floats(cm, l->attn_norm, dim, &d->attn_norm)) != SE_OK) break;
        if ((r = upload_floats(cm, l->ffn_norm, dim, &d->ffn_norm)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bq, q_dim, &d->bq)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bk, kv_dim, &d->bk)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bv, kv_dim, &d->bv)) != SE_OK) break;
        const se_weight * src[7] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        se_dweight * dst[7] = {&d->wq, &d->wk, &d->wv, &d->wo, &d->w_gate, &d->w_up, &d->w_down};
        for (int k = 0; k < 7 && r == SE_OK; k++) r = upload_weight(cm, src[k], split, dst[k]);
    }
    if (r == SE_OK) r = upload_floats(cm, m->output_norm, dim, &cm->output_norm);
    if (r == SE_OK) r = upload_weight(cm, &m->output, split, &cm->output);
    cudaFreeHost(cm->staging);
    cm->staging = NULL;
    return r;
}
