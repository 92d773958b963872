// SEPEDGE_CUDA_TIMING=1: the GPU time of every kernel of one-token passes (=prefill: of passes of
// many tokens), from CUDA events recorded
// between the launches of a direct (not graph) pass, summed per kernel name and printed to stderr
// when the context is freed. A spin kernel first holds the stream while the pass's launches queue
// behind it, so that the kernels run back to back and the events time the kernels, not the host.
//
// Also the entry points for tests and tools of sepedge.h: se_cuda_device_count, se_cuda_mul_mat,
// se_cuda_dequantize_f16, se_cuda_cublas_load.
#include "se-cuda-quants.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Busy for `cycles` clocks.
__global__ void k_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

int se_cuda_timing_init(se_cuda_timing * t) {
    memset(t, 0, sizeof *t);
    const char * env = getenv("SEPEDGE_CUDA_TIMING");
    t->on = env && strcmp(env, "0");
    t->prefill = t->on && !strcmp(env, "prefill");
    if (!t->on) return SE_OK;
    for (int i = 0; i < SE_TIMING_EVENTS; i++) SE_CUDA_CHECK(cudaEventCreate(&t->ev[i]));
    return SE_OK;
}

void se_cuda_timing_begin(se_cuda_timing * t, cudaStream_t s) {
    t->n_ev = 0;
    if (!t->marking) return;
    k_spin<<<1, 1, 0, s>>>(20000000);  // ~10 ms: the launches after it queue behind it
    se_cuda_timing_mark(t, "start", s);
}

void se_cuda_timing_mark(se_cuda_timing * t, const char * name, cudaStream_t s) {
    if (!t->marking || t->n_ev >= SE_TIMING_EVENTS) return;
    cudaEventRecord(t->ev[t->n_ev], s);
    t->ev_name[t->n_ev++] = name;
}

void se_cuda_timing_end(se_cuda_timing * t) {
    if (!t->marking) return;
    for (int i = 1; i < t->n_ev; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, t->ev[i - 1], t->ev[i]);
        int k = 0;
        while (k < t->n_tt && strcmp(t->tt[k].name, t->ev_name[i])) k++;
        if (k == t->n_tt) {
            if (k == SE_TIMING_NAMES) continue;
            t->tt[t->n_tt].name = t->ev_name[i];
            t->tt[t->n_tt].us = 0;
            t->tt[t->n_tt++].count = 0;
        }
        t->tt[k].us += 1e3 * ms;
        t->tt[k].count++;
    }
    t->n_ev = 0;
    t->steps++;
    t->marking = false;
}

void se_cuda_timing_free(se_cuda_timing * t) {
    if (!t->on) return;
    if (t->steps) {
        double total = 0;
        for (int k = 0; k < t->n_tt; k++) total += t->tt[k].us;
        fprintf(stderr, "sepedge CUDA timing, %s passes: %lld, GPU time per pass %.1f us\n", t->prefill ? "prefill" : "one-token",
                t->steps, total / t->steps);
        fprintf(stderr, "%-22s %10s %12s %7s\n", "kernel", "launches", "us/pass", "share");
        for (int k = 0; k < t->n_tt; k++) {
            fprintf(stderr, "%-22s %10.1f %12.1f %6.1f%%\n", t->tt[k].name, (double) t->tt[k].count / t->steps,
                    t->tt[k].us / t->steps, 100 * t->tt[k].us / total);
        }
    }
    for (int i = 0; i < SE_TIMING_EVENTS; i++)
        if (t->ev[i]) cudaEventDestroy(t->ev[i]);
    t->on = false;
}

// ---------------------------------------------------------------------------------------------
// entry points for tests and tools

extern "C" int se_cuda_device_count(int32_t * count) {
    if (!count) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_device_count: count is NULL");
    int n;
    const int r = se_cuda_check_device(&n);
    *count = n;
    return r == SE_OK || n == 0 ? SE_OK : r;
}

typedef struct mm_test {  // device buffers of se_cuda_mul_mat
    uint8_t * w;
    float * x, * out;
    int8_t * qx;
    float2 * ds;
} mm_test;

