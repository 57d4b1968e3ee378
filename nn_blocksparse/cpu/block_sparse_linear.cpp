// Native CPU kernel for `y = act(x @ W^T + b)` with W block-sparse, read in its stored BSR format.
//
// ONE source for every instruction set: `build.py` compiles it once per ISA with that ISA's -m
// flags (AVX-512, AVX-512 + BF16, AVX2 + FMA, NEON, NEON + BF16), so the code a test runs on an
// AVX2 machine is the code an AVX-512 machine runs at another vector width. Only two primitives
// differ per ISA (the fused multiply-add and the bf16 pair dot product); the rest is
// GCC/Clang vector extensions, templated on the lane count L.
//
// Format (exactly as `BlockSparseMatrix` stores it, no second copy): `values [nnz, bs, bs]`
// row-major (the block (r, c) holds W[r*bs + n, c*bs + k] at [n][k]), int32 `row_offsets [N/bs + 1]`
// and `col_indices [nnz]`. Indices are trusted: the caller validated them against K = x's width.
//
// Micro-kernels. fp32 is an outer product: per step of k, a few vectors of one row of a transposed
// block (W[n.., k], unit stride in n) times broadcast x[i, k] into an MR x NV tile of y's own
// outputs, the tile's whole block-row walked in registers. A task transposes its block-row's blocks
// into per-thread scratch first, so W is read as it is stored and nothing is kept between calls;
// a caller that keeps each block transposed itself (`values_layout` 1, fp32 only) saves that shuffle
// pass over every stored block on every call, and lets the rows of x be split into chunks that stay
// in cache across block-rows, since no chunk then transposes anything.
// bf16 keeps vectors along k, the reduction axis, so that both operands are read where they lie:
// (k, k+1) pairs as one 32-bit lane, the layout AVX512_BF16's vdpbf16ps and ARM's BFDOT multiply
// (without them the pair is split into two fp32 values). An MR x 4 tile (MR rows of x, 4 output
// features) keeps MR*4 vector accumulators, reduced across lanes once at the end; the epilogue
// (bias, GELU, rounding) runs on the 4 outputs.
//
// Work split: (block-row, chunk of rows of x) tasks dealt dynamically to OpenMP threads. Each output
// is summed by one thread in a fixed order, so results are bit-identical for any thread count. The
// library links libgomp.so.1, which resolves to the one torch already loaded: these are torch's
// own OpenMP threads, not a second team competing for the cores.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cstddef>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define NNBS_VECTOR_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NNBS_VECTOR_LANES 8
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define NNBS_VECTOR_LANES 4
#else
#error "block_sparse_linear.cpp needs AVX-512, AVX2 + FMA or aarch64 NEON (see build.py's flags)"
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define NNBS_AMX 1  // bf16 on tile registers (the amx_bf16 build)
#include <sys/syscall.h>
#include <unistd.h>
#else
#define NNBS_AMX 0
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define NNBS_BF16_DOT 1  // vdpbf16ps
#elif defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define NNBS_BF16_DOT 1  // bfdot
#else
#define NNBS_BF16_DOT 0
#endif

#ifndef NNBS_ISA
#define NNBS_ISA "unknown"
#endif
#ifndef NNBS_BUILD_KEY
#define NNBS_BUILD_KEY "unkeyed"
#endif
#define NNBS_ABI_VERSION 6
// Built with -fvisibility=hidden (build.py), so only the entry points below leave the library: a
// process loads one build per ISA (tests, benchmarks), and exported inline or template code, or a
// function-local thread_local (a process-wide unique symbol), would be shared between them.
#define NNBS_EXPORT __attribute__((visibility("default")))

namespace nnbs {

// ------------------------------------------------------------------------------ vector helpers
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef uint32_t u __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
};
template <int L>
using vf = typename Vec<L>::f;
template <int L>
using vu = typename Vec<L>::u;
template <int L>
using vi = typename Vec<L>::i;

template <int L>
inline vf<L> load_f(const float* p) {
  vf<L> v;
  memcpy(&v, p, sizeof v);
  return v;
}
template <int L>
inline vu<L> load_u(const void* p) {
  vu<L> v;
  memcpy(&v, p, sizeof v);
  return v;
}
// s in every lane, as one broadcast instruction (`vf<L>{} + s` costs an add before it, since
// -0.0 + 0.0 is +0.0; a vector built lane by lane is not always one instruction).
template <int L>
inline vf<L> splat(float s) {
#if defined(__aarch64__)
  static_assert(L == 4, "NEON vectors hold 4 floats");
  return (vf<L>)vdupq_n_f32(s);
#else
  if constexpr (L == 4) return (vf<L>)_mm_set1_ps(s);
  else if constexpr (L == 8) return (vf<L>)_mm256_set1_ps(s);
#if NNBS_VECTOR_LANES >= 16
  else return (vf<L>)_mm512_set1_ps(s);
#else
  else static_assert(L <= 8, "AVX2 vectors hold 8 floats");
#endif
#endif
}
template <int L>
inline vf<L> as_f(vu<L> v) {
  return (vf<L>)v;
}
template <int L>
inline vu<L> as_u(vf<L> v) {
  return (vu<L>)v;
}

// a * b + c, rounded once.
template <int L>
inline vf<L> fmadd(vf<L> a, vf<L> b, vf<L> c) {
#if defined(__aarch64__)
  static_assert(L == 4, "NEON vectors hold 4 floats");
  return (vf<L>)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
  if constexpr (L == 4) return _mm_fmadd_ps(a, b, c);
  else if constexpr (L == 8) return _mm256_fmadd_ps(a, b, c);
#if NNBS_VECTOR_LANES >= 16
  else return _mm512_fmadd_ps(a, b, c);
#else
  else static_assert(L <= 8, "AVX2 vectors hold 8 floats");
#endif
#endif
}

// The bf16 pair in each 32-bit lane as fp32: the low half is element k, the high half k + 1.
template <int L>
inline vf<L> even_bf16(vu<L> pairs) {
  return as_f<L>(pairs << 16);
}
template <int L>
inline vf<L> odd_bf16(vu<L> pairs) {
  return as_f<L>(pairs & 0xFFFF0000u);
}

// acc + a[2j] * b[2j] + a[2j+1] * b[2j+1] per 32-bit lane j (a, b: bf16 pairs).
template <int L>
inline vf<L> dot_bf16(vf<L> acc, vu<L> a, vu<L> b) {
#if NNBS_BF16_DOT && defined(__aarch64__)
  return (vf<L>)vbfdotq_f32((float32x4_t)acc, (bfloat16x8_t)a, (bfloat16x8_t)b);
#elif NNBS_BF16_DOT
  if constexpr (L == 8) return (vf<L>)_mm256_dpbf16_ps((__m256)acc, (__m256bh)a, (__m256bh)b);
  else return (vf<L>)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
  return fmadd<L>(odd_bf16<L>(a), odd_bf16<L>(b), fmadd<L>(even_bf16<L>(a), even_bf16<L>(b), acc));
#endif
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN. Bits in the low 16 of each lane.
template <int L>
inline vu<L> round_to_bf16(vf<L> v) {
  const vu<L> bits = as_u<L>(v);
  const vu<L> rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
  const vu<L> is_nan = (vu<L>)((bits & 0x7FFFFFFFu) > 0x7F800000u);
  return (is_nan & ((bits >> 16) | 0x40u)) | (~is_nan & rounded);
}

// round_to_bf16 in one conversion in the builds that have one (AVX512_BF16's vcvtneps2bf16: also to
// nearest even, NaN kept quiet, but a denormal input becomes a zero of its sign), for code that rounds
// more than it computes; in the other builds round_to_bf16 itself.
template <int L>
inline vu<L> round_to_bf16_fast(vf<L> v) {
#if NNBS_BF16_DOT && !defined(__aarch64__)
  if constexpr (L == 16) return (vu<L>)_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)v));
  else if constexpr (L == 8) return (vu<L>)_mm256_cvtepu16_epi32((__m128i)_mm256_cvtneps_pbh((__m256)v));
  else if constexpr (L == 4) return (vu<L>)_mm_cvtepu16_epi32((__m128i)_mm_cvtneps_pbh((__m128)v));
  else return round_to_bf16<L>(v);
#else
  return round_to_bf16<L>(v);
#endif
}

// ------------------------------------------------------------------------------ lane reductions
// Pairwise sums inside each 4-lane segment: segment s of the result is
// (a[4s] + a[4s+1], a[4s+2] + a[4s+3], b[4s] + b[4s+1], b[4s+2] + b[4s+3]).
template <int L, std::size_t... J>
inline vf<L> segment_pair_sums(vf<L> a, vf<L> b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, ((J % 4 < 2) ? (J / 4 * 4 + 2 * (J % 4)) : (L + J / 4 * 4 + 2 * (J % 4 - 2)))...) +
         __builtin_shufflevector(a, b, ((J % 4 < 2) ? (J / 4 * 4 + 2 * (J % 4) + 1) : (L + J / 4 * 4 + 2 * (J % 4 - 2) + 1))...);
}
template <int L, std::size_t... J>
inline vf<L / 2> low_half(vf<L> v, std::index_sequence<J...>) {
  return __builtin_shufflevector(v, v, J...);
}
template <int L, std::size_t... J>
inline vf<L / 2> high_half(vf<L> v, std::index_sequence<J...>) {
  return __builtin_shufflevector(v, v, (L / 2 + J)...);
}
template <int L>
inline vf<4> fold_to_4(vf<L> v) {
  if constexpr (L == 4) {
    return v;
  } else {
    constexpr auto half = std::make_index_sequence<L / 2>();
    return fold_to_4<L / 2>(low_half<L>(v, half) + high_half<L>(v, half));
  }
}
// (sum of a, sum of b, sum of c, sum of d): always the same order of additions.
template <int L>
inline vf<4> sum4(vf<L> a, vf<L> b, vf<L> c, vf<L> d) {
  constexpr auto lanes = std::make_index_sequence<L>();
  const vf<L> ab = segment_pair_sums<L>(a, b, lanes);
  const vf<L> cd = segment_pair_sums<L>(c, d, lanes);
  return fold_to_4<L>(segment_pair_sums<L>(ab, cd, lanes));
}

// ------------------------------------------------------------------------------ polynomials
// c[0] + c[1] t + ... + c[N-1] t^(N-1) by Estrin's scheme: a dependency chain of about log2(N)
// fused multiply-adds instead of Horner's N, so that GELU is bound by throughput, not FMA latency.
constexpr int lower_power_of_two(int n) { return n <= 2 ? 1 : 2 * lower_power_of_two((n + 1) / 2); }
template <int L, int P>
inline vf<L> power(vf<L> t) {
  if constexpr (P == 1) {
    return t;
  } else {
    const vf<L> half = power<L, P / 2>(t);
    return half * half;
  }
}
template <int L, int N>
inline vf<L> polynomial(vf<L> t, const float* c) {
  if constexpr (N == 1) {
    return splat<L>(c[0]);
  } else {
    constexpr int H = lower_power_of_two(N);
    return fmadd<L>(polynomial<L, N - H>(t, c + H), power<L, H>(t), polynomial<L, H>(t, c));
  }
}

