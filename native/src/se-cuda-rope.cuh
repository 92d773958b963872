// Rotary position embedding on the device: the one place the pair convention and the rotation are
// written. llama.cpp's two conventions: SE_ROPE_NORM rotates pairs (2i, 2i + 1), SE_ROPE_NEOX pairs
// (i, i + d / 2); pair i turns by angle pos * freq[i], (cos, sin) from a table or sincos.
#ifndef SE_CUDA_ROPE_CUH
#define SE_CUDA_ROPE_CUH

#include "se-cuda-quants.cuh"

// The two dimensions of pair i (of d / 2).
__device__ __forceinline__ void rope_pair(int i, int d, int rope_type, int & ia, int & ib) {
    ia = rope_type == SE_ROPE_NORM ? 2 * i : i;
    ib = rope_type == SE_ROPE_NORM ? 2 * i + 1 : i + d / 2;
}

// The pair (x0, x1) turned by (cos, sin) = cs.
__device__ __forceinline__ float2 rope_turn(float x0, float x1, float2 cs) {
    return make_float2(x0 * cs.x - x1 * cs.y, x0 * cs.y + x1 * cs.x);
}

// Dimension j of a key row rotated by the cell's delta, t its (cos, sin) row.
__device__ inline float rope_rotated(const __half * k, int j, int d, const float2 * t, int rope_type) {
    const int i = rope_type == SE_ROPE_NORM ? j / 2 : j % (d / 2);
    int ia, ib;
    rope_pair(i, d, rope_type, ia, ib);
    const float2 r = rope_turn(__half2float(k[ia]), __half2float(k[ib]), t[i]);
    return j == ia ? r.x : r.y;
}

// Eight f16 values held in 16 bytes.
__device__ __forceinline__ void unpack8(const int4 raw, float x[8]) {
    const __half2 * h = (const __half2 *) &raw;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const float2 f = __half22float2(h[e]);
        x[2 * e] = f.x;
        x[2 * e + 1] = f.y;
    }
}

// Eight f16 values from a 16-byte load.
__device__ __forceinline__ void load8(const __half * p, float x[8]) { unpack8(*(const int4 *) p, x); }

// Dimensions [j0, j0 + 8) of a key (in k) turned by the cell's delta, its (cos, sin) row t already
// at hand (shared memory); SE_ROPE_NEOX: pk holds the partner dimensions j0 +- d / 2 (d / 2 % 8 == 0).
__device__ __forceinline__ void rope_rotate8_row(float k[8], const float pk[8], const float2 * t, int j0, int d, int rope_type) {
    if (rope_type == SE_ROPE_NORM) {
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
            const float2 r = rope_turn(k[e], k[e + 1], t[(j0 + e) / 2]);
            k[e] = r.x;
            k[e + 1] = r.y;
        }
        return;
    }
    const int half = d / 2;
    const bool low = j0 < half;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float2 cs = t[(j0 + e) % half];
        k[e] = low ? k[e] * cs.x - pk[e] * cs.y : pk[e] * cs.y + k[e] * cs.x;
    }
}

// Dimensions [j0, j0 + 8) of key row kr (already in k) rotated by the cell's delta (table row t);
// SE_ROPE_NEOX pairs (i, i + d / 2), so the partners are eight other dimensions of the row.
__device__ __forceinline__ void rope_rotate8(float k[8], const __half * kr, int j0, int d, const float2 * t, int rope_type) {
    if (rope_type == SE_ROPE_NORM) return rope_rotate8_row(k, k, t, j0, d, rope_type);  // pairs within the eight
    float pk[8];
    load8(kr + (j0 < d / 2 ? j0 + d / 2 : j0 - d / 2), pk);
    rope_rotate8_row(k, pk, t, j0, d, rope_type);
}

#endif  // SE_CUDA_ROPE_CUH
