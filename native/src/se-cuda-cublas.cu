// The cuBLAS route of the prefill products: for chunks of many tokens, each weight dequantized to
// f16 a slice of rows at a time (se-cuda-dequant.cu), the activations made f16, and cublasGemmEx
// (f16 x f16, f32 accumulation and output). llama.cpp sends its large batches of types without an
// int8 kernel the same way; on an H200 cuBLAS ran f16 products at 637-748 TFLOP/s where our int8
// kernels reach ~170 (benchmarks/results/triton_bench.md, cuda_kernels_log.md).
//
// cuBLAS is loaded at run time with dlopen, so the library builds without its headers and loads
// where it is absent: SEPEDGE_CUBLAS where set (a path, the one tried; the Python layer sets it from
// an installed nvidia-cublas package), else libcublas.so.13, else libcublas.so.12. The few entry points and
// enum values used are declared here as cuBLAS's documentation gives them.
//
// Range: f16 holds magnitudes up to 65504, and the hidden states of some models (random-weight 8B
// files: 1e6) exceed it. Each activation row is divided by a power of two s_t (1 unless its largest
// magnitude exceeds 2^15), exact in both directions, and the row of the result multiplied back by s_t
// afterwards. Where the product adds to the residual stream, that row of the stream is divided by
// s_t before the GEMM (which adds with beta = 1) and multiplied back with the result: s_t (a + r / s_t)
// = s_t a + r, the rounding of the sum the same at either scale. Weights are checked once per
// context (se_cuda_f16_weights_fit) and the route stays off where any exceeds f16's range.
#include "se-cuda-quants.cuh"

#include <dlfcn.h>
#include <library_types.h>
#include <math.h>
#include <mutex>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// cuBLAS's handle, enum values and entry points (cublas_api.h of cuBLAS 12 and 13).
typedef void * cublas_handle;
enum { CUBLAS_OK = 0, CUBLAS_OP_N_ = 0, CUBLAS_OP_T_ = 1, CUBLAS_COMPUTE_32F_ = 68, CUBLAS_GEMM_DEFAULT_ = -1 };
typedef int (*cublas_create_fn)(cublas_handle *);
typedef int (*cublas_destroy_fn)(cublas_handle);
typedef int (*cublas_set_stream_fn)(cublas_handle, cudaStream_t);
typedef int (*cublas_gemm_ex_fn)(cublas_handle, int transa, int transb, int m, int n, int k, const void * alpha,
                                 const void * a, cudaDataType_t a_type, int lda, const void * b, cudaDataType_t b_type,
                                 int ldb, const void * beta, void * c, cudaDataType_t c_type, int ldc, int compute_type,
                                 int algo);
typedef const char * (*cublas_status_string_fn)(int);

static struct {
    std::once_flag once;
    void * lib;
    cublas_create_fn create;
    cublas_destroy_fn destroy;
    cublas_set_stream_fn set_stream;
    cublas_gemm_ex_fn gemm_ex;
    cublas_status_string_fn status_string;  // or NULL (older libraries)
    char why[512];                          // why it did not load
} cublas;

static void cublas_open() {
    // SEPEDGE_CUBLAS, where set, is the one library tried (a path that does not load: no cuBLAS)
    const char * env = getenv("SEPEDGE_CUBLAS");
    const char * names[2] = {"libcublas.so.13", "libcublas.so.12"};
    if (env && *env) names[0] = env, names[1] = NULL;
    size_t used = 0;
    for (const char * name : names) {
        if (!name || !*name) continue;
        void * lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            const char * e = dlerror();
            if (used < sizeof cublas.why) used += (size_t) snprintf(cublas.why + used, sizeof cublas.why - used, "%s%s", used ? "; " : "", e ? e : name);
            continue;
        }
        cublas.create = (cublas_create_fn) dlsym(lib, "cublasCreate_v2");
        cublas.destroy = (cublas_destroy_fn) dlsym(lib, "cublasDestroy_v2");
        cublas.set_stream = (cublas_set_stream_fn) dlsym(lib, "cublasSetStream_v2");
        cublas.gemm_ex = (cublas_gemm_ex_fn) dlsym(lib, "cublasGemmEx");
        cublas.status_string = (cublas_status_string_fn) dlsym(lib, "cublasGetStatusString");
        if (cublas.create && cublas.destroy && cublas.set_stream && cublas.gemm_ex) {
            cublas.lib = lib;
            cublas.why[0] = 0;
            return;
        }
        if (used < sizeof cublas.why) used += (size_t) snprintf(cublas.why + used, sizeof cublas.why - used, "%s%s lacks cublasGemmEx", used ? "; " : "", name);
        dlclose(lib);
    }
    if (!used) snprintf(cublas.why, sizeof cublas.why, "no library to try");
}

int se_cublas_load(bool report) {
    std::call_once(cublas.once, cublas_open);
    if (cublas.lib) return SE_OK;
    return report ? se_error(SE_ERR_BACKEND, "cuBLAS is not available (%s)", cublas.why) : SE_ERR_BACKEND;
}

