// Weights to f16 for the prefill products of the cuBLAS route (se-cuda-cublas.cu): each weight
// matrix's rows, a slice at a time, dequantized into a scratch buffer of row-major f16 values that
// cublasGemmEx then reads, as llama.cpp does for its large batches of types without an int8 kernel.
//
// The values come from dequant32_wide / dequant32 (se-cuda-quants.cuh), the device's readings of every
// type's blocks in the layouts of se-cuda.h, so this file knows no block layout of its own. The kernel is bound by
// its writes (2 bytes a weight against 0.56 read for Q4_0): a thread makes 32 values of one row and
// stores them as four 16-byte pieces, neighbouring threads the neighbouring pieces of the row.
#include "se-cuda-quants.cuh"

// Rows [r0, r0 + rows) of w into out (rows, w.cols), row-major f16. A thread a 32-value chunk.
__global__ void __launch_bounds__(256) k_dequant_f16(const se_dweight w, int64_t r0, int64_t rows, __half * out) {
    const int64_t chunks = (w.cols + 31) / 32;
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * chunks) return;
    const int64_t r = i / chunks, c = i % chunks;
    float v[32];
    dequant32_wide(w, r0 + r, c, v);
    __half * o = out + r * w.cols + 32 * c;
    if (w.cols % 8 == 0 && 32 * c + 32 <= w.cols) {  // 16-byte aligned pieces
        __align__(16) __half2 h[16];
#pragma unroll
        for (int j = 0; j < 16; j++) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
#pragma unroll
        for (int j = 0; j < 4; j++) ((uint4 *) o)[j] = ((const uint4 *) h)[j];
    } else {  // float weights whose rows are not multiples of 8 (or the last chunk of a short row)
        for (int j = 0; j < 32 && 32 * c + j < w.cols; j++) o[j] = __float2half_rn(v[j]);
    }
}

int se_cuda_dequant_f16(const se_dweight * w, int64_t r0, int64_t rows, __half * out, cudaStream_t s) {
    if (rows <= 0) return SE_OK;
    const int64_t threads = rows * ((w->cols + 31) / 32);
    k_dequant_f16<<<(unsigned) ((threads + 255) / 256), 256, 0, s>>>(*w, r0, rows, out);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

// The largest |value| of w as the bits of a non-negative float (their order is the values' order, and
// a NaN's bits exceed those of infinity), gathered by atomicMax into *max_bits.
__global__ void __launch_bounds__(256) k_weight_max(const se_dweight w, unsigned * max_bits) {
    const int64_t chunks = (w.cols + 31) / 32, total = w.rows * chunks;
    unsigned m = 0;
    for (int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t) gridDim.x * blockDim.x) {
        float v[32];
        dequant32_wide(w, i / chunks, i % chunks, v);
#pragma unroll
        for (int j = 0; j < 32; j++) m = max(m, __float_as_uint(v[j]) & 0x7fffffffu);
    }
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x % 32 == 0) atomicMax(max_bits, m);
}

int se_cuda_weight_max(const se_dweight * w, unsigned * max_bits, cudaStream_t s) {
    if (w->rows <= 0) return SE_OK;
    const int64_t threads = w->rows * ((w->cols + 31) / 32);
    int64_t grid = (threads + 255) / 256;
    if (grid > 16 * (int64_t) se_cuda_n_sms()) grid = 16 * (int64_t) se_cuda_n_sms();
    k_weight_max<<<(unsigned) grid, 256, 0, s>>>(*w, max_bits);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}
