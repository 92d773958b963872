// Element-wise kernels: RMSNorm, SwiGLU and activations to 8 bits. In the one-token pass RMSNorm
// and SwiGLU run fused into the products (se-cuda-matmul.cu); these serve prefill and the inputs
// too wide for that kernel's shared memory.
//
// The 8-bit form is the one the CPU engine uses (blocks of 32, d = max |x| / 127, round to even;
// as llama.cpp's q8_1 with d * sum kept for the offsets of Q4_0 / Q4_1 / K-quants).
#include "se-cuda-quants.cuh"

// a warp per block of 32
__global__ void k_quantize_q8(const float * x, int64_t n_blocks, int8_t * qx, float2 * ds) {
    const int64_t b = ((int64_t) blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (b >= n_blocks) return;
    float d;
    const int q = q8_lane(x[32 * b + lane], d);
    qx[32 * b + lane] = (int8_t) q;
    const float sum = warp_sum((float) q);
    if (lane == 0) ds[b] = make_float2(d, d * sum);
}

int se_cuda_quantize_q8(const float * x, int32_t n, int64_t cols, int8_t * qx, float2 * ds, cudaStream_t s) {
    const int64_t n_blocks = (int64_t) n * cols / 32;
    k_quantize_q8<<<(unsigned) ((n_blocks + 7) / 8), 256, 0, s>>>(x, n_blocks, qx, ds);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

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

int se_cuda_rmsnorm(const float * x, const float * w, int32_t n, int64_t dim, float eps, float * out, int8_t * qx,
                    float2 * ds, cudaStream_t s) {
    k_rmsnorm<<<n, 256, 0, s>>>(x, w, dim, eps, out, qx, ds);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
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

int se_cuda_swiglu(float * g, const float * u, int64_t n, int8_t * qx, float2 * ds, cudaStream_t s) {
    k_swiglu<<<(unsigned) ((n + 255) / 256), 256, 0, s>>>(g, u, n, qx, ds);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

void se_cuda_elementwise_init() {
    const void * kernels[] = {(const void *) k_quantize_q8, (const void *) k_rmsnorm, (const void *) k_swiglu};
    for (const void * k : kernels) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaGetLastError();
}
