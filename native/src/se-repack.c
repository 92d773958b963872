// Matrix products on the CPU and the interleaved weight layouts they run on.
//
// A matrix-vector product that takes one weight row at a time ends every row with a horizontal sum
// and, for a batch of tokens, unpacks each weight block once per few tokens at best. llama.cpp's
// CPU backend instead repacks Q4_0/IQ4_NL (and, on some ISAs, Q4_K) weights at load into groups of
// interleaved rows and multiplies tiles of rows x tokens. sepedge does the same with its own layouts
// (se-common.h): groups of 8 rows, so that one vector register holds one partial sum per row, and a
// register tile of 8 rows x SE_RP_TOKENS tokens per kernel call. Repacked copies live in one buffer
// beside the mapping (m->packed), built once per model and reported in the model's memory figures;
// the mapped originals are still used for the embedding lookup and by non-CPU backends.
//
// This file holds the repacking (the same for every ISA), the portable C kernels over the layouts
// and the row-range driver the forward pass calls; the AVX2 kernels are in se-quants-avx2.c.
#include "se-impl.h"
#include "se-common.h"

#include <stdlib.h>
#include <string.h>

#define TOKEN_BLOCK 32  // tokens whose activations stay in cache while a thread walks its row groups

// ---------------------------------------------------------------------------------------------
// repacking: 8 rows `row_bytes` apart -> one group

static void repack_q4_0(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group) {
    block_q4_0x8 * dst = group;
    for (int64_t i = 0; i < cols / SE_QK; i++) {
        for (int r = 0; r < SE_RP_ROWS; r++) {
            const block_q4_0 * src = (const block_q4_0 *) (rows + (uint64_t) r * row_bytes) + i;
            dst[i].d[r] = src->d;
            for (int k = 0; k < 4; k++) memcpy(dst[i].qs + 32 * k + 4 * r, src->qs + 4 * k, 4);
        }
    }
}

static void repack_q5_0(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group) {
    block_q5_0x8 * dst = group;
    for (int64_t i = 0; i < cols / SE_QK; i++) {
        for (int r = 0; r < SE_RP_ROWS; r++) {
            const block_q5_0 * src = (const block_q5_0 *) (rows + (uint64_t) r * row_bytes) + i;
            uint32_t qh, out = 0;
            memcpy(&qh, src->qh, 4);
            for (int k = 0; k < 4; k++) {
                for (int j = 0; j < 4; j++) {
                    out |= ((qh >> (4 * k + j)) & 1u) << (8 * j + k);
                    out |= ((qh >> (16 + 4 * k + j)) & 1u) << (8 * j + 4 + k);
                }
            }
            dst[i].d[r] = src->d;
            dst[i].qh[r] = out;
            for (int k = 0; k < 4; k++) memcpy(dst[i].qs + 32 * k + 4 * r, src->qs + 4 * k, 4);
        }
    }
}

static void repack_q8_0(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group) {
    block_q8_0x8 * dst = group;
    for (int64_t i = 0; i < cols / SE_QK; i++) {
        for (int r = 0; r < SE_RP_ROWS; r++) {
            const block_q8_0 * src = (const block_q8_0 *) (rows + (uint64_t) r * row_bytes) + i;
            dst[i].d[r] = src->d;
            for (int k = 0; k < 8; k++) memcpy(dst[i].qs + 32 * k + 4 * r, src->qs + 4 * k, 4);
        }
    }
}

