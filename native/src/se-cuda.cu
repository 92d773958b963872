// The CUDA backend: weights uploaded once in their quantized formats, the KV cache in device memory
// (f16), and the forward pass as a sequence of kernels on one stream.
//
// The cache's bookkeeping (which cells live, their positions and deltas: se-kv-cache.c) runs on the
// host from token ids, as for the CPU backend. Each pass uploads what the kernels need in one
// host-to-device copy: the tokens' positions and cells, the live cells in cache order, and the
// token embeddings (looked up on the host, so the embedding matrix needs no device memory). Nothing
// comes back but the logits; eviction and compression move no key or value, they only change the
// live list.
//
// Every kernel reads the step's sizes from device memory, so the one-token pass is the same launch
// sequence every time: it is captured once as a CUDA graph and replayed.
#include "se-cuda-quants.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int se_cuda_error(cudaError_t e, const char * what) {
    return se_error(SE_ERR_BACKEND, "CUDA error: %s (%s)", cudaGetErrorString(e), what);
}

static int check_device(int * count) {
    *count = 0;
    const cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {
        *count = 0;
        cudaGetLastError();  // not sticky: clear it
        return se_error(SE_ERR_BACKEND, "no CUDA GPU is usable: %s", cudaGetErrorString(e));
    }
    if (*count == 0) return se_error(SE_ERR_BACKEND, "no CUDA GPU found");
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// weights

void se_cuda_block_layout(int32_t type, int32_t * q_block, int32_t * s_block) {
    switch (type) {
        case SE_TYPE_Q4_0: *q_block = 16; *s_block = 2; break;
        case SE_TYPE_Q4_1: *q_block = 16; *s_block = 4; break;
        case SE_TYPE_Q8_0: *q_block = 32; *s_block = 2; break;
        case SE_TYPE_Q6_K: *q_block = offsetof(block_q6_K, d); *s_block = 2; break;
        default: *q_block = se_type_get(type)->size; *s_block = 0; break;
    }
}

void se_cuda_split_blocks(int32_t type, const uint8_t * src, int64_t n_blocks, uint8_t * q, uint8_t * s) {
    const int32_t size = se_type_get(type)->size;
    int32_t qb, sb;
    se_cuda_block_layout(type, &qb, &sb);
    for (int64_t i = 0; i < n_blocks; i++, src += size, q += qb, s += sb) {
        if (type == SE_TYPE_Q6_K) {  // ql qh scales | d
            memcpy(q, src, offsetof(block_q6_K, d));
            memcpy(s, src + offsetof(block_q6_K, d), 2);
        } else {                     // d (m) | codes
            memcpy(s, src, (size_t) sb);
            memcpy(q, src + sb, (size_t) qb);
        }
    }
}

typedef struct cuda_layer {
    float * attn_norm, * ffn_norm;   // (n_embd)
    float * bq, * bk, * bv;          // or NULL
    se_dweight wq, wk, wv, wo, w_gate, w_up, w_down;
} cuda_layer;

typedef struct cuda_model {
    int device;
    uint8_t * arena;                 // every weight, one allocation
    size_t size, used;
    cuda_layer * layers;             // (n_layer)
    float * output_norm;
    se_dweight output;
    uint8_t * staging;               // pinned, for the upload
    size_t staging_size;
} cuda_model;

static size_t align256(size_t n) { return (n + 255) & ~(size_t) 255; }

static size_t weight_bytes(const se_weight * w) {
    const se_type_traits * tt = se_type_get(w->type);
    int32_t qb, sb;
    se_cuda_block_layout(w->type, &qb, &sb);
    const int64_t nb = w->cols / tt->block;
    return align256((size_t) (w->rows * nb * qb)) + align256((size_t) (w->rows * nb * sb));
}

static uint8_t * claim(cuda_model * cm, size_t n) {
    uint8_t * p = cm->arena + cm->used;
    cm->used += align256(n);
    return p;
}

static int upload_weight(cuda_model * cm, const se_weight * w, se_dweight * out) {
    const se_type_traits * tt = se_type_get(w->type);
    int32_t qb, sb;
    se_cuda_block_layout(w->type, &qb, &sb);
    const int64_t nb = w->cols / tt->block;
    *out = (se_dweight) {w->type, sb ? SE_DL_PLANES : SE_DL_RAW, w->rows, w->cols, NULL, NULL, nb * qb, nb * sb};
    uint8_t * q = claim(cm, (size_t) (w->rows * nb * qb)), * s = sb ? claim(cm, (size_t) (w->rows * nb * sb)) : NULL;
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
        se_cuda_split_blocks(w->type, w->data + (uint64_t) r * w->row_bytes, n * nb, sq, ss);
        SE_CUDA_CHECK(cudaMemcpy(q + r * nb * qb, sq, (size_t) (n * nb * qb), cudaMemcpyHostToDevice));
        SE_CUDA_CHECK(cudaMemcpy(s + r * nb * sb, ss, (size_t) (n * nb * sb), cudaMemcpyHostToDevice));
    }
    return SE_OK;
}

static int upload_floats(cuda_model * cm, const float * src, int64_t n, float ** out) {
    *out = NULL;
    if (!src) return SE_OK;
    *out = (float *) claim(cm, (size_t) n * sizeof(float));
    SE_CUDA_CHECK(cudaMemcpy(*out, src, (size_t) n * sizeof(float), cudaMemcpyHostToDevice));
    return SE_OK;
}

static void cuda_model_free(cuda_model * cm) {
    if (!cm) return;
    cudaSetDevice(cm->device);
    cudaFree(cm->arena);
    cudaFreeHost(cm->staging);
    free(cm->layers);
    free(cm);
}

