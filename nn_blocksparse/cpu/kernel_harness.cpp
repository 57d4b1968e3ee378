// A self-contained test of block_sparse_linear.cpp, for machines where Python and torch cannot run
// it: the test suite cross-compiles this for aarch64 and runs it under qemu-aarch64 (it also runs
// natively). It includes the kernel source itself, so it checks exactly what the library compiles.
//
// Every case is compared against a double-precision reference of the same problem (x and W rounded
// to bf16 first where the kernel computes in bf16); GELU against erfc in double; attention against
// softmax in double; the residual add + layer norm against its statistics in double. Prints one line per
// failure and "ok <cases>" at the end; the exit status is the number of failures (capped at 100).

#include "block_sparse_linear.cpp"

#include <math.h>
#include <stdio.h>

#include <vector>

#include <omp.h>

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
double uniform() {  // [-1, 1)
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return static_cast<double>(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

uint16_t to_bf16(float f) {
  nnbs::vf<4> v = {f, 0.0f, 0.0f, 0.0f};
  return static_cast<uint16_t>(nnbs::round_to_bf16<4>(v)[0]);
}
float from_bf16(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}
double gelu_reference(double v) { return 0.5 * v * erfc(-v / sqrt(2.0)); }

int failures = 0;
void fail(const char* what) {
  ++failures;
  printf("FAIL %s\n", what);
}

// Each bs x bs block of `w` ([n][k]) transposed ([k][n]): values_layout 1.
std::vector<float> transposed_blocks(const std::vector<float>& w, int bs) {
  std::vector<float> out(w.size());
  for (size_t b = 0; b < w.size() / (bs * bs); ++b)
    for (int nn = 0; nn < bs; ++nn)
      for (int kk = 0; kk < bs; ++kk) out[(b * bs + kk) * bs + nn] = w[(b * bs + nn) * bs + kk];
  return out;
}

// kind 0: fp32; 1: bf16 x and W; 2: fp32 x, bf16 W; 3: fp32, the blocks given transposed (values_layout 1).
bool run_case(int kind, int bs, int64_t m, int64_t block_rows, int64_t block_cols, double density, bool bias_on,
              bool gelu, int threads, bool empty_row) {
  const int64_t n = block_rows * bs, k = block_cols * bs;
  std::vector<int32_t> row_offsets(block_rows + 1, 0), cols;
  for (int64_t r = 0; r < block_rows; ++r) {
    for (int64_t c = 0; c < block_cols; ++c)
      if (!(empty_row && r == 1) && (uniform() + 1.0) / 2.0 < density) cols.push_back(static_cast<int32_t>(c));
    row_offsets[r + 1] = static_cast<int32_t>(cols.size());
  }
  const int64_t nnz = static_cast<int64_t>(cols.size());
  const double scale = 1.0 / sqrt(static_cast<double>(k));
  std::vector<float> w32(nnz * bs * bs), x32(m * k), bias32(n);
  for (auto& v : w32) v = static_cast<float>(uniform() * scale * 1.7);
  for (auto& v : x32) v = static_cast<float>(uniform() * 1.7);
  for (auto& v : bias32) v = static_cast<float>(uniform());
  std::vector<uint16_t> w16(w32.size()), x16(x32.size());
  const bool weights_bf16 = kind == 1 || kind == 2;
  for (size_t j = 0; j < w32.size(); ++j) {
    w16[j] = to_bf16(w32[j]);
    if (weights_bf16) w32[j] = from_bf16(w16[j]);
  }
  for (size_t j = 0; j < x32.size(); ++j) {
    x16[j] = to_bf16(x32[j]);
    if (weights_bf16) x32[j] = from_bf16(x16[j]);  // the values the kernel multiplies
  }
  // Reference in double from the (rounded) operands.
  std::vector<double> expected(m * n, 0.0);
  for (int64_t r = 0; r < block_rows; ++r)
    for (int32_t b = row_offsets[r]; b < row_offsets[r + 1]; ++b)
      for (int64_t i = 0; i < m; ++i)
        for (int nn = 0; nn < bs; ++nn) {
          double s = 0.0;
          for (int kk = 0; kk < bs; ++kk)
            s += static_cast<double>(x32[i * k + cols[b] * bs + kk]) * w32[(b * bs + nn) * bs + kk];
          expected[i * n + r * bs + nn] += s;
        }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double v = expected[i * n + j] + (bias_on ? bias32[j] : 0.0);
      expected[i * n + j] = gelu ? gelu_reference(v) : v;
    }
  const bool y_bf16 = kind == 1;
  std::vector<float> y32(m * n, -7.0f);
  std::vector<uint16_t> y16(m * n, 0);
  const void* x = kind == 1 ? static_cast<const void*>(x16.data()) : static_cast<const void*>(x32.data());
  const std::vector<float> w32t = kind == 3 ? transposed_blocks(w32, bs) : std::vector<float>();
  const void* w = weights_bf16 ? static_cast<const void*>(w16.data())
                  : static_cast<const void*>(kind == 3 ? w32t.data() : w32.data());
  const int code = nnbs_block_sparse_linear(
      bs, m, block_rows, k, x, k, kind == 1 ? NNBS_BF16 : NNBS_F32, w, weights_bf16 ? NNBS_BF16 : NNBS_F32,
      kind == 3 ? 1 : 0, row_offsets.data(), cols.data(), bias_on ? bias32.data() : nullptr,
      bias_on ? NNBS_F32 : NNBS_NONE, gelu ? 1 : 0,
      y_bf16 ? static_cast<void*>(y16.data()) : static_cast<void*>(y32.data()), n, y_bf16 ? NNBS_BF16 : NNBS_F32,
      threads);
  char what[200];
  snprintf(what, sizeof what, "kind=%d bs=%d m=%lld n=%lld k=%lld density=%.2f bias=%d gelu=%d threads=%d", kind, bs,
           static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k), density, bias_on, gelu,
           threads);
  if (code != NNBS_OK) {
    fail(what);
    return false;
  }
  // fp32 accumulation of up to 6144 terms of size ~1/sqrt(K): 2e-5; a bf16 output adds its rounding (2^-8).
  const double tolerance = y_bf16 ? 1.0e-2 : 2.0e-5;
  for (int64_t j = 0; j < m * n; ++j) {
    const double actual = y_bf16 ? from_bf16(y16[j]) : y32[j];
    if (!(fabs(actual - expected[j]) <= tolerance * (1.0 + fabs(expected[j])))) {
      printf("  y[%lld] = %.8g, expected %.8g\n", static_cast<long long>(j), actual, expected[j]);
      fail(what);
      return false;
    }
  }
  return true;
}