// ------------------------------------------------------------------------------ GELU
// gelu(v) = v/2 * (1 + erf(v/sqrt(2))), exact (erf) form, branch-free. erf(z) = z * P(z^2) for
// |z| <= 1; above, erfc(|z|) is a polynomial in |z| - 2.46 on [1, 3.92] (erf rounds to +-1 past
// 3.92). 1 + erf(z) for z < -1 is taken as erfc(|z|) directly, so large negative v keep their
// relative accuracy. Coefficients: tools/fit_cpu_gelu.py (absolute error of erf within ~1e-7, the
// rounding of z itself).
template <int L>
inline vf<L> gelu(vf<L> v) {
  static const float erf_small[6] = {1.1283791065216064f,   -0.37612324953079224f,  0.11280179023742676f,
                                     -0.02671128138899803f, 0.004917518701404333f, -0.0005631292006000876f};
  static const float erfc_large[13] = {
      0.0005033272318542004f,  -0.002656205091625452f, 0.0065357377752661705f, -0.009832863695919514f,
      0.009905017912387848f,   -0.006798057351261377f, 0.0029630237258970737f, -0.00046167458640411496f,
      -0.0003905983758158982f, 0.00030141667230054736f, -5.192761818761937e-05f, -2.5371689844178036e-05f,
      9.17150464374572e-06f};
  const vf<L> z = v * splat<L>(0.70710678118654752f);
  const vf<L> a = as_f<L>(as_u<L>(z) & 0x7FFFFFFFu);
  // |z| <= 1: 1 + erf(z) = 1 + z * P(z^2).
  const vf<L> one_plus_small = fmadd<L>(z, polynomial<L, 6>(z * z, erf_small), splat<L>(1.0f));
  // |z| > 1: erfc(|z|), taken as 0 past 3.92 (where 1 + erf rounds to 2, and gelu(v) < 1e-7 |v| for
  // v < 0); the polynomial's value out there, however large, is masked off.
  const vf<L> erfc = as_f<L>(as_u<L>(polynomial<L, 13>(a - splat<L>(2.46f), erfc_large)) & (vu<L>)(a < 3.92f));
  const vf<L> one_plus_large = z < 0.0f ? erfc : splat<L>(2.0f) - erfc;
  // NaN propagates through the product with v; gelu(inf) = inf, gelu(-inf) = NaN (inf * 0), as torch in float64.
  return splat<L>(0.5f) * v * (a <= 1.0f ? one_plus_small : one_plus_large);
}

// ------------------------------------------------------------------------------ epilogue
struct Epilogue {
  const void* bias;  // N values, or null
  bool bias_bf16;
  bool gelu;
  void* y;  // [M, ldy]
  int64_t ldy;
  bool y_bf16;
};

// p[j .. j + L) in fp32: fp32 values, or bf16 ones widened where `bf16`.
template <int L>
inline vf<L> load_widened(const void* p, int64_t j, bool bf16) {
  if (!bf16) return load_f<L>(static_cast<const float*>(p) + j);
  typedef uint16_t u16xL __attribute__((vector_size(2 * L)));
  u16xL raw;
  memcpy(&raw, static_cast<const uint16_t*>(p) + j, sizeof raw);
  return as_f<L>(__builtin_convertvector(raw, vu<L>) << 16);
}
// v into p[j .. j + L): as fp32, or rounded to bf16 where `bf16`.
template <int L>
inline void store_narrowed(void* p, int64_t j, vf<L> v, bool bf16) {
  if (!bf16) {
    memcpy(static_cast<float*>(p) + j, &v, sizeof v);
    return;
  }
  typedef uint16_t u16xL __attribute__((vector_size(2 * L)));
  const u16xL rounded = __builtin_convertvector(round_to_bf16<L>(v), u16xL);
  memcpy(static_cast<uint16_t*>(p) + j, &rounded, sizeof rounded);
}

// bias[n .. n + L) in fp32 (bf16 widened), zeros without a bias.
template <int L>
inline vf<L> load_bias(const Epilogue& e, int64_t n) {
  return e.bias ? load_widened<L>(e.bias, n, e.bias_bf16) : vf<L>{};
}

// Where a task's tiles put their outputs: y itself, or, with GELU, the task's fp32 buffer (GELU then
// runs over the whole buffer at once: one tile's few vectors would wait on its polynomials' latency).
struct Sink {
  void* origin;  // output (first row of the task, first feature of its block-row)
  int64_t ld;
  bool bf16;
};

// y[row + i, n .. n + 3] = sums[i] + bias[n .. n + 3] for an MR x 4 tile (rows relative to the sink's).
template <int MR>
inline void finish_tile(const Epilogue& e, const Sink& sink, const vf<4>* sums, int64_t row, int64_t n_in_sink,
                        int64_t n) {
  const vf<4> bias = load_bias<4>(e, n);
  for (int i = 0; i < MR; ++i)
    store_narrowed<4>(sink.origin, (row + i) * sink.ld + n_in_sink, sums[i] + bias, sink.bf16);
}

// GELU over `count` (a multiple of 4) contiguous values, two vectors at a time.
inline void gelu_span(float* v, int64_t count) {
  constexpr int L = NNBS_VECTOR_LANES;
  int64_t j = 0;
  for (; j + 2 * L <= count; j += 2 * L) {
    const vf<L> a = gelu<L>(load_f<L>(v + j)), b = gelu<L>(load_f<L>(v + j + L));
    memcpy(v + j, &a, sizeof a);
    memcpy(v + j + L, &b, sizeof b);
  }
  for (; j < count; j += 4) {
    const vf<4> a = gelu<4>(load_f<4>(v + j));
    memcpy(v + j, &a, sizeof a);
  }
}

// The task's buffered outputs (rows x BS, GELU applied) into y.
template <int BS>
inline void store_buffer(const Epilogue& e, const float* buffer, int64_t rows, int64_t first_row, int64_t first_n) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = buffer + i * BS;
    const int64_t at = (first_row + i) * e.ldy + first_n;
    if (e.y_bf16) {
      for (int j = 0; j < BS; j += 4) store_narrowed<4>(e.y, at + j, load_f<4>(src + j), true);
    } else {
      memcpy(static_cast<float*>(e.y) + at, src, BS * sizeof(float));
    }
  }
}

// ------------------------------------------------------------------------------ bf16 micro-kernel
// Where a tile's walk starts and ends: a segment of its block-row's stored blocks, resumed from and
// parked in `partial` (the MR x 4 accumulators, unreduced) between segments.
struct Segment {
  int64_t first_block, blocks;
  void* partial;
  bool resume, finish;
};

// An MR x 4 tile: rows row.. of x (relative to the sink's first) against 4 output features of one
// block-row, walking the segment's stored blocks, reading 32-bit lanes of (k, k+1) pairs.
template <int BS, int L, int MR>
inline void tile_kernel(const uint16_t* x, int64_t ldx, const uint16_t* w, const int32_t* cols,
                        const Segment& segment, const Epilogue& e, const Sink& sink, int64_t row, int64_t n_in_sink,
                        int64_t n) {
  vf<L> acc[MR][4];
  vf<L>* partial = static_cast<vf<L>*>(segment.partial);
  // The accumulators must stay in registers: every loop over them is unrolled (GCC for aarch64
  // otherwise keeps the array in memory and stores it on every step). The k loop is not: interleaving
  // its steps is what spills.
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = segment.resume ? partial[4 * i + j] : vf<L>{};
  const int64_t blocks = segment.blocks;
  cols += segment.first_block;
  w += segment.first_block * BS * BS;
  for (int64_t p = 0; p < blocks; ++p) {
    const uint16_t* xp = x + static_cast<int64_t>(cols[p]) * BS;
    const uint16_t* wp = w + p * BS * BS;
#pragma GCC unroll 1
    for (int k = 0; k < BS; k += 2 * L) {
      if constexpr (NNBS_BF16_DOT) {
        vu<L> xv[MR];
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) xv[i] = load_u<L>(xp + i * ldx + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const vu<L> wv = load_u<L>(wp + j * BS + k);
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i) acc[i][j] = dot_bf16<L>(acc[i][j], xv[i], wv);
        }
      } else {
        // Split x's pairs once per step, not once per output feature.
        vf<L> x_even[MR], x_odd[MR];
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const vu<L> pairs = load_u<L>(xp + i * ldx + k);
          x_even[i] = even_bf16<L>(pairs);
          x_odd[i] = odd_bf16<L>(pairs);
        }
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const vu<L> wv = load_u<L>(wp + j * BS + k);
          const vf<L> w_even = even_bf16<L>(wv), w_odd = odd_bf16<L>(wv);
#pragma GCC unroll 16
          for (int i = 0; i < MR; ++i) acc[i][j] = fmadd<L>(x_odd[i], w_odd, fmadd<L>(x_even[i], w_even, acc[i][j]));
        }
      }
    }
  }
  if (!segment.finish) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) partial[4 * i + j] = acc[i][j];
    return;
  }
  vf<4> sums[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) sums[i] = sum4<L>(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  finish_tile<MR>(e, sink, sums, row, n_in_sink, n);
}

template <typename T>
struct Problem {
  int64_t m, block_rows;
  const T* x;
  int64_t ldx;
  const T* values;
  const int32_t* row_offsets;
  const int32_t* col_indices;
  Epilogue e;
};

// Rows row.. of x against features n0..n0+3 of block-row r (n0 counted within the block-row); the
// outputs go to the sink at (row - sink_row, n0).
template <int BS, int L, int MR>
inline void tile(const Problem<uint16_t>& p, const Sink& sink, const Segment& segment, int64_t row,
                 int64_t sink_row, int64_t r, int64_t n0) {
  const int64_t start = p.row_offsets[r];
  tile_kernel<BS, L, MR>(p.x + row * p.ldx, p.ldx, p.values + start * BS * BS + n0 * BS, p.col_indices + start,
                         segment, p.e, sink, row - sink_row, n0, r * BS + n0);
}

// The last rows % MR rows of a chunk, with a tile of exactly that height.
template <int BS, int L, int R>
inline void tail(const Problem<uint16_t>& p, const Sink& sink, const Segment& segment, int rows, int64_t row,
                 int64_t sink_row, int64_t r, int64_t n0) {
  if constexpr (R > 0) {
    if (rows == R)
      tile<BS, L, R>(p, sink, segment, row, sink_row, r, n0);
    else
      tail<BS, L, R - 1>(p, sink, segment, rows, row, sink_row, r, n0);
  }
}

// Rows of x per tile: as many accumulators as the registers hold beside the MR + 1 operand vectors
// (16 registers on AVX2, 32 on AVX-512 and NEON) without spilling in the inner loop (checked in the
// compiler's output); without a bf16 dot product each x vector is split into two registers.
constexpr int rows_per_tile() {
#if NNBS_VECTOR_LANES == 8
  return NNBS_BF16_DOT ? 3 : 2;
#elif NNBS_VECTOR_LANES == 16
  return NNBS_BF16_DOT ? 6 : 4;
#else
  return NNBS_BF16_DOT ? 5 : 4;
#endif
}

