// Decode rows over an int8 cache in integer arithmetic. The cache holds int8 codes in the bf16 tiles' places
// (bf16_tiles.h) with a bf16 scale per slot and KV head (value = code * scale). AVX512-VNNI's `vpdpwssd`
// multiplies 32 int16 pairs and adds each pair's sum into 16 int32 lanes, and a tile's codes are already in its
// pair order: one `vpmovsxbw` widens 32 codes into its operand. The other operand is quantized to int16 with
// one scale per row: each query row's head_dim for the scores, each row's block of probabilities times the
// value scales for the values. 15 bits per operand, finer than the bf16 the bf16 path multiplies in (8 bits);
// against widening the codes to bf16 (four conversions per 16 codes, then a store and a load), a row costs
// about half the instructions. Sums stay exact: 32767 x 127 x 512 < 2^31 (a lane adds head_dim or 64 products).
#pragma once

#if defined(__AVX512BF16__)
#if !defined(__AVX512VNNI__)
#error "AVX512-BF16 without AVX512-VNNI: no x86 CPU has one without the other"
#endif
#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>

#include "bf16_tiles.h"

namespace swiftkv_int8_tiles {

using swiftkv_common::slot_of;
using swiftkv_math::load_bf16;
using swiftkv_tiles::kKeyBlock;
using swiftkv_tiles::kTile;

constexpr float kInt16Max = 32767.f;

// 16 floats -> 16 int16 at `inverse` (round to nearest)
inline __m256i to_int16(__m512 x, __m512 inverse) {
  return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x, inverse)));
}

// n (a multiple of 16) floats `x` as int16 `codes` times the returned scale (max |x| / 32767; 0 for all zeros)
inline float quantize_int16(const float* x, int64_t n, int16_t* codes) {
  __m512 top = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float largest = _mm512_reduce_max_ps(top);
  const __m512 inverse = _mm512_set1_ps(largest > 0.f ? kInt16Max / largest : 0.f);
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), to_int16(_mm512_loadu_ps(x + i), inverse));
  return largest / kInt16Max;
}

// A bf16 query row (head_dim a multiple of 16) as int16 codes, through `row` (head_dim floats); returns their scale
inline float quantize_query(const at::BFloat16* query, int64_t dim, float* row, int16_t* codes) {
  for (int64_t i = 0; i < dim; i += 16) _mm512_storeu_ps(row + i, load_bf16(query + i));
  return quantize_int16(row, dim, codes);
}

// Each row's 64 probabilities times their keys' value scales, as int16 codes (`codes` [rows][64]) and a scale per
// row (`scales`): p . (codes * value scale) = (p * value scale) . codes
inline void quantize_probabilities(const at::BFloat16* probabilities, int64_t rows, const float* value_scale,
                                   int16_t* codes, float* scales) {
  alignas(64) float weighted[kKeyBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < 4; ++c)
      _mm512_storeu_ps(weighted + 16 * c, _mm512_mul_ps(load_bf16(probabilities + r * kKeyBlock + 16 * c),
                                                        _mm512_loadu_ps(value_scale + 16 * c)));
    scales[r] = quantize_int16(weighted, kKeyBlock, codes + r * kKeyBlock);
  }
}

// 16 codes' pairs as 16 int32 lanes of two int16: a K tile's pair of dimensions of 16 keys, or a V tile's 16
// dimensions of a pair of keys
inline __m512i widen_pairs(const int8_t* codes) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
}

// scores[r][0..63] = row_scale[r] * key_scale[key] * (query codes_r . key codes) over the key block's 4 K tiles
// (`[head_dim / 2][16 keys][2]` codes); queries: each row's int16 codes, read as `pairs` words
template <int R>
inline void score_codes(const uint32_t* const* queries, const int8_t* const* key_tiles, int64_t pairs,
                        const float* row_scale, const float* key_scale, float* scores) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i k[4];
    for (int c = 0; c < 4; ++c) k[c] = widen_pairs(key_tiles[c] + p * 2 * kTile);
    for (int r = 0; r < R; ++r) {
      const __m512i q = _mm512_set1_epi32(static_cast<int32_t>(queries[r][p]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], k[c], q);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), _mm512_set1_ps(row_scale[r]));
      _mm512_storeu_ps(scores + r * kKeyBlock + 16 * c, _mm512_mul_ps(scaled, _mm512_loadu_ps(key_scale + 16 * c)));
    }
}