// GGUF rows of `type` into device memory (*wp, freed by the caller) in the layout the forward pass
// uploads (SEPEDGE_CUDA_Q4K_REPACK read at each call, as a model's upload reads it).
static int upload_weight(const se_type_traits * tt, int32_t type, const void * w, int64_t rows, int64_t cols, uint8_t ** wp,
                         se_dweight * out) {
    const bool split = se_cuda_q4k_split_env();
    int32_t qb, sb;
    se_cuda_block_layout(type, split, &qb, &sb);
    const int64_t nb = cols / tt->block;
    const int64_t s_row = se_align16(nb * sb);
    const size_t q_bytes = (size_t) (rows * nb * qb), s_bytes = (size_t) (rows * nb * sb);
    SE_CUDA_CHECK(cudaMalloc((void **) wp, se_align256(q_bytes) + (size_t) (rows * s_row) + 16));
    uint8_t * dev = *wp;
    *out = se_dweight{type, sb ? SE_DL_PLANES : SE_DL_RAW, rows, cols, dev, sb ? dev + se_align256(q_bytes) : NULL, nb * qb, s_row};
    if (sb) {
        uint8_t * host = (uint8_t *) malloc(q_bytes + s_bytes + 1);
        if (!host) return se_error(SE_ERR_OUT_OF_MEMORY, "out of memory");
        se_cuda_split_blocks(type, split, (const uint8_t *) w, rows * nb, host, host + q_bytes);
        cudaError_t e1 = cudaMemcpy(dev, host, q_bytes, cudaMemcpyHostToDevice);
        cudaError_t e2 = cudaMemcpy2D(dev + se_align256(q_bytes), (size_t) s_row, host + q_bytes, (size_t) (nb * sb),
                                      (size_t) (nb * sb), (size_t) rows, cudaMemcpyHostToDevice);
        free(host);
        SE_CUDA_CHECK(e1);
        SE_CUDA_CHECK(e2);
    } else {
        SE_CUDA_CHECK(cudaMemcpy(dev, w, q_bytes, cudaMemcpyHostToDevice));
    }
    return SE_OK;
}

// The cuBLAS route (path 4; path 5 adding to what out holds) on its own buffers and handle.
static int f16_route_product(const se_mm_out * o, const float * x, int32_t n) {
    se_f16_route route;
    int r = se_cuda_f16_init(&route, n, o->w.cols, 0);
    if (r == SE_OK) r = se_cuda_f16_products(&route, o, 1, x, n, 0);
    if (r == SE_OK) {
        const cudaError_t e = cudaDeviceSynchronize();
        if (e != cudaSuccess) r = se_cuda_error(e, "cudaDeviceSynchronize");
    }
    se_cuda_f16_free(&route);
    return r;
}

