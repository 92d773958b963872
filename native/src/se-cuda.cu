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

thread_local se_cuda_launch_opts se_cuda_opts = {false, 1, 0, false, 0};

int se_cuda_error(cudaError_t e, const char * what) {
    return se_error(SE_ERR_BACKEND, "CUDA error: %s (%s)", cudaGetErrorString(e), what);
}

int se_cuda_check_device(int * count) {
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

int se_cuda_n_sms() {
    static int n = 0;
    if (!n) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            n = 128;
        }
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// context

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
    int32_t split_cells;  // se_cuda_split_cells() when the context was made
    int path;             // se_mv_path
    bool mmq;             // prefill products on int8 tensor cores where the type has them
    bool f16_on;          // prefill products of chunks of >= f16_min tokens through cuBLAS (se-cuda-cublas.cu)
    int32_t f16_min;      // SEPEDGE_CUDA_CUBLAS_MIN, or 0: by weight type (f16_min_of)
    se_f16_route f16;
    bool use_graphs;
    se_cuda_launch_opts opts;  // programmatic dependent launch, L2 prefetch (se-cuda.h)
    int next_l2_mb;            // decode: MB of the next products' weights the attention asks L2 for
    bool kv_heads_major;       // the cache's layout (se_kv_at): a KV head's cells side by side
    cudaGraphExec_t graph[2];  // one-token pass without / with logits
    se_cuda_timing timing;     // SEPEDGE_CUDA_TIMING
} cuda_ctx;

static void mark(cuda_ctx * c, const char * name) { se_cuda_timing_mark(&c->timing, name, c->stream); }

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
    se_cuda_elementwise_init();
    se_cuda_rope_init();
}

// Chunks of at least this many tokens take the cuBLAS route by default (SEPEDGE_CUDA_CUBLAS_MIN sets
// one threshold for every type). The route pays the weights' dequantization (2 bytes written a
// weight) per chunk however few its tokens, so it wins from the size where that is covered by what it
// gains over the int8 kernels. Measured on the H200, 8B files, route on / off (cuda_kernels_log.md,
// session 6): Q4_0 0.60x at 64 tokens, 0.74x at 128, 1.08x at 256, 1.38x at 512; Q4_K_M 1.01x at 64,
// 1.19x at 128, 2.07x at 512. The simple block types have the faster int8 kernels: 256 for them,
// 128 for the K-quants and the rest.
#define F16_MIN_TOKENS 128
#define F16_MIN_TOKENS_BLOCKS 256

static int32_t f16_min_of(const cuda_ctx * c, int32_t type) {
    if (c->f16_min > 0) return c->f16_min;
    switch (type) {
        case SE_TYPE_Q4_0: case SE_TYPE_Q4_1: case SE_TYPE_Q5_0: case SE_TYPE_Q8_0:
            return F16_MIN_TOKENS_BLOCKS;
        default: return F16_MIN_TOKENS;
    }
}

// The cuBLAS route (SEPEDGE_CUDA_CUBLAS=0: off): on where cuBLAS loads and every weight fits f16;
// otherwise the int8 and f16 kernels serve every chunk, as before.
static int f16_route_init(se_context * ctx, int64_t widest) {
    cuda_ctx * c = cctx(ctx);
    const se_cuda_model * cm = (const se_cuda_model *) ctx->model->dev;
    const char * env = getenv("SEPEDGE_CUDA_CUBLAS_MIN");
    c->f16_min = env && atoi(env) > 1 ? atoi(env) : 0;  // 0: by type (f16_min_of)
    env = getenv("SEPEDGE_CUDA_CUBLAS");
    const int32_t least = c->f16_min > 0 ? c->f16_min : F16_MIN_TOKENS;
    if ((env && !strcmp(env, "0")) || ctx->params.n_batch < least || se_cublas_load(false) != SE_OK) return SE_OK;
    int r = se_cuda_f16_init(&c->f16, ctx->params.n_batch, widest, c->stream);
    if (r == SE_ERR_OUT_OF_MEMORY) return SE_OK;  // no room for its buffers: the int8 kernels serve
    if (r != SE_OK) return r;
    const int32_t n_layer = ctx->model->hp.n_layer;
    bool fit = true;
    for (int32_t il = 0; il < n_layer && fit && r == SE_OK; il++) {
        const se_cuda_layer * l = &cm->layers[il];
        const se_dweight * ws[7] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        r = se_cuda_f16_weights_fit(ws, 7, &fit, c->stream);
    }
    const se_dweight * out = &cm->output;
    if (r == SE_OK && fit) r = se_cuda_f16_weights_fit(&out, 1, &fit, c->stream);
    if (r != SE_OK) return r;
    c->f16_on = fit;
    if (!fit) se_cuda_f16_free(&c->f16);  // weights beyond f16's range: the route stays off
    return SE_OK;
}