template <int BS>
void run(const Problem<uint16_t>& p) {
  // One vector step covers L pairs of k, at most one block row.
  constexpr int L = BS / 2 < NNBS_VECTOR_LANES ? BS / 2 : NNBS_VECTOR_LANES;
  constexpr int MR = rows_per_tile();
  // Tasks of 3 tiles of rows: enough to balance the threads at M = 128, few enough that a task
  // amortises its block-row's index loads.
  constexpr int64_t CHUNK = 3 * MR;
  // A tile's x rows are read once per group of 4 output features (BS / 4 times): a long block-row
  // is walked in segments whose x rows (about 12 KiB) stay in L1 meanwhile, the tile's accumulators
  // parked between segments. Parked vectors come back unchanged, so the sums are the same as in one
  // walk, bit for bit.
  constexpr int64_t SEGMENT_FIT = (12288 / (MR * static_cast<int>(sizeof(uint16_t)))) / BS;
  constexpr int64_t SEGMENT = SEGMENT_FIT > 0 ? SEGMENT_FIT : 1;
  const int64_t chunks = (p.m + CHUNK - 1) / CHUNK;
  const int64_t tasks = p.block_rows * chunks;
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r = task / chunks;
    const int64_t first = (task % chunks) * CHUNK;
    const int64_t end = first + CHUNK < p.m ? first + CHUNK : p.m;
    const int64_t blocks = p.row_offsets[r + 1] - p.row_offsets[r];
    alignas(64) float buffer[CHUNK * BS];  // used with GELU only
    alignas(64) vf<L> partial[CHUNK / MR][BS / 4][MR * 4];  // used by segmented walks only
    const int64_t y_element = first * p.e.ldy + r * BS;
    const Sink sink = p.e.gelu ? Sink{buffer, BS, false}
                               : Sink{p.e.y_bf16 ? static_cast<void*>(static_cast<uint16_t*>(p.e.y) + y_element)
                                                 : static_cast<void*>(static_cast<float*>(p.e.y) + y_element),
                                      p.e.ldy, p.e.y_bf16};
    // Segments outermost: a segment of the block-row's weights serves every tile of the task
    // before the next one is read.
    for (int64_t s = 0; s == 0 || s < blocks; s += SEGMENT) {  // once for an empty block-row
      for (int64_t i = first; i < end; i += MR) {
        const int rows = end - i < MR ? static_cast<int>(end - i) : MR;
        for (int64_t n0 = 0; n0 < BS; n0 += 4) {
          const Segment segment{s, blocks - s < SEGMENT ? blocks - s : SEGMENT, partial[(i - first) / MR][n0 / 4],
                                s > 0, s + SEGMENT >= blocks};
          if (rows == MR)
            tile<BS, L, MR>(p, sink, segment, i, first, r, n0);
          else
            tail<BS, L, MR - 1>(p, sink, segment, rows, i, first, r, n0);
        }
      }
    }
    if (p.e.gelu) {
      gelu_span(buffer, (end - first) * BS);
      store_buffer<BS>(p.e, buffer, end - first, first, r * BS);
    }
  }
}

// Called by every thread of a parallel region: the tasks are shared out inside.
void run_block_size(int64_t block_size, const Problem<uint16_t>& p) {
  if (block_size == 16) run<16>(p);
  else if (block_size == 32) run<32>(p);
  else run<64>(p);
}

// This thread's scratch memory of at least `bytes`, or null if it cannot be had: kept between calls
// and grown as needed (freed at the thread's exit), since memory fresh from malloc on every call is,
// at these sizes, memory the system maps and zeroes page by page on every call.
inline void* scratch(size_t bytes) {
  static thread_local struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { free(data); }
  } buffer;
  if (buffer.size < bytes) {
    free(buffer.data);
    buffer.data = malloc(bytes);
    buffer.size = buffer.data ? bytes : 0;
  }
  return buffer.data;
}

// scratch(bytes) for a thread of a parallel region, setting the team's `failed` where it cannot be
// had (the thread then skips its tasks; the call reports out of memory).
inline void* team_scratch(size_t bytes, bool* failed) {
  void* memory = scratch(bytes);
  if (!memory) {
#pragma omp atomic write
    *failed = true;
  }
  return memory;
}

// ------------------------------------------------------------------------------ fp32 micro-kernel
// The outer product (see the top of the file) needs no lane reductions and no 4-feature groups
// re-reading x: a block-row's weights are read once per MR rows of x, and the transposed copy costs
// a few vector shuffles per element, spread over all the task's rows. Each output is one chain of
// FMAs in the order of the stored blocks and of k: bit-identical for any thread count.

// Stage B of an in-register T x T transpose: swaps bit B of the row index with bit B of the lane
// index. After stages 0 .. log2(T) - 1 row j holds what column j held. Row i (bit B clear) takes
// lane j from row i where bit B of j is clear, else lane j ^ 2^B of row i | 2^B; row i | 2^B the
// mirror image.
constexpr int transpose_source(int lane, int bit, int lanes, bool upper) {
  const bool set = (lane >> bit) & 1;
  const int across = lane ^ (1 << bit);
  return upper ? (set ? lanes + lane : across) : (set ? lanes + across : lane);
}
template <int T, int B, bool UPPER, std::size_t... J>
inline vf<T> transpose_shuffle(vf<T> low, vf<T> high, std::index_sequence<J...>) {
  return __builtin_shufflevector(low, high, transpose_source(J, B, T, UPPER)...);
}
template <int T, int B = 0>
inline void transpose_rows(vf<T>* rows) {
  if constexpr ((1 << B) < T) {
    constexpr auto lanes = std::make_index_sequence<T>();
#pragma GCC unroll 16
    for (int i = 0; i < T; ++i) {
      if (i & (1 << B)) continue;
      const vf<T> low = rows[i], high = rows[i | (1 << B)];
      rows[i] = transpose_shuffle<T, B, false>(low, high, lanes);
      rows[i | (1 << B)] = transpose_shuffle<T, B, true>(low, high, lanes);
    }
    transpose_rows<T, B + 1>(rows);
  }
}
// out[k][n] = block[n][k] for one BS x BS block, in tiles of T x T.
template <int BS>
inline void transpose_block(const float* block, float* out) {
  constexpr int T = NNBS_VECTOR_LANES < BS ? NNBS_VECTOR_LANES : BS;
  for (int n0 = 0; n0 < BS; n0 += T)
    for (int k0 = 0; k0 < BS; k0 += T) {
      vf<T> rows[T];
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) rows[i] = load_f<T>(block + (n0 + i) * BS + k0);
      transpose_rows<T>(rows);
#pragma GCC unroll 16
      for (int i = 0; i < T; ++i) memcpy(out + (k0 + i) * BS + n0, &rows[i], sizeof rows[i]);
    }
}

// Vectors of features per tile row (NV) and rows of x per tile (MR): MR x NV accumulators beside NV
// weight vectors and the x values, in 16 registers on AVX2 (6 x 2) and 32 on AVX-512 (12 x 2) and
// NEON (5 x 4: NEON multiplies by a lane of x, so each of the MR x values holds a register), without
// spilling in the inner loop (checked in the compiler's output).
template <int BS>
constexpr int outer_vectors() {
  constexpr int want = NNBS_VECTOR_LANES == 4 ? 4 : 2;
  return BS / NNBS_VECTOR_LANES < want ? BS / NNBS_VECTOR_LANES : want;
}
constexpr int OUTER_ROWS = NNBS_VECTOR_LANES == 16 ? 12 : NNBS_VECTOR_LANES == 8 ? 6 : 5;

// y[row .. row + MR, n .. n + NV * L) = act(x rows @ W^T + bias) over a block-row's `blocks`
// transposed blocks `wt` (each [k][n], this tile's features at offset 0 of each row).
template <int BS, int L, int NV, int MR>
inline void outer_tile(const float* x, int64_t ldx, const float* wt, const int32_t* cols, int64_t blocks,
                       const Epilogue& e, int64_t row, int64_t n) {
  vf<L> acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vf<L>{};
  for (int64_t p = 0; p < blocks; ++p) {
    const float* xp = x + static_cast<int64_t>(cols[p]) * BS;
    const float* wp = wt + p * BS * BS;
#pragma GCC unroll 1
    for (int k = 0; k < BS; ++k) {
      vf<L> wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = load_f<L>(wp + k * BS + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const vf<L> xb = splat<L>(xp[i * ldx + k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = fmadd<L>(xb, wv[v], acc[i][v]);
      }
    }
  }
  vf<L> bias[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bias[v] = load_bias<L>(e, n + v * L);
  float* y = static_cast<float*>(e.y) + row * e.ldy + n;
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      vf<L> out = acc[i][v] + bias[v];
      if (e.gelu) out = gelu<L>(out);
      memcpy(y + i * e.ldy + v * L, &out, sizeof out);
    }
}

// The last rows % MR rows of a task, with a tile of exactly that height.
template <int BS, int L, int NV, int R>
inline void outer_tail(int rows, const float* x, int64_t ldx, const float* wt, const int32_t* cols, int64_t blocks,
                       const Epilogue& e, int64_t row, int64_t n) {
  if constexpr (R > 0) {
    if (rows == R)
      outer_tile<BS, L, NV, R>(x, ldx, wt, cols, blocks, e, row, n);
    else
      outer_tail<BS, L, NV, R - 1>(rows, x, ldx, wt, cols, blocks, e, row, n);
  }
}

// Rows of x per chunk when the blocks come transposed: their K-wide rows stay in L2 while the
// chunk's tasks walk the block-rows (tasks are dealt chunk by chunk).
constexpr int64_t TRANSPOSED_CHUNK_ROWS = 8 * OUTER_ROWS;

// Called by every thread of a parallel region. `max_blocks`: the most stored blocks of any
// block-row (the size of a task's transposed copy); `pretransposed`: `p.values` holds each block
// transposed ([k][n], `values_layout` 1), read in place; `failed` is set if scratch memory ran out.
template <int BS>
void run_fp32(const Problem<float>& p, int64_t max_blocks, bool pretransposed, int threads, bool* failed) {
  constexpr int L = NNBS_VECTOR_LANES < BS ? NNBS_VECTOR_LANES : BS;
  constexpr int NV = outer_vectors<BS>();
  constexpr int MR = OUTER_ROWS;
  // Row chunks where the block-rows alone are too few to share out (4 tasks per thread), where each
  // chunk of a block-row transposes its blocks again; with the blocks given transposed, also to keep x
  // in cache.
  const int64_t wanted_chunks = (4 * static_cast<int64_t>(threads) + p.block_rows - 1) / p.block_rows;
  const int64_t cached_chunks = pretransposed ? (p.m + TRANSPOSED_CHUNK_ROWS - 1) / TRANSPOSED_CHUNK_ROWS : 1;
  const int64_t max_chunks = (p.m + MR - 1) / MR;
  const int64_t wanted = wanted_chunks > cached_chunks ? wanted_chunks : cached_chunks;
  const int64_t chunks = wanted < max_chunks ? wanted : max_chunks;
  const int64_t chunk_rows = ((p.m + chunks - 1) / chunks + MR - 1) / MR * MR;
  const int64_t tasks = p.block_rows * ((p.m + chunk_rows - 1) / chunk_rows);
  const size_t scratch_bytes = static_cast<size_t>(max_blocks > 0 ? max_blocks : 1) * BS * BS * sizeof(float);
  float* scratch_copy = pretransposed ? nullptr : static_cast<float*>(team_scratch(scratch_bytes, failed));
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    if (!pretransposed && !scratch_copy) continue;
    const int64_t r = task % p.block_rows;
    const int64_t first = task / p.block_rows * chunk_rows;
    const int64_t end = first + chunk_rows < p.m ? first + chunk_rows : p.m;
    const int64_t start = p.row_offsets[r];
    const int64_t blocks = p.row_offsets[r + 1] - start;
    const float* transposed = pretransposed ? p.values + start * BS * BS : scratch_copy;
    if (!pretransposed)
      for (int64_t b = 0; b < blocks; ++b)
        transpose_block<BS>(p.values + (start + b) * BS * BS, scratch_copy + b * BS * BS);
    for (int64_t n0 = 0; n0 < BS; n0 += NV * L) {
      for (int64_t i = first; i < end; i += MR) {
        const int rows = end - i < MR ? static_cast<int>(end - i) : MR;
        if (rows == MR)
          outer_tile<BS, L, NV, MR>(p.x + i * p.ldx, p.ldx, transposed + n0, p.col_indices + start, blocks, p.e, i,
                                    r * BS + n0);
        else
          outer_tail<BS, L, NV, MR - 1>(rows, p.x + i * p.ldx, p.ldx, transposed + n0, p.col_indices + start, blocks,
                                        p.e, i, r * BS + n0);
      }
    }
  }
}

// fp32 rows of x to bf16 (round to nearest even), for bf16 weights with fp32 activations.
inline void rows_to_bf16(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out) {
  constexpr int L = NNBS_VECTOR_LANES;
  typedef uint16_t u16xL __attribute__((vector_size(2 * L)));
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; ++i) {
    const float* src = x + i * ldx;
    uint16_t* dst = out + i * k;
    int64_t j = 0;
    for (; j + L <= k; j += L) {
      const u16xL packed = __builtin_convertvector(round_to_bf16<L>(load_f<L>(src + j)), u16xL);
      memcpy(dst + j, &packed, sizeof packed);
    }
    for (; j < k; ++j) {
      vf<4> one = {src[j], 0.0f, 0.0f, 0.0f};
      dst[j] = static_cast<uint16_t>(round_to_bf16<4>(one)[0]);
    }
  }
}