// out[r][d0..d0+16C) = out * correction[r] + prob_scale[r] * (probability codes_r . value codes) over the key
// block's 4 V tiles (`[8 pairs of keys][head_dim][2]` codes); probabilities: [64] int16 per row, read as words
template <int C, int R>
inline void add_value_codes(const int8_t* const* value_tiles, int64_t dim, int64_t d0, const uint32_t* probabilities,
                            const float* prob_scale, const float* correction, float* out) {
  __m512i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int t = 0; t < 4; ++t) {
    for (int64_t jp = 0; jp < kTile / 2; ++jp) {
      __m512i v[C];
      for (int c = 0; c < C; ++c) v[c] = widen_pairs(value_tiles[t] + 2 * (jp * dim + d0 + 16 * c));
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_set1_epi32(static_cast<int32_t>(probabilities[r * kKeyBlock / 2 + t * kTile / 2 + jp]));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], v[c], w);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float* o = out + r * dim + d0 + 16 * c;
      const __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), _mm512_set1_ps(prob_scale[r]));
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(correction[r]), sum));
    }
}

// score_codes / add_value_codes for 1..R rows (R a compile-time bound)
template <int R>
inline void score_code_rows(int rows, const uint32_t* const* queries, const int8_t* const* key_tiles, int64_t pairs,
                            const float* row_scale, const float* key_scale, float* scores) {
  if (rows == R) return score_codes<R>(queries, key_tiles, pairs, row_scale, key_scale, scores);
  if constexpr (R > 1) score_code_rows<R - 1>(rows, queries, key_tiles, pairs, row_scale, key_scale, scores);
}

template <int C, int R>
inline void value_code_rows(int rows, const int8_t* const* value_tiles, int64_t dim, int64_t d0,
                            const uint32_t* probabilities, const float* prob_scale, const float* correction,
                            float* out) {
  if (rows == R) return add_value_codes<C, R>(value_tiles, dim, d0, probabilities, prob_scale, correction, out);
  if constexpr (R > 1)
    value_code_rows<C, R - 1>(rows, value_tiles, dim, d0, probabilities, prob_scale, correction, out);
}

// All rows' scores over one key block, kRows rows at a time
inline void score_block_codes(int64_t rows, const uint32_t* const* queries, const int8_t* const* key_tiles,
                              int64_t pairs, const float* row_scale, const float* key_scale, float* scores) {
  using swiftkv_tiles::kRows;
  for (int64_t r = 0; r < rows; r += kRows)
    score_code_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, rows - r)), queries + r, key_tiles, pairs,
                           row_scale + r, key_scale, scores + r * kKeyBlock);
}

// All rows' values over one key block: every 64 (then 32) dimensions, kRows rows at a time
inline void add_block_value_codes(int64_t rows, const int8_t* const* value_tiles, int64_t dim,
                                  const int16_t* probabilities, const float* prob_scale, const float* correction,
                                  float* out) {
  using swiftkv_tiles::kRows;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(probabilities);
  for (int64_t r = 0; r < rows; r += kRows) {
    const int count = static_cast<int>(std::min<int64_t>(kRows, rows - r));
    const uint32_t* p = words + r * kKeyBlock / 2;
    int64_t d0 = 0;
    for (; d0 + 64 <= dim; d0 += 64)
      value_code_rows<4, kRows>(count, value_tiles, dim, d0, p, prob_scale + r, correction + r, out + r * dim);
    if (d0 < dim)  // dim % 64 == 32
      value_code_rows<2, kRows>(count, value_tiles, dim, d0, p, prob_scale + r, correction + r, out + r * dim);
  }
}

// cache_tiles for an int8 cache (k_scales, v_scales: the KV head's [slots] scales), with the tiles' keys' scales
// (0 past `keys`, whose tiles are `zeros`)
inline void code_tiles(const int8_t* k, const int8_t* v, const at::BFloat16* k_scales, const at::BFloat16* v_scales,
                       const int32_t* table, int64_t block_size, int64_t dim, int64_t k0, int64_t keys,
                       const int8_t* zeros, const int8_t** key_tiles, const int8_t** value_tiles, float* key_scale,
                       float* value_scale) {
  swiftkv_tiles::cache_tiles(k, v, table, block_size, dim, k0, keys, zeros, key_tiles, value_tiles);
  for (int c = 0; c < 4; ++c) {
    const int64_t key = k0 + kTile * c;
    const bool past = key >= keys;
    const int64_t slot = past ? 0 : slot_of(table, key, block_size);
    _mm512_storeu_ps(key_scale + kTile * c, past ? _mm512_setzero_ps() : load_bf16(k_scales + slot));
    _mm512_storeu_ps(value_scale + kTile * c, past ? _mm512_setzero_ps() : load_bf16(v_scales + slot));
  }
}

}  // namespace swiftkv_int8_tiles
#endif