void se_cuda_model_free(se_model * m) {
    cuda_model_free((cuda_model *) m->dev);
    m->dev = NULL;
}

int se_cuda_model_upload(se_model * m) {
    int count;
    int r = check_device(&count);
    if (r != SE_OK) return r;
    const se_hparams * hp = &m->hp;
    cuda_model * cm = (cuda_model *) calloc(1, sizeof *cm);
    if (!cm || !(cm->layers = (cuda_layer *) calloc((size_t) hp->n_layer, sizeof(cuda_layer)))) {
        free(cm);
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    m->dev = cm;
    SE_CUDA_CHECK(cudaSetDevice(cm->device));
    const int64_t dim = hp->n_embd, q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = (int64_t) hp->n_head_kv * hp->head_dim;
    size_t total = weight_bytes(&m->output) + align256((size_t) dim * 4);
    for (int32_t il = 0; il < hp->n_layer; il++) {
        const se_layer * l = &m->layers[il];
        total += weight_bytes(&l->wq) + weight_bytes(&l->wk) + weight_bytes(&l->wv) + weight_bytes(&l->wo) +
                 weight_bytes(&l->w_gate) + weight_bytes(&l->w_up) + weight_bytes(&l->w_down) +
                 2 * align256((size_t) dim * 4) + align256((size_t) q_dim * 4) + 2 * align256((size_t) kv_dim * 4);
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
        cuda_layer * d = &cm->layers[il];
        if ((r = upload_floats(cm, l->attn_norm, dim, &d->attn_norm)) != SE_OK) break;
        if ((r = upload_floats(cm, l->ffn_norm, dim, &d->ffn_norm)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bq, q_dim, &d->bq)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bk, kv_dim, &d->bk)) != SE_OK) break;
        if ((r = upload_floats(cm, l->bv, kv_dim, &d->bv)) != SE_OK) break;
        const se_weight * src[7] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        se_dweight * dst[7] = {&d->wq, &d->wk, &d->wv, &d->wo, &d->w_gate, &d->w_up, &d->w_down};
        for (int k = 0; k < 7 && r == SE_OK; k++) r = upload_weight(cm, src[k], dst[k]);
    }
    if (r == SE_OK) r = upload_floats(cm, m->output_norm, dim, &cm->output_norm);
    if (r == SE_OK) r = upload_weight(cm, &m->output, &cm->output);
    cudaFreeHost(cm->staging);
    cm->staging = NULL;
    return r;
}

// ---------------------------------------------------------------------------------------------
// element-wise kernels

// out = x / rms(x) * w for n rows of dim (a block of 256 threads a row); with qx, also 8-bit blocks
// (dim % 32 == 0).
__global__ void __launch_bounds__(256) k_rmsnorm(const float * x, const float * w, int64_t dim, float eps, float * out,
                                                 int8_t * qx, float2 * ds) {
    const float * xr = x + blockIdx.x * dim;
    const float scale = block_rms_scale(xr, dim, eps);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float * o = out + blockIdx.x * dim;
    if (!qx) {
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * scale * w[i];
        return;
    }
    for (int64_t c = warp; c < dim / 32; c += 8) {
        const int64_t i = 32 * c + lane;
        const float v = xr[i] * scale * w[i];
        o[i] = v;
        float d;
        const int q = q8_lane(v, d);
        qx[blockIdx.x * dim + i] = (int8_t) q;
        const float sum = warp_sum((float) q);
        if (lane == 0) ds[(blockIdx.x * dim + i) / 32] = make_float2(d, d * sum);
    }
}

// Busy for `cycles` clocks: with SEPEDGE_CUDA_TIMING, holds the stream while the step's launches
// queue up behind it, so that the events between them time the kernels back to back.
__global__ void k_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

// g = silu(g) * u over n elements; with qx, also 8-bit blocks (n % 32 == 0).
__global__ void k_swiglu(float * g, const float * u, int64_t n, int8_t * qx, float2 * ds) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    float v = 0;
    if (i < n) {
        const float a = g[i];
        v = a / (1.0f + expf(-a)) * u[i];
        g[i] = v;
    }
    if (!qx) return;
    float d;
    const int q = q8_lane(v, d);
    const float sum = warp_sum((float) q);
    if (i >= n) return;
    qx[i] = (int8_t) q;
    if (i % 32 == 0) ds[i / 32] = make_float2(d, d * sum);
}

// Rotate q (in place) and k by each token's position, and store k and v (f16) in the tokens' cells.
__global__ void k_rope_store(float * q, const float * k, const float * v, const int32_t * pos, const int32_t * cells,
                             const double * freq, __half * kc, __half * vc, int n_head, int n_head_kv, int d, int rope_type) {
    const int t = blockIdx.x, half = d / 2;
    const int64_t row = (int64_t) n_head_kv * d, cell = cells[t];
    const double p = pos[t];
    for (int idx = threadIdx.x; idx < (n_head + n_head_kv) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        const int a = rope_type == SE_ROPE_NORM ? 2 * i : i, b = rope_type == SE_ROPE_NORM ? 2 * i + 1 : i + half;
        double sn, cs;
        sincos(p * freq[i], &sn, &cs);
        const float c = (float) cs, s = (float) sn;
        if (h < n_head) {
            float * x = q + ((int64_t) t * n_head + h) * d;
            const float x0 = x[a], x1 = x[b];
            x[a] = x0 * c - x1 * s;
            x[b] = x0 * s + x1 * c;
        } else {
            const float * x = k + (int64_t) t * row + (int64_t) (h - n_head) * d;
            __half * dst = kc + cell * row + (int64_t) (h - n_head) * d;
            const float x0 = x[a], x1 = x[b];
            dst[a] = __float2half(x0 * c - x1 * s);
            dst[b] = __float2half(x0 * s + x1 * c);
        }
    }
    for (int64_t j = threadIdx.x; j < row; j += blockDim.x) vc[cell * row + j] = __float2half(v[(int64_t) t * row + j]);
}