void check_gelu() {
  // Absolute error within 2.5e-7 * max(1, |v|): the rounding of fp32 at the input's scale.
  std::vector<float> in, out;
  for (int j = -200000; j <= 200000; ++j) in.push_back(static_cast<float>(j) * 1.0e-4f);
  in.push_back(-30.0f);
  in.push_back(30.0f);
  out.resize(in.size());
  nnbs_gelu(in.data(), out.data(), static_cast<int64_t>(in.size()));
  for (size_t j = 0; j < in.size(); ++j) {
    const double expected = gelu_reference(in[j]);
    if (!(fabs(out[j] - expected) <= 2.5e-7 * fmax(1.0, fabs(in[j])))) {
      printf("  gelu(%.8g) = %.10g, expected %.10g\n", in[j], out[j], expected);
      fail("gelu");
      return;
    }
  }
}

// Self-attention of a random fused projection (B, S, H, D), optionally masking the second half of
// batch 0's keys, against softmax in double; and bit-identical for 1 and 3 threads.
int attention_case(int64_t batch, int64_t s_len, int64_t heads, int64_t d, bool masked) {
  const int64_t width = heads * d;
  std::vector<float> qkv(batch * s_len * 3 * width), mask(batch * s_len, 0.0f), out(batch * s_len * width),
      again(out.size());
  for (auto& v : qkv) v = static_cast<float>(2.0 * uniform());
  if (masked)
    for (int64_t j = s_len / 2; j < s_len; ++j) mask[j] = -1e30f;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(d)));
  nnbs_attention(batch, s_len, heads, d, qkv.data(), masked ? mask.data() : nullptr, scale, out.data(), 1);
  nnbs_attention(batch, s_len, heads, d, qkv.data(), masked ? mask.data() : nullptr, scale, again.data(), 3);
  if (memcmp(out.data(), again.data(), out.size() * sizeof(float)) != 0) fail("attention thread counts");
  std::vector<double> p(s_len);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < s_len; ++i) {
        const float* q = &qkv[(b * s_len + i) * 3 * width + h * d];
        double maximum = -1e300, sum = 0.0;
        for (int64_t j = 0; j < s_len; ++j) {
          const float* k = &qkv[(b * s_len + j) * 3 * width + width + h * d];
          double dot = 0.0;
          for (int64_t e = 0; e < d; ++e) dot += static_cast<double>(q[e]) * k[e];
          p[j] = dot * scale + mask[b * s_len + j] * (masked ? 1.0 : 0.0);
          maximum = p[j] > maximum ? p[j] : maximum;
        }
        for (int64_t j = 0; j < s_len; ++j) sum += p[j] = exp(p[j] - maximum);
        for (int64_t e = 0; e < d; ++e) {
          double expected = 0.0;
          for (int64_t j = 0; j < s_len; ++j) expected += p[j] / sum * qkv[(b * s_len + j) * 3 * width + 2 * width + h * d + e];
          const double got = out[(b * s_len + i) * width + h * d + e];
          if (fabs(got - expected) > 2e-5 * 2.0) {
            printf("  attention B %lld S %lld H %lld D %lld: out[%lld, %lld, %lld] = %.8g, expected %.8g\n",
                   (long long)batch, (long long)s_len, (long long)heads, (long long)d, (long long)b, (long long)i,
                   (long long)e, got, expected);
            fail("attention");
            return 1;
          }
        }
      }
  return 1;
}

