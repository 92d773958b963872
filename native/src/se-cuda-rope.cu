// Rotary position embedding: the step's (cos, sin) tables, and the rotation and cache store of
// tokens' queries and keys where the attention kernel does not fuse it (prefill, odd head sizes).
//
// Keys are stored rotated by their original position. A cell with a delta (positions within the
// cache, SepLLM's streaming modes) is rotated by the delta as it is read, with (cos, sin) from a
// table rewritten only where a delta changed (deltas change at compressions, not every token).
// Angles are computed in double, as the CPU engine's se-forward.c does, then rounded to float.
#include "se-cuda-rope.cuh"

// grid: block 0 the token's position; all blocks stride over the live cells, a warp a cell.
__global__ void k_rope_tables(const se_dattn a, const double * freq, int32_t * tab_delta, float2 * dtab, float2 * rope) {
    const int half = a.head_dim / 2;
    if (rope && blockIdx.x == 0) {
        const double p = a.pos[0];
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            double sn, cs;
            sincos(p * freq[i], &sn, &cs);
            rope[i] = make_float2((float) cs, (float) sn);
        }
    }
    if (!dtab) return;
    const int lane = threadIdx.x % 32, n_warps = gridDim.x * blockDim.x / 32;
    for (int li = (blockIdx.x * blockDim.x + threadIdx.x) / 32; li < a.step->n_live; li += n_warps) {
        const se_dcell c = a.live[li];
        if (c.delta == 0 || tab_delta[c.cell] == c.delta) continue;
        for (int i = lane; i < half; i += 32) {
            double sn, cs;
            sincos((double) c.delta * freq[i], &sn, &cs);
            dtab[(int64_t) c.cell * half + i] = make_float2((float) cs, (float) sn);
        }
        __syncwarp();
        if (lane == 0) tab_delta[c.cell] = c.delta;
    }
}

int se_cuda_rope_tables(const se_dattn * a, const double * freq, int32_t * tab_delta, float2 * dtab, float2 * rope,
                        cudaStream_t s) {
    if (!dtab && !rope) return SE_OK;
    k_rope_tables<<<dtab ? 132 : 1, 256, 0, s>>>(*a, freq, tab_delta, dtab, rope);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

// A block a token: rotate q (in place) and k by the token's position, store k and v (f16) in its cell.
__global__ void k_rope_store(const se_dattn a, float * q, const double * freq) {
    const int t = blockIdx.x, d = a.head_dim, half = d / 2, n_head = a.n_head, n_head_kv = a.n_head_kv;
    const int64_t row = (int64_t) n_head_kv * d, cell = a.cells[t];
    const double p = a.pos[t];
    for (int idx = threadIdx.x; idx < (n_head + n_head_kv) * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        int ia, ib;
        rope_pair(i, d, a.rope_type, ia, ib);
        double sn, cs;
        sincos(p * freq[i], &sn, &cs);
        const float2 c = make_float2((float) cs, (float) sn);
        if (h < n_head) {
            float * x = q + ((int64_t) t * n_head + h) * d;
            const float2 r = rope_turn(x[ia], x[ib], c);
            x[ia] = r.x;
            x[ib] = r.y;
        } else {
            const float * x = a.k_new + (int64_t) t * row + (int64_t) (h - n_head) * d;
            __half * dst = a.k + se_kv_at(a, cell, h - n_head);
            const float2 r = rope_turn(x[ia], x[ib], c);
            dst[ia] = __float2half(r.x);
            dst[ib] = __float2half(r.y);
        }
    }
    for (int64_t j = threadIdx.x; j < row; j += blockDim.x) {
        a.v[se_kv_at(a, cell, j / d) + j % d] = __float2half(a.v_new[(int64_t) t * row + j]);
    }
}

int se_cuda_rope_store(const se_dattn * a, float * q, const double * freq, int32_t n, cudaStream_t s) {
    k_rope_store<<<n, 256, 0, s>>>(*a, q, freq);
    SE_CUDA_CHECK(cudaGetLastError());
    return SE_OK;
}

void se_cuda_rope_init() {
    const void * kernels[] = {(const void *) k_rope_tables, (const void *) k_rope_store};
    for (const void * k : kernels) cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaGetLastError();
}