static int mul_mat(const se_type_traits * tt, int32_t type, const void * w, int64_t rows, int64_t cols, const float * x,
                   int32_t n, float * out, int32_t path, mm_test * b) {
    se_dweight dw;
    int r = upload_weight(tt, type, w, rows, cols, &b->w, &dw);
    if (r != SE_OK) return r;
    SE_CUDA_CHECK(cudaMalloc((void **) &b->x, (size_t) (n * cols) * sizeof(float)));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->out, (size_t) (n * rows) * sizeof(float)));
    const int64_t q8_values = (n * cols > rows ? n * cols : rows) + 32;  // path 3 writes h's 8-bit form there
    SE_CUDA_CHECK(cudaMalloc((void **) &b->qx, (size_t) q8_values));
    SE_CUDA_CHECK(cudaMalloc((void **) &b->ds, (size_t) (q8_values / 32 + 1) * sizeof(float2)));
    SE_CUDA_CHECK(cudaMemcpy(b->x, x, (size_t) (n * cols) * sizeof(float), cudaMemcpyHostToDevice));
    if (path == 5) {  // the route adds to out's values
        SE_CUDA_CHECK(cudaMemcpy(b->out, out, (size_t) (n * rows) * sizeof(float), cudaMemcpyHostToDevice));
    } else {          // poison the output: every element must be written
        SE_CUDA_CHECK(cudaMemset(b->out, 0xff, (size_t) (n * rows) * sizeof(float)));
    }
    if (path == 4 || path == 5) {
        const se_mm_out o = {dw, b->out, NULL, path == 5};
        r = f16_route_product(&o, b->x, n);
    } else if (path == 2 || path == 3) {  // one token through the fused norm (x row 1: the norm's weights)
        const float eps = 1e-5f;
        if (path == 2) {
            const se_mm_out o = {dw, b->out, NULL, 0};
            r = se_cuda_matvec_norm(&o, 1, b->x, b->x + cols, eps, SE_MV_AUTO, false, NULL, NULL, 0);
        } else {  // gate: the first rows / 2 rows, up: the rest; h into out[0 .. rows / 2)
            se_dweight gw = dw, uw = dw;
            gw.rows = uw.rows = rows / 2;
            uw.q += (rows / 2) * dw.q_row;
            if (uw.s) uw.s += (rows / 2) * dw.s_row;
            const se_mm_out o[2] = {{gw, b->out, NULL, 0}, {uw, b->out + rows / 2, NULL, 0}};
            r = se_cuda_matvec_norm(o, 2, b->x, b->x + cols, eps, SE_MV_AUTO, true, b->qx, b->ds, 0);
        }
    } else if (path == SE_MV_AUTO && n > 1) {  // as the forward pass: int8 tensor cores where the type has them
        const se_mm_out o = {dw, b->out, NULL, 0};
        if (se_cuda_mmq_enabled() && se_cuda_has_mmq(type)) {
            r = se_cuda_quantize_q8(b->x, n, cols, b->qx, b->ds, 0);
            if (r == SE_OK) r = se_cuda_mmq(&o, 1, se_dact{b->x, b->qx, b->ds}, n, 0);
        } else {
            r = se_cuda_matmul(&o, b->x, n, 0);
        }
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
    const bool fused = path == 2 || path == 3;
    if (!w || !x || !out || rows < 1 || n < 1 || cols < 1 || cols % tt->block || path < SE_MV_AUTO || path > 5 ||
        (fused && (n != 2 || cols % 32)) || (path == 3 && rows % 2)) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_mul_mat: bad arguments");
    }
    if (tt->block > 1 && cols % 32) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_mul_mat: cols must be a multiple of 32");
    int count;
    int r = se_cuda_check_device(&count);
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

extern "C" int se_cuda_cublas_load(void) {
    int count;
    const int r = se_cuda_check_device(&count);
    return r != SE_OK ? r : se_cublas_load(true);
}

extern "C" int se_cuda_dequantize_f16(int32_t type, const void * w, int64_t rows, int64_t cols, uint16_t * out) {
    const se_type_traits * tt = se_type_get(type);
    if (!tt || !tt->dot) return se_error(SE_ERR_UNSUPPORTED, "se_cuda_dequantize_f16: type %d is not supported", type);
    if (!w || !out || rows < 1 || cols < 1 || cols % tt->block) return se_error(SE_ERR_INVALID_ARGUMENT, "se_cuda_dequantize_f16: bad arguments");
    int count;
    int r = se_cuda_check_device(&count);
    if (r != SE_OK) return r;
    se_quants_init();
    SE_CUDA_CHECK(cudaSetDevice(0));
    uint8_t * dev = NULL;
    __half * o = NULL;
    se_dweight dw;
    r = upload_weight(tt, type, w, rows, cols, &dev, &dw);
    if (r == SE_OK && !se_cuda_f16_takes(&dw)) r = se_error(SE_ERR_UNSUPPORTED, "se_cuda_dequantize_f16: type %d is not supported", type);
    if (r == SE_OK) {
        const cudaError_t e = cudaMalloc((void **) &o, (size_t) (rows * cols) * sizeof(__half));
        r = e == cudaSuccess ? SE_OK : se_cuda_error(e, "cudaMalloc");
    }
    if (r == SE_OK) r = se_cuda_dequant_f16(&dw, 0, rows, o, 0);
    if (r == SE_OK) {
        const cudaError_t e = cudaMemcpy(out, o, (size_t) (rows * cols) * sizeof(__half), cudaMemcpyDeviceToHost);
        r = e == cudaSuccess ? SE_OK : se_cuda_error(e, "cudaMemcpy");
    }
    cudaFree(dev);
    cudaFree(o);
    return r;
}