// ------------------------------------------------------------------------------ bf16 on AMX tiles
// With AMX (the amx_bf16 build), bf16 runs on tile registers: TDPBF16PS multiplies a 16 x 32 bf16
// tile by a 32 x 16 one into a 16 x 16 fp32 tile. The stored blocks are the left operand exactly as
// they lie (16 rows of W, 32 k each, stride bs): the right operand must be (k, k+1) pairs down its
// rows, which x^T is, so x -- shared by every block-row -- is repacked once per call instead of
// transposing every block in every task. Per step, 2 tiles of W (32 features) and 2 of x^T (32 rows
// of x) feed 4 accumulator tiles, the most that 8 tile registers hold. The accumulators hold
// y^T: each is transposed once, in vector registers, in the epilogue. Each output is one thread's sum
// over the block-row in a fixed order (the hardware's within a tile step): bit-identical for any
// thread count. fp32 x (bf16 weights) is rounded to bf16 while it is repacked.
#if NNBS_AMX
namespace amx {

constexpr int TILE_ROWS = 16;     // rows of every tile (and m or n per accumulator)
constexpr int PACK_ROWS = 32;     // rows of x per task: 2 tiles of x^T
constexpr int PAIR_GROUP = 16;    // k pairs per repacked 16 x 16 group (one tile row of 64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Linux grants a process AMX's tile state only on request (arch_prctl), once per process.
inline bool os_grants_tiles() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

// Tiles 0-3: accumulators (16 x 16 fp32); 4, 5: W (16 rows of kw bf16); 6, 7: x^T (kw / 2 rows of
// 16 (k, k+1) pairs).
inline TileConfig tile_config(int kw) {
  TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 4; ++t) c.rows[t] = TILE_ROWS, c.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) c.rows[t] = TILE_ROWS, c.colsb[t] = static_cast<uint16_t>(2 * kw);
  for (int t = 6; t < 8; ++t) c.rows[t] = static_cast<uint8_t>(kw / 2), c.colsb[t] = 64;
  return c;
}

// The 16 (k, k+1) pairs of one row of x at pair p0, as 32-bit lanes (bf16 x read as is, fp32 x
// rounded); `pairs` < 16 zero-fills the rest.
template <bool FP32>
inline vf<16> row_pairs(const void* x, int64_t ldx, int64_t row, int64_t p0, int pairs) {
  if constexpr (FP32) {
    const float* source = static_cast<const float*>(x) + row * ldx + 2 * p0;
    vf<16> low, high;
    if (pairs == PAIR_GROUP) {  // the common case as two plain loads, not a call to memcpy
      low = load_f<16>(source), high = load_f<16>(source + 16);
    } else {
      alignas(64) float values[2 * PAIR_GROUP] = {};
      memcpy(values, source, 2 * pairs * sizeof(float));
      low = load_f<16>(values), high = load_f<16>(values + 16);
    }
    // vcvtne2ps2bf16: 32 values rounded to nearest even, in order, so each 32-bit lane is a (k, k+1) pair.
    return (vf<16>)_mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
  } else {
    const uint16_t* source = static_cast<const uint16_t*>(x) + row * ldx + 2 * p0;
    if (pairs == PAIR_GROUP) return as_f<16>(load_u<16>(source));
    vu<16> out = {};
    memcpy(&out, source, 2 * pairs * sizeof(uint16_t));
    return as_f<16>(out);
  }
}

// xt[(chunk * k_pairs + p) * 16 + i] = the pair p of row 16 chunk + i of x (zeros past m), for
// every row chunk padded to PACK_ROWS: the right operand of the tile products. Shared by the team.
template <bool FP32>
inline void pack_group(const void* x, int64_t ldx, int64_t m, int64_t k_pairs, uint32_t* xt, int64_t chunk,
                       int64_t p0) {
  const int pairs = k_pairs - p0 < PAIR_GROUP ? static_cast<int>(k_pairs - p0) : PAIR_GROUP;
  vf<16> rows[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    const int64_t row = chunk * TILE_ROWS + i;
    rows[i] = row < m ? row_pairs<FP32>(x, ldx, row, p0, pairs) : vf<16>{};
  }
  transpose_rows<16>(rows);
  for (int p = 0; p < pairs; ++p) memcpy(xt + (chunk * k_pairs + p0 + p) * 16, &rows[p], sizeof rows[p]);
}
template <bool FP32>
void pack_x(const void* x, int64_t ldx, int64_t m, int64_t k, uint32_t* xt) {
  const int64_t k_pairs = k / 2, groups = (k_pairs + PAIR_GROUP - 1) / PAIR_GROUP;
  const int64_t chunks = (m + PACK_ROWS - 1) / PACK_ROWS * (PACK_ROWS / TILE_ROWS);
#pragma omp for schedule(static)
  for (int64_t task = 0; task < chunks * groups; ++task)
    pack_group<FP32>(x, ldx, m, k_pairs, xt, task / groups, task % groups * PAIR_GROUP);
}

// NT accumulators side by side (features n .. n + 16 NT, rows row .. row + rows) into y: each
// transposed to rows of y in registers, bias, GELU, rounding (vcvtne2ps2bf16), a row's 16 NT outputs
// written together (a whole cache line where NT is 2 and y is bf16).
template <int NT>
inline void store_accumulators(const float (*tiles)[TILE_ROWS * 16], const Epilogue& e, int64_t row, int64_t rows,
                               int64_t n) {
  vf<16> lines[NT][16], bias[NT];
  for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) lines[t][i] = load_f<16>(tiles[t] + 16 * i);
    transpose_rows<16>(lines[t]);
    bias[t] = load_bias<16>(e, n + 16 * t);
  }
  for (int64_t i = 0; i < rows; ++i) {
    vf<16> v[NT];
    for (int t = 0; t < NT; ++t) v[t] = e.gelu ? gelu<16>(lines[t][i] + bias[t]) : lines[t][i] + bias[t];
    if (e.y_bf16) {
      uint16_t* out = static_cast<uint16_t*>(e.y) + (row + i) * e.ldy + n;
      if constexpr (NT == 2) {
        const __m512bh both = _mm512_cvtne2ps_pbh((__m512)v[1], (__m512)v[0]);
        memcpy(out, &both, sizeof both);
      } else {
        const __m256bh one = _mm512_cvtneps_pbh((__m512)v[0]);
        memcpy(out, &one, sizeof one);
      }
    } else {
      memcpy(static_cast<float*>(e.y) + (row + i) * e.ldy + n, v, sizeof v);
    }
  }
}

// Called by every thread of a parallel region, after pack_x: tasks of (block-row, 32 rows of x),
// each pass over the block-row covering 32 of its features (16 where bs is 16).
template <int BS>
void run(const Problem<uint16_t>& p, const uint32_t* xt, int64_t k) {
  constexpr int KW = BS < 32 ? BS : 32;               // k per tile step
  constexpr int NT = BS / TILE_ROWS < 2 ? BS / TILE_ROWS : 2;  // W tiles per step
  constexpr int PASSES = BS / (NT * TILE_ROWS);
  const int64_t k_pairs = k / 2;
  const TileConfig config = tile_config(KW);
  _tile_loadconfig(&config);
  const int64_t row_tasks = (p.m + PACK_ROWS - 1) / PACK_ROWS;
  // Dealt round-robin, not dynamically: the same call gives each thread the same tasks every time,
  // so its part of y (and of a reused output buffer) stays in that core's cache instead of moving
  // between cores from call to call, the cost that dominated a dynamically scheduled epilogue.
#pragma omp for schedule(static, 1)
  for (int64_t task = 0; task < p.block_rows * row_tasks; ++task) {
    const int64_t r = task / row_tasks, first = task % row_tasks * PACK_ROWS;
    const int64_t start = p.row_offsets[r], blocks = p.row_offsets[r + 1] - start;
    const uint32_t* xt0 = xt + first / TILE_ROWS * k_pairs * 16;
    const uint32_t* xt1 = xt0 + k_pairs * 16;
    for (int pass = 0; pass < PASSES; ++pass) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t* w = p.values + (start + b) * BS * BS + pass * NT * TILE_ROWS * BS;
        const int64_t pair = static_cast<int64_t>(p.col_indices[start + b]) * (BS / 2);
        if (b + 1 < blocks) {
          // The next block's x^T rows sit at an offset no hardware prefetcher predicts.
          const int64_t next = static_cast<int64_t>(p.col_indices[start + b + 1]) * (BS / 2);
          for (int line = 0; line < BS / 2 * 64; line += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(xt0 + next * 16) + line, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(xt1 + next * 16) + line, _MM_HINT_T0);
          }
        }
        for (int s = 0; s < BS / KW; ++s) {
          _tile_loadd(4, w + s * KW, BS * sizeof(uint16_t));
          _tile_loadd(6, xt0 + (pair + s * KW / 2) * 16, 64);
          _tile_loadd(7, xt1 + (pair + s * KW / 2) * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if constexpr (NT == 2) {
            _tile_loadd(5, w + TILE_ROWS * BS + s * KW, BS * sizeof(uint16_t));
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      // tile[j][t]: rows first + 16 j.., features 16 t.. of the pass.
      alignas(64) float tile[2][NT][TILE_ROWS * 16];
      _tile_stored(0, tile[0][0], 64);
      _tile_stored(1, tile[1][0], 64);
      if constexpr (NT == 2) {
        _tile_stored(2, tile[0][1], 64);
        _tile_stored(3, tile[1][1], 64);
      }
      for (int j = 0; j < 2; ++j) {
        const int64_t row = first + j * TILE_ROWS;
        const int64_t rows = p.m - row < TILE_ROWS ? p.m - row : TILE_ROWS;
        if (rows > 0) store_accumulators<NT>(tile[j], p.e, row, rows, r * BS + pass * NT * TILE_ROWS);
      }
    }
  }
  _tile_release();
}

// ------------------------------------------------------------------------------ attention on tiles (bf16)
// The fp32 attention's task split and layout (qkv [B, S, 3 * H * D] in, [B, S, H * D] out), in bf16
// with fp32 accumulation, for D a multiple of 32. Per task (batch, head, block of query rows, 32 at a
// step): the head's keys packed as K^T (k, k+1) pairs, pack_x's layout (the right operand of
// Q K^T); its values packed as (V[j], V[j + 1]) pairs along j, keys padded to 32 with zeros (the
// right operand of P V); a step's 32 queries copied (zeros past S, so no tile reads past qkv).
// Scores go to fp32 rows, the softmax runs in fp32 (exp_for_probabilities), and its numerators are
// rounded to bf16 as the left operand of P V, the outputs divided by the fp32 sums. Each output is one thread's, summed
// in a fixed order: bit-identical for any thread count.
constexpr int QUERY_STEP = 2 * TILE_ROWS;

// Every tile 16 rows of 64 bytes: 16 x 16 fp32 accumulators, 16 x 32 bf16 left operands, 16 pair
// rows of 16 pairs on the right.
inline TileConfig square_tile_config() {
  TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = TILE_ROWS, c.colsb[t] = 64;
  return c;
}

struct AttentionScratch {
  uint32_t* kp;   // keys16 * D / 2 pairs used (sized for keys32)
  uint32_t* vp;   // keys32 / 2 * D pairs
  uint16_t* q;    // QUERY_STEP x D
  float* scores;  // QUERY_STEP x keys32 (each C tile stored here, then softmax in place)
  uint16_t* p;    // QUERY_STEP x keys32
  float* out;     // 2 tiles of 16 x 16
  float* key_bias;  // keys32
};

inline size_t attention_scratch_floats(int64_t keys32, int64_t d) {
  return static_cast<size_t>(keys32 * d / 2 + keys32 / 2 * d + QUERY_STEP * d / 2 + QUERY_STEP * keys32 +
                             QUERY_STEP * keys32 / 2 + 2 * 256 + keys32) + 64;
}

inline AttentionScratch attention_scratch(float* base, int64_t keys32, int64_t d) {
  AttentionScratch a;
  a.kp = reinterpret_cast<uint32_t*>(base);
  a.vp = a.kp + keys32 * d / 2;
  a.q = reinterpret_cast<uint16_t*>(a.vp + keys32 / 2 * d);
  a.scores = reinterpret_cast<float*>(a.q + QUERY_STEP * d);
  a.p = reinterpret_cast<uint16_t*>(a.scores + QUERY_STEP * keys32);
  a.out = reinterpret_cast<float*>(a.p + QUERY_STEP * keys32);
  a.key_bias = a.out + 2 * 256;
  return a;
}

// e^x for x <= 0 to about 3e-6 (for probabilities rounded to bf16): exp_nonpositive's reduction
// x = n ln2 + r with fewer instructions, since the softmax is most of this kernel's vector work:
// vscalefps applies 2^n (no exponent arithmetic), a degree-5 Taylor polynomial gives e^r, and x
// below -87.3 (-inf included) gives 0; NaN stays NaN (the comparison is unordered-true and vmaxps
// returns its second operand for NaN), so a NaN score reaches the output as in the fp32 kernel.
inline __m512 exp_for_probabilities(__m512 x) {
  const __m512 floor = _mm512_set1_ps(-87.3f);
  const __mmask16 kept = _mm512_cmp_ps_mask(x, floor, _CMP_NLT_UQ);
  const __m512 clamped = _mm512_max_ps(floor, x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145752f), clamped);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860677e-06f), r);
  __m512 e = _mm512_set1_ps(1.0f / 120);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(kept, e, n);
}