static void repack_q4_K(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group) {
    block_q4_Kx8 * dst = group;
    for (int64_t i = 0; i < cols / SE_QK_K; i++) {
        for (int r = 0; r < SE_RP_ROWS; r++) {
            const block_q4_K * src = (const block_q4_K *) (rows + (uint64_t) r * row_bytes) + i;
            uint8_t sc[8], m[8];
            se_k_scales(src->scales, sc, m);
            for (int j = 0; j < 8; j++) {
                dst[i].sc[j][r] = sc[j];
                dst[i].m[j][r] = m[j];
            }
            dst[i].d[r] = se_fp16_to_fp32(src->d);
            dst[i].dmin[r] = se_fp16_to_fp32(src->dmin);
            for (int c = 0; c < 4; c++) {
                for (int k = 0; k < 8; k++) memcpy(dst[i].qs + 256 * c + 32 * k + 4 * r, src->qs + 32 * c + 4 * k, 4);
            }
        }
    }
}

// The CUDA backend's Q4_K layout (se-common.h, SE_Q4K_SPLIT_*): plain C so that every build can
// check it (se_cuda_repack_q4_K). The decode kernels then read a lane's two scales and mins in one
// 4-byte load instead of unpacking them from the 12 packed bytes (GGUF.md §7.2) on every use.
void se_q4_K_split(const void * src, int64_t n, uint8_t * q, uint8_t * s) {
    const block_q4_K * b = src;
    for (int64_t i = 0; i < n; i++, b++, q += SE_Q4K_SPLIT_QB, s += SE_Q4K_SPLIT_SB) {
        uint8_t sc[8], m[8];
        se_k_scales(b->scales, sc, m);
        memcpy(s, &b->d, sizeof b->d);
        memcpy(s + 2, &b->dmin, sizeof b->dmin);
        for (int j = 0; j < 8; j++) {
            s[4 + 2 * j] = sc[j];
            s[5 + 2 * j] = m[j];
        }
        memcpy(q, b->qs, SE_Q4K_SPLIT_QB);
    }
}

SE_API int se_cuda_repack_q4_K(const void * src, int64_t n, void * q, void * s) {
    if (!src || !q || !s || n < 0) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_repack_q4_K: bad arguments");
    se_q4_K_split(src, n, q, s);
    return SE_OK;
}

// the 256 codes (0..63) of a Q6_K super-block in column order (GGUF.md §7.2)
static void q6_K_codes(const block_q6_K * b, uint8_t q[256]) {
    for (int h = 0; h < 2; h++) {
        const uint8_t * ql = b->ql + 64 * h, * qh = b->qh + 32 * h;
        uint8_t * o = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (uint8_t) ((ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4));
            o[l + 32] = (uint8_t) ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4));
            o[l + 64] = (uint8_t) ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            o[l + 96] = (uint8_t) ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

