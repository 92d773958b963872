// The quantized block layouts of the GGUF tensor types (GGUF.md §7, llama.cpp's ggml-common.h),
// declared once for every backend: the portable C kernels, the AVX2 kernels and the CUDA code all
// include this file. Plain C structs with fixed-width fields, valid C11 and CUDA C++; half-precision
// scales are raw IEEE binary16 bits (uint16_t), converted by each backend its own way.
#ifndef SE_COMMON_H
#define SE_COMMON_H

#include <stdint.h>

#ifdef __cplusplus
#define SE_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define SE_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

#define SE_QK    32    // values per block of the 32-value types (Q4_0, Q4_1, Q5_0, Q8_0)
#define SE_QK_K  256   // values per superblock of the K-quants
#define SE_K_SCALE_SIZE 12

typedef struct { uint16_t d; int8_t qs[SE_QK]; } block_q8_0;                    // x = d * q
typedef struct { uint16_t d; uint8_t qs[SE_QK / 2]; } block_q4_0;               // x = d * (q - 8); low nibbles: values 0..15, high: 16..31
typedef struct { uint16_t d, m; uint8_t qs[SE_QK / 2]; } block_q4_1;            // x = d * q + m
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[SE_QK / 2]; } block_q5_0; // x = d * (q - 16); bit 4 of value j in qh bit j

// K-quants: 8 sub-blocks of 32 with 6-bit scales and mins packed in `scales` (Q4_K, Q5_K), or 16
// sub-blocks of 16 with 8-bit scales (Q6_K: x = d * scale * (q - 32)).
typedef struct { uint16_t d, dmin; uint8_t scales[SE_K_SCALE_SIZE]; uint8_t qs[SE_QK_K / 2]; } block_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[SE_K_SCALE_SIZE]; uint8_t qh[SE_QK_K / 8]; uint8_t qs[SE_QK_K / 2]; } block_q5_K;
typedef struct { uint8_t ql[SE_QK_K / 2]; uint8_t qh[SE_QK_K / 4]; int8_t scales[SE_QK_K / 16]; uint16_t d; } block_q6_K;

SE_STATIC_ASSERT(sizeof(block_q8_0) == 34, "Q8_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_0) == 18, "Q4_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_1) == 20, "Q4_1 block layout");
SE_STATIC_ASSERT(sizeof(block_q5_0) == 22, "Q5_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_K) == 144, "Q4_K block layout");
SE_STATIC_ASSERT(sizeof(block_q5_K) == 176, "Q5_K block layout");
SE_STATIC_ASSERT(sizeof(block_q6_K) == 210, "Q6_K block layout");

#endif