static int cuda_init(se_context * ctx) {
    const se_model * m = ctx->model;
    const se_hparams * hp = &m->hp;
    const se_cuda_model * cm = (const se_cuda_model *) m->dev;
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
    c->mmq = se_cuda_mmq_enabled();
    env = getenv("SEPEDGE_CUDA_GRAPHS");
    c->use_graphs = !(env && !strcmp(env, "0"));
    int r = se_cuda_timing_init(&c->timing);
    if (r != SE_OK) return r;
    if (c->timing.on) c->use_graphs = false;  // events between the kernels of a direct launch
    int major = 0;
    SE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, cm->device));
    env = getenv("SEPEDGE_CUDA_PDL");
    c->opts.pdl = major >= 9 && !c->timing.on && !(env && !strcmp(env, "0"));
    env = getenv("SEPEDGE_CUDA_PREFETCH");
    c->opts.prefetch = env && *env ? atoi(env) : 1;
    env = getenv("SEPEDGE_CUDA_MV_SPEC");
    c->opts.mv_typed = env && !strcmp(env, "1");
    env = getenv("SEPEDGE_CUDA_ATTN_TC");
    c->opts.attn_tc = env && *env ? atoi(env) : SE_ATTN_TC_AUTO;
    env = getenv("SEPEDGE_CUDA_ATTN_MERGE");
    c->opts.attn_merge = env && *env ? atoi(env) : 1;
    env = getenv("SEPEDGE_CUDA_NEXT_L2");
    c->next_l2_mb = env && *env ? atoi(env) : 0;
    env = getenv("SEPEDGE_CUDA_KV_LAYOUT");
    c->kv_heads_major = !(env && !strcmp(env, "cells"));
    const int64_t dim = hp->n_embd, q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = ctx->kv.row;
    int64_t widest = hp->n_ff > q_dim ? hp->n_ff : q_dim;
    if (widest < dim) widest = dim;
    c->logit_rows = nb < 8 ? (int32_t) nb : 8;
    c->split_cells = se_cuda_split_cells();
    c->max_splits = (int32_t) ((n_cells + c->split_cells - 1) / c->split_cells);
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
    DEV_ALLOC(c->qx, nb * widest);  // n_batch tokens' 8-bit activations (prefill on int8 tensor cores)
    DEV_ALLOC(c->ds, nb * widest / 32 + 1);
    DEV_ALLOC(c->kc, (int64_t) hp->n_layer * n_cells * kv_dim);
    DEV_ALLOC(c->vc, (int64_t) hp->n_layer * n_cells * kv_dim);
    DEV_ALLOC(c->freq, hp->head_dim / 2);
    DEV_ALLOC(c->rope, hp->head_dim / 2);
    DEV_ALLOC(c->count, hp->n_head);
    SE_CUDA_CHECK(cudaMemset(c->count, 0, (size_t) hp->n_head * sizeof(unsigned)));
    if (ctx->kv.cfg.mode != SE_KV_MODE_FULL && ctx->kv.cfg.mode != SE_KV_MODE_SEPLLM) {  // modes with deltas
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
    c->off_floor = c->off_pos + se_align256((size_t) nb * 4);
    c->off_cells = c->off_floor + se_align256((size_t) nb * 4);
    c->off_live = c->off_cells + se_align256((size_t) nb * 4);
    c->off_x = c->off_live + se_align256((size_t) n_cells * sizeof(se_dcell));
    c->step_bytes = c->off_x + (size_t) nb * (size_t) dim * sizeof(float);
    DEV_ALLOC(c->d_step, c->step_bytes);
    SE_CUDA_CHECK(cudaMallocHost((void **) &c->h_step, c->step_bytes));
    SE_CUDA_CHECK(cudaMallocHost((void **) &c->h_logits, (size_t) c->logit_rows * hp->n_vocab * sizeof(float)));
    // the cache starts as zeros: attention never reads a cell before it is written, but a clean
    // start keeps a stray read finite
    SE_CUDA_CHECK(cudaMemset(c->kc, 0, (size_t) hp->n_layer * n_cells * kv_dim * sizeof(__half)));
    SE_CUDA_CHECK(cudaMemset(c->vc, 0, (size_t) hp->n_layer * n_cells * kv_dim * sizeof(__half)));
    return f16_route_init(ctx, widest);
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
    cudaSetDevice(((const se_cuda_model *) ctx->model->dev)->device);
    for (int i = 0; i < 2; i++)
        if (c->graph[i]) cudaGraphExecDestroy(c->graph[i]);
    se_cuda_timing_free(&c->timing);
    se_cuda_f16_free(&c->f16);
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
    a.split_cells = c->split_cells;
    a.prefetch = c->opts.prefetch;
    a.merge = c->opts.attn_merge;
    a.scale = 1.0f / sqrtf((float) hp->head_dim);
    a.n_next = 0;
    a.cache_row_bytes = 2 * ctx->kv.row * (int64_t) sizeof(__half);
    a.next_max_cache = 16 << 20;
    a.kv_cell = c->kv_heads_major ? hp->head_dim : ctx->kv.row;
    a.kv_head = c->kv_heads_major ? ctx->kv.cfg.n_cells * hp->head_dim : hp->head_dim;
    return a;
}