// ---------------------------------------------------------------------------------------------
// context

#define SE_TIMING_EVENTS 4096
#define SE_TIMING_NAMES 24

typedef struct cuda_ctx {
    cudaStream_t stream;
    float * x;            // (n_batch, n_embd) residual stream
    float * xb;           // (n_batch, max(n_embd, q_dim)) normalized input of a product
    float * q, * k, * v;  // (n_batch, q_dim / kv_dim)
    float * att;          // (n_batch, q_dim)
    float * hb, * hb2;    // (n_batch, n_ff)
    float * logits;       // (logit_rows, n_vocab)
    float * part;         // (n_head, max_splits, head_dim + 2)
    int8_t * qx;          // (widest) one token's activations, 8-bit
    float2 * ds;          // (widest / 32)
    __half * kc, * vc;    // (n_layer, n_cells, kv_dim)
    double * freq;        // (head_dim / 2)
    float2 * rope;        // (head_dim / 2) (cos, sin) of the decode token's position
    float2 * dtab;        // (n_cells, head_dim / 2) of each cell's delta, in the modes that have deltas
    int32_t * tab_delta;  // (n_cells) the delta each dtab row holds
    unsigned * count;     // (n_head) attention splits done
    // the step: pinned host copy and device copy, same layout
    uint8_t * h_step, * d_step;
    size_t off_pos, off_floor, off_cells, off_live, off_x, step_bytes;
    float * h_logits;     // pinned (logit_rows, n_vocab)
    int32_t logit_rows;
    int32_t max_splits;
    int path;             // se_mv_path
    bool use_graphs;
    cudaGraphExec_t graph[2];  // one-token pass without / with logits
    // SEPEDGE_CUDA_TIMING: events between the launches of one-token passes, summed per kernel
    bool timing, marking;  // marking: this pass
    cudaEvent_t ev[SE_TIMING_EVENTS];
    const char * ev_name[SE_TIMING_EVENTS];
    int n_ev;
    struct { const char * name; double us; long long count; } tt[SE_TIMING_NAMES];
    int n_tt;
    long long steps;
} cuda_ctx;

static void mark(cuda_ctx * c, const char * name) {
    if (!c->marking || c->n_ev >= SE_TIMING_EVENTS) return;
    cudaEventRecord(c->ev[c->n_ev], c->stream);
    c->ev_name[c->n_ev++] = name;
}

static void timing_collect(cuda_ctx * c) {
    for (int i = 1; i < c->n_ev; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, c->ev[i - 1], c->ev[i]);
        int k = 0;
        while (k < c->n_tt && strcmp(c->tt[k].name, c->ev_name[i])) k++;
        if (k == c->n_tt) {
            if (k == SE_TIMING_NAMES) continue;
            c->tt[c->n_tt++] = {c->ev_name[i], 0, 0};
        }
        c->tt[k].us += 1e3 * ms;
        c->tt[k].count++;
    }
    c->n_ev = 0;
    c->steps++;
}

static void timing_report(const cuda_ctx * c) {
    double total = 0;
    for (int k = 0; k < c->n_tt; k++) total += c->tt[k].us;
    fprintf(stderr, "sepedge CUDA timing, one-token passes: %lld, GPU time per pass %.1f us\n", c->steps, total / c->steps);
    fprintf(stderr, "%-22s %10s %12s %7s\n", "kernel", "launches", "us/pass", "share");
    for (int k = 0; k < c->n_tt; k++) {
        fprintf(stderr, "%-22s %10.1f %12.1f %6.1f%%\n", c->tt[k].name, (double) c->tt[k].count / c->steps,
                c->tt[k].us / c->steps, 100 * c->tt[k].us / total);
    }
}

static cuda_ctx * cctx(se_context * ctx) { return (cuda_ctx *) ctx->dev; }