static void repack_q6_K(const uint8_t * rows, uint64_t row_bytes, int64_t cols, void * group) {
    block_q6_Kx8 * dst = group;
    for (int64_t i = 0; i < cols / SE_QK_K; i++) {
        memset(dst[i].qh, 0, sizeof dst[i].qh);
        for (int r = 0; r < SE_RP_ROWS; r++) {
            const block_q6_K * src = (const block_q6_K *) (rows + (uint64_t) r * row_bytes) + i;
            uint8_t q[256];
            q6_K_codes(src, q);
            dst[i].d[r] = se_fp16_to_fp32(src->d);
            for (int sb = 0; sb < 16; sb++) dst[i].sc[sb][r] = src->scales[sb];
            for (int c = 0; c < 4; c++) {
                for (int k = 0; k < 8; k++) {
                    uint32_t w = 0;
                    memcpy(&w, dst[i].qh + 128 * c + 32 * (k / 2) + 4 * r, 4);
                    for (int j = 0; j < 4; j++) {
                        const uint8_t a = q[64 * c + 4 * k + j], b = q[64 * c + 32 + 4 * k + j];
                        dst[i].qs[256 * c + 32 * k + 4 * r + j] = (uint8_t) ((a & 15) | (b & 15) << 4);
                        w |= (uint32_t) (a >> 4) << (8 * j + 2 * (2 * (k % 2)));
                        w |= (uint32_t) (b >> 4) << (8 * j + 2 * (2 * (k % 2) + 1));
                    }
                    memcpy(dst[i].qh + 128 * c + 32 * (k / 2) + 4 * r, &w, 4);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// portable kernels: one group of 8 rows with nt activation rows; integer sums per block, one float
// multiply-add per block and row (the offset or min term folded in), as the AVX2 kernels do

static const se_block_q8 * act_row(const void * act, size_t stride, int32_t t) {
    return (const se_block_q8 *) ((const char *) act + (size_t) t * stride);
}

static void gemm_q4_0(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) {
    const block_q4_0x8 * b = group;
    for (int32_t t = 0; t < nt; t++) {
        const se_block_q8 * a = act_row(act, stride, t);
        float acc[SE_RP_ROWS] = {0};
        for (int64_t i = 0; i < cols / SE_QK; i++) {
            for (int r = 0; r < SE_RP_ROWS; r++) {
                int32_t sum = 0;
                for (int k = 0; k < 4; k++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = b[i].qs[32 * k + 4 * r + j];
                        sum += (q & 15) * a[i].qs[4 * k + j] + (q >> 4) * a[i].qs[16 + 4 * k + j];
                    }
                }
                acc[r] += se_fp16_to_fp32(b[i].d[r]) * (a[i].d * (float) sum - 8 * a[i].s);  // codes are q + 8
            }
        }
        memcpy(out + t * ld, acc, sizeof acc);
    }
}

static void gemm_q5_0(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) {
    const block_q5_0x8 * b = group;
    for (int32_t t = 0; t < nt; t++) {
        const se_block_q8 * a = act_row(act, stride, t);
        float acc[SE_RP_ROWS] = {0};
        for (int64_t i = 0; i < cols / SE_QK; i++) {
            for (int r = 0; r < SE_RP_ROWS; r++) {
                int32_t sum = 0;
                for (int k = 0; k < 4; k++) {
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = b[i].qs[32 * k + 4 * r + j];
                        const int lo = (q & 15) | (int) ((b[i].qh[r] >> (8 * j + k)) & 1) << 4;
                        const int hi = (q >> 4) | (int) ((b[i].qh[r] >> (8 * j + 4 + k)) & 1) << 4;
                        sum += lo * a[i].qs[4 * k + j] + hi * a[i].qs[16 + 4 * k + j];
                    }
                }
                acc[r] += se_fp16_to_fp32(b[i].d[r]) * (a[i].d * (float) sum - 16 * a[i].s);  // codes are q + 16
            }
        }
        memcpy(out + t * ld, acc, sizeof acc);
    }
}

static void gemm_q8_0(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) {
    const block_q8_0x8 * b = group;
    for (int32_t t = 0; t < nt; t++) {
        const se_block_q8 * a = act_row(act, stride, t);
        float acc[SE_RP_ROWS] = {0};
        for (int64_t i = 0; i < cols / SE_QK; i++) {
            for (int r = 0; r < SE_RP_ROWS; r++) {
                int32_t sum = 0;
                for (int k = 0; k < 8; k++) {
                    for (int j = 0; j < 4; j++) sum += b[i].qs[32 * k + 4 * r + j] * a[i].qs[4 * k + j];
                }
                acc[r] += se_fp16_to_fp32(b[i].d[r]) * (a[i].d * (float) sum);
            }
        }
        memcpy(out + t * ld, acc, sizeof acc);
    }
}

static void gemm_q4_K(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) {
    const block_q4_Kx8 * b = group;
    for (int32_t t = 0; t < nt; t++) {
        const se_block_q8 * a = act_row(act, stride, t);
        float acc[SE_RP_ROWS] = {0};
        for (int64_t i = 0; i < cols / SE_QK_K; i++) {
            for (int r = 0; r < SE_RP_ROWS; r++) {
                for (int j = 0; j < 8; j++) {  // sub-block j: nibble j % 2 of chunk j / 2
                    const se_block_q8 * x = &a[8 * i + j];
                    int32_t sum = 0;
                    for (int k = 0; k < 8; k++) {
                        for (int l = 0; l < 4; l++) {
                            const uint8_t q = b[i].qs[256 * (j / 2) + 32 * k + 4 * r + l];
                            sum += (j % 2 ? q >> 4 : q & 15) * x->qs[4 * k + l];
                        }
                    }
                    acc[r] += b[i].d[r] * (x->d * (float) (sum * b[i].sc[j][r])) - b[i].dmin[r] * (b[i].m[j][r] * x->s);
                }
            }
        }
        memcpy(out + t * ld, acc, sizeof acc);
    }
}

static void gemm_q6_K(const void * group, const void * act, size_t stride, int64_t cols, int32_t nt, float * out, int64_t ld) {
    const block_q6_Kx8 * b = group;
    for (int32_t t = 0; t < nt; t++) {
        const se_block_q8 * a = act_row(act, stride, t);
        float acc[SE_RP_ROWS] = {0};
        for (int64_t i = 0; i < cols / SE_QK_K; i++) {
            for (int r = 0; r < SE_RP_ROWS; r++) {
                for (int blk = 0; blk < 8; blk++) {  // activation block: nibble blk % 2 of chunk blk / 2
                    const int c = blk / 2, m = blk % 2;
                    const se_block_q8 * x = &a[8 * i + blk];
                    int32_t sum = 0;
                    for (int k = 0; k < 8; k++) {
                        uint32_t w;
                        memcpy(&w, b[i].qh + 128 * c + 32 * (k / 2) + 4 * r, 4);
                        int32_t part = 0;
                        for (int j = 0; j < 4; j++) {
                            const uint8_t lo = b[i].qs[256 * c + 32 * k + 4 * r + j];
                            const int q = (m ? lo >> 4 : lo & 15) | (int) ((w >> (8 * j + 2 * (2 * (k % 2) + m))) & 3) << 4;
                            part += (q - 32) * x->qs[4 * k + j];
                        }
                        sum += part * b[i].sc[2 * blk + k / 4][r];
                    }
                    acc[r] += b[i].d[r] * (x->d * (float) sum);
                }
            }
        }
        memcpy(out + t * ld, acc, sizeof acc);
    }
}

void se_repack_portable(se_type_traits * types) {
    types[SE_TYPE_Q6_K].packed_size = sizeof(block_q6_Kx8);
    types[SE_TYPE_Q6_K].repack = repack_q6_K;
    types[SE_TYPE_Q6_K].gemm = gemm_q6_K;
    types[SE_TYPE_Q4_0].packed_size = sizeof(block_q4_0x8);
    types[SE_TYPE_Q4_0].repack = repack_q4_0;
    types[SE_TYPE_Q4_0].gemm = gemm_q4_0;
    types[SE_TYPE_Q5_0].packed_size = sizeof(block_q5_0x8);
    types[SE_TYPE_Q5_0].repack = repack_q5_0;
    types[SE_TYPE_Q5_0].gemm = gemm_q5_0;
    types[SE_TYPE_Q8_0].packed_size = sizeof(block_q8_0x8);
    types[SE_TYPE_Q8_0].repack = repack_q8_0;
    types[SE_TYPE_Q8_0].gemm = gemm_q8_0;
    types[SE_TYPE_Q4_K].packed_size = sizeof(block_q4_Kx8);
    types[SE_TYPE_Q4_K].repack = repack_q4_K;
    types[SE_TYPE_Q4_K].gemm = gemm_q4_K;
}

// ---------------------------------------------------------------------------------------------
// the driver: rows [r0, r1) of one weight for n tokens

static void rows_one_by_one(const se_weight * w, const float * bias, const void * act, size_t stride, int32_t n,
                            float * out, int64_t r0, int64_t r1) {
    const se_type_traits * tt = se_type_get(w->type);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t * wrow = w->data + (uint64_t) row * w->row_bytes;
        const float b = bias ? bias[row] : 0.0f;
        int32_t t = 0;
        if (tt->vec_dot4) {
            for (; t + 4 <= n; t += 4) {
                float v[4];
                tt->vec_dot4(wrow, (const char *) act + t * stride, stride, w->cols, v);
                for (int k = 0; k < 4; k++) out[(t + k) * w->rows + row] = v[k] + b;
            }
        }
        for (; t < n; t++) out[t * w->rows + row] = tt->vec_dot(wrow, (const char *) act + t * stride, w->cols) + b;
    }
}

void se_matmul_rows(const se_weight * w, const float * bias, const void * act, size_t stride, int32_t n, float * out,
                    int64_t r0, int64_t r1) {
    const se_type_traits * tt = se_type_get(w->type);
    if (!w->packed || !tt->gemm) {
        rows_one_by_one(w, bias, act, stride, n, out, r0, r1);
        return;
    }
    // whole groups through the tiled kernel; rows of a group cut by the range (callers split at
    // multiples of 8, so only odd callers) one by one
    const int64_t g0 = (r0 + SE_RP_ROWS - 1) / SE_RP_ROWS * SE_RP_ROWS, g1 = r1 / SE_RP_ROWS * SE_RP_ROWS;
    if (g0 >= g1) {
        rows_one_by_one(w, bias, act, stride, n, out, r0, r1);
        return;
    }
    rows_one_by_one(w, bias, act, stride, n, out, r0, g0);
    for (int32_t t0 = 0; t0 < n; t0 += TOKEN_BLOCK) {
        const int32_t t1 = t0 + TOKEN_BLOCK < n ? t0 + TOKEN_BLOCK : n;
        int64_t g = g0;
        if (tt->gemm16) {  // pairs of groups where the ISA has a 16-row kernel (AVX-512)
            for (; g + 2 * SE_RP_ROWS <= g1; g += 2 * SE_RP_ROWS) {
                const uint8_t * group = w->packed + (uint64_t) (g / SE_RP_ROWS) * w->group_bytes;
                for (int32_t t = t0; t < t1; t += SE_RP_TOKENS) {
                    const int32_t nt = t1 - t < SE_RP_TOKENS ? t1 - t : SE_RP_TOKENS;
                    tt->gemm16(group, w->group_bytes, (const char *) act + t * stride, stride, w->cols, nt, out + t * w->rows + g,
                               w->rows);
                }
            }
        }
        for (; g < g1; g += SE_RP_ROWS) {
            const uint8_t * group = w->packed + (uint64_t) (g / SE_RP_ROWS) * w->group_bytes;
            for (int32_t t = t0; t < t1; t += SE_RP_TOKENS) {
                const int32_t nt = t1 - t < SE_RP_TOKENS ? t1 - t : SE_RP_TOKENS;
                tt->gemm(group, (const char *) act + t * stride, stride, w->cols, nt, out + t * w->rows + g, w->rows);
            }
        }
    }
    if (bias) {
        for (int32_t t = 0; t < n; t++) {
            for (int64_t row = g0; row < g1; row++) out[t * w->rows + row] += bias[row];
        }
    }
    rows_one_by_one(w, bias, act, stride, n, out, g1, r1);
}

// ---------------------------------------------------------------------------------------------
// repacking a model

static bool packable(const se_weight * w) {
    const se_type_traits * tt = se_type_get(w->type);
    return tt && tt->repack && w->rows % SE_RP_ROWS == 0 && w->rows > 0;
}

static uint64_t packed_group_bytes(const se_weight * w) {
    const se_type_traits * tt = se_type_get(w->type);
    return (uint64_t) (w->cols / tt->block) * (uint64_t) tt->packed_size;
}

int se_model_repack(se_model * m) {
    const char * env = getenv("SEPEDGE_REPACK");
    if (env && env[0] == '0') return SE_OK;  // the one-row-at-a-time path, for comparisons
    se_weight ** ws = malloc(((size_t) m->hp.n_layer * 7 + 1) * sizeof *ws);
    if (!ws) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
    int64_t n_ws = 0;
    for (int32_t il = 0; il < m->hp.n_layer; il++) {
        se_layer * l = &m->layers[il];
        se_weight * lw[7] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        for (int k = 0; k < 7; k++) ws[n_ws++] = lw[k];
    }
    ws[n_ws++] = &m->output;
    uint64_t total = 0;
    for (int64_t i = 0; i < n_ws; i++) {
        if (packable(ws[i])) total += (uint64_t) (ws[i]->rows / SE_RP_ROWS) * packed_group_bytes(ws[i]);
    }
    void * buf = NULL;
    if (total == 0 || posix_memalign(&buf, 64, (size_t) total) != 0) {
        free(ws);
        if (total == 0) return SE_OK;
        return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory for the repacked weights (%llu bytes)", (unsigned long long) total);
    }
    m->packed = buf;
    m->n_bytes_packed = (int64_t) total;
    uint64_t off = 0;
    for (int64_t i = 0; i < n_ws; i++) {
        se_weight * w = ws[i];
        if (!packable(w)) continue;
        const se_type_traits * tt = se_type_get(w->type);
        w->group_bytes = packed_group_bytes(w);
        for (int64_t g = 0; g < w->rows / SE_RP_ROWS; g++) {
            tt->repack(w->data + (uint64_t) g * SE_RP_ROWS * w->row_bytes, w->row_bytes, w->cols,
                       m->packed + off + (uint64_t) g * w->group_bytes);
        }
        w->packed = m->packed + off;
        off += (uint64_t) (w->rows / SE_RP_ROWS) * w->group_bytes;
    }
    free(ws);
    return SE_OK;
}

// ---------------------------------------------------------------------------------------------
// public kernel API (tests and tools)

SE_API int se_matmul(int32_t type, const void * w, int64_t rows, int64_t cols, const float * x, int32_t n, float * out,
                     int32_t packed) {
    se_quants_init();
    const se_type_traits * tt = se_type_get(type);
    if (!tt || !tt->vec_dot) return se_error(SE_ERR_UNSUPPORTED, "tensor type %d has no kernels", type);
    if (!w || !x || !out || rows < 1 || n < 1 || cols < 1 || cols % tt->block || (tt->act == SE_ACT_Q8 && cols % 32)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_matmul: bad arguments (rows %lld, cols %lld, n %d)", (long long) rows,
                        (long long) cols, n);
    }
    se_weight wt = {.type = type, .cols = cols, .rows = rows, .row_bytes = (uint64_t) (cols / tt->block) * (uint64_t) tt->size,
                    .data = w};
    const size_t stride = se_act_row_bytes(tt->act, cols);
    void * act = (void *) x;
    void * q = NULL, * p = NULL;
    if (tt->act == SE_ACT_Q8) {
        q = act = malloc(stride * (size_t) n + 1);
        if (!q) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
        for (int32_t t = 0; t < n; t++) se_kern.quantize_q8(x + t * cols, (se_block_q8 *) ((char *) q + t * stride), cols);
    }
    if (packed && packable(&wt)) {
        wt.group_bytes = packed_group_bytes(&wt);
        if (posix_memalign(&p, 64, (size_t) (rows / SE_RP_ROWS * wt.group_bytes)) != 0) {
            free(q);
            return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
        }
        for (int64_t g = 0; g < rows / SE_RP_ROWS; g++) {
            tt->repack(wt.data + (uint64_t) g * SE_RP_ROWS * wt.row_bytes, wt.row_bytes, cols, (uint8_t *) p + g * wt.group_bytes);
        }
        wt.packed = p;
    }
    se_matmul_rows(&wt, NULL, act, stride, n, out, 0, rows);
    free(p);
    free(q);
    return SE_OK;
}