typedef uint16_t u16x16 __attribute__((vector_size(32)));

// 16 values of a qkv row as bf16: read as they are, or fp32 rounded to nearest even.
template <bool FP32>
inline u16x16 bf16x16(const void* row, int64_t at) {
  u16x16 out;
  if constexpr (FP32) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(static_cast<const float*>(row) + at));
    memcpy(&out, &rounded, sizeof out);
  } else {
    memcpy(&out, static_cast<const uint16_t*>(row) + at, sizeof out);
  }
  return out;
}

// FP32: qkv and out fp32, q, k, v and the probabilities rounded to bf16 for the two products only
// (bf16 weights with fp32 activations); else qkv and out bf16.
template <bool FP32>
void attention_task_bf16(const void* qkv, int64_t s_len, int64_t heads, int64_t d, const float* mask, float scale,
                         void* out, int64_t b, int64_t h, int64_t first, int64_t rows, const AttentionScratch& a) {
  const int64_t row_stride = 3 * heads * d, width = heads * d;
  const int64_t keys16 = (s_len + 15) / 16 * 16, keys32 = (s_len + 31) / 32 * 32, d_pairs = d / 2;
  const size_t value_bytes = FP32 ? sizeof(float) : sizeof(uint16_t);
  const char* base = static_cast<const char*>(qkv) + b * s_len * row_stride * value_bytes;
  const auto at = [&](int64_t j, int64_t column) { return base + (j * row_stride + column) * value_bytes; };
  // K^T pairs, 16 keys per chunk (zeros past S).
  for (int64_t chunk = 0; chunk < keys16 / 16; ++chunk)
    for (int64_t p0 = 0; p0 < d_pairs; p0 += PAIR_GROUP)
      pack_group<FP32>(at(0, width + h * d), row_stride, s_len, d_pairs, a.kp, chunk, p0);
  // V pairs along keys: vp[p * D + e] = (V[2p][e], V[2p + 1][e]), zeros past S.
  for (int64_t p = 0; p < keys32 / 2; ++p) {
    const int64_t j = 2 * p;
    for (int64_t e = 0; e < d; e += 16) {
      const u16x16 low = j < s_len ? bf16x16<FP32>(at(j, 2 * width + h * d), e) : u16x16{};
      const u16x16 high = j + 1 < s_len ? bf16x16<FP32>(at(j + 1, 2 * width + h * d), e) : u16x16{};
      const vu<16> pairs = __builtin_convertvector(low, vu<16>) | (__builtin_convertvector(high, vu<16>) << 16);
      memcpy(a.vp + p * d + e, &pairs, sizeof pairs);
    }
  }
  for (int64_t j = 0; j < keys32; ++j) a.key_bias[j] = j < s_len ? (mask ? mask[b * s_len + j] : 0.0f) : -INFINITY;
  for (int64_t i0 = first; i0 < first + rows; i0 += QUERY_STEP) {
    const int64_t qr = first + rows - i0 < QUERY_STEP ? first + rows - i0 : QUERY_STEP;
    for (int64_t r = 0; r < QUERY_STEP; ++r)
      for (int64_t e = 0; e < d; e += 16) {
        const u16x16 values = r < qr ? bf16x16<FP32>(at(i0 + r, h * d), e) : u16x16{};
        memcpy(a.q + r * d + e, &values, sizeof values);
      }
    // Scores: 2 query tiles x 16 keys per tile step, D in steps of 32. Up to D = 64 the query tiles
    // (2 x 2) stay in tile registers 2, 3, 5, 6 for every key tile.
    const bool resident = d <= 64;
    if (resident) {
      _tile_loadd(2, a.q, d * sizeof(uint16_t));
      _tile_loadd(3, a.q + TILE_ROWS * d, d * sizeof(uint16_t));
      if (d == 64) {
        _tile_loadd(5, a.q + 32, d * sizeof(uint16_t));
        _tile_loadd(6, a.q + TILE_ROWS * d + 32, d * sizeof(uint16_t));
      }
    }
    for (int64_t kt = 0; kt < keys16 / 16; ++kt) {
      _tile_zero(0);
      _tile_zero(1);
      if (resident) {
        _tile_loadd(4, a.kp + kt * d_pairs * 16, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
        if (d == 64) {
          _tile_loadd(7, a.kp + (kt * d_pairs + 16) * 16, 64);
          _tile_dpbf16ps(0, 5, 7);
          _tile_dpbf16ps(1, 6, 7);
        }
      } else {
        for (int64_t e = 0; e < d; e += 32) {
          _tile_loadd(2, a.q + e, d * sizeof(uint16_t));
          _tile_loadd(3, a.q + TILE_ROWS * d + e, d * sizeof(uint16_t));
          _tile_loadd(4, a.kp + (kt * d_pairs + e / 2) * 16, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 3, 4);
        }
      }
      _tile_stored(0, a.scores + kt * 16, keys32 * sizeof(float));
      _tile_stored(1, a.scores + TILE_ROWS * keys32 + kt * 16, keys32 * sizeof(float));
    }
    // Softmax numerators rounded to bf16 as P (rows past the task's: zeros, their outputs are not
    // written); the sums, of the fp32 numerators, divide the outputs.
    float inverse_sum[QUERY_STEP];
    for (int64_t r = 0; r < QUERY_STEP; ++r) {
      float* row = a.scores + r * keys32;
      uint16_t* p = a.p + r * keys32;
      if (r >= qr) {
        memset(p, 0, keys32 * sizeof(uint16_t));
        continue;
      }
      vf<16> maxima = splat<16>(-INFINITY);
      for (int64_t j = 0; j < keys32; j += 16) {
        vf<16> v = load_f<16>(row + j) * scale + load_f<16>(a.key_bias + j);
        if (j >= keys16) v = splat<16>(-INFINITY);  // never stored by a tile
        memcpy(row + j, &v, sizeof v);
        maxima = v > maxima ? v : maxima;
      }
      float maximum = _mm512_reduce_max_ps((__m512)maxima);
      if (maximum == -INFINITY) maximum = 0.0f;  // every key masked out: every numerator 0
      vf<16> sums = {};
      for (int64_t j = 0; j < keys32; j += 32) {
        const vf<16> low = (vf<16>)exp_for_probabilities((__m512)(load_f<16>(row + j) - maximum));
        const vf<16> high = (vf<16>)exp_for_probabilities((__m512)(load_f<16>(row + j + 16) - maximum));
        sums += low + high;
        const __m512bh both = _mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
        memcpy(p + j, &both, sizeof both);
      }
      const float sum = _mm512_reduce_add_ps((__m512)sums);
      inverse_sum[r] = sum == 0.0f ? 0.0f : 1.0f / sum;  // a row with every key masked out: zeros, as SDPA
    }
    // Out = P V: per query tile, D in pairs of 16-wide tiles, keys in steps of 32.
    for (int qt = 0; qt < 2; ++qt) {
      const int64_t row0 = qt * TILE_ROWS;
      if (row0 >= qr) break;
      for (int64_t e = 0; e < d; e += 32) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t j = 0; j < keys32; j += 32) {
          _tile_loadd(4, a.p + row0 * keys32 + j, keys32 * sizeof(uint16_t));
          _tile_loadd(5, a.vp + (j / 2) * d + e, d * sizeof(uint32_t));
          _tile_loadd(6, a.vp + (j / 2) * d + e + 16, d * sizeof(uint32_t));
          _tile_dpbf16ps(0, 4, 5);
          _tile_dpbf16ps(1, 4, 6);
        }
        _tile_stored(0, a.out, 64);
        _tile_stored(1, a.out + 256, 64);
        for (int64_t r = 0; r < TILE_ROWS && row0 + r < qr; ++r) {
          const float inverse = inverse_sum[row0 + r];
          const vf<16> low = load_f<16>(a.out + 16 * r) * inverse, high = load_f<16>(a.out + 256 + 16 * r) * inverse;
          const int64_t element = (b * s_len + i0 + row0 + r) * width + h * d + e;
          if constexpr (FP32) {
            memcpy(static_cast<float*>(out) + element, &low, sizeof low);
            memcpy(static_cast<float*>(out) + element + 16, &high, sizeof high);
          } else {
            const __m512bh both = _mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
            memcpy(static_cast<uint16_t*>(out) + element, &both, sizeof both);
          }
        }
      }
    }
  }
}

}  // namespace amx
#endif

// ------------------------------------------------------------------------------ attention (fp32)
// out[b, i, h, :] = softmax_j(q_i . k_j * scale + mask[b, j]) v_j for an encoder's self-attention,
// read straight from the fused projection's output `qkv [B, S, 3 * H * D]` (all Q heads, then K,
// then V) and written as `[B, S, H * D]`, the layout the output projection takes: no transposed
// copies either way. Tasks are (batch, head, block of query rows). A task first copies its head's
// keys transposed, `kt[d][j]` (S padded to a vector with zeros), so that scores run along j with
// broadcast queries and need no lane reductions; then per QR query rows: scores (QR x S), softmax
// (max, exp, sum; the exp is `exp_nonpositive`), and the weighted sum of V rows along d, scaled by
// 1 / sum at the end (zeros for a row whose every key is masked out, as SDPA gives). Each output is
// one thread's sum in a fixed order: bit-identical for any thread count.

