// The transformer forward pass on the CPU backend (llama family):
//
//   x = embed(tokens)
//   per layer:  h = rmsnorm(x);  q, k, v = h Wq, h Wk, h Wv;  q, k = rope(q, k);  store k, v
//               x += attention(q, cache) Wo
//               h = rmsnorm(x);  x += (silu(h Wgate) * (h Wup)) Wdown
//   logits = rmsnorm(x) Wout
//
// Matrix products and attention run on the thread pool; the rest is cheap and stays on the caller.
#include "se-impl.h"
#include "se-common.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// matrix products: out (n, rows) = x (n, cols) . W^T for one or more weights sharing the input
// (Q, K, V; gate, up), their rows split across threads in one pass. Quantized weights take the
// activations quantized to 8 bits once per input.

typedef struct mm_out {
    float * out;
    const se_weight * w;
    const float * bias;
} mm_out;

typedef struct matmul_job {
    const float * x;        // (n, cols) float activations
    const void * xq;        // (n, cols / 32) Q8 blocks, when a weight needs them
    int32_t n;
    int64_t cols;
    mm_out outs[3];
    int n_outs;
    int64_t rows;           // all weights' rows together
    int64_t chunk;          // rows per work item, a multiple of 8
    atomic_llong next;      // the next work item
} matmul_job;

// What the input rows of a product need first; done per token by the threads that quantize them,
// so that normalization and the SwiGLU product run in parallel and cost no extra pool barrier.
typedef struct row_prep {
    float * x;              // norm: x += add (when add is set), then input = rmsnorm(x) * norm
    const float * add;
    const float * norm;
    const float * up;       // swiglu: input (the gate values, in place) = silu(gate) * up
    float eps;
} row_prep;

static void rmsnorm(float * out, const float * x, const float * weight, int64_t dim, int32_t n, float eps);

typedef struct quantize_job {
    float * x;              // (n, cols) the float input rows
    se_block_q8 * q;        // their 8-bit form, or NULL when no weight needs it
    int32_t n;
    int64_t cols;
    const row_prep * prep;  // or NULL
    atomic_int next;        // the next token
} quantize_job;

static void quantize_task(void * p, int ith, int nth) {
    quantize_job * j = p;
    for (int32_t t; (t = atomic_fetch_add(&j->next, 1)) < j->n;) {
        float * in = j->x + t * j->cols;
        const row_prep * r = j->prep;
        if (r && r->norm) {
            float * x = r->x + t * j->cols;
            if (r->add) {
                for (int64_t i = 0; i < j->cols; i++) x[i] += r->add[t * j->cols + i];
            }
            rmsnorm(in, x, r->norm, j->cols, 1, r->eps);
        } else if (r && r->up) {
            const float * up = r->up + t * j->cols;
            for (int64_t i = 0; i < j->cols; i++) in[i] = in[i] / (1.0f + expf(-in[i])) * up[i];
        }
        if (j->q) se_kern.quantize_q8(in, j->q + t * (j->cols / 32), j->cols);
    }
}

// Threads take chunks of the combined rows from a shared counter (as llama.cpp's threadpool hands
// out chunks): on a machine where another process can take a core away, the other threads finish
// the work instead of waiting. Chunks are cut at multiples of 8 so that interleaved groups
// (se-repack.c) stay whole; each row takes the same kernel whichever thread runs it.
static void matmul_task(void * p, int ith, int nth) {
    matmul_job * j = p;
    for (;;) {
        int64_t r = atomic_fetch_add(&j->next, 1) * j->chunk;
        if (r >= j->rows) return;
        const int64_t end = r + j->chunk < j->rows ? r + j->chunk : j->rows;
        int64_t base = 0;  // first row of outs[k] in the combined row space
        for (int k = 0; k < j->n_outs && r < end; base += j->outs[k].w->rows, k++) {
            const mm_out * o = &j->outs[k];
            const se_weight * w = o->w;
            if (r >= base + w->rows) continue;
            const se_type_traits * tt = se_type_get(w->type);
            const void * act = tt->act == SE_ACT_Q8 ? j->xq : (const void *) j->x;
            const int64_t stop = end < base + w->rows ? end : base + w->rows;
            se_matmul_rows(w, o->bias, act, se_act_row_bytes(tt->act, j->cols), j->n, o->out, r - base, stop - base);
            r = stop;
        }
    }
}

