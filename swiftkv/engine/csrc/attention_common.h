// What the CPU kernels share (paged_attention_cpu.cpp, prefill_attention_cpu.cpp, small_batch_linear_cpu.cpp):
// argument checks and vector math.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace swiftkv_common {

// query [rows, heads, head_dim] against one cache entry's k_cache/v_cache [kv_heads, slots, head_dim], of the
// query's dtype or (codes) int8
inline void check_query_and_caches(const torch::Tensor& query, const torch::Tensor& k_cache,
                                   const torch::Tensor& v_cache, int64_t block_size, bool codes = false) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "query and caches must be 3-d");
  const auto cache_type = codes ? at::kChar : query.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == cache_type && v_cache.scalar_type() == cache_type,
              codes ? "int8 caches expected" : "query and caches must share a dtype");
  TORCH_CHECK(query.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "head_dim must be contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have one shape");
  TORCH_CHECK(query.size(2) == k_cache.size(2), "query and caches must share head_dim");
  TORCH_CHECK(query.size(1) % k_cache.size(0) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_size > 0, "block_size must be positive");
}

// A tiled cache (bf16_tiles.h) is read only by the AVX512-BF16 paths, which need bf16, head_dim % 32 == 0,
// whole tiles per block, contiguous slots, and bf16 pairs of the query on 4-byte boundaries
inline void check_tiled(bool tiled, const torch::Tensor& query, const torch::Tensor& k_cache, int64_t block_size) {
  if (!tiled) return;
#if defined(__AVX512BF16__)
  const bool supported = query.scalar_type() == at::kBFloat16 && query.size(2) % 32 == 0 && block_size % 16 == 0 &&
                         k_cache.stride(1) == k_cache.size(2) &&
                         reinterpret_cast<uintptr_t>(query.data_ptr()) % 4 == 0 && query.stride(0) % 2 == 0 &&
                         query.stride(1) % 2 == 0;
#else
  const bool supported = false;
#endif
  TORCH_CHECK(supported, "a tiled KV cache needs bf16, head_dim % 32 == 0, block_size % 16 == 0, contiguous slots "
              "and a CPU with AVX512-BF16");
}

// The cache slot of a sequence's `position`, through its block table
inline int64_t slot_of(const int32_t* table, int64_t position, int64_t block_size) {
  return static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
}

// An int8 cache is read tiled, with bf16 scales [kv_heads, slots(, 1)] for K and V
inline void check_scales(bool tiled, const torch::Tensor& k_cache, const torch::Tensor& k_scale,
                         const c10::optional<torch::Tensor>& v_scale) {
  TORCH_CHECK(tiled && v_scale.has_value() && v_scale->defined(), "an int8 KV cache is read tiled, with both scales");
  TORCH_CHECK(k_scale.scalar_type() == at::kBFloat16 && v_scale->scalar_type() == at::kBFloat16 &&
                  k_scale.is_contiguous() && v_scale->is_contiguous() &&
                  k_scale.numel() == k_cache.size(0) * k_cache.size(1) && v_scale->numel() == k_scale.numel(),
              "the scales must be contiguous bf16 [kv_heads, slots(, 1)], one per slot and KV head");
}

}  // namespace swiftkv_common

#if defined(__AVX512F__)
#include <immintrin.h>

namespace swiftkv_math {

// e^x for x <= 0 (scores minus their maximum), to about 2 ulp: e^x = 2^k * e^r with r = x - k ln 2 in
// [-ln2/2, ln2/2], e^r by its degree-6 Taylor polynomial
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // below: 0 after rounding anyway
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts: exact k * high
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}

// 16 consecutive bf16 as float32 lanes (exact: a bf16 is the top half of a float32)
inline __m512 load_bf16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// [sum(v[0]), ..., sum(v[15])]: 16 horizontal sums at once (about 3 shuffles and adds per vector, where 16
// separate reductions cost about 8 each)
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's partial sums of v[4i .. 4i+3]
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xDD));
}

}  // namespace swiftkv_math
#endif