// Spans of w's rows for an L2 prefetch: the first `take` rows of every `period` (codes, scales).
static void add_spans(se_dattn * a, const se_dweight & w, int64_t period, int64_t take) {
    if (take <= 0 || period <= 0) return;
    const int64_t n = w.rows / period > 0 ? w.rows / period : 1;
    if (take > w.rows) take = w.rows;
    const uint8_t * planes[2] = {w.q, w.s};
    const int64_t row_bytes[2] = {w.q_row, w.s_row};
    for (int i = 0; i < 2 && a->n_next < SE_L2_SPANS; i++) {
        if (!planes[i]) continue;
        a->next[a->n_next++] = se_l2_span{planes[i], period * row_bytes[i], take * row_bytes[i], n};
    }
}

static int64_t weight_bytes(const se_dweight & w) { return w.rows * (w.q_row + (w.s ? w.s_row : 0)); }

// What the decode attention of layer l asks L2 for ahead (SEPEDGE_CUDA_NEXT_L2: MB at most, 0 none):
// all of wo, then of gate and up the rows their kernel reads first, as many as the rest allows.
static void next_weights(const cuda_ctx * c, const se_cuda_layer * l, se_dattn * a) {
    const int64_t budget = (int64_t) c->next_l2_mb << 20;
    if (budget <= 0 || !c->opts.prefetch) return;
    int64_t left = budget;
    if (weight_bytes(l->wo) <= left) {
        add_spans(a, l->wo, l->wo.rows, l->wo.rows);
        left -= weight_bytes(l->wo);
    }
    const se_mm_out gate_up[2] = {{l->w_gate, c->hb, NULL, 0}, {l->w_up, c->hb2, NULL, 0}};
    int64_t period = se_cuda_matvec_period(gate_up, 2, true, c->path);
    if (period <= 0 || period > l->w_gate.rows) period = l->w_gate.rows;
    const int64_t both = weight_bytes(l->w_gate) + weight_bytes(l->w_up);
    const int64_t take = both > 0 ? (int64_t) ((double) left / (double) both * (double) period) : 0;
    add_spans(a, l->w_gate, period, take < period ? take : period);
    add_spans(a, l->w_up, period, take < period ? take : period);
}

// Whether the prefill product of w over n tokens goes through cuBLAS (its input then made f16 there).
static bool wants_f16(const cuda_ctx * c, const se_dweight * w, int32_t n) {
    return c->f16_on && n >= f16_min_of(c, w->type) && se_cuda_f16_takes(w);
}

static bool all_f16(const cuda_ctx * c, const se_mm_out * outs, int n_outs, int32_t n) {
    for (int k = 0; k < n_outs; k++)
        if (!wants_f16(c, &outs[k].w, n)) return false;
    return true;
}