// `prep` (or NULL) is applied to the rows of x first, in place.
static void matmul_many(se_context * ctx, float * x, int32_t n, const mm_out * outs, int n_outs, const row_prep * prep) {
    matmul_job j = {.x = x, .n = n, .cols = outs[0].w->cols, .n_outs = n_outs};
    atomic_init(&j.next, 0);
    bool need_q8 = false;
    for (int k = 0; k < n_outs; k++) {
        j.outs[k] = outs[k];
        j.rows += outs[k].w->rows;
        need_q8 |= se_type_get(outs[k].w->type)->act == SE_ACT_Q8;
    }
    if (need_q8 || prep) {
        quantize_job q = {.x = x, .q = need_q8 ? ctx->buf.xq : NULL, .n = n, .cols = j.cols, .prep = prep};
        atomic_init(&q.next, 0);
        if (n == 1) quantize_task(&q, 0, 1);
        else se_pool_run(ctx->pool, quantize_task, &q);
        j.xq = ctx->buf.xq;
    }
    // about 8 chunks per thread, each whole pairs of groups of 8 rows (the AVX-512 kernels take two)
    const int64_t pairs = (j.rows + 2 * SE_RP_ROWS - 1) / (2 * SE_RP_ROWS), per = 8 * (int64_t) se_pool_size(ctx->pool);
    j.chunk = (pairs + per - 1) / per * 2 * SE_RP_ROWS;
    se_pool_run(ctx->pool, matmul_task, &j);
}

static void matmul(se_context * ctx, float * out, float * x, const se_weight * w, const float * bias, int32_t n,
                   const row_prep * prep) {
    const mm_out o = {out, w, bias};
    matmul_many(ctx, x, n, &o, 1, prep);
}

// ---------------------------------------------------------------------------------------------
// element-wise pieces

static void rmsnorm(float * out, const float * x, const float * weight, int64_t dim, int32_t n, float eps) {
    for (int32_t t = 0; t < n; t++, x += dim, out += dim) {
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double) x[i] * x[i];
        const float scale = (float) (1.0 / sqrt(ss / (double) dim + eps));
        for (int64_t i = 0; i < dim; i++) out[i] = x[i] * scale * weight[i];
    }
}

// RoPE angle per position of frequency i: freq_scale * base^(-2i/d) / factor_i
static double rope_freq(const se_model * m, int32_t i) {
    const se_hparams * hp = &m->hp;
    double freq = pow((double) hp->rope_base, -2.0 * i / hp->head_dim) * hp->rope_freq_scale;
    return m->rope_freqs ? freq / m->rope_freqs[i] : freq;
}

static int cmp_cell(const void * a, const void * b) {
    const int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    return (x > y) - (x < y);
}

// cos/sin of every (token, frequency) pair of this batch, and of every cell that is read with an
// extra rotation (its delta)
static void rope_tables(se_context * ctx, int32_t n) {
    const se_model * m = ctx->model;
    const int32_t half = m->hp.head_dim / 2;
    se_buffers * b = &ctx->buf;
    for (int32_t i = 0; i < half; i++) {
        const double freq = rope_freq(m, i);
        for (int32_t t = 0; t < n; t++) {
            const double theta = (double) b->positions[t] * freq;
            b->rope_cos[t * half + i] = (float) cos(theta);
            b->rope_sin[t * half + i] = (float) sin(theta);
        }
        for (int32_t j = 0; j < ctx->kv.n_live; j++) {
            const int32_t c = ctx->kv.live[j];
            const int32_t delta = ctx->kv.m.cells[c].delta;
            if (delta == 0 || delta == b->delta_done[c]) continue;  // a cell's delta changes rarely
            b->delta_cos[(int64_t) c * half + i] = (float) cos(delta * freq);
            b->delta_sin[(int64_t) c * half + i] = (float) sin(delta * freq);
        }
    }
    for (int32_t j = 0; j < ctx->kv.n_live; j++) b->delta_done[ctx->kv.live[j]] = ctx->kv.m.cells[ctx->kv.live[j]].delta;
    if (ctx->kv.sliding) {
        // a pass that slides the window: query t reads these cells at delta + t, with the angles a
        // pass of that token alone would use for them
        int32_t k = 0;
        for (int32_t j = 0; j < ctx->kv.n_live; j++) {
            const int32_t c = ctx->kv.live[j];
            const se_kv_cell * cell = &ctx->kv.m.cells[c];
            if (!se_kv_step(&ctx->kv, cell)) continue;
            b->step_row[c] = k;
            for (int32_t t = 0; t < n; t++) {
                float * cs = b->step_cos + ((int64_t) k * b->step_tokens + t) * half, * sn = b->step_sin + ((int64_t) k * b->step_tokens + t) * half;
                for (int32_t i = 0; i < half; i++) {
                    const double theta = (double) (cell->delta + t) * rope_freq(m, i);
                    cs[i] = (float) cos(theta);
                    sn[i] = (float) sin(theta);
                }
            }
            k++;
        }
    }
    // attention walks the live cells in memory order (their rows in the cache), not in cache order
    memcpy(b->order, ctx->kv.live, (size_t) ctx->kv.n_live * sizeof(int32_t));
    qsort(b->order, (size_t) ctx->kv.n_live, sizeof(int32_t), cmp_cell);
}