#define DEV_ALLOC(ptr, count)                                                                         \
    do {                                                                                              \
        cudaError_t e_ = cudaMalloc((void **) &(ptr), (size_t) (count) * sizeof(*(ptr)));             \
        if (e_ != cudaSuccess) {                                                                      \
            cudaGetLastError();                                                                       \
            return se_error(SE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of GPU memory (%s)",       \
                            (double) ((size_t) (count) * sizeof(*(ptr))) / (1 << 20), #ptr);          \
        }                                                                                             \
    } while (0)

static void kernels_init() {
    static bool done = false;
    if (done) return;
    done = true;
    se_cuda_attention_init();
    se_cuda_matmul_init();
    const void * kernels[] = {(const void *) k_rmsnorm, (const void *) k_swiglu, (const void *) k_rope_store};
    for (const void * k : kernels) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaGetLastError();
}

static int cuda_init(se_context * ctx) {
    const se_model * m = ctx->model;
    const se_hparams * hp = &m->hp;
    const cuda_model * cm = (const cuda_model *) m->dev;
    se_buffers * b = &ctx->buf;
    const int64_t nb = ctx->params.n_batch, n_cells = ctx->kv.cfg.n_cells;
    b->cells = (int32_t *) calloc((size_t) nb, sizeof(int32_t));
    b->positions = (int32_t *) calloc((size_t) nb, sizeof(int32_t));
    b->sep_floor = (int64_t *) calloc((size_t) nb, sizeof(int64_t));
    b->visible = (int32_t *) calloc((size_t) nb, sizeof(int32_t));
    cuda_ctx * c = (cuda_ctx *) calloc(1, sizeof(cuda_ctx));
    if (!b->cells || !b->positions || !b->sep_floor || !b->visible || !c) {
        free(c);
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    ctx->dev = c;
    if (ctx->kv.kv_type != SE_KV_F16) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "the CUDA backend stores keys and values as f16: use kv_type f16");
    }
    if (hp->head_dim > 128 || hp->head_dim % 2) {
        return se_error(SE_ERR_UNSUPPORTED, "the CUDA backend runs head sizes up to 128 (this model: %d)", hp->head_dim);
    }
    SE_CUDA_CHECK(cudaSetDevice(cm->device));
    kernels_init();
    SE_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    const char * env = getenv("SEPEDGE_CUDA_MATVEC");
    c->path = env && !strcmp(env, "float") ? SE_MV_FLOAT : SE_MV_AUTO;
    env = getenv("SEPEDGE_CUDA_GRAPHS");
    c->use_graphs = !(env && !strcmp(env, "0"));
    env = getenv("SEPEDGE_CUDA_TIMING");
    c->timing = env && strcmp(env, "0");
    if (c->timing) {
        c->use_graphs = false;  // events between the kernels of a direct launch
        for (int i = 0; i < SE_TIMING_EVENTS; i++) SE_CUDA_CHECK(cudaEventCreate(&c->ev[i]));
    }
    const int64_t dim = hp->n_embd, q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = ctx->kv.row;
    int64_t widest = hp->n_ff > q_dim ? hp->n_ff : q_dim;
    if (widest < dim) widest = dim;
    c->logit_rows = nb < 8 ? (int32_t) nb : 8;
    c->max_splits = (int32_t) ((n_cells + SE_ATTN_SPLIT - 1) / SE_ATTN_SPLIT);
    if (c->max_splits > SE_ATTN_MAX_SPLITS) c->max_splits = SE_ATTN_MAX_SPLITS;
    DEV_ALLOC(c->x, nb * dim);
    DEV_ALLOC(c->xb, nb * (dim > q_dim ? dim : q_dim));
    DEV_ALLOC(c->q, nb * q_dim);
    DEV_ALLOC(c->k, nb * kv_dim);
    DEV_ALLOC(c->v, nb * kv_dim);
    DEV_ALLOC(c->att, nb * q_dim);
    DEV_ALLOC(c->hb, nb * hp->n_ff);
    DEV_ALLOC(c->hb2, nb * hp->n_ff);
    DEV_ALLOC(c->logits, (int64_t) c->logit_rows * hp->n_vocab);
    DEV_ALLOC(c->part, (int64_t) hp->n_head * c->max_splits * (hp->head_dim + 2));
    DEV_ALLOC(c->qx, widest);
    DEV_ALLOC(c->ds, widest / 32 + 1);
    DEV_ALLOC(c->kc, (int64_t) hp->n_layer * n_cells * kv_dim);
    DEV_ALLOC(c->vc, (int64_t) hp->n_layer * n_cells * kv_dim);
    DEV_ALLOC(c->freq, hp->head_dim / 2);
    DEV_ALLOC(c->rope, hp->head_dim / 2);
    DEV_ALLOC(c->count, hp->n_head);
    SE_CUDA_CHECK(cudaMemset(c->count, 0, (size_t) hp->n_head * sizeof(unsigned)));
    if (ctx->kv.cfg.mode == SE_KV_MODE_STREAMINGLLM || ctx->kv.cfg.mode == SE_KV_MODE_SEPLLM_STREAM) {
        DEV_ALLOC(c->dtab, n_cells * (hp->head_dim / 2));
        DEV_ALLOC(c->tab_delta, n_cells);
        SE_CUDA_CHECK(cudaMemset(c->tab_delta, 0, (size_t) n_cells * sizeof(int32_t)));
    }
    double freq[64];
    for (int32_t i = 0; i < hp->head_dim / 2; i++) {  // as se-forward.c's rope_freq
        freq[i] = pow((double) hp->rope_base, -2.0 * i / hp->head_dim) * hp->rope_freq_scale;
        if (m->rope_freqs) freq[i] /= m->rope_freqs[i];
    }
    SE_CUDA_CHECK(cudaMemcpy(c->freq, freq, (size_t) (hp->head_dim / 2) * sizeof(double), cudaMemcpyHostToDevice));
    c->off_pos = 256;
    c->off_floor = c->off_pos + align256((size_t) nb * 4);
    c->off_cells = c->off_floor + align256((size_t) nb * 4);
    c->off_live = c->off_cells + align256((size_t) nb * 4);
    c->off_x = c->off_live + align256((size_t) n_cells * sizeof(se_dcell));
    c->step_bytes = c->off_x + (size_t) nb * (size_t) dim * sizeof(float);
    DEV_ALLOC(c->d_step, c->step_bytes);
    SE_CUDA_CHECK(cudaMallocHost((void **) &c->h_step, c->step_bytes));
    SE_CUDA_CHECK(cudaMallocHost((void **) &c->h_logits, (size_t) c->logit_rows * hp->n_vocab * sizeof(float)));
    // the cache starts as zeros: attention never reads a cell before it is written, but a clean
    // start keeps a stray read finite
    SE_CUDA_CHECK(cudaMemset(c->kc, 0, (size_t) hp->n_layer * n_cells * kv_dim * sizeof(__half)));
    SE_CUDA_CHECK(cudaMemset(c->vc, 0, (size_t) hp->n_layer * n_cells * kv_dim * sizeof(__half)));
    return SE_OK;
}

static void cuda_free(se_context * ctx) {
    se_buffers * b = &ctx->buf;
    free(b->cells);
    free(b->positions);
    free(b->sep_floor);
    free(b->visible);
    memset(b, 0, sizeof *b);
    cuda_ctx * c = cctx(ctx);
    if (!c) return;
    cudaSetDevice(((const cuda_model *) ctx->model->dev)->device);
    for (int i = 0; i < 2; i++)
        if (c->graph[i]) cudaGraphExecDestroy(c->graph[i]);
    if (c->timing) {
        if (c->steps) timing_report(c);
        for (int i = 0; i < SE_TIMING_EVENTS; i++)
            if (c->ev[i]) cudaEventDestroy(c->ev[i]);
    }
    void * dev[] = {c->x, c->xb, c->q, c->k, c->v, c->att, c->hb, c->hb2, c->logits, c->part, c->qx, c->ds, c->kc, c->vc,
                    c->freq, c->rope, c->dtab, c->tab_delta, c->count, c->d_step};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) cudaFree(dev[i]);
    cudaFreeHost(c->h_step);
    cudaFreeHost(c->h_logits);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
    ctx->dev = NULL;
}

// ---------------------------------------------------------------------------------------------
// the forward pass

static se_dattn attn_args(se_context * ctx, int32_t il) {
    const se_hparams * hp = &ctx->model->hp;
    cuda_ctx * c = cctx(ctx);
    const int64_t layer = (int64_t) ctx->kv.cfg.n_cells * ctx->kv.row;
    se_dattn a;
    a.step = (const se_dstep *) c->d_step;
    a.pos = (const int32_t *) (c->d_step + c->off_pos);
    a.floor = (const int32_t *) (c->d_step + c->off_floor);
    a.cells = (const int32_t *) (c->d_step + c->off_cells);
    a.live = (const se_dcell *) (c->d_step + c->off_live);
    a.dtab = c->dtab;
    a.rope = c->rope;
    a.k = c->kc + il * layer;
    a.v = c->vc + il * layer;
    a.q = c->q;
    a.k_new = c->k;
    a.v_new = c->v;
    a.out = c->att;
    a.part = c->part;
    a.count = c->count;
    a.n_head = hp->n_head;
    a.n_head_kv = hp->n_head_kv;
    a.head_dim = hp->head_dim;
    a.rope_type = hp->rope_type;
    a.max_splits = c->max_splits;
    a.scale = 1.0f / sqrtf((float) hp->head_dim);
    return a;
}

// products of n tokens sharing the input xb (q8: its 8-bit form, one token)
static int products(cuda_ctx * c, const se_mm_out * outs, int n_outs, int32_t n, bool q8) {
    if (n == 1) return se_cuda_matvec(outs, n_outs, se_dact{c->xb, c->qx, c->ds}, c->path, c->stream);
    for (int k = 0; k < n_outs; k++) {
        int r = se_cuda_matmul(&outs[k], c->xb, n, c->stream);
        if (r != SE_OK) return r;
    }
    return SE_OK;
}

static bool any_q8(const cuda_ctx * c, const se_mm_out * outs, int n_outs) {
    for (int k = 0; k < n_outs; k++)
        if (se_cuda_wants_q8(&outs[k].w, c->path)) return true;
    return false;
}

// One token: products of rmsnorm(x) * norm, the norm made inside the product's kernel where the
// input fits its shared memory; with swiglu (gate, up), h = silu(gate) * up into hb, and 8-bit
// into qx when `down` reads that.
static int norm_products(se_context * ctx, const se_mm_out * outs, int n_outs, const float * x, const float * norm,
                         bool swiglu, const se_dweight * down) {
    const se_hparams * hp = &ctx->model->hp;
    cuda_ctx * c = cctx(ctx);
    const bool down_q8 = down && se_cuda_wants_q8(down, c->path);
    int r = se_cuda_matvec_norm(outs, n_outs, x, norm, hp->rms_eps, c->path, swiglu, down_q8 ? c->qx : NULL, c->ds, c->stream);
    if (r != SE_ERR_UNSUPPORTED) return r;
    const bool q8 = any_q8(c, outs, n_outs);
    k_rmsnorm<<<1, 256, 0, c->stream>>>(x, norm, hp->n_embd, hp->rms_eps, c->xb, q8 ? c->qx : NULL, c->ds);
    mark(c, "rmsnorm");
    if ((r = products(c, outs, n_outs, 1, q8)) != SE_OK || !swiglu) return r;
    mark(c, "matvec");
    k_swiglu<<<(unsigned) ((hp->n_ff + 255) / 256), 256, 0, c->stream>>>(c->hb, c->hb2, hp->n_ff, down_q8 ? c->qx : NULL, c->ds);
    return SE_OK;
}

// One layer for one token.
static int layer_decode(se_context * ctx, int32_t il) {
    const se_hparams * hp = &ctx->model->hp;
    const cuda_layer * l = &((const cuda_model *) ctx->model->dev)->layers[il];
    cuda_ctx * c = cctx(ctx);
    cudaStream_t st = c->stream;
    const se_mm_out qkv[3] = {{l->wq, c->q, l->bq, 0}, {l->wk, c->k, l->bk, 0}, {l->wv, c->v, l->bv, 0}};
    int r = norm_products(ctx, qkv, 3, c->x, l->attn_norm, false, NULL);
    if (r != SE_OK) return r;
    mark(c, "norm+qkv");
    const se_dattn a = attn_args(ctx, il);
    if (!se_cuda_decode_fused(hp->head_dim)) {
        const int64_t layer = (int64_t) ctx->kv.cfg.n_cells * ctx->kv.row;
        k_rope_store<<<1, 256, 0, st>>>(c->q, c->k, c->v, a.pos, a.cells, c->freq, c->kc + il * layer, c->vc + il * layer,
                                        hp->n_head, hp->n_head_kv, hp->head_dim, hp->rope_type);
        mark(c, "rope_store");
    }
    const bool q8 = se_cuda_wants_q8(&l->wo, c->path), fused = q8 && hp->head_dim % 32 == 0;  // attention quantizes
    if ((r = se_cuda_attention_decode(&a, fused ? c->qx : NULL, c->ds, st)) != SE_OK) return r;
    mark(c, "attention");
    if (q8 && !fused) {
        if ((r = se_cuda_quantize_q8(c->att, 1, (int64_t) hp->n_head * hp->head_dim, c->qx, c->ds, st)) != SE_OK) return r;
        mark(c, "quantize");
    }
    const se_mm_out wo = {l->wo, c->x, NULL, 1};
    if ((r = se_cuda_matvec(&wo, 1, se_dact{c->att, c->qx, c->ds}, c->path, st)) != SE_OK) return r;
    mark(c, "wo");
    const se_mm_out gate_up[2] = {{l->w_gate, c->hb, NULL, 0}, {l->w_up, c->hb2, NULL, 0}};
    if ((r = norm_products(ctx, gate_up, 2, c->x, l->ffn_norm, true, &l->w_down)) != SE_OK) return r;
    mark(c, "norm+gate_up+swiglu");
    const se_mm_out down = {l->w_down, c->x, NULL, 1};
    if ((r = se_cuda_matvec(&down, 1, se_dact{c->hb, c->qx, c->ds}, c->path, st)) != SE_OK) return r;
    mark(c, "down");
    return SE_OK;
}

// One layer for n > 1 tokens: tensor-core products and tiled attention.
static int layer_prefill(se_context * ctx, int32_t il, int32_t n) {
    const se_hparams * hp = &ctx->model->hp;
    const cuda_layer * l = &((const cuda_model *) ctx->model->dev)->layers[il];
    cuda_ctx * c = cctx(ctx);
    cudaStream_t st = c->stream;
    const int64_t dim = hp->n_embd, layer = (int64_t) ctx->kv.cfg.n_cells * ctx->kv.row;
    k_rmsnorm<<<n, 256, 0, st>>>(c->x, l->attn_norm, dim, hp->rms_eps, c->xb, NULL, c->ds);
    const se_mm_out qkv[3] = {{l->wq, c->q, l->bq, 0}, {l->wk, c->k, l->bk, 0}, {l->wv, c->v, l->bv, 0}};
    int r = products(c, qkv, 3, n, false);
    if (r != SE_OK) return r;
    const se_dattn a = attn_args(ctx, il);
    k_rope_store<<<n, 256, 0, st>>>(c->q, c->k, c->v, a.pos, a.cells, c->freq, c->kc + il * layer, c->vc + il * layer,
                                    hp->n_head, hp->n_head_kv, hp->head_dim, hp->rope_type);
    if ((r = se_cuda_attention_prefill(&a, n, st)) != SE_OK) return r;
    const se_mm_out wo = {l->wo, c->x, NULL, 1};
    if ((r = se_cuda_matmul(&wo, c->att, n, st)) != SE_OK) return r;
    k_rmsnorm<<<n, 256, 0, st>>>(c->x, l->ffn_norm, dim, hp->rms_eps, c->xb, NULL, c->ds);
    const se_mm_out gate_up[2] = {{l->w_gate, c->hb, NULL, 0}, {l->w_up, c->hb2, NULL, 0}};
    if ((r = products(c, gate_up, 2, n, false)) != SE_OK) return r;
    const int64_t n_ff = (int64_t) n * hp->n_ff;
    k_swiglu<<<(unsigned) ((n_ff + 255) / 256), 256, 0, st>>>(c->hb, c->hb2, n_ff, NULL, c->ds);
    const se_mm_out down = {l->w_down, c->x, NULL, 1};
    return se_cuda_matmul(&down, c->hb, n, st);
}

// All layers over the n tokens of the step.
static int run_layers(se_context * ctx, int32_t n) {
    const se_hparams * hp = &ctx->model->hp;
    cuda_ctx * c = cctx(ctx);
    cudaStream_t st = c->stream;
    SE_CUDA_CHECK(cudaMemcpyAsync(c->x, c->d_step + c->off_x, (size_t) (n * hp->n_embd) * sizeof(float),
                                  cudaMemcpyDeviceToDevice, st));
    mark(c, "embeddings");
    const se_dattn a = attn_args(ctx, 0);
    int r = se_cuda_rope_tables(&a, c->freq, c->tab_delta, c->dtab, n == 1 ? c->rope : NULL, st);
    mark(c, "rope_tables");
    for (int32_t il = 0; il < hp->n_layer && r == SE_OK; il++) r = n == 1 ? layer_decode(ctx, il) : layer_prefill(ctx, il, n);
    if (r == SE_OK) SE_CUDA_CHECK(cudaGetLastError());
    return r;
}

// Logits of `count` rows of the residual stream from row `first` into c->logits.
static int run_output(se_context * ctx, int32_t first, int32_t count) {
    const se_hparams * hp = &ctx->model->hp;
    const cuda_model * cm = (const cuda_model *) ctx->model->dev;
    cuda_ctx * c = cctx(ctx);
    const se_mm_out o = {cm->output, c->logits, NULL, 0};
    const float * x = c->x + (int64_t) first * hp->n_embd;
    if (count == 1) {
        const int r = norm_products(ctx, &o, 1, x, cm->output_norm, false, NULL);
        mark(c, "norm+output");
        return r;
    }
    k_rmsnorm<<<count, 256, 0, c->stream>>>(x, cm->output_norm, hp->n_embd, hp->rms_eps, c->xb, NULL, c->ds);
    return products(c, &o, 1, count, false);
}

static int capture(se_context * ctx, int with_logits) {
    cuda_ctx * c = cctx(ctx);
    cudaGraph_t g;
    SE_CUDA_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    int r = run_layers(ctx, 1);
    if (r == SE_OK && with_logits) r = run_output(ctx, 0, 1);
    const cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    if (r != SE_OK) {
        if (e == cudaSuccess) cudaGraphDestroy(g);
        return r;
    }
    SE_CUDA_CHECK(e);
    const cudaError_t ei = cudaGraphInstantiate(&c->graph[with_logits], g, 0);
    cudaGraphDestroy(g);
    SE_CUDA_CHECK(ei);
    return SE_OK;
}

// The step's upload: sizes, positions, cells, live cells, embeddings; and the visible counts.
static void build_step(se_context * ctx, const int32_t * tokens, int32_t n) {
    const se_model * m = ctx->model;
    const se_kv_cache * kv = &ctx->kv;
    cuda_ctx * c = cctx(ctx);
    se_buffers * b = &ctx->buf;
    *(se_dstep *) c->h_step = se_dstep{n, kv->n_live, kv->cfg.mode, kv->cfg.n_local};
    int32_t * pos = (int32_t *) (c->h_step + c->off_pos), * floor = (int32_t *) (c->h_step + c->off_floor);
    int32_t * cells = (int32_t *) (c->h_step + c->off_cells);
    for (int32_t t = 0; t < n; t++) {
        pos[t] = b->positions[t];
        cells[t] = b->cells[t];
        const int64_t f = b->sep_floor[t];
        floor[t] = f < 0 ? 0 : f > INT32_MAX - 1 ? INT32_MAX - 1 : (int32_t) f;
    }
    se_dcell * live = (se_dcell *) (c->h_step + c->off_live);
    for (int32_t i = 0; i < kv->n_live; i++) {
        const se_kv_cell * cl = &kv->m.cells[kv->live[i]];
        const int32_t sep = cl->region == SE_REGION_INIT ? INT32_MAX
                          : cl->sep_seq >= 0 ? (int32_t) (cl->sep_seq < INT32_MAX - 1 ? cl->sep_seq : INT32_MAX - 1) : -1;
        live[i] = se_dcell{kv->live[i], cl->pos, cl->delta, sep};
    }
    const se_type_traits * embd = se_type_get(m->tok_embd.type);
    float * x = (float *) (c->h_step + c->off_x);
    for (int32_t t = 0; t < n; t++) {
        embd->to_float(m->tok_embd.data + (uint64_t) tokens[t] * m->tok_embd.row_bytes, x + (int64_t) t * m->hp.n_embd,
                       m->hp.n_embd);
    }
    // the cells each query attends to (statistics): earlier cells all precede the chunk's positions,
    // so outside training-free sepllm a query sees them all plus the chunk's tokens up to itself
    for (int32_t t = 0; t < n; t++) {
        if (kv->cfg.mode != SE_KV_MODE_SEPLLM) {
            b->visible[t] = kv->n_live - n + t + 1;
            continue;
        }
        int32_t count = 0;
        for (int32_t i = 0; i < kv->n_live; i++) count += se_kv_visible(kv, &kv->m.cells[kv->live[i]], b->positions[t], b->sep_floor[t]);
        b->visible[t] = count;
    }
}

static int cuda_forward(se_context * ctx, const int32_t * tokens, int32_t n, float * logits, int32_t n_logits) {
    const se_hparams * hp = &ctx->model->hp;
    cuda_ctx * c = cctx(ctx);
    SE_CUDA_CHECK(cudaSetDevice(((const cuda_model *) ctx->model->dev)->device));
    build_step(ctx, tokens, n);
    const size_t head = c->off_live + (size_t) ctx->kv.n_live * sizeof(se_dcell);
    SE_CUDA_CHECK(cudaMemcpyAsync(c->d_step, c->h_step, head, cudaMemcpyHostToDevice, c->stream));
    SE_CUDA_CHECK(cudaMemcpyAsync(c->d_step + c->off_x, c->h_step + c->off_x, (size_t) n * hp->n_embd * sizeof(float),
                                  cudaMemcpyHostToDevice, c->stream));
    int r = SE_OK;
    if (n == 1 && c->use_graphs) {
        const int g = n_logits > 0;
        if (!c->graph[g] && (r = capture(ctx, g)) != SE_OK) return r;
        SE_CUDA_CHECK(cudaGraphLaunch(c->graph[g], c->stream));
        if (g) {
            SE_CUDA_CHECK(cudaMemcpyAsync(c->h_logits, c->logits, (size_t) hp->n_vocab * sizeof(float), cudaMemcpyDeviceToHost, c->stream));
        }
        SE_CUDA_CHECK(cudaStreamSynchronize(c->stream));
        if (g) memcpy(logits, c->h_logits, (size_t) hp->n_vocab * sizeof(float));
        return SE_OK;
    }
    c->marking = c->timing && n == 1;
    c->n_ev = 0;
    if (c->marking) {
        k_spin<<<1, 1, 0, c->stream>>>(20000000);  // ~10 ms: the launches below queue behind it
        mark(c, "start");
    }
    if ((r = run_layers(ctx, n)) != SE_OK) return r;
    for (int32_t g = 0; g < n_logits; g += c->logit_rows) {  // the wanted rows, a few at a time
        const int32_t count = n_logits - g < c->logit_rows ? n_logits - g : c->logit_rows;
        if ((r = run_output(ctx, n - n_logits + g, count)) != SE_OK) return r;
        const size_t bytes = (size_t) count * hp->n_vocab * sizeof(float);
        SE_CUDA_CHECK(cudaMemcpyAsync(c->h_logits, c->logits, bytes, cudaMemcpyDeviceToHost, c->stream));
        SE_CUDA_CHECK(cudaStreamSynchronize(c->stream));
        memcpy(logits + (int64_t) g * hp->n_vocab, c->h_logits, bytes);
    }
    // the pinned step buffer is rewritten by the next pass: wait until this one has read it
    SE_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->marking) timing_collect(c);
    c->marking = false;
    return SE_OK;
}