// e^x for x <= 0 (scores less their row's max), -inf and anything below -87.3 giving 0: x = n ln2 + r
// with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error below 2e-8 there), 2^n
// put into the exponent bits.
template <int L>
inline vf<L> exp_nonpositive(vf<L> x) {
  static const float taylor[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
  const vi<L> underflow = (vi<L>)(x < -87.3f);
  const vf<L> clamped = underflow ? splat<L>(0.0f) : x;
  const vi<L> n = __builtin_convertvector(clamped * 1.44269504088896341f - 0.5f, vi<L>);  // round(x log2 e)
  const vf<L> nf = __builtin_convertvector(n, vf<L>);
  const vf<L> r = fmadd<L>(nf, splat<L>(-1.42860677e-06f), fmadd<L>(nf, splat<L>(-0.693145752f), clamped));
  const vf<L> scale = as_f<L>((vu<L>)((n + 127) << 23));
  return as_f<L>(as_u<L>(polynomial<L, 8>(r, taylor) * scale) & ~(vu<L>)underflow);
}

// The largest lane, halving the vector at each step.
template <int L>
inline float lane_max(vf<L> v) {
  if constexpr (L == 4) {
    const float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
    return a > b ? a : b;
  } else {
    constexpr auto half = std::make_index_sequence<L / 2>();
    const vf<L / 2> low = low_half<L>(v, half), high = high_half<L>(v, half);
    return lane_max<L / 2>(low > high ? low : high);
  }
}

constexpr int ATTENTION_ROWS = 6;  // query rows per step: they share each load of kt (of V: VALUE_ROWS)
// Vectors of keys per query row in a pass of the scores: ATTENTION_ROWS x this many accumulators,
// which must stay in registers: 24 of AVX-512's and NEON's 32, 12 of AVX2's 16.
constexpr int ATTENTION_VECTORS = NNBS_VECTOR_LANES == 8 ? 2 : 4;

// Query rows and vectors of D per pass of p V: R x V accumulators beside the R broadcast
// probabilities of a key (GCC loads them once per key, for all V vectors) and one V vector. AVX2's
// 16 registers take 3 x 4 (6 x 2 would need 19, and spill accumulators in the loop); the 32 of
// AVX-512 and NEON take 6 x 4.
constexpr int VALUE_ROWS = NNBS_VECTOR_LANES == 8 ? 3 : ATTENTION_ROWS;
constexpr int VALUE_VECTORS = 4;
static_assert(ATTENTION_ROWS % VALUE_ROWS == 0, "a step's rows are whole passes of p V");

// out_rows[r][d0 .. d0 + V * L) = sum_j scores[r][j] * values[j * row_stride ..] * inverse_sum[r] for
// the R rows r < qr.
template <int L, int V, int R>
inline void weighted_values(const float* scores, int64_t padded, int64_t s_len, const float* values, int64_t row_stride,
                            const float* inverse_sum, int qr, float* const* out_rows, int64_t d0) {
  vf<L> acc[R][V] = {};
  const float* row = values;
  for (int64_t j = 0; j < s_len; ++j, row += row_stride) {
    // One V vector at a time, used by every query row before the next is loaded: with all V
    // vectors loaded first, GCC keeps them on the stack and reloads each for every row.
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vf<L> value = load_f<L>(row + v * L);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][v] = fmadd<L>(splat<L>(scores[r * padded + j]), value, acc[r][v]);
    }
  }
  for (int r = 0; r < qr && r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const vf<L> value = acc[r][v] * inverse_sum[r];
      memcpy(out_rows[r] + d0 + v * L, &value, sizeof value);
    }
}

// out = p V / sum for a step's qr rows, VALUE_ROWS at a time: D VALUE_VECTORS vectors of L at a time (a
// count the compiler knows, so the accumulators stay in registers), then fewer, then what is left of D
// by 4 floats. Score rows past qr are finite (see attention_task) and their outputs not stored.
template <int L>
inline void step_values(const float* scores, int64_t padded, int64_t s_len, const float* values, int64_t row_stride,
                        int64_t d, const float* inverse_sum, int qr, float* const* out_rows) {
  constexpr int R = VALUE_ROWS;
  for (int r0 = 0; r0 < qr; r0 += R) {
    const float* rows = scores + r0 * padded;
    const float* inverse = inverse_sum + r0;
    float* const* out = out_rows + r0;
    const int count = qr - r0;
    int64_t d0 = 0;
    for (; d0 + VALUE_VECTORS * L <= d; d0 += VALUE_VECTORS * L)
      weighted_values<L, VALUE_VECTORS, R>(rows, padded, s_len, values + d0, row_stride, inverse, count, out, d0);
    switch ((d - d0) / L) {
      case 3: weighted_values<L, 3, R>(rows, padded, s_len, values + d0, row_stride, inverse, count, out, d0); d0 += 3 * L; break;
      case 2: weighted_values<L, 2, R>(rows, padded, s_len, values + d0, row_stride, inverse, count, out, d0); d0 += 2 * L; break;
      case 1: weighted_values<L, 1, R>(rows, padded, s_len, values + d0, row_stride, inverse, count, out, d0); d0 += L; break;
      default: break;
    }
    for (; d0 < d; d0 += 4) weighted_values<4, 1, R>(rows, padded, s_len, values + d0, row_stride, inverse, count, out, d0);
  }
}

// scores[r][0 .. V * L) = q_r . k_j * scale + key_bias[j] over V vectors of keys (kt, key_bias and
// scores at the first of them), for a step's rows, and each row's running maximum. V is a count the
// compiler knows, so that the accumulators stay in registers through the loop and its epilogue.
template <int L, int V>
inline void score_pass(const float* const* query, const float* kt, int64_t padded, int64_t d, const float* key_bias,
                       float scale, float* scores, vf<L>* maxima) {
  vf<L> acc[ATTENTION_ROWS][V] = {};
  for (int64_t dd = 0; dd < d; ++dd) {
    const float* row = kt + dd * padded;
    vf<L> kv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) kv[v] = load_f<L>(row + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < ATTENTION_ROWS; ++r) {
      const vf<L> qv = splat<L>(query[r][dd]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = fmadd<L>(qv, kv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ATTENTION_ROWS; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const vf<L> value = fmadd<L>(acc[r][v], splat<L>(scale), load_f<L>(key_bias + v * L));
      memcpy(scores + r * padded + v * L, &value, sizeof value);
      maxima[r] = value > maxima[r] ? value : maxima[r];
    }
}

template <int L>
void attention_task(const float* qkv, int64_t s_len, int64_t heads, int64_t d, const float* mask, float scale,
                    float* out, int64_t b, int64_t h, int64_t first, int64_t rows, float* kt, float* scores) {
  const int64_t row_stride = 3 * heads * d, width = heads * d;
  const int64_t padded = (s_len + L - 1) / L * L;
  const float* base = qkv + b * s_len * row_stride;
  // Keys transposed: kt[dd * padded + j] = k[j][dd], zeros past S; L x L squares in registers (a
  // store a value, to a line each, would cost as much as a small head's products), D's tail by value.
  const float* keys = base + width + h * d;
  for (int64_t j0 = 0; j0 < padded; j0 += L) {
    int64_t dd = 0;
    for (; dd + L <= d; dd += L) {
      vf<L> square[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) square[i] = j0 + i < s_len ? load_f<L>(keys + (j0 + i) * row_stride + dd) : vf<L>{};
      transpose_rows<L>(square);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) memcpy(kt + (dd + i) * padded + j0, &square[i], sizeof square[i]);
    }
    for (; dd < d; ++dd)
      for (int64_t j = j0; j < j0 + L; ++j) kt[dd * padded + j] = j < s_len ? keys[j * row_stride + dd] : 0.0f;
  }
  // What every score of a key gets added: the mask, or -inf past S (those keys weigh 0).
  float* key_bias = scores + ATTENTION_ROWS * padded;
  for (int64_t j = 0; j < padded; ++j) key_bias[j] = j < s_len ? (mask ? mask[b * s_len + j] : 0.0f) : -INFINITY;
  for (int64_t i0 = first; i0 < first + rows; i0 += ATTENTION_ROWS) {
    const int qr = first + rows - i0 < ATTENTION_ROWS ? static_cast<int>(first + rows - i0) : ATTENTION_ROWS;
    const float* query[ATTENTION_ROWS];
    for (int r = 0; r < ATTENTION_ROWS; ++r) query[r] = base + (i0 + (r < qr ? r : 0)) * row_stride + h * d;
    // Scores, ATTENTION_VECTORS vectors of keys at a time, then the vectors left, and each row's
    // running maximum.
    constexpr int AV = ATTENTION_VECTORS;
    vf<L> maxima[ATTENTION_ROWS];
    for (int r = 0; r < ATTENTION_ROWS; ++r) maxima[r] = splat<L>(-INFINITY);
    int64_t j0 = 0;
    for (; j0 + AV * L <= padded; j0 += AV * L)
      score_pass<L, AV>(query, kt + j0, padded, d, key_bias + j0, scale, scores + j0, maxima);
    switch ((padded - j0) / L) {
      case 3: score_pass<L, 3>(query, kt + j0, padded, d, key_bias + j0, scale, scores + j0, maxima); break;
      case 2: score_pass<L, 2>(query, kt + j0, padded, d, key_bias + j0, scale, scores + j0, maxima); break;
      case 1: score_pass<L, 1>(query, kt + j0, padded, d, key_bias + j0, scale, scores + j0, maxima); break;
      default: break;
    }
    // Softmax numerators and their sums, every row of the step at once: one row's reductions
    // alone are chains of dependent steps. (Rows past qr repeat the first row's query: finite,
    // unused.)
    float maximum[ATTENTION_ROWS], inverse_sum[ATTENTION_ROWS];
    for (int r = 0; r < ATTENTION_ROWS; ++r) {
      maximum[r] = lane_max<L>(maxima[r]);
      if (maximum[r] == -INFINITY) maximum[r] = 0.0f;  // every key masked out: every numerator 0
    }
    vf<L> sums[ATTENTION_ROWS] = {};
    for (int64_t j = 0; j < padded; j += L)
#pragma GCC unroll 8
      for (int r = 0; r < ATTENTION_ROWS; ++r) {
        float* at = scores + r * padded + j;
        const vf<L> e = exp_nonpositive<L>(load_f<L>(at) - maximum[r]);
        memcpy(at, &e, sizeof e);
        sums[r] += e;
      }
    for (int r = 0; r < ATTENTION_ROWS; ++r) {
      const vf<4> four = fold_to_4<L>(sums[r]);
      const float sum = (four[0] + four[1]) + (four[2] + four[3]);
      inverse_sum[r] = sum == 0.0f ? 0.0f : 1.0f / sum;  // a row with every key masked out: zeros, as SDPA
    }
    float* out_rows[ATTENTION_ROWS];
    for (int r = 0; r < ATTENTION_ROWS; ++r) out_rows[r] = out + (b * s_len + i0 + r) * width + h * d;
    step_values<L>(scores, padded, s_len, base + 2 * width + h * d, row_stride, d, inverse_sum, qr, out_rows);
  }
}

// Attention tasks are (batch, head, block of query rows): enough blocks per head to share out 4
// tasks per thread, each a whole number of steps of `step` query rows.
struct QueryBlocks {
  int64_t count, rows;  // blocks per head, query rows per block (the last may have fewer)
};
inline QueryBlocks query_blocks(int64_t s_len, int64_t pairs, int threads, int64_t step) {
  const int64_t steps = (s_len + step - 1) / step;
  int64_t count = (4 * threads + pairs - 1) / pairs;
  count = count < steps ? count : steps;
  const int64_t rows = ((s_len + count - 1) / count + step - 1) / step * step;
  return {(s_len + rows - 1) / rows, rows};
}

// ------------------------------------------------------------------------------ residual add + layer norm
// out = layer_norm(x + residual) * weight + bias, row by row: an encoder layer's residual add and
// norm in one pass over the stream instead of an add and a norm that each read and write it. The
// sum is rounded to the io dtype first, as an add in that dtype is (bf16 by round_to_bf16_fast, as the
// output: a denormal becomes a zero in the builds with AVX512_BF16); the statistics are fp32 over the
// row's rounded sums, kept in per-thread scratch between the passes: the mean, then the mean of the
// squared deviations (not E[s^2] - E[s]^2, which cancels). fp32 rows may take either input in
// bf16 (widened: the sum is then the fp32 add of torch's type promotion). Each row is one thread's,
// in a fixed order of additions: bit-identical for any thread count.
struct NormRows {
  int64_t width;  // a multiple of 4 (8 in bf16)
  const void* x;
  const void* residual;
  void* out;
  bool x_bf16, residual_bf16;  // both where out_bf16
  bool out_bf16;
  const void* weight;  // width values, or null (ones)
  const void* bias;    // width values, or null (zeros)
  bool params_bf16;
  float eps;
};

template <int L>
inline float lane_sum(vf<L> v) {
  const vf<4> f = fold_to_4<L>(v);
  return (f[0] + f[1]) + (f[2] + f[3]);
}

// Four accumulators for a row's statistics (one would wait on the adds' latency); the mean of what
// they hold with `tail`'s, over `width` values.
template <int L>
inline float mean_of(const vf<L>* acc, vf<4> tail, int64_t width) {
  return (lane_sum<L>((acc[0] + acc[1]) + (acc[2] + acc[3])) + lane_sum<4>(tail)) / static_cast<float>(width);
}

// The mean of the squared deviations of `sums [width]` from `mean`.
template <int L>
inline float variance_of(const float* __restrict sums, int64_t width, float mean) {
  const int64_t whole = width / (4 * L) * (4 * L);
  const vf<L> m = splat<L>(mean);
  vf<L> acc[4] = {};
  vf<4> tail{};
  int64_t j = 0;
  for (; j < whole; j += 4 * L)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const vf<L> d = load_f<L>(sums + j + u * L) - m;
      acc[u] += d * d;
    }
  for (; j < width; j += 4) {
    const vf<4> d = load_f<4>(sums + j) - splat<4>(mean);
    tail += d * d;
  }
  return mean_of<L>(acc, tail, width);
}