static int cublas_error(int status, const char * what) {
    const char * s = cublas.status_string ? cublas.status_string(status) : NULL;
    return se_error(SE_ERR_BACKEND, "cuBLAS error %d%s%s (%s)", status, s ? ": " : "", s ? s : "", what);
}

// ---------------------------------------------------------------------------------------------
// the route's buffers

#define F16_SCRATCH_MB 64  // the f16 slice of a weight: 8B's gate (117 MB in f16) in two slices

int se_cuda_f16_init(se_f16_route * r, int64_t n_batch, int64_t widest, cudaStream_t s) {
    memset(r, 0, sizeof *r);
    int st = se_cublas_load(true);
    if (st != SE_OK) return st;
    const char * env = getenv("SEPEDGE_CUDA_CUBLAS_SCRATCH_MB");
    const int64_t mb = env && atoi(env) > 0 ? atoi(env) : F16_SCRATCH_MB;
    r->w16_elems = (mb << 20) / (int64_t) sizeof(__half);
    r->x16_elems = n_batch * widest;
    r->n_batch = n_batch;
    const size_t bytes[3] = {(size_t) r->w16_elems * sizeof(__half), (size_t) r->x16_elems * sizeof(__half),
                             (size_t) n_batch * sizeof(float)};
    void ** ptrs[3] = {(void **) &r->w16, (void **) &r->x16, (void **) &r->xscale};
    for (int i = 0; i < 3; i++) {
        const cudaError_t e = cudaMalloc(ptrs[i], bytes[i]);
        if (e != cudaSuccess) {
            cudaGetLastError();
            se_cuda_f16_free(r);
            return se_error(SE_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of GPU memory (the cuBLAS route's buffers)",
                            (double) bytes[i] / (1 << 20));
        }
    }
    cublas_handle h = NULL;
    if ((st = cublas.create(&h)) != CUBLAS_OK) {
        se_cuda_f16_free(r);
        return cublas_error(st, "cublasCreate");
    }
    r->handle = h;
    if ((st = cublas.set_stream(h, s)) != CUBLAS_OK) {
        se_cuda_f16_free(r);
        return cublas_error(st, "cublasSetStream");
    }
    return SE_OK;
}

void se_cuda_f16_free(se_f16_route * r) {
    if (r->handle && cublas.destroy) cublas.destroy(r->handle);
    cudaFree(r->w16);
    cudaFree(r->x16);
    cudaFree(r->xscale);
    memset(r, 0, sizeof *r);
}

bool se_cuda_f16_takes(const se_dweight * w) {
    switch (w->type) {  // the types dequant32 reads
        case SE_TYPE_F32: case SE_TYPE_F16: case SE_TYPE_BF16: case SE_TYPE_Q4_0: case SE_TYPE_Q4_1: case SE_TYPE_Q8_0:
        case SE_TYPE_Q5_0: case SE_TYPE_Q4_K: case SE_TYPE_Q5_K: case SE_TYPE_Q6_K:
            return w->cols > 0 && w->cols <= INT32_MAX && w->rows <= INT32_MAX;
        default:
            return false;
    }
}

int se_cuda_f16_weights_fit(const se_dweight * const * ws, int n, bool * fit, cudaStream_t s) {
    unsigned * d_max = NULL;
    SE_CUDA_CHECK(cudaMalloc((void **) &d_max, sizeof(unsigned)));
    const cudaError_t e0 = cudaMemsetAsync(d_max, 0, sizeof(unsigned), s);
    int r = e0 == cudaSuccess ? SE_OK : se_cuda_error(e0, "cudaMemsetAsync");
    for (int i = 0; i < n && r == SE_OK; i++)
        if (ws[i] && se_cuda_f16_takes(ws[i])) r = se_cuda_weight_max(ws[i], d_max, s);
    unsigned bits = 0;
    if (r == SE_OK) {
        const cudaError_t e = cudaMemcpyAsync(&bits, d_max, sizeof bits, cudaMemcpyDeviceToHost, s);
        const cudaError_t e2 = e == cudaSuccess ? cudaStreamSynchronize(s) : e;
        if (e2 != cudaSuccess) r = se_cuda_error(e2, "the weights' largest value");
    }
    cudaFree(d_max);
    float m;
    memcpy(&m, &bits, sizeof m);
    *fit = r == SE_OK && m <= 65504.0f;  // false for NaN and infinity as well
    return r;
}

// ---------------------------------------------------------------------------------------------
// activations to f16, and the rows' scales applied to the results

// Rows of x whose largest magnitude is at most this stay as they are; others are divided by the
// power of two that brings it into [2^14, 2^15): f16 then keeps 11 significant bits of the row's
// large values, well below its largest finite value (65504) so that rounding cannot overflow.
#define F16_ROW_MAX 32768.0f

// A block of 256 threads a row: x (n, cols) -> x16 = x / s_t in f16, scale[t] = s_t.
__global__ void __launch_bounds__(256) k_act_f16(const float * x, int64_t cols, __half * x16, float * scale) {
    const float * xr = x + (int64_t) blockIdx.x * cols;
    __half * o = x16 + (int64_t) blockIdx.x * cols;
    __shared__ float partial[8];
    float m = 0;
    for (int64_t i = threadIdx.x; i < cols; i += 256) m = fmaxf(m, fabsf(xr[i]));
    m = warp_max(m);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = m;
    __syncthreads();
    m = 0;
#pragma unroll
    for (int w = 0; w < 8; w++) m = fmaxf(m, partial[w]);
    float s = 1.0f;
    if (m > F16_ROW_MAX && isfinite(m)) {  // non-finite rows pass unchanged: the pass reports them
        int e;
        frexpf(m, &e);                     // m < 2^e
        s = ldexpf(1.0f, e - 15);
    }
    const float inv = 1.0f / s;            // exact: a power of two
    for (int64_t i = threadIdx.x; i < cols; i += 256) o[i] = __float2half_rn(xr[i] * inv);
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// Rows t of out (n, rows) whose scale is not 1: before the GEMM (post false) out /= s_t; after it
// (post true) out = out * s_t, and + bias on every row.
__global__ void __launch_bounds__(256) k_row_scale(float * out, int64_t rows, const float * scale, const float * bias, bool post) {
    const float s = scale[blockIdx.x];
    if (s == 1.0f && !(post && bias)) return;
    float * o = out + (int64_t) blockIdx.x * rows;
    const float f = post ? s : 1.0f / s;
    for (int64_t i = threadIdx.x; i < rows; i += 256) o[i] = o[i] * f + (post && bias ? bias[i] : 0.0f);
}

// ---------------------------------------------------------------------------------------------
// the products

int se_cuda_f16_act(se_f16_route * r, const float * x, int32_t n, int64_t cols, cudaStream_t s) {
    if (n > r->n_batch || (int64_t) n * cols > r->x16_elems) {
        return se_error(SE_ERR_INVALID_ARGUMENT, "the cuBLAS route's buffers hold %lld values of %lld rows (asked %d x %lld)",
                        (long long) r->x16_elems, (long long) r->n_batch, n, (long long) cols);
    }
    k_act_f16<<<(unsigned) n, 256, 0, s>>>(x, cols, r->x16, r->xscale);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

// out (n, rows) (+)= x16 W^T from the f16 activations made by se_cuda_f16_act.
static int product(se_f16_route * r, const se_mm_out * o, int32_t n, cudaStream_t s) {
    const se_dweight & w = o->w;
    const int64_t rows = w.rows, cols = w.cols;
    if (o->accumulate) {
        k_row_scale<<<(unsigned) n, 256, 0, s>>>(o->out, rows, r->xscale, NULL, false);
        SE_CUDA_CHECK(cudaGetLastError());
    }
    // f16 weights stored as rows of the file need no copy; every other type goes a slice at a time
    const bool direct = w.type == SE_TYPE_F16 && w.layout == SE_DL_RAW && w.q_row == cols * (int64_t) sizeof(__half) &&
                        (uintptr_t) w.q % 16 == 0;
    int64_t slice = direct ? rows : r->w16_elems / cols;
    if (slice < 1) {
        return se_error(SE_ERR_UNSUPPORTED, "a row of %lld values does not fit the cuBLAS route's scratch buffer",
                        (long long) cols);
    }
    if (slice < rows && slice >= 128) slice -= slice % 128;  // whole GEMM tiles but the last
    const float alpha = 1.0f, beta = o->accumulate ? 1.0f : 0.0f;
    for (int64_t r0 = 0; r0 < rows; r0 += slice) {
        const int64_t m = rows - r0 < slice ? rows - r0 : slice;
        const __half * a = direct ? (const __half *) w.q + r0 * cols : r->w16;
        if (!direct) {
            const int st = se_cuda_dequant_f16(&w, r0, m, r->w16, s);
            if (st != SE_OK) return st;
        }
        // column-major: out^T (rows, n), leading dimension rows, = W (cols x rows, transposed) . x16^T (cols x n)
        const int st = cublas.gemm_ex(r->handle, CUBLAS_OP_T_, CUBLAS_OP_N_, (int) m, n, (int) cols, &alpha, a, CUDA_R_16F,
                                      (int) cols, r->x16, CUDA_R_16F, (int) cols, &beta, o->out + r0, CUDA_R_32F, (int) rows,
                                      CUBLAS_COMPUTE_32F_, CUBLAS_GEMM_DEFAULT_);
        if (st != CUBLAS_OK) return cublas_error(st, "cublasGemmEx");
    }
    k_row_scale<<<(unsigned) n, 256, 0, s>>>(o->out, rows, r->xscale, o->bias, true);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

int se_cuda_f16_products(se_f16_route * r, const se_mm_out * outs, int n_outs, const float * x, int32_t n, cudaStream_t s) {
    int st = se_cuda_f16_act(r, x, n, outs[0].w.cols, s);
    for (int k = 0; k < n_outs && st == SE_OK; k++) {
        if (outs[k].w.cols != outs[0].w.cols) return se_error(SE_ERR_INVALID_ARGUMENT, "products of one input differ in K");
        st = product(r, &outs[k], n, s);
    }
    return st;
}