// Whether the prefill product of w over n tokens runs on the int8 tensor cores (its input then
// wanted in 8 bits).
static bool wants_mmq(const cuda_ctx * c, const se_dweight * w, int32_t n) {
    return c->mmq && se_cuda_has_mmq(w->type) && w->cols % 32 == 0 && !wants_f16(c, w, n);
}

static bool any_mmq(const cuda_ctx * c, const se_mm_out * outs, int n_outs, int32_t n) {
    for (int k = 0; k < n_outs; k++)
        if (wants_mmq(c, &outs[k].w, n)) return true;
    return false;
}

// n > 1 tokens: the product of x through cuBLAS where the route takes it, else on the int8 tensor
// cores when q8 (x's 8-bit form is in qx, ds). (SE_ERR_UNSUPPORTED from the int8 kernel, which
// launched nothing: its tiles do not fit this GPU's shared memory; the f16 kernel then serves, from
// the float input that is still there.)
static int prefill_product(cuda_ctx * c, const se_mm_out * o, const float * x, bool q8, int32_t n) {
    if (wants_f16(c, &o->w, n)) return se_cuda_f16_products(&c->f16, o, 1, x, n, c->stream);
    if (q8 && wants_mmq(c, &o->w, n)) {
        const int r = se_cuda_mmq(o, 1, se_dact{x, c->qx, c->ds}, n, c->stream);
        if (r != SE_ERR_UNSUPPORTED) return r;
    }
    return se_cuda_matmul(o, x, n, c->stream);
}

