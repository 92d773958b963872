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

// Interleaved groups of SE_RP_ROWS consecutive weight rows, built at load for the CPU matrix
// products (the idea of llama.cpp's CPU "repack" buffers, e.g. q4_0_8x8; the layouts here are
// sepedge's own). Block i of a group holds block i of each of its 8 rows, the codes cut into 4-byte
// pieces and interleaved so that one 32-byte load holds the same 4 columns of all 8 rows: lane r
// (bytes 4r..4r+3) belongs to row r. An integer dot product with 4 activation bytes broadcast to
// every lane then leaves row r's partial sum in lane r: no horizontal sums, one result vector per
// 8 rows and token.
#define SE_RP_ROWS 8

// Q4_0: piece k (0..3) of row r at qs[32k + 4r] = that row's qs[4k..4k+3] (low nibbles: columns
// 4k..4k+3, high nibbles: columns 16+4k..16+4k+3)
typedef struct { uint16_t d[SE_RP_ROWS]; uint8_t qs[SE_RP_ROWS * SE_QK / 2]; } block_q4_0x8;
// Q8_0: piece k (0..7) of row r at qs[32k + 4r] = that row's qs[4k..4k+3]
typedef struct { uint16_t d[SE_RP_ROWS]; int8_t qs[SE_RP_ROWS * SE_QK]; } block_q8_0x8;
// Q5_0: qs as Q4_0's; the fifth bits of row r in the 32-bit word qh[r], placed for cheap unpacking:
// bit 8j + k = fifth bit of column 4k + j (low nibble of piece k), bit 8j + 4 + k = fifth bit of
// column 16 + 4k + j (its high nibble), for k, j in 0..3
typedef struct { uint16_t d[SE_RP_ROWS]; uint32_t qh[SE_RP_ROWS]; uint8_t qs[SE_RP_ROWS * SE_QK / 2]; } block_q5_0x8;
// Q4_K: scales and mins unpacked to bytes, sub-block j of row r at sc[j][r] / m[j][r]; for chunk c
// (sub-blocks 2c and 2c+1) piece k (0..7) of row r at qs[256c + 32k + 4r] = that row's
// qs[32c + 4k .. 32c + 4k + 3]
typedef struct {
    float d[SE_RP_ROWS], dmin[SE_RP_ROWS];
    uint8_t sc[8][SE_RP_ROWS], m[8][SE_RP_ROWS];
    uint8_t qs[SE_RP_ROWS * SE_QK_K / 2];
} block_q4_Kx8;

// Q6_K: the 6-bit codes q (value d * scale * (q - 32)) re-split per 32-column activation block b:
// for chunk c (blocks 2c, 2c + 1) piece k (0..7) of row r at qs[256c + 32k + 4r] holds the low 4 bits
// of columns 4k..4k+3 of block 2c (low nibbles) and of block 2c + 1 (high nibbles), as Q4_K; their
// high 2 bits in the 32-bit word qh[128c + 32(k / 2) + 4r], bits 8j + 2m (m = 2 (k % 2) + 0 for
// block 2c, + 1 for block 2c + 1) for column 4k + j. Sub-block s (16 columns) of row r scales with sc[s][r].
typedef struct {
    float d[SE_RP_ROWS];
    int8_t sc[16][SE_RP_ROWS];
    uint8_t qs[SE_RP_ROWS * SE_QK_K / 2];
    uint8_t qh[SE_RP_ROWS * SE_QK_K / 4];
} block_q6_Kx8;

SE_STATIC_ASSERT(sizeof(block_q8_0) == 34, "Q8_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_0) == 18, "Q4_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_1) == 20, "Q4_1 block layout");
SE_STATIC_ASSERT(sizeof(block_q5_0) == 22, "Q5_0 block layout");
SE_STATIC_ASSERT(sizeof(block_q4_K) == 144, "Q4_K block layout");
SE_STATIC_ASSERT(sizeof(block_q5_K) == 176, "Q5_K block layout");
SE_STATIC_ASSERT(sizeof(block_q6_K) == 210, "Q6_K block layout");
SE_STATIC_ASSERT(sizeof(block_q4_0x8) == 8 * 18, "Q4_0x8 layout");
// The CUDA backend's Q4_K layout (se-cuda-weights.cu; SEPEDGE_CUDA_Q4K_REPACK=0: the file's instead): per superblock
// its 128 code bytes as in the file (code plane) and a 20-byte head (scale plane): the word d | dmin << 16
// (f16 bits, as in the file), then for c = 0..3 the word of bytes (scale, min of sub-block 2c, scale,
// min of sub-block 2c + 1), the six-bit values already unpacked. 148 bytes for the file's 144 (+2.8%).
#define SE_Q4K_SPLIT_QB (SE_QK_K / 2)
#define SE_Q4K_SPLIT_SB 20

SE_STATIC_ASSERT(sizeof(block_q8_0x8) == 8 * 34, "Q8_0x8 layout");
SE_STATIC_ASSERT(sizeof(block_q5_0x8) == 8 * 22, "Q5_0x8 layout");
SE_STATIC_ASSERT(sizeof(block_q4_Kx8) == 1216, "Q4_Kx8 layout");
SE_STATIC_ASSERT(sizeof(block_q6_Kx8) == 1696, "Q6_Kx8 layout");

#endif