// layer_norm(x + residual) * weight + bias over rows of `width` (kind 0: fp32; 1: bf16 rows and
// parameters; 2: bf16 x, fp32 residual, parameters and output), against double statistics of the
// (rounded) sums, within a rounding of the output dtype; and bit-identical for 1 and 3 threads.
int layer_norm_case(int64_t rows, int64_t width, int kind, bool params) {
  const bool bf16 = kind == 1;
  const int64_t count = rows * width;
  std::vector<float> x(count), residual(count), weight(width), bias(width);
  for (auto& v : x) v = static_cast<float>(3.0 * uniform() + 1.0);
  for (auto& v : residual) v = static_cast<float>(uniform());
  for (auto& v : weight) v = static_cast<float>(uniform() + 1.5);
  for (auto& v : bias) v = static_cast<float>(uniform());
  std::vector<uint16_t> x16(count), residual16(count), weight16(width), bias16(width), out16(count), again16(count);
  for (int64_t j = 0; j < count && kind > 0; ++j) x[j] = from_bf16(x16[j] = to_bf16(x[j]));
  if (bf16) {
    for (int64_t j = 0; j < count; ++j) residual[j] = from_bf16(residual16[j] = to_bf16(residual[j]));
    for (int64_t j = 0; j < width; ++j) weight[j] = from_bf16(weight16[j] = to_bf16(weight[j]));
    for (int64_t j = 0; j < width; ++j) bias[j] = from_bf16(bias16[j] = to_bf16(bias[j]));
  }
  std::vector<float> out(count), again(count);
  const int32_t out_dtype = bf16 ? NNBS_BF16 : NNBS_F32;
  const void* w = !params ? nullptr : bf16 ? static_cast<const void*>(weight16.data()) : weight.data();
  const void* b = !params ? nullptr : bf16 ? static_cast<const void*>(bias16.data()) : bias.data();
  const float eps = 1e-5f;
  for (int threads : {1, 3}) {
    void* target = bf16 ? static_cast<void*>(threads == 1 ? out16.data() : again16.data())
                        : static_cast<void*>(threads == 1 ? out.data() : again.data());
    if (nnbs_add_layer_norm(rows, width, kind > 0 ? static_cast<const void*>(x16.data()) : x.data(),
                            kind > 0 ? NNBS_BF16 : NNBS_F32,
                            bf16 ? static_cast<const void*>(residual16.data()) : residual.data(), out_dtype, w, b,
                            out_dtype, eps, target, out_dtype, threads) != NNBS_OK)
      fail("layer norm refused");
  }
  if (bf16 ? out16 != again16 : memcmp(out.data(), again.data(), count * sizeof(float)) != 0)
    fail("layer norm thread counts");
  // In place: the output written over x (where x has the output's dtype) and over residual, bit for bit
  // the values written elsewhere.
  for (int over_x = kind == 2 ? 0 : 1; over_x >= 0; --over_x) {
    std::vector<float> inout = over_x ? x : residual;
    std::vector<uint16_t> inout16 = over_x ? x16 : residual16;
    void* target = bf16 ? static_cast<void*>(inout16.data()) : static_cast<void*>(inout.data());
    const void* xs = over_x ? target : kind > 0 ? static_cast<const void*>(x16.data()) : x.data();
    const void* rs = !over_x ? target : bf16 ? static_cast<const void*>(residual16.data()) : residual.data();
    if (nnbs_add_layer_norm(rows, width, xs, kind > 0 ? NNBS_BF16 : NNBS_F32, rs, out_dtype, w, b, out_dtype, eps,
                            target, out_dtype, 3) != NNBS_OK)
      fail("layer norm in place refused");
    if (bf16 ? inout16 != out16 : memcmp(inout.data(), out.data(), count * sizeof(float)) != 0)
      fail(over_x ? "layer norm over x" : "layer norm over residual");
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> sums(width);
    double mean = 0.0, variance = 0.0;
    for (int64_t j = 0; j < width; ++j) {
      const float sum = x[r * width + j] + residual[r * width + j];
      mean += sums[j] = bf16 ? from_bf16(to_bf16(sum)) : sum;
    }
    mean /= static_cast<double>(width);
    for (int64_t j = 0; j < width; ++j) variance += (sums[j] - mean) * (sums[j] - mean);
    const double rstd = 1.0 / sqrt(variance / static_cast<double>(width) + eps);
    for (int64_t j = 0; j < width; ++j) {
      const double expected = (sums[j] - mean) * rstd * (params ? weight[j] : 1.0) + (params ? bias[j] : 0.0);
      const double got = bf16 ? from_bf16(out16[r * width + j]) : out[r * width + j];
      // bf16: the output's rounding (half an ulp, 2^-9 relative) and the fp32 statistics' error.
      const double allowed = bf16 ? fabs(expected) * 4.0e-3 + 1e-3 : 2e-5 * (1.0 + fabs(expected));
      if (!(fabs(got - expected) <= allowed)) {
        printf("  layer norm rows %lld width %lld kind %d: out[%lld, %lld] = %.8g, expected %.8g\n", (long long)rows,
               (long long)width, kind, (long long)r, (long long)j, got, expected);
        fail("layer norm");
        return 1;
      }
    }
  }
  return 1;
}

}  // namespace