// An fp32 row (its inputs and parameters fp32, or bf16 widened where X_BF16, RESIDUAL_BF16,
// PARAMS_BF16, fixed at compile time: a test per vector costs as much as the arithmetic at these
// sizes), four vectors at a time, the tail (width % (4 L)) a vector of 4 at a time.
template <int L, bool X_BF16, bool RESIDUAL_BF16, bool PARAMS_BF16>
void add_layer_norm_row_fp32(const NormRows& p, int64_t row, float* __restrict sums) {
  const int64_t width = p.width, whole = width / (4 * L) * (4 * L), at = row * width;
  // out may be this row of x or of residual: the row is read whole into `sums` before any store.
  float* out = static_cast<float*>(p.out) + at;
  auto sum = [&](auto lanes, int64_t j) {
    constexpr int V = decltype(lanes)::value;
    const vf<V> v = load_widened<V>(p.x, at + j, X_BF16) + load_widened<V>(p.residual, at + j, RESIDUAL_BF16);
    memcpy(sums + j, &v, sizeof v);
    return v;
  };
  vf<L> acc[4] = {};
  vf<4> tail{};
  int64_t j = 0;
  for (; j < whole; j += 4 * L)
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[u] += sum(std::integral_constant<int, L>{}, j + u * L);
  for (; j < width; j += 4) tail += sum(std::integral_constant<int, 4>{}, j);
  const float mean = mean_of<L>(acc, tail, width);
  const float rstd = 1.0f / sqrtf(variance_of<L>(sums, width, mean) + p.eps);
  auto normalize = [&](auto lanes, int64_t j) {
    constexpr int V = decltype(lanes)::value;
    const vf<V> w = p.weight ? load_widened<V>(p.weight, j, PARAMS_BF16) : splat<V>(1.0f);
    const vf<V> b = p.bias ? load_widened<V>(p.bias, j, PARAMS_BF16) : vf<V>{};
    const vf<V> v = fmadd<V>((load_f<V>(sums + j) - splat<V>(mean)) * splat<V>(rstd), w, b);
    memcpy(out + j, &v, sizeof v);
  };
  for (j = 0; j < width / L * L; j += L) normalize(std::integral_constant<int, L>{}, j);
  for (; j < width; j += 4) normalize(std::integral_constant<int, 4>{}, j);
}

// A bf16 row: each 32-bit lane holds a (j, j + 1) pair, taken apart into its even and odd element as
// two fp32 vectors (a shift, a mask) and put together again after rounding (a shift, an or), where
// widening and narrowing conversions would cost more than the arithmetic. `sums` holds the even
// elements' sums, then the odd ones'; `params` the weight's even and odd elements, then the bias's
// (fp32, made once per call). Two vectors of pairs at a time, the tail (width % (4 L)) 8 elements at
// a time (width is a multiple of 8).
template <int L>
void add_layer_norm_row_bf16(const NormRows& p, int64_t row, float* __restrict sums, const float* __restrict params) {
  const int64_t half = p.width / 2, whole = half / (2 * L) * (2 * L);
  // out may be this row of x or of residual (no restrict): the row is read whole before any store.
  const uint32_t* x = static_cast<const uint32_t*>(p.x) + row * half;
  const uint32_t* residual = static_cast<const uint32_t*>(p.residual) + row * half;
  uint32_t* out = static_cast<uint32_t*>(p.out) + row * half;
  auto rounded = [](auto v) {
    constexpr int V = sizeof v / sizeof(float);
    return as_f<V>(round_to_bf16_fast<V>(v) << 16);
  };
  auto sum_pairs = [&](auto lanes, int64_t k, auto& even_total, auto& odd_total) {
    constexpr int V = decltype(lanes)::value;
    const vu<V> a = load_u<V>(x + k), b = load_u<V>(residual + k);
    const vf<V> even = rounded(even_bf16<V>(a) + even_bf16<V>(b)), odd = rounded(odd_bf16<V>(a) + odd_bf16<V>(b));
    memcpy(sums + k, &even, sizeof even);
    memcpy(sums + half + k, &odd, sizeof odd);
    even_total += even;
    odd_total += odd;
  };
  vf<L> acc[4] = {};
  vf<4> tail[2] = {};
  int64_t k = 0;
  for (; k < whole; k += 2 * L) {
    sum_pairs(std::integral_constant<int, L>{}, k, acc[0], acc[1]);
    sum_pairs(std::integral_constant<int, L>{}, k + L, acc[2], acc[3]);
  }
  for (; k < half; k += 4) sum_pairs(std::integral_constant<int, 4>{}, k, tail[0], tail[1]);
  const float mean = mean_of<L>(acc, tail[0] + tail[1], p.width);
  const float rstd = 1.0f / sqrtf(variance_of<L>(sums, p.width, mean) + p.eps);
  auto normalize = [&](auto lanes, int64_t k) {
    constexpr int V = decltype(lanes)::value;
    const vf<V> m = splat<V>(mean), r = splat<V>(rstd);
    const vf<V> even = fmadd<V>((load_f<V>(sums + k) - m) * r, load_f<V>(params + k), load_f<V>(params + 2 * half + k));
    const vf<V> odd = fmadd<V>((load_f<V>(sums + half + k) - m) * r, load_f<V>(params + half + k),
                               load_f<V>(params + 3 * half + k));
    const vu<V> pairs = round_to_bf16_fast<V>(even) | (round_to_bf16_fast<V>(odd) << 16);
    memcpy(out + k, &pairs, sizeof pairs);
  };
  for (k = 0; k < half / L * L; k += L) normalize(std::integral_constant<int, L>{}, k);
  for (; k < half; k += 4) normalize(std::integral_constant<int, 4>{}, k);
}

// A bf16 row's parameters in its even/odd order (see above), as fp32: weight (ones without one), bias
// (zeros without one).
inline void split_parameters(const NormRows& p, float* params) {
  const int64_t half = p.width / 2;
  auto value = [&](const void* v, int64_t j, float absent) {
    if (!v) return absent;
    if (!p.params_bf16) return static_cast<const float*>(v)[j];
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(v)[j]) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
  };
  for (int64_t k = 0; k < half; ++k) {
    params[k] = value(p.weight, 2 * k, 1.0f);
    params[half + k] = value(p.weight, 2 * k + 1, 1.0f);
    params[2 * half + k] = value(p.bias, 2 * k, 0.0f);
    params[3 * half + k] = value(p.bias, 2 * k + 1, 0.0f);
  }
}

// Called by every thread of a parallel region; `failed` is set if scratch memory ran out.
inline void add_layer_norm_rows(const NormRows& p, int64_t rows, bool* failed) {
  constexpr int L = NNBS_VECTOR_LANES;
  const size_t floats = static_cast<size_t>(p.width) * (p.out_bf16 ? 3 : 1);
  float* sums = static_cast<float*>(team_scratch(floats * sizeof(float), failed));
  if (sums && p.out_bf16) split_parameters(p, sums + p.width);
  // The fp32 row for these dtypes: one instance per combination.
  void (*fp32_row)(const NormRows&, int64_t, float*) =
      p.x_bf16 ? (p.residual_bf16 ? (p.params_bf16 ? add_layer_norm_row_fp32<L, true, true, true>
                                                    : add_layer_norm_row_fp32<L, true, true, false>)
                                  : (p.params_bf16 ? add_layer_norm_row_fp32<L, true, false, true>
                                                    : add_layer_norm_row_fp32<L, true, false, false>))
               : (p.residual_bf16 ? (p.params_bf16 ? add_layer_norm_row_fp32<L, false, true, true>
                                                    : add_layer_norm_row_fp32<L, false, true, false>)
                                  : (p.params_bf16 ? add_layer_norm_row_fp32<L, false, false, true>
                                                    : add_layer_norm_row_fp32<L, false, false, false>));
#pragma omp for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    if (!sums) continue;
    if (p.out_bf16) add_layer_norm_row_bf16<L>(p, row, sums, sums + p.width);
    else fp32_row(p, row, sums);
  }
}

}  // namespace nnbs

// Dtype codes shared with the launcher (launcher.py: _DTYPE_CODES).
enum { NNBS_NONE = 0, NNBS_F32 = 1, NNBS_BF16 = 2 };
// Return codes.
enum {
  NNBS_OK = 0, NNBS_BAD_BLOCK_SIZE = 1, NNBS_BAD_DTYPES = 2, NNBS_NO_MEMORY = 3, NNBS_BAD_ACTIVATION = 4,
  NNBS_BAD_LAYOUT = 5
};

