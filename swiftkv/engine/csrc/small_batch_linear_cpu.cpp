// bf16 matrix products of a few rows on a CPU with AVX512-BF16 (swiftkv/engine/small_batch_linear.py).
//
// A decode step multiplies one row per running sequence by every weight matrix: the weights stream from memory
// once and the arithmetic is small, so speed is bytes per second. oneDNN's bf16 GEMM reaches a third to a half
// of the memory bandwidth at 1-16 rows, ATen's GEMV most of it at one row but not beyond. This kernel reads the
// weight [N, K] as stored (no packed copy): each task takes 16 output features, keeps their rows in L1, and
// for every few input rows computes a tile of 16 dot products by bf16 pairs (vdpbf16ps: exact products,
// float32 sums), 32 input features at a time, then reduces the 16 at once (sum16). Tiles are 4 rows x 4
// features, 2 x 8 or 1 x 16, so each weight load feeds 4, 2 or 1 products and each row load 4, 8 or 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "attention_common.h"

namespace {

constexpr int64_t kFeatures = 16;  // output features per task step: one sum16 of 16 dot products
constexpr int64_t kPair = 32;      // input features per vdpbf16ps (16 bf16 pairs)

bool small_batch_linear_is_fast() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
using swiftkv_math::sum16;

// sums[r * (16 / Rows) + f] = x row r . weight row f, for Rows rows of x and 16 / Rows weight rows; with
// `ahead`, each weight line read also asks for the line `ahead` elements on (the next task's rows) into L2, so
// the stream from memory overlaps the arithmetic
template <int Rows>
inline __m512 dot_tile(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* weight, int64_t k_size,
                       int64_t ahead) {
  constexpr int Features = kFeatures / Rows;
  __m512 acc[kFeatures];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += kPair) {
    __m512bh w[Features];
    for (int f = 0; f < Features; ++f) {
      w[f] = (__m512bh)_mm512_loadu_si512(weight + f * k_size + k);
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(weight + f * k_size + k + ahead), _MM_HINT_T1);
    }
    for (int r = 0; r < Rows; ++r) {
      const __m512bh row = (__m512bh)_mm512_loadu_si512(x + r * x_stride + k);
      for (int f = 0; f < Features; ++f) acc[r * Features + f] = _mm512_dpbf16_ps(acc[r * Features + f], row, w[f]);
    }
  }
  return sum16(acc);
}

// out rows [Rows] x the 16 features of `weight` (+ their `bias`), as bf16 rounded to nearest even (as PyTorch)
template <int Rows>
inline void tile_into(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* weight, int64_t k_size,
                      const at::BFloat16* bias, int64_t ahead, at::BFloat16* out, int64_t n_size) {
  constexpr int Features = kFeatures / Rows;
  alignas(64) at::BFloat16 values[kFeatures];
  for (int64_t first = 0; first < kFeatures; first += Features) {
    __m512 sums = dot_tile<Rows>(x, x_stride, weight + first * k_size, k_size, ahead);
    if (bias) {  // lane r * Features + f: feature first + f
      alignas(64) float lanes[kFeatures];
      for (int i = 0; i < kFeatures; ++i) lanes[i] = static_cast<float>(bias[first + i % Features]);
      sums = _mm512_add_ps(sums, _mm512_load_ps(lanes));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(values), (__m256i)_mm512_cvtneps_pbh(sums));
    for (int r = 0; r < Rows; ++r)
      std::memcpy(out + r * n_size + first, values + r * Features, Features * sizeof(at::BFloat16));
  }
}
#endif

// input [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N], all bf16
torch::Tensor small_batch_linear(const torch::Tensor& input, const torch::Tensor& weight,
                                 const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(small_batch_linear_is_fast(), "small_batch_linear needs a CPU with AVX512-BF16");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.size(1) == weight.size(1),
              "input [M, K] and weight [N, K] expected");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bf16 expected");
  TORCH_CHECK(input.stride(1) == 1 && weight.is_contiguous(), "input rows and the weight must be contiguous");
  const int64_t rows = input.size(0), k_size = input.size(1), n_size = weight.size(0);
  TORCH_CHECK(k_size % kPair == 0 && n_size % kFeatures == 0, "in_features % 32 and out_features % 16 must be 0");
  const at::BFloat16* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n_size,
                "bias must be [N] bf16");
    bias_data = bias->data_ptr<at::BFloat16>();
  }
  auto out = torch::empty({rows, n_size}, input.options());
#if defined(__AVX512BF16__)
  const auto* x = input.data_ptr<at::BFloat16>();
  const auto* w = weight.data_ptr<at::BFloat16>();
  auto* o = out.data_ptr<at::BFloat16>();
  const int64_t x_stride = input.stride(0);
  at::parallel_for(0, n_size / kFeatures, 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kFeatures;
      const at::BFloat16* block_bias = bias_data ? bias_data + n0 : nullptr;
      const int64_t ahead = block + 1 < n_size / kFeatures ? kFeatures * k_size : 0;  // the next task's rows
      const at::BFloat16* rows_weight = w + n0 * k_size;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4)  // the weight rows are read from memory by the first tile, from cache after
        tile_into<4>(x + r * x_stride, x_stride, rows_weight, k_size, block_bias, r ? 0 : ahead, o + r * n_size + n0,
                     n_size);
      if (r + 2 <= rows) {
        tile_into<2>(x + r * x_stride, x_stride, rows_weight, k_size, block_bias, r ? 0 : ahead, o + r * n_size + n0,
                     n_size);
        r += 2;
      }
      if (r < rows)
        tile_into<1>(x + r * x_stride, x_stride, rows_weight, k_size, block_bias, r ? 0 : ahead, o + r * n_size + n0,
                     n_size);
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(swiftkv_cpu, m) {
  m.def("small_batch_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("small_batch_linear_is_fast() -> bool", &small_batch_linear_is_fast);
}
TORCH_LIBRARY_IMPL(swiftkv_cpu, CPU, m) { m.impl("small_batch_linear", &small_batch_linear); }