int main() {
  int cases = 0;
  printf("isa %s, bf16 dot %d\n", nnbs_isa(), nnbs_has_bf16_dot());
  check_gelu();
  ++cases;
  for (int kind = 0; kind < 4; ++kind)
    for (int bs : {16, 32, 64}) {
      // Every tail height (M = 1 .. 13), chunk boundaries (M = 53; 197 with the blocks given
      // transposed), empty rows, dense, empty.
      for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 13, 53, 197}) {
        cases += run_case(kind, bs, m, 3, 4, 0.6, m % 2 == 1, m % 3 == 0, 2, true);
      }
      cases += run_case(kind, bs, 9, 2, 3, 1.0, true, true, 1, false);
      cases += run_case(kind, bs, 9, 2, 3, 0.0, true, false, 1, false);
      // Long block-rows (K = 6144): walked in several segments.
      cases += run_case(kind, bs, 7, 2, 6144 / bs, 0.8, true, kind == 1, 2, false);
    }
  // Bit-identical for any thread count, and (fp32) with the blocks given transposed, over several chunks.
  for (int kind = 0; kind < 4; ++kind) {
    const int bs = 32;
    const int64_t m = kind == 3 ? 301 : 37, block_rows = 4, block_cols = 5, n = block_rows * bs, k = block_cols * bs;
    std::vector<int32_t> row_offsets = {0, 3, 3, 8, 10}, cols = {0, 2, 4, 0, 1, 2, 3, 4, 1, 3};
    std::vector<float> w32(cols.size() * bs * bs), x32(m * k);
    for (auto& v : w32) v = static_cast<float>(uniform());
    for (auto& v : x32) v = static_cast<float>(uniform());
    std::vector<uint16_t> w16(w32.size()), x16(x32.size());
    for (size_t j = 0; j < w32.size(); ++j) w16[j] = to_bf16(w32[j]);
    for (size_t j = 0; j < x32.size(); ++j) x16[j] = to_bf16(x32[j]);
    const std::vector<float> w32t = transposed_blocks(w32, bs);
    std::vector<float> first(m * n), again(m * n);
    for (int threads : {1, 2, 3}) {
      std::vector<float>& y = threads == 1 ? first : again;
      // kind 3: the first call reads the blocks as stored, the others transposed.
      const bool transposed = kind == 3 && threads > 1;
      const bool fp32 = kind == 0 || kind == 3;
      const void* w = fp32 ? static_cast<const void*>(transposed ? w32t.data() : w32.data()) : w16.data();
      nnbs_block_sparse_linear(bs, m, block_rows, k, kind == 1 ? static_cast<const void*>(x16.data()) : x32.data(), k,
                               kind == 1 ? NNBS_BF16 : NNBS_F32, w, fp32 ? NNBS_F32 : NNBS_BF16, transposed ? 1 : 0,
                               row_offsets.data(), cols.data(), nullptr, NNBS_NONE, 1, y.data(), n,
                               kind == 1 ? NNBS_BF16 : NNBS_F32, threads);
      if (threads > 1 && memcmp(first.data(), again.data(), (kind == 1 ? 2 : 4) * m * n) != 0) fail("thread counts");
      ++cases;
    }
  }
  // Arguments refused before anything is read (every pointer null): the code returned.
  auto refusal = [](int64_t bs, int32_t x_dtype, int32_t w_dtype, int32_t layout, int32_t y_dtype) {
    return nnbs_block_sparse_linear(bs, 1, 1, bs, nullptr, bs, x_dtype, nullptr, w_dtype, layout, nullptr, nullptr,
                                    nullptr, NNBS_NONE, 0, nullptr, bs, y_dtype, 1);
  };
  if (refusal(48, NNBS_F32, NNBS_F32, 0, NNBS_F32) != NNBS_BAD_BLOCK_SIZE) fail("block size 48 accepted");
  if (refusal(32, NNBS_BF16, NNBS_F32, 0, NNBS_F32) != NNBS_BAD_DTYPES) fail("bf16 x with fp32 W accepted");
  if (refusal(32, NNBS_BF16, NNBS_BF16, 1, NNBS_BF16) != NNBS_BAD_LAYOUT) fail("bf16 W given transposed accepted");
  if (refusal(32, NNBS_F32, NNBS_F32, 2, NNBS_F32) != NNBS_BAD_LAYOUT) fail("values layout 2 accepted");
  // Attention: tails of every vector width (S = 1, 13, 37), steps ending at each row of the last pass
  // of P V (S = 4, 5, 11), D of every number of whole vectors after the widest passes (8 to 64) and
  // with a partial vector (4, 36, 44), masks.
  for (int64_t s_len : {1, 4, 5, 11, 13, 37, 128})
    for (int64_t d : {4, 8, 16, 24, 32, 36, 44, 64}) cases += attention_case(2, s_len, 3, d, s_len > 1);
  if (nnbs_attention(1, 4, 1, 6, nullptr, nullptr, 1.0f, nullptr, 1) != NNBS_BAD_BLOCK_SIZE) fail("head size 6 accepted");
  // Add + layer norm: widths with and without a vector tail, one row and many, with and without
  // parameters.
  for (int kind = 0; kind < 3; ++kind)
    for (int64_t width : {8, 24, 384, 776})
      for (int64_t rows : {1, 5, 64}) cases += layer_norm_case(rows, width, kind, rows != 5);
  if (nnbs_add_layer_norm(1, 6, nullptr, NNBS_F32, nullptr, NNBS_F32, nullptr, nullptr, NNBS_F32, 1e-5f, nullptr,
                          NNBS_F32, 1) != NNBS_BAD_BLOCK_SIZE)
    fail("layer norm width 6 accepted");
  if (nnbs_add_layer_norm(1, 16, nullptr, NNBS_F32, nullptr, NNBS_BF16, nullptr, nullptr, NNBS_BF16, 1e-5f, nullptr,
                          NNBS_BF16, 1) != NNBS_BAD_DTYPES)
    fail("fp32 x into a bf16 layer norm accepted");
  if (nnbs_add_layer_norm(1, 12, nullptr, NNBS_BF16, nullptr, NNBS_BF16, nullptr, nullptr, NNBS_BF16, 1e-5f, nullptr,
                          NNBS_BF16, 1) != NNBS_BAD_BLOCK_SIZE)
    fail("bf16 layer norm width 12 accepted");
  printf("%s %d\n", failures ? "failed" : "ok", cases);
  return failures > 100 ? 100 : failures;
}