// y [m, ldy] = act(x [m, ldx] @ W^T + bias) for W [block_rows * bs, k] in BSR; activation 0 (none)
// or 1 (gelu). Dtypes (x, W -> y): fp32, fp32 -> fp32; bf16, bf16 -> bf16; fp32, bf16 -> fp32 (x
// rounded to bf16 first, fp32 accumulation). Bias fp32 or bf16 (or null). `values_layout` 0: each
// block as stored ([n][k]); 1: each block transposed ([k][n]), fp32 only.
extern "C" NNBS_EXPORT int nnbs_block_sparse_linear(int64_t block_size, int64_t m, int64_t block_rows, int64_t k,
                                        const void* x, int64_t ldx, int32_t x_dtype, const void* values,
                                        int32_t w_dtype, int32_t values_layout, const int32_t* row_offsets,
                                        const int32_t* col_indices, const void* bias, int32_t bias_dtype,
                                        int32_t activation, void* y, int64_t ldy, int32_t y_dtype, int32_t threads) {
  using namespace nnbs;
  if (block_size != 16 && block_size != 32 && block_size != 64) return NNBS_BAD_BLOCK_SIZE;
  if (activation != 0 && activation != 1) return NNBS_BAD_ACTIVATION;
  if (values_layout != 0 && values_layout != 1) return NNBS_BAD_LAYOUT;
  const bool fp32 = x_dtype == NNBS_F32 && w_dtype == NNBS_F32 && y_dtype == NNBS_F32;
  const bool bf16 = x_dtype == NNBS_BF16 && w_dtype == NNBS_BF16 && y_dtype == NNBS_BF16;
  const bool mixed = x_dtype == NNBS_F32 && w_dtype == NNBS_BF16 && y_dtype == NNBS_F32;
  const bool bias_ok = bias == nullptr || bias_dtype == NNBS_F32 || bias_dtype == NNBS_BF16;
  if (!(fp32 || bf16 || mixed) || !bias_ok) return NNBS_BAD_DTYPES;
  if (values_layout == 1 && !fp32) return NNBS_BAD_LAYOUT;
  if (m <= 0 || block_rows <= 0) return NNBS_OK;
  const Epilogue e{bias, bias_dtype == NNBS_BF16, activation == 1, y, ldy, y_dtype == NNBS_BF16};
  const int t = threads > 0 ? threads : 1;
  if (fp32) {
    const Problem<float> p{m, block_rows, static_cast<const float*>(x), ldx, static_cast<const float*>(values),
                           row_offsets, col_indices, e};
    int64_t max_blocks = 0;
    for (int64_t r = 0; r < block_rows; ++r) {
      const int64_t blocks = row_offsets[r + 1] - row_offsets[r];
      max_blocks = blocks > max_blocks ? blocks : max_blocks;
    }
    bool failed = false;
#pragma omp parallel num_threads(t)
    {
      const bool pretransposed = values_layout == 1;
      if (block_size == 16) run_fp32<16>(p, max_blocks, pretransposed, t, &failed);
      else if (block_size == 32) run_fp32<32>(p, max_blocks, pretransposed, t, &failed);
      else run_fp32<64>(p, max_blocks, pretransposed, t, &failed);
    }
    return failed ? NNBS_NO_MEMORY : NNBS_OK;
  }
#if NNBS_AMX
  // Without Linux's grant of the tile state (a process that never asked), the vector bf16 code below.
  if (amx::os_grants_tiles()) {
    // x^T for the tile products, its rows padded to whole tasks (zeros). Kept in the calling thread's
    // scratch up to AMX_SCRATCH_MAX bytes, allocated for this call alone above that (a large batch
    // would otherwise stay allocated in every thread that ever ran one). At least a cache line: with
    // K = 0 the product is the bias, and an empty request may give null.
    constexpr size_t AMX_SCRATCH_MAX = size_t{64} << 20;
    const size_t packed_rows = static_cast<size_t>((m + amx::PACK_ROWS - 1) / amx::PACK_ROWS * amx::PACK_ROWS);
    const size_t bytes = packed_rows * static_cast<size_t>(k) * sizeof(uint16_t) + 64;
    void* owned = bytes > AMX_SCRATCH_MAX ? malloc(bytes) : nullptr;
    uint32_t* xt = static_cast<uint32_t*>(bytes > AMX_SCRATCH_MAX ? owned : scratch(bytes));
    if (!xt) return NNBS_NO_MEMORY;
    const Problem<uint16_t> tiles{m, block_rows, nullptr, 0, static_cast<const uint16_t*>(values), row_offsets,
                                  col_indices, e};
#pragma omp parallel num_threads(t)
    {
      if (mixed) amx::pack_x<true>(x, ldx, m, k, xt);  // ends in a barrier
      else amx::pack_x<false>(x, ldx, m, k, xt);
      if (block_size == 16) amx::run<16>(tiles, xt, k);
      else if (block_size == 32) amx::run<32>(tiles, xt, k);
      else amx::run<64>(tiles, xt, k);
    }
    free(owned);
    return NNBS_OK;
  }
#endif
  uint16_t* converted = nullptr;
  if (mixed) {
    // (+ 64: malloc(0), with K = 0, may return null.)
    converted = static_cast<uint16_t*>(malloc(static_cast<size_t>(m) * static_cast<size_t>(k) * sizeof(uint16_t) + 64));
    if (!converted) return NNBS_NO_MEMORY;
  }
  const Problem<uint16_t> p{m, block_rows, mixed ? converted : static_cast<const uint16_t*>(x), mixed ? k : ldx,
                            static_cast<const uint16_t*>(values), row_offsets, col_indices, e};
#pragma omp parallel num_threads(t)
  {
    if (mixed) rows_to_bf16(static_cast<const float*>(x), ldx, m, k, converted);  // ends in a barrier
    run_block_size(block_size, p);
  }
  free(converted);
  return NNBS_OK;
}

// out [B, S, H * D] = self-attention of the fused projection qkv [B, S, 3 * H * D] (fp32, contiguous),
// `mask` null or an additive fp32 [B, S] over the keys; `scale` multiplies q . k. D a multiple of 4.
extern "C" NNBS_EXPORT int nnbs_attention(int64_t batch, int64_t s_len, int64_t heads, int64_t d, const float* qkv,
                              const float* mask, float scale, float* out, int32_t threads) {
  using namespace nnbs;
  constexpr int L = NNBS_VECTOR_LANES;
  if (batch <= 0 || s_len <= 0 || heads <= 0 || d <= 0) return NNBS_OK;
  if (d % 4) return NNBS_BAD_BLOCK_SIZE;
  const int t = threads > 0 ? threads : 1;
  const int64_t pairs = batch * heads;
  const QueryBlocks split = query_blocks(s_len, pairs, t, ATTENTION_ROWS);
  const int64_t blocks = split.count, per_block = split.rows;
  const int64_t padded = (s_len + L - 1) / L * L;
  // Each thread's transposed keys and score rows, in its own scratch.
  const size_t per_thread = static_cast<size_t>(padded) * static_cast<size_t>(d + ATTENTION_ROWS + 1) * sizeof(float);
  bool failed = false;
#pragma omp parallel num_threads(t)
  {
    float* kt = static_cast<float*>(team_scratch(per_thread, &failed));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < pairs * blocks; ++task) {
      if (!kt) continue;
      const int64_t pair = task / blocks, first = (task % blocks) * per_block;
      const int64_t rows = s_len - first < per_block ? s_len - first : per_block;
      attention_task<L>(qkv, s_len, heads, d, mask, scale, out, pair / heads, pair % heads, first, rows, kt,
                        kt + padded * d);
    }
  }
  return failed ? NNBS_NO_MEMORY : NNBS_OK;
}

// out [B, S, H * D] = self-attention of qkv [B, S, 3 * H * D] (contiguous) on AMX tiles, both bf16
// (`io_dtype` NNBS_BF16) or both fp32 (NNBS_F32: q, k, v and the probabilities rounded to bf16 for
// the products), `mask` null or an additive fp32 [B, S]; D a multiple of 32. NNBS_BAD_DTYPES from a
// build without AMX or in a process without Linux's grant of the tile state.
extern "C" NNBS_EXPORT int nnbs_attention_bf16(int64_t batch, int64_t s_len, int64_t heads, int64_t d,
                                              const void* qkv, int32_t io_dtype, const float* mask, float scale,
                                              void* out, int32_t threads) {
  using namespace nnbs;
#if NNBS_AMX
  if (!amx::os_grants_tiles() || (io_dtype != NNBS_F32 && io_dtype != NNBS_BF16)) return NNBS_BAD_DTYPES;
  if (batch <= 0 || s_len <= 0 || heads <= 0 || d <= 0) return NNBS_OK;
  if (d % 32) return NNBS_BAD_BLOCK_SIZE;
  const int t = threads > 0 ? threads : 1;
  const int64_t pairs = batch * heads;
  const QueryBlocks split = query_blocks(s_len, pairs, t, amx::QUERY_STEP);
  const int64_t blocks = split.count, per_block = split.rows;
  const int64_t keys32 = (s_len + 31) / 32 * 32;
  const size_t bytes = amx::attention_scratch_floats(keys32, d) * sizeof(float);
  bool failed = false;
#pragma omp parallel num_threads(t)
  {
    float* base = static_cast<float*>(team_scratch(bytes, &failed));
    const amx::AttentionScratch a = amx::attention_scratch(base, keys32, d);
    const amx::TileConfig config = amx::square_tile_config();
    _tile_loadconfig(&config);
#pragma omp for schedule(static, 1)
    for (int64_t task = 0; task < pairs * blocks; ++task) {
      if (!base) continue;
      const int64_t pair = task / blocks, first = (task % blocks) * per_block;
      const int64_t rows = s_len - first < per_block ? s_len - first : per_block;
      if (io_dtype == NNBS_F32)
        amx::attention_task_bf16<true>(qkv, s_len, heads, d, mask, scale, out, pair / heads, pair % heads, first, rows, a);
      else
        amx::attention_task_bf16<false>(qkv, s_len, heads, d, mask, scale, out, pair / heads, pair % heads, first, rows,
                                        a);
    }
    _tile_release();
  }
  return failed ? NNBS_NO_MEMORY : NNBS_OK;
#else
  (void)batch, (void)s_len, (void)heads, (void)d, (void)qkv, (void)io_dtype, (void)mask, (void)scale, (void)out,
      (void)threads;
  return NNBS_BAD_DTYPES;
#endif
}

// GELU of n fp32 values with the epilogue's own code (tests check it against float64).
extern "C" NNBS_EXPORT void nnbs_gelu(const float* in, float* out, int64_t n) {
  const int64_t whole = n / 4 * 4;
  memmove(out, in, whole * sizeof(float));
  nnbs::gelu_span(out, whole);
  for (int64_t j = whole; j < n; ++j) {
    nnbs::vf<4> v = {in[j], 0.0f, 0.0f, 0.0f};
    out[j] = nnbs::gelu<4>(v)[0];
  }
}

// out [rows, width] = layer_norm(x + residual) * weight + bias (see above), [rows, width] contiguous
// each. out_dtype fp32 or bf16; x and residual of out_dtype, or, for fp32 out, either of them bf16;
// weight and bias: width values of param_dtype (fp32 or bf16), or null; width a multiple of 4 (8 in
// bf16). out may be x or residual (of out_dtype) itself: each row is read whole before
// it is written; no other overlap.
extern "C" NNBS_EXPORT int nnbs_add_layer_norm(int64_t rows, int64_t width, const void* x, int32_t x_dtype,
                                   const void* residual, int32_t residual_dtype, const void* weight,
                                   const void* bias, int32_t param_dtype, float eps, void* out, int32_t out_dtype,
                                   int32_t threads) {
  using namespace nnbs;
  auto is_float = [](int32_t code) { return code == NNBS_F32 || code == NNBS_BF16; };
  if (!is_float(x_dtype) || !is_float(residual_dtype) || !is_float(param_dtype) || !is_float(out_dtype) ||
      (out_dtype == NNBS_BF16 && (x_dtype != NNBS_BF16 || residual_dtype != NNBS_BF16)))
    return NNBS_BAD_DTYPES;
  if (width % (out_dtype == NNBS_BF16 ? 8 : 4)) return NNBS_BAD_BLOCK_SIZE;
  if (rows <= 0 || width <= 0) return NNBS_OK;
  const NormRows p{width, x, residual, out, x_dtype == NNBS_BF16, residual_dtype == NNBS_BF16,
                   out_dtype == NNBS_BF16, weight, bias, param_dtype == NNBS_BF16, eps};
  const int64_t team = threads < 1 ? 1 : threads < rows ? threads : rows;
  bool failed = false;
#pragma omp parallel num_threads(team)
  add_layer_norm_rows(p, rows, &failed);
  return failed ? NNBS_NO_MEMORY : NNBS_OK;
}

// What the launcher checks after loading: the ABI, the ISA this copy was compiled for, and the key
// of its source, flags and compiler (a cached library that is not exactly the one asked for is
// rebuilt, never used).
extern "C" NNBS_EXPORT int nnbs_abi_version(void) { return NNBS_ABI_VERSION; }
extern "C" NNBS_EXPORT const char* nnbs_isa(void) { return NNBS_ISA; }
extern "C" NNBS_EXPORT const char* nnbs_build_key(void) { return NNBS_BUILD_KEY; }
extern "C" NNBS_EXPORT int nnbs_has_bf16_dot(void) { return NNBS_BF16_DOT; }