extern "C" const se_backend se_backend_cuda = {"cuda", cuda_init, cuda_free, cuda_forward};

// ---------------------------------------------------------------------------------------------
// public entry points for tests and tools

extern "C" int se_cuda_device_count(int32_t * count) {
    if (!count) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_device_count: count is NULL");
    int n;
    const int r = check_device(&n);
    *count = n;
    return r == SE_OK || n == 0 ? SE_OK : r;
}

typedef struct mm_test {  // device buffers of se_cuda_mul_mat
    uint8_t * w;
    float * x, * out;
    int8_t * qx;
    float2 * ds;
} mm_test;

static int mul_mat(const se_type_traits * tt, int32_t type, const void * w, int64_t rows, int64_t cols, const float * x,
                   int32_t n, float * out, int32_t path, mm_test * b) {
    int32_t qb, sb;
    se_cuda_block_layout(type, &qb, &sb);
    const int64_t nb = cols / tt->block;
    const size_t q_bytes = (size_t) (rows * nb * qb), s_bytes = (size_t) (rows * nb * sb);
    SE_CUDA_CHECK(cudaMalloc((void **) &b->w, align256(q_bytes) + s_bytes + 16));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->x, (size_t) (n * cols) * sizeof(float)));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->out, (size_t) (n * rows) * sizeof(float)));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->qx, (size_t) cols + 32));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->ds, (size_t) (cols / 32 + 1) * sizeof(float2)));
    se_dweight dw = {type, sb ? SE_DL_PLANES : SE_DL_RAW, rows, cols, b->w, sb ? b->w + align256(q_bytes) : NULL, nb * qb, nb * sb};
    if (sb) {
        uint8_t * host = (uint8_t *) malloc(q_bytes + s_bytes + 1);
        if (!host) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
        se_cuda_split_blocks(type, (const uint8_t *) w, rows * nb, host, host + q_bytes);
        cudaError_t e1 = cudaMemcpy(b->w, host, q_bytes, cudaMemcpyHostToDevice);
        cudaError_t e2 = cudaMemcpy(b->w + align256(q_bytes), host + q_bytes, s_bytes, cudaMemcpyHostToDevice);
        free(host);
        SE_CUDA_CHECK(e1);
        SE_CUDA_CHECK(e2);
    } else {
        SE_CUDA_CHECK(cudaMemcpy(b->w, w, q_bytes, cudaMemcpyHostToDevice));
    }
    SE_CUDA_CHECK(cudaMemcpy(b->x, x, (size_t) (n * cols) * sizeof(float), cudaMemcpyHostToDevice));
    int r = SE_OK;
    if (path == SE_MV_AUTO && n > 1) {
        const se_mm_out o = {dw, b->out, NULL, 0};
        r = se_cuda_matmul(&o, b->x, n, 0);
    } else {
        for (int32_t t = 0; t < n && r == SE_OK; t++) {  // the decode kernels, token by token
            const float * xt = b->x + t * cols;
            if (se_cuda_wants_q8(&dw, path)) r = se_cuda_quantize_q8(xt, 1, cols, b->qx, b->ds, 0);
            const se_mm_out o = {dw, b->out + t * rows, NULL, 0};
            if (r == SE_OK) r = se_cuda_matvec(&o, 1, se_dact{xt, b->qx, b->ds}, path, 0);
        }
    }
    if (r != SE_OK) return r;
    SE_CUDA_CHECK(cudaDeviceSynchronize());
    SE_CUDA_CHECK(cudaMemcpy(out, b->out, (size_t) (n * rows) * sizeof(float), cudaMemcpyDeviceToHost));
    return SE_OK;
}

extern "C" int se_cuda_mul_mat(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n,
                               float * out, int32_t path) {
    const se_type_traits * tt = se_type_get(type);
    if (!tt || !tt->dot) return se_error(SE_ERR_UNSUPPORTED, "se_cuda_mul_mat: type %d is not supported", type);
    if (!w || !x || !out || rows < 1 || n < 1 || cols < 1 || cols % tt->block || (path != SE_MV_AUTO && path != SE_MV_FLOAT)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_mul_mat: bad arguments");
    }
    if (tt->block > 1 && cols % 32) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_mul_mat: cols must be a multiple of 32");
    int count;
    int r = check_device(&count);
    if (r != SE_OK) return r;
    se_quants_init();
    SE_CUDA_CHECK(cudaSetDevice(0));
    mm_test b = {};
    r = mul_mat(tt, type, w, rows, cols, x, n, out, path, &b);
    cudaFree(b.w);
    cudaFree(b.x);
    cudaFree(b.out);
    cudaFree(b.qx);
    cudaFree(b.ds);
    return r;
}
