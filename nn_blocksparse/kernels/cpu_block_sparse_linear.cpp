// Native CPU kernel for `y = x @ W^T + b` with W block-sparse (BSR, square bs x bs blocks), fp32, AVX-512.
//
// Compiled on first use by `cpu_block_sparse_linear.py` (the launcher beside this file) with the
// system C++ compiler and loaded through ctypes: it takes raw pointers and knows nothing of torch.
//
// Why a hand-written kernel: torch's CPU BSR matmul is 14-50x slower than dense, and a pure-torch
// path (gather the block-columns of x, then batched BLAS GEMMs) loses 20-25% to the gathers and
// transposes, and runs on MKL, which on AMD CPUs takes its AVX2 code path (about half the
// AVX-512 peak).  Here the gather costs nothing: the micro-kernel reads x where it lies.
//
// Layout: blocks are stored transposed, `blocks_t[b][k][n] = W[r*bs + n, c*bs + k]` for the b-th
// stored block (r, c) in BSR order, so that one row of a block is the bs output features of one
// input feature: bs/16 vector loads.
//
// Micro-kernel (BLIS style, x not packed): an MR x bs tile of y lives in registers (MR*bs/16
// accumulators, 24 of the 32 zmm registers) for the whole walk over the block-row's stored
// blocks; per input feature k it loads one row of the block and broadcasts x[i, c*bs + k] of each
// of the MR rows.  2*MR FMAs per 2 + MR loads keeps it FMA-bound.  The x rows touched by one tile
// (MR rows x bs floats per block) stay in L1 while the block row streams from L2.
//
// Work split: (block-row, chunk of rows of x) tasks, dealt dynamically to OpenMP threads.  The
// shared object links libgomp.so.1, which the dynamic loader resolves to the one torch already
// loaded, so these threads are torch's own OpenMP team, not a second one competing for the cores.

#include <immintrin.h>
#include <stdint.h>

namespace {

template <int NV, int MR>
inline void tile(const float* x, int64_t ldx, const float* blocks_t, const int64_t* cols, int64_t nblocks,
                 const float* bias, float* y, int64_t ldy) {
  constexpr int BS = 16 * NV;
  __m512 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 init = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) acc[i][v] = init;
  }
  for (int64_t p = 0; p < nblocks; ++p) {
    const float* xp = x + cols[p] * BS;
    const float* bp = blocks_t + p * BS * BS;
    for (int k = 0; k < BS; ++k) {
      __m512 w[NV];
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(bp + k * BS + 16 * v);
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(xp[i * ldx + k]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, w[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + i * ldy + 16 * v, acc[i][v]);
}

// The last rows % MR rows of a chunk, with a tile of exactly that height.
template <int NV, int R>
inline void tail(int rows, const float* x, int64_t ldx, const float* blocks_t, const int64_t* cols,
                 int64_t nblocks, const float* bias, float* y, int64_t ldy) {
  if constexpr (R > 0) {
    if (rows == R)
      tile<NV, R>(x, ldx, blocks_t, cols, nblocks, bias, y, ldy);
    else
      tail<NV, R - 1>(rows, x, ldx, blocks_t, cols, nblocks, bias, y, ldy);
  }
}

template <int NV>
void run(int64_t m, int64_t block_rows, const float* x, int64_t ldx, const float* blocks_t,
         const int64_t* row_offsets, const int64_t* col_indices, const float* bias, float* y, int64_t ldy,
         int threads) {
  constexpr int BS = 16 * NV;
  constexpr int MR = 24 / NV;  // 24 accumulators: 24, 12 or 6 rows for bs = 16, 32, 64
  // Chunks of 8 tiles: enough tasks to balance the threads at M = 128, few enough that a task
  // amortises its block-row's index loads.
  constexpr int64_t CHUNK = 8 * MR;
  const int64_t chunks = (m + CHUNK - 1) / CHUNK;
  const int64_t tasks = block_rows * chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r = task / chunks;
    const int64_t first = (task % chunks) * CHUNK;
    const int64_t end = first + CHUNK < m ? first + CHUNK : m;
    const int64_t start = row_offsets[r];
    const int64_t nblocks = row_offsets[r + 1] - start;
    const float* row_blocks = blocks_t + start * BS * BS;
    const int64_t* row_cols = col_indices + start;
    const float* row_bias = bias ? bias + r * BS : nullptr;
    int64_t i = first;
    for (; i + MR <= end; i += MR)
      tile<NV, MR>(x + i * ldx, ldx, row_blocks, row_cols, nblocks, row_bias, y + i * ldy + r * BS, ldy);
    if (i < end)
      tail<NV, MR - 1>(static_cast<int>(end - i), x + i * ldx, ldx, row_blocks, row_cols, nblocks, row_bias,
                       y + i * ldy + r * BS, ldy);
  }
}

// bf16 (AVX512_BF16): vdpbf16ps multiplies pairs of bf16 and adds both products to an fp32 lane,
// twice the fp32 FMA's work per instruction.  x is read as (x[i, k], x[i, k+1]) pairs, one 32-bit
// broadcast each; blocks are stored as `blocks_p[b][k/2][n][2] = W[r*bs + n, c*bs + k + {0, 1}]`, so
// one vector holds 16 output features of one k pair.  Accumulates in fp32 and rounds y to bf16 once
// (round to nearest even), as oneDNN's bf16 GEMM does.
template <int NV, int MR>
__attribute__((target("avx512f,avx512bf16"))) inline void tile_bf16(
    const uint16_t* x, int64_t ldx, const uint16_t* blocks_p, const int64_t* cols, int64_t nblocks,
    const float* bias, uint16_t* y, int64_t ldy) {
  constexpr int BS = 16 * NV;
  __m512 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 init = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) acc[i][v] = init;
  }
  for (int64_t p = 0; p < nblocks; ++p) {
    const uint16_t* xp = x + cols[p] * BS;
    const uint16_t* bp = blocks_p + p * BS * BS;
    for (int kp = 0; kp < BS / 2; ++kp) {
      __m512bh w[NV];
      for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(bp + (kp * BS + 16 * v) * 2);
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        __builtin_memcpy(&pair, xp + i * ldx + 2 * kp, sizeof(pair));
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, w[v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i * ldy + 16 * v), (__m256i)_mm512_cvtneps_pbh(acc[i][v]));
}