// products of n tokens sharing the input xb (q8: its 8-bit form is in qx, ds)
static int products(cuda_ctx * c, const se_mm_out * outs, int n_outs, int32_t n, bool q8) {
    if (n == 1) return se_cuda_matvec(outs, n_outs, se_dact{c->xb, c->qx, c->ds}, c->path, c->stream);
    if (all_f16(c, outs, n_outs, n)) return se_cuda_f16_products(&c->f16, outs, n_outs, c->xb, n, c->stream);
    bool all_mmq = q8;
    for (int k = 0; k < n_outs; k++) all_mmq = all_mmq && wants_mmq(c, &outs[k].w, n);
    if (all_mmq) {  // one grid a type
        const int r = se_cuda_mmq(outs, n_outs, se_dact{c->xb, c->qx, c->ds}, n, c->stream);
        if (r != SE_ERR_UNSUPPORTED) return r;
    }
    for (int k = 0; k < n_outs; k++) {
        int r = prefill_product(c, &outs[k], c->xb, q8, n);
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
    if ((r = se_cuda_rmsnorm(x, norm, 1, hp->n_embd, hp->rms_eps, c->xb, q8 ? c->qx : NULL, c->ds, c->stream)) != SE_OK) return r;
    mark(c, "rmsnorm");
    if ((r = products(c, outs, n_outs, 1, q8)) != SE_OK || !swiglu) return r;
    mark(c, "matvec");
    return se_cuda_swiglu(c->hb, c->hb2, hp->n_ff, down_q8 ? c->qx : NULL, c->ds, c->stream);
}

// One layer for one token.
static int layer_decode(se_context * ctx, int32_t il) {
    const se_hparams * hp = &ctx->model->hp;
    const se_cuda_layer * l = &((const se_cuda_model *) ctx->model->dev)->layers[il];
    cuda_ctx * c = cctx(ctx);
    cudaStream_t st = c->stream;
    const se_mm_out qkv[3] = {{l->wq, c->q, l->bq, 0}, {l->wk, c->k, l->bk, 0}, {l->wv, c->v, l->bv, 0}};
    int r = norm_products(ctx, qkv, 3, c->x, l->attn_norm, false, NULL);
    if (r != SE_OK) return r;
    mark(c, "norm+qkv");
    se_dattn a = attn_args(ctx, il);
    next_weights(c, l, &a);
    if (!se_cuda_decode_fused(hp->head_dim)) {
        if ((r = se_cuda_rope_store(&a, c->q, c->freq, 1, st)) != SE_OK) return r;
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

// One layer for n > 1 tokens: tensor-core products (cuBLAS on f16 weights for chunks of at least
// f16_min tokens where the route is on; else int8 over 8-bit activations for the quantized types
// that have such a kernel, else f16) and tiled attention.
static int layer_prefill(se_context * ctx, int32_t il, int32_t n) {
    const se_hparams * hp = &ctx->model->hp;
    const se_cuda_layer * l = &((const se_cuda_model *) ctx->model->dev)->layers[il];
    cuda_ctx * c = cctx(ctx);
    cudaStream_t st = c->stream;
    const int64_t dim = hp->n_embd;
    const se_mm_out qkv[3] = {{l->wq, c->q, l->bq, 0}, {l->wk, c->k, l->bk, 0}, {l->wv, c->v, l->bv, 0}};
    bool q8 = any_mmq(c, qkv, 3, n);
    int r = se_cuda_rmsnorm(c->x, l->attn_norm, n, dim, hp->rms_eps, c->xb, q8 ? c->qx : NULL, c->ds, st);
    mark(c, "rmsnorm");
    if (r != SE_OK || (r = products(c, qkv, 3, n, q8)) != SE_OK) return r;
    mark(c, "qkv");
    const se_dattn a = attn_args(ctx, il);
    if ((r = se_cuda_rope_store(&a, c->q, c->freq, n, st)) != SE_OK) return r;
    mark(c, "rope_store");
    if ((r = se_cuda_attention_prefill(&a, n, st)) != SE_OK) return r;
    mark(c, "attention");
    const se_mm_out wo = {l->wo, c->x, NULL, 1};
    q8 = wants_mmq(c, &l->wo, n);
    if (q8 && (r = se_cuda_quantize_q8(c->att, n, l->wo.cols, c->qx, c->ds, st)) != SE_OK) return r;
    mark(c, "quantize");
    if ((r = prefill_product(c, &wo, c->att, q8, n)) != SE_OK) return r;
    mark(c, "wo");
    const se_mm_out gate_up[2] = {{l->w_gate, c->hb, NULL, 0}, {l->w_up, c->hb2, NULL, 0}};
    q8 = any_mmq(c, gate_up, 2, n);
    if ((r = se_cuda_rmsnorm(c->x, l->ffn_norm, n, dim, hp->rms_eps, c->xb, q8 ? c->qx : NULL, c->ds, st)) != SE_OK) return r;
    mark(c, "rmsnorm");
    if ((r = products(c, gate_up, 2, n, q8)) != SE_OK) return r;
    mark(c, "gate_up");
    q8 = wants_mmq(c, &l->w_down, n);
    if ((r = se_cuda_swiglu(c->hb, c->hb2, (int64_t) n * hp->n_ff, q8 ? c->qx : NULL, c->ds, st)) != SE_OK) return r;
    mark(c, "swiglu");
    const se_mm_out down = {l->w_down, c->x, NULL, 1};
    r = prefill_product(c, &down, c->hb, q8, n);
    mark(c, "down");
    return r;
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
    const se_cuda_model * cm = (const se_cuda_model *) ctx->model->dev;
    cuda_ctx * c = cctx(ctx);
    const se_mm_out o = {cm->output, c->logits, NULL, 0};
    const float * x = c->x + (int64_t) first * hp->n_embd;
    if (count == 1) {
        const int r = norm_products(ctx, &o, 1, x, cm->output_norm, false, NULL);
        mark(c, "norm+output");
        return r;
    }
    const bool q8 = wants_mmq(c, &cm->output, count);
    const int r = se_cuda_rmsnorm(x, cm->output_norm, count, hp->n_embd, hp->rms_eps, c->xb, q8 ? c->qx : NULL, c->ds, c->stream);
    return r != SE_OK ? r : products(c, &o, 1, count, q8);
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
    SE_CUDA_CHECK(cudaSetDevice(((const se_cuda_model *) ctx->model->dev)->device));
    se_cuda_opts = c->opts;
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
    c->timing.marking = c->timing.on && (n == 1) != c->timing.prefill;
    se_cuda_timing_begin(&c->timing, c->stream);
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
    se_cuda_timing_end(&c->timing);
    return SE_OK;
}

extern "C" const se_backend se_backend_cuda = {"cuda", cuda_init, cuda_free, cuda_forward};