// Rotate one head of d values by the angles (c, s): the pair convention of the model.
static void rotate(float * v, const float * c, const float * s, int32_t d, int32_t rope_type) {
    const int32_t half = d / 2;
    for (int32_t i = 0; i < half; i++) {
        // NORM rotates adjacent pairs; NEOX rotates i with i + d/2
        const int32_t a = rope_type == SE_ROPE_NORM ? 2 * i : i;
        const int32_t b = rope_type == SE_ROPE_NORM ? 2 * i + 1 : i + half;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c[i] - x1 * s[i];
        v[b] = x0 * s[i] + x1 * c[i];
    }
}

static void rope(const se_context * ctx, float * x, int32_t n_heads, int32_t n) {
    const se_hparams * hp = &ctx->model->hp;
    const int32_t d = hp->head_dim, half = d / 2;
    for (int32_t t = 0; t < n; t++) {
        for (int32_t h = 0; h < n_heads; h++) {
            rotate(x + ((int64_t) t * n_heads + h) * d, ctx->buf.rope_cos + t * half, ctx->buf.rope_sin + t * half, d,
                   hp->rope_type);
        }
    }
}

static void store_kv(se_context * ctx, int32_t il, const float * k, const float * v, int32_t n) {
    se_kv_cache * kv = &ctx->kv;
    for (int32_t t = 0; t < n; t++) {
        void * kd = se_kv_k(kv, il, ctx->buf.cells[t]), * vd = se_kv_v(kv, il, ctx->buf.cells[t]);
        if (kv->kv_type == SE_KV_F16) {
            se_fp32_to_fp16_row(k + t * kv->row, kd, kv->row);
            se_fp32_to_fp16_row(v + t * kv->row, vd, kv->row);
        } else {
            memcpy(kd, k + t * kv->row, (size_t) kv->row * sizeof(float));
            memcpy(vd, v + t * kv->row, (size_t) kv->row * sizeof(float));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// attention: every (token, head) pair against the live cells it may see

// One work item: a tile of up to ATT_TOKENS query tokens against one KV head, for `nh` of the query
// heads that share it (GQA): nq = tokens x heads query rows. Each live cell's key and value row is
// read once, in memory order, for all of them: the scores are a small (nq x cells) matrix product
// and the output a (cells -> nq x d) one, with f16 rows converted inside the multiply-add loops.
#define ATT_TOKENS 4
#define SE_ATT_MAX_SPLITS 8  // parts of a split decode step's cells

// Cells [c0, c1) of the memory order; `part` NULL: the normalized outputs go to b->att. Else (a
// decode step whose cells are split among threads, as flash-decoding splits them) this range's
// part of the softmax goes there for merge_parts: per query its max score, its sum of exp(score -
// max), the outputs weighted by those exps (nq x d), then the count of cells the first token saw.
static void attend(se_context * ctx, int32_t il, int32_t t0, int32_t nt, int32_t h0, int32_t nh, float * scratch,
                   int32_t c0, int32_t c1, float * part_out) {
    const se_hparams * hp = &ctx->model->hp;
    const se_kv_cache * kv = &ctx->kv;
    const se_buffers * b = &ctx->buf;
    const int32_t d = hp->head_dim, half = d / 2, n = c1 - c0, nq = nt * nh;
    const size_t esize = kv->kv_type == SE_KV_F16 ? 2 : 4;
    const int64_t off = (int64_t) (h0 / (hp->n_head / hp->n_head_kv)) * d;  // the KV head of these heads
    const float scale = 1.0f / sqrtf((float) d);
    const bool f16 = kv->kv_type == SE_KV_F16;
    float * scores = scratch;                   // (n_live, nq) cell-major
    float * qt = scores + (int64_t) n * nq;     // (nq, d) the queries, scaled
    float * ot = qt + (int64_t) nq * d;         // (nq, d) the outputs
    float * raw = ot + (int64_t) nq * d;        // (d) a key as stored
    float * rot = raw + d;                      // (d) a key rotated by its cell's delta
    float * w = rot + d;                        // (nq) one cell's weights
    float * part = w + nq;                      // (n_live, nq) scores of the cells in `list`
    int32_t * list = (int32_t *) (part + (int64_t) n * nq);  // (n_live) cells for one batched kernel call
    int32_t * where = list + n;                 // (n_live) their index in memory order
    uint8_t * vmask = (uint8_t *) (where + n);  // (n_live) bit tt: token tt sees the cell
    float max[ATT_TOKENS * 8], inv[ATT_TOKENS * 8];
    int32_t n_visible[ATT_TOKENS] = {0};
    for (int32_t tt = 0; tt < nt; tt++) {
        for (int32_t k = 0; k < nh; k++) {
            const float * q = b->q + ((int64_t) (t0 + tt) * hp->n_head + h0 + k) * d;
            for (int32_t j = 0; j < d; j++) qt[(tt * nh + k) * d + j] = q[j] * scale;
        }
    }
    for (int32_t k = 0; k < nq; k++) max[k] = -INFINITY;
    memset(ot, 0, (size_t) nq * d * sizeof(float));
    // scores: cells read with an extra rotation (delta) one at a time, the others (f16 keys) in one
    // call of the batched kernel over the list of their rows
    int32_t n_list = 0;
    for (int32_t i = 0; i < n; i++) {
        const int32_t cell = b->order[c0 + i];
        const se_kv_cell * c = &kv->m.cells[cell];
        float * s = scores + (int64_t) i * nq;
        uint8_t vis = 0;
        for (int32_t tt = 0; tt < nt; tt++) {
            const bool v = se_kv_visible(kv, c, b->positions[t0 + tt], b->sep_floor[t0 + tt]);
            vis |= (uint8_t) (v << tt);
            n_visible[tt] += v;
        }
        vmask[i] = vis;
        if (!vis) continue;
        const void * key = (const char *) se_kv_k(kv, il, cell) + off * esize;
        if (se_kv_step(kv, c)) {  // a pass that slides the window: query tt reads the key at delta + t0 + tt
            if (f16) se_kern.f16_to_f32(key, raw, d);
            else memcpy(raw, key, (size_t) d * sizeof(float));
            for (int32_t tt = 0; tt < nt; tt++) {
                const int64_t row = ((int64_t) b->step_row[cell] * b->step_tokens + t0 + tt) * half;
                memcpy(rot, raw, (size_t) d * sizeof(float));
                if (c->delta + t0 + tt != 0) rotate(rot, b->step_cos + row, b->step_sin + row, d, hp->rope_type);
                se_kern.dot_f32_n(rot, qt + (int64_t) tt * nh * d, d, nh, d, s + tt * nh);
            }
        } else if (c->delta != 0) {
            if (f16) se_kern.f16_to_f32(key, rot, d);
            else memcpy(rot, key, (size_t) d * sizeof(float));
            rotate(rot, b->delta_cos + (int64_t) cell * half, b->delta_sin + (int64_t) cell * half, d, hp->rope_type);
            se_kern.dot_f32_n(rot, qt, d, nq, d, s);
        } else if (f16) {
            list[n_list] = cell;
            where[n_list++] = i;
        } else {
            se_kern.dot_f32_n(key, qt, d, nq, d, s);
        }
    }
    if (n_list) {
        const uint16_t * kbase = (const uint16_t *) se_kv_k(kv, il, 0) + off;
        se_kern.att_dot_f16(kbase, kv->row, list, n_list, qt, nq, d, part);
        for (int32_t k = 0; k < n_list; k++) memcpy(scores + (int64_t) where[k] * nq, part + (int64_t) k * nq, (size_t) nq * sizeof(float));
    }
    for (int32_t i = 0; i < n; i++) {
        float * s = scores + (int64_t) i * nq;
        for (int32_t tt = 0; tt < nt; tt++) {
            const bool v = vmask[i] >> tt & 1;
            for (int32_t k = 0; k < nh; k++) {
                const int32_t qi = tt * nh + k;
                if (!v) s[qi] = -INFINITY;
                else if (s[qi] > max[qi]) max[qi] = s[qi];
            }
        }
    }
    if (il == 0 && h0 == 0 && !part_out) {
        for (int32_t tt = 0; tt < nt; tt++) b->visible[t0 + tt] = n_visible[tt];
    }
    float sum[ATT_TOKENS * 8] = {0};
    for (int32_t i = 0; i < n; i++) {
        float * s = scores + (int64_t) i * nq;
        for (int32_t qi = 0; qi < nq; qi++) {
            s[qi] = s[qi] == -INFINITY ? 0 : expf(s[qi] - max[qi]);
            sum[qi] += s[qi];
        }
    }
    for (int32_t qi = 0; qi < nq; qi++) inv[qi] = part_out ? 1 : 1 / sum[qi];
    // values: the weights of the cells any query sees, packed in place (row k <= i), then one call
    n_list = 0;
    for (int32_t i = 0; i < n; i++) {
        const float * s = scores + (int64_t) i * nq;
        if (!vmask[i]) continue;
        if (f16) {
            float * wk = scores + (int64_t) n_list * nq;
            for (int32_t qi = 0; qi < nq; qi++) wk[qi] = s[qi] * inv[qi];
            list[n_list++] = b->order[c0 + i];
            continue;
        }
        for (int32_t qi = 0; qi < nq; qi++) w[qi] = s[qi] * inv[qi];
        se_kern.axpy_f32_n(ot, d, w, nq, (const float *) se_kv_v(kv, il, b->order[c0 + i]) + off, d);
    }
    if (n_list) se_kern.att_axpy_f16(ot, scores, nq, (const uint16_t *) se_kv_v(kv, il, 0) + off, kv->row, list, n_list, d);
    if (part_out) {
        memcpy(part_out, max, (size_t) nq * sizeof(float));
        memcpy(part_out + nq, sum, (size_t) nq * sizeof(float));
        memcpy(part_out + 2 * nq, ot, (size_t) nq * d * sizeof(float));
        part_out[2 * nq + (int64_t) nq * d] = (float) n_visible[0];
        return;
    }
    for (int32_t tt = 0; tt < nt; tt++) {
        for (int32_t k = 0; k < nh; k++) {
            memcpy(b->att + ((int64_t) (t0 + tt) * hp->n_head + h0 + k) * d, ot + (int64_t) (tt * nh + k) * d,
                   (size_t) d * sizeof(float));
        }
    }
}

typedef struct attention_job {
    se_context * ctx;
    int32_t il;
    int32_t n;
    int32_t nh;               // query heads per work item
    int32_t tile;             // query tokens per work item
    int32_t splits;           // decode: parts of the cells per head group (1: not split)
    atomic_llong next;        // the next work item
} attention_job;

// floats of one part (attend's part_out) of nq query rows
static int64_t part_size(int32_t nq, int32_t d) { return 2 * (int64_t) nq + (int64_t) nq * d + 1; }

static void attention_task(void * p, int ith, int nth) {
    attention_job * j = p;
    const se_hparams * hp = &j->ctx->model->hp;
    float * scratch = j->ctx->buf.scratch + (int64_t) ith * j->ctx->buf.scratch_stride;
    const int64_t per_tile = hp->n_head / j->nh, n_tiles = (j->n + j->tile - 1) / j->tile, n_items = n_tiles * per_tile * j->splits;
    const int32_t n_live = j->ctx->kv.n_live;
    for (int64_t item; (item = atomic_fetch_add(&j->next, 1)) < n_items;) {
        if (j->splits > 1) {  // one token: item = (head group, part of the cells)
            const int32_t g = (int32_t) (item / j->splits), p = (int32_t) (item % j->splits);
            const int32_t c0 = (int32_t) ((int64_t) n_live * p / j->splits), c1 = (int32_t) ((int64_t) n_live * (p + 1) / j->splits);
            attend(j->ctx, j->il, 0, 1, g * j->nh, j->nh, scratch, c0, c1,
                   j->ctx->buf.att_part + item * part_size(j->nh, hp->head_dim));
            continue;
        }
        const int32_t t0 = (int32_t) (item / per_tile) * j->tile;
        const int32_t nt = j->n - t0 < j->tile ? j->n - t0 : j->tile;
        attend(j->ctx, j->il, t0, nt, (int32_t) (item % per_tile) * j->nh, j->nh, scratch, 0, n_live, NULL);
    }
}

// The parts of a split decode step combined: per query, the outputs and sums rescaled to the
// largest max among the parts, then normalized (flash-decoding's merge).
static void merge_parts(se_context * ctx, const attention_job * j) {
    const se_hparams * hp = &ctx->model->hp;
    const int32_t d = hp->head_dim, nq = j->nh, groups = hp->n_head / j->nh;
    const int64_t ps = part_size(nq, d);
    int64_t n_visible = 0;
    for (int32_t g = 0; g < groups; g++) {
        const float * parts = ctx->buf.att_part + (int64_t) g * j->splits * ps;
        for (int32_t qi = 0; qi < nq; qi++) {
            float m = -INFINITY, total = 0;
            for (int32_t p = 0; p < j->splits; p++) m = fmaxf(m, parts[p * ps + qi]);
            float * out = ctx->buf.att + (int64_t) (g * nq + qi) * d;
            memset(out, 0, (size_t) d * sizeof(float));
            for (int32_t p = 0; p < j->splits; p++) {
                const float * part = parts + p * ps;
                const float f = part[qi] == -INFINITY ? 0 : expf(part[qi] - m);
                total += f * part[nq + qi];
                const float * o = part + 2 * nq + (int64_t) qi * d;
                for (int32_t k = 0; k < d; k++) out[k] += f * o[k];
            }
            const float inv = 1 / total;
            for (int32_t k = 0; k < d; k++) out[k] *= inv;
        }
        if (g == 0) {
            for (int32_t p = 0; p < j->splits; p++) n_visible += (int64_t) parts[p * ps + ps - 1];
        }
    }
    if (j->il == 0) ctx->buf.visible[0] = (int32_t) n_visible;
}

// Heads sharing a KV head go together, and tokens in tiles of ATT_TOKENS, unless that leaves threads
// idle (decoding one token).
static void attention_items(const se_context * ctx, int32_t n, int32_t * nh, int32_t * tile) {
    const se_hparams * hp = &ctx->model->hp;
    const int32_t group = hp->n_head / hp->n_head_kv, nth = se_pool_size(ctx->pool);
    *tile = n >= ATT_TOKENS * nth ? ATT_TOKENS : 1;
    const int64_t items = (int64_t) (n + *tile - 1) / *tile * hp->n_head_kv;
    // a KV head's rows read once for all its query heads beats an even split (decoding SmolLM2's 3 KV
    // heads on 2 threads): split heads only when there are fewer items than threads
    *nh = group > 8 || items < nth ? 1 : group;
}

// Decoding one token with fewer head groups than threads, or a count that leaves a thread idle
// for a whole group (SmolLM2: 3 KV heads on 2 threads), and enough cells: split the cells of each
// group among the threads, so that they share the work evenly.
static int32_t attention_splits(const se_context * ctx, int32_t n, int32_t nh) {
    const int32_t nth = se_pool_size(ctx->pool), groups = ctx->model->hp.n_head / nh;
    if (n != 1 || nth < 2 || groups % nth == 0 || ctx->kv.n_live < 64 * nth) return 1;
    return nth < SE_ATT_MAX_SPLITS ? nth : SE_ATT_MAX_SPLITS;
}

// ---------------------------------------------------------------------------------------------

static int forward(se_context * ctx, const int32_t * tokens, int32_t n, float * logits, int32_t n_logits) {
    const se_model * m = ctx->model;
    const se_hparams * hp = &m->hp;
    se_buffers * b = &ctx->buf;
    const int64_t dim = hp->n_embd;
    const se_type_traits * embd = se_type_get(m->tok_embd.type);

    for (int32_t t = 0; t < n; t++) {
        embd->to_float(m->tok_embd.data + (uint64_t) tokens[t] * m->tok_embd.row_bytes, b->x + t * dim, dim);
    }
    rope_tables(ctx, n);

    for (int32_t il = 0; il < hp->n_layer; il++) {
        if (se_cancelled(ctx)) return se_error(SE_ERR_CANCELLED, "cancelled (at layer %d)", il);  // se_context_cancel
        const se_layer * l = &m->layers[il];
        // attention (the previous layer's feed-forward output joins the residual stream here)
        const row_prep attn_in = {b->x, il > 0 ? b->xb2 : NULL, l->attn_norm, NULL, hp->rms_eps};
        const mm_out qkv[3] = {{b->q, &l->wq, l->bq}, {b->k, &l->wk, l->bk}, {b->v, &l->wv, l->bv}};
        matmul_many(ctx, b->xb, n, qkv, 3, &attn_in);
        rope(ctx, b->q, hp->n_head, n);
        rope(ctx, b->k, hp->n_head_kv, n);
        store_kv(ctx, il, b->k, b->v, n);
        attention_job aj = {.ctx = ctx, .il = il, .n = n, .nh = 1, .tile = 1};
        atomic_init(&aj.next, 0);
        attention_items(ctx, n, &aj.nh, &aj.tile);
        aj.splits = attention_splits(ctx, n, aj.nh);
        se_pool_run(ctx->pool, attention_task, &aj);
        if (aj.splits > 1) merge_parts(ctx, &aj);
        matmul(ctx, b->xb2, b->att, &l->wo, NULL, n, NULL);
        // SwiGLU feed-forward, after x += attention output
        const row_prep ffn_in = {b->x, b->xb2, l->ffn_norm, NULL, hp->rms_eps};
        const mm_out gate_up[2] = {{b->hb, &l->w_gate, NULL}, {b->hb2, &l->w_up, NULL}};
        matmul_many(ctx, b->xb, n, gate_up, 2, &ffn_in);
        const row_prep swiglu = {.up = b->hb2};
        matmul(ctx, b->xb2, b->hb, &l->w_down, NULL, n, &swiglu);
    }
    for (int64_t i = 0; i < n * dim; i++) b->x[i] += b->xb2[i];  // the last layer's feed-forward output

    if (ctx->embd.on) se_embd_collect(ctx, b->x, n);  // embeddings: the final hidden states, before the head

    if (n_logits > 0) {  // only the rows whose logits are wanted
        const float * last = b->x + (int64_t) (n - n_logits) * dim;
        rmsnorm(b->xb, last, m->output_norm, dim, n_logits, hp->rms_eps);
        matmul(ctx, logits, b->xb, &m->output, NULL, n_logits, NULL);
    }
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// the CPU backend

static int cpu_init(se_context * ctx) {
    const se_hparams * hp = &ctx->model->hp;
    se_buffers * b = &ctx->buf;
    const int64_t nb = ctx->params.n_batch, q_dim = (int64_t) hp->n_head * hp->head_dim, kv_dim = ctx->kv.row;
    // attention: scores, queries and outputs of up to ATT_TOKENS x 8 query rows, a rotated key, weights
    const int64_t group = hp->n_head / hp->n_head_kv > 8 ? 1 : hp->n_head / hp->n_head_kv, nq = ATT_TOKENS * group;
    // (+ the batched kernels' scores, cell lists and visibility bytes)
    int64_t stride = 2 * nq * ctx->kv.cfg.n_cells + 2 * nq * hp->head_dim + 2 * hp->head_dim + nq + 3 * (int64_t) ctx->kv.cfg.n_cells;
    if (stride < hp->n_embd) stride = hp->n_embd;
    if (stride < hp->n_ff) stride = hp->n_ff;
    if (stride < q_dim) stride = q_dim;
    b->scratch_stride = stride;
    b->x = calloc((size_t) (nb * hp->n_embd), sizeof(float));
    b->xb = calloc((size_t) (nb * hp->n_embd), sizeof(float));
    b->xb2 = calloc((size_t) (nb * hp->n_embd), sizeof(float));
    b->q = calloc((size_t) (nb * q_dim), sizeof(float));
    b->k = calloc((size_t) (nb * kv_dim), sizeof(float));
    b->v = calloc((size_t) (nb * kv_dim), sizeof(float));
    b->att = calloc((size_t) (nb * q_dim), sizeof(float));
    b->hb = calloc((size_t) (nb * hp->n_ff), sizeof(float));
    b->hb2 = calloc((size_t) (nb * hp->n_ff), sizeof(float));
    b->rope_cos = calloc((size_t) (nb * hp->head_dim / 2), sizeof(float));
    b->rope_sin = calloc((size_t) (nb * hp->head_dim / 2), sizeof(float));
    // passes that slide the window: the cells read with a per-query rotation are the initial and
    // separator ones, at most n_cache - n_local + 1 (se_kv_capacity_check), for n_spare + 1 queries
    const se_kv_config * kc = &ctx->kv.cfg;
    const int64_t n_step = kc->n_spare > 0 ? kc->n_cells - kc->n_spare - kc->n_local + 1 : 0;
    b->step_tokens = kc->n_spare + 1;
    b->step_row = calloc((size_t) kc->n_cells, sizeof(int32_t));
    b->step_cos = calloc((size_t) (n_step * b->step_tokens * hp->head_dim / 2 + 1), sizeof(float));
    b->step_sin = calloc((size_t) (n_step * b->step_tokens * hp->head_dim / 2 + 1), sizeof(float));
    b->scratch = calloc((size_t) (se_pool_size(ctx->pool) * stride), sizeof(float));
    int64_t widest = hp->n_ff > q_dim ? hp->n_ff : q_dim;  // the longest input row of a matrix product
    if (widest < hp->n_embd) widest = hp->n_embd;
    b->xq = calloc((size_t) nb, se_act_row_bytes(SE_ACT_Q8, widest) + sizeof(se_block_q8));
    b->cells = calloc((size_t) nb, sizeof(int32_t));
    b->positions = calloc((size_t) nb, sizeof(int32_t));
    b->sep_floor = calloc((size_t) nb, sizeof(int64_t));
    b->visible = calloc((size_t) nb, sizeof(int32_t));
    b->delta_cos = calloc((size_t) ctx->kv.cfg.n_cells * (size_t) (hp->head_dim / 2), sizeof(float));
    b->delta_sin = calloc((size_t) ctx->kv.cfg.n_cells * (size_t) (hp->head_dim / 2), sizeof(float));
    b->delta_done = calloc((size_t) ctx->kv.cfg.n_cells, sizeof(int32_t));
    b->order = calloc((size_t) ctx->kv.cfg.n_cells, sizeof(int32_t));
    // split decode steps: a part per (query head, split) at most, each with its query rows
    b->att_part = calloc((size_t) hp->n_head * SE_ATT_MAX_SPLITS, (size_t) part_size(1, hp->head_dim) * sizeof(float));
    if (!b->att_part || !b->delta_done || !b->order || !b->x || !b->xb || !b->xb2 || !b->q || !b->k || !b->v || !b->att || !b->hb || !b->hb2 || !b->rope_cos ||
        !b->rope_sin || !b->step_row || !b->step_cos || !b->step_sin || !b->scratch || !b->xq || !b->cells || !b->positions || !b->sep_floor || !b->visible || !b->delta_cos ||
        !b->delta_sin) {
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for activation buffers (n_batch %lld)", (long long) nb);
    }
    return se_kv_alloc_host(&ctx->kv, hp->n_layer);
}

static void cpu_free(se_context * ctx) {
    se_buffers * b = &ctx->buf;
    free(b->x); free(b->xb); free(b->xb2); free(b->q); free(b->k); free(b->v); free(b->att);
    free(b->hb); free(b->hb2); free(b->rope_cos); free(b->rope_sin); free(b->step_row); free(b->step_cos); free(b->step_sin); free(b->scratch); free(b->xq);
    free(b->cells); free(b->positions); free(b->sep_floor); free(b->visible); free(b->delta_cos); free(b->delta_sin);
    free(b->delta_done); free(b->order); free(b->att_part);
    memset(b, 0, sizeof *b);
}

const se_backend se_backend_cpu = {"cpu", cpu_init, cpu_free, forward};