template <int NV, int R>
__attribute__((target("avx512f,avx512bf16"))) inline void tail_bf16(
    int rows, const uint16_t* x, int64_t ldx, const uint16_t* blocks_p, const int64_t* cols, int64_t nblocks,
    const float* bias, uint16_t* y, int64_t ldy) {
  if constexpr (R > 0) {
    if (rows == R)
      tile_bf16<NV, R>(x, ldx, blocks_p, cols, nblocks, bias, y, ldy);
    else
      tail_bf16<NV, R - 1>(rows, x, ldx, blocks_p, cols, nblocks, bias, y, ldy);
  }
}

template <int NV>
__attribute__((target("avx512f,avx512bf16"))) void run_bf16(
    int64_t m, int64_t block_rows, const uint16_t* x, int64_t ldx, const uint16_t* blocks_p,
    const int64_t* row_offsets, const int64_t* col_indices, const float* bias, uint16_t* y, int64_t ldy,
    int threads) {
  constexpr int BS = 16 * NV;
  constexpr int MR = 24 / NV;
  constexpr int64_t CHUNK = 8 * MR;
  const int64_t chunks = (m + CHUNK - 1) / CHUNK;
  const int64_t tasks = block_rows * chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r = task / chunks;
    const int64_t first = (task % chunks) * CHUNK;
    const int64_t end = first + CHUNK < m ? first + CHUNK : m;
    const int64_t start = row_offsets[r];
    const int64_t nblocks = row_offsets[r + 1] - start;
    const uint16_t* row_blocks = blocks_p + start * BS * BS;
    const int64_t* row_cols = col_indices + start;
    const float* row_bias = bias ? bias + r * BS : nullptr;
    int64_t i = first;
    for (; i + MR <= end; i += MR)
      tile_bf16<NV, MR>(x + i * ldx, ldx, row_blocks, row_cols, nblocks, row_bias, y + i * ldy + r * BS, ldy);
    if (i < end)
      tail_bf16<NV, MR - 1>(static_cast<int>(end - i), x + i * ldx, ldx, row_blocks, row_cols, nblocks, row_bias,
                            y + i * ldy + r * BS, ldy);
  }
}

}  // namespace

// Returns 0 on success, 1 for an unsupported block size.  Indices are trusted (the launcher's
// caller validated them when it built the layout).
extern "C" int nnbs_block_sparse_linear_f32(int64_t block_size, int64_t m, int64_t block_rows, const float* x,
                                            int64_t ldx, const float* blocks_t, const int64_t* row_offsets,
                                            const int64_t* col_indices, const float* bias, float* y, int64_t ldy,
                                            int64_t threads) {
  const int t = threads > 0 ? static_cast<int>(threads) : 1;
  switch (block_size) {
    case 16: run<1>(m, block_rows, x, ldx, blocks_t, row_offsets, col_indices, bias, y, ldy, t); return 0;
    case 32: run<2>(m, block_rows, x, ldx, blocks_t, row_offsets, col_indices, bias, y, ldy, t); return 0;
    case 64: run<4>(m, block_rows, x, ldx, blocks_t, row_offsets, col_indices, bias, y, ldy, t); return 0;
    default: return 1;
  }
}

// bf16 x and blocks (as uint16 bit patterns), fp32 bias, bf16 y.  Call only on CPUs with AVX512_BF16.
extern "C" int nnbs_block_sparse_linear_bf16(int64_t block_size, int64_t m, int64_t block_rows, const uint16_t* x,
                                             int64_t ldx, const uint16_t* blocks_p, const int64_t* row_offsets,
                                             const int64_t* col_indices, const float* bias, uint16_t* y,
                                             int64_t ldy, int64_t threads) {
  const int t = threads > 0 ? static_cast<int>(threads) : 1;
  switch (block_size) {
    case 16: run_bf16<1>(m, block_rows, x, ldx, blocks_p, row_offsets, col_indices, bias, y, ldy, t); return 0;
    case 32: run_bf16<2>(m, block_rows, x, ldx, blocks_p, row_offsets, col_indices, bias, y, ldy, t); return 0;
    case 64: run_bf16<4>(m, block_rows, x, ldx, blocks_p, row_offsets, col_indices, bias, y, ldy, t); return 0;
    default: return 1;
  }
}

// Lets the launcher check that it loaded the library it compiled.
extern "C" int nnbs_abi_version(void) { return 1; }
