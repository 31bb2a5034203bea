// The bf16 tile layout both CPU attention kernels compute on with AVX512-BF16 (prefill_attention_cpu.cpp, and
// paged_attention_cpu.cpp on a tiled cache), and the building blocks over it.
//
// A tile holds 16 consecutive keys of one KV head as 32-bit words, each a pair of bf16 that `vdpbf16ps`
// multiplies and adds in one step (exact products, float32 sums), so no product needs a shuffle or a conversion:
//   K tile: [head_dim / 2][16] words, word (p, j) = key j's dimensions 2p and 2p + 1 (a vector: 16 keys' pair p);
//   V tile: [8][head_dim] words, word (jp, d) = dimension d of keys 2jp and 2jp + 1 (a vector: 16 dimensions).
// Either is 16 x head_dim bf16, the size of 16 cache slots, which is how a tiled cache stores them
// (`paged_attention_cpu.tile_cache` is the reference for the layout).
#pragma once

#if defined(__AVX512BF16__)
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_common.h"

namespace swiftkv_tiles {

using swiftkv_common::slot_of;
using swiftkv_math::exp_nonpositive;
using swiftkv_math::load_bf16;

constexpr int64_t kTile = 16;      // keys per tile
constexpr int64_t kKeyBlock = 64;  // keys per step of the online softmax: 4 tiles, 4 vectors of 16 scores
constexpr int kRows = 6;           // query rows held in registers at once (24 accumulators)

inline uint32_t pair_at(const at::BFloat16* p) {  // two consecutive bf16 as one 32-bit word
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return bits;
}

// scores[r][0..63] = scale * q_r . key (16c + j) for R rows over the key block's 4 K tiles; queries: each
// row's head_dim as `pairs` words
template <int R>
inline void score_block(const uint32_t* const* queries, const uint32_t* const* key_tiles, int64_t pairs,
                        float scale, float* scores) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh k[4];
    for (int c = 0; c < 4; ++c) k[c] = (__m512bh)_mm512_loadu_si512(key_tiles[c] + p * kTile);
    for (int r = 0; r < R; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(queries[r][p]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], k[c], q);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(scores + r * kKeyBlock + 16 * c, _mm512_mul_ps(acc[r][c], s));
}

// out[r][d0..d0+16C) = out * correction[r] + probabilities[r] . values for R rows over the key block's 4 V
// tiles; probabilities: [64] bf16 per row; out rows `dim` apart
template <int C, int R>
inline void add_values(const uint32_t* const* value_tiles, int64_t dim, int64_t d0, const at::BFloat16* probabilities,
                       const float* correction, float* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(out + r * dim + d0 + 16 * c), _mm512_set1_ps(correction[r]));
  for (int t = 0; t < 4; ++t) {
    for (int64_t jp = 0; jp < kTile / 2; ++jp) {
      __m512bh v[C];
      for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(value_tiles[t] + jp * dim + d0 + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(
            static_cast<int32_t>(pair_at(probabilities + r * kKeyBlock + t * kTile + 2 * jp)));
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], w);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * dim + d0 + 16 * c, acc[r][c]);
}

// score_block / add_values for 1..R rows (R a compile-time bound)
template <int R>
inline void score_rows(int rows, const uint32_t* const* queries, const uint32_t* const* key_tiles, int64_t pairs,
                       float scale, float* scores) {
  if (rows == R) return score_block<R>(queries, key_tiles, pairs, scale, scores);
  if constexpr (R > 1) score_rows<R - 1>(rows, queries, key_tiles, pairs, scale, scores);
}

template <int C, int R>
inline void value_rows(int rows, const uint32_t* const* value_tiles, int64_t dim, int64_t d0,
                       const at::BFloat16* probabilities, const float* correction, float* out) {
  if (rows == R) return add_values<C, R>(value_tiles, dim, d0, probabilities, correction, out);
  if constexpr (R > 1) value_rows<C, R - 1>(rows, value_tiles, dim, d0, probabilities, correction, out);
}

// All rows' values over one key block: every 64 (then 32) dimensions, kRows rows at a time
inline void add_block_values(int64_t rows, const uint32_t* const* value_tiles, int64_t dim,
                             const at::BFloat16* probabilities, const float* correction, float* out) {
  for (int64_t r = 0; r < rows; r += kRows) {
    const int count = static_cast<int>(std::min<int64_t>(kRows, rows - r));
    int64_t d0 = 0;
    for (; d0 + 64 <= dim; d0 += 64)
      value_rows<4, kRows>(count, value_tiles, dim, d0, probabilities + r * kKeyBlock, correction + r, out + r * dim);
    if (d0 < dim)  // dim % 64 == 32
      value_rows<2, kRows>(count, value_tiles, dim, d0, probabilities + r * kKeyBlock, correction + r, out + r * dim);
  }
}

// One row's online-softmax step over a key block: its 64 scores `s` (keys outside `visible` ignored) update the
// running maximum `best` and sum `total`; writes the block's probabilities `p` (bf16, rounded as PyTorch's bf16
// attention rounds them) and the factor `correction` that rescales what was accumulated before
inline void softmax_block(const float* s, const __mmask16* visible, float& best, float& total, float& correction,
                          at::BFloat16* p) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < 4; ++c) top = _mm512_mask_max_ps(top, visible[c], top, _mm512_loadu_ps(s + 16 * c));
  const float block_top = _mm512_reduce_max_ps(top);
  if (block_top == -std::numeric_limits<float>::infinity()) {  // the row sees none of these keys
    correction = 1.f;
    std::fill(p, p + kKeyBlock, at::BFloat16(0.f));
    return;
  }
  const float updated = std::max(best, block_top);
  correction = best == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(best - updated);
  best = updated;
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    const __m512 e = _mm512_maskz_mov_ps(
        visible[c], exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c), _mm512_set1_ps(updated))));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
  }
  total = total * correction + _mm512_reduce_add_ps(sum);
}

// An int8 cache holds codes in the same tiles, with a bf16 scale per slot and KV head (value = code * scale);
// decode rows multiply them in integers (int8_tiles.h), the prompt kernel widens each tile once.
// 16 consecutive codes as float32 lanes
inline __m512 load_codes(const int8_t* codes) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
}

// An int8 tile (K: values = false, V: true) dequantized into bf16 words (code * its key's scale, rounded once):
// what the prompt kernel packs once per call, where a block's keys serve many query rows. scale: the tile's 16
// keys' scales, 0 for keys past the prompt (their values come out 0)
inline void dequantize_tile(const int8_t* codes, const float* scale, bool values, int64_t dim, uint32_t* words) {
  alignas(64) float pattern[3][16];  // K: keys 0-7 / 8-15, each twice; V: set per pair of keys below
  for (int i = 0; i < 16; ++i) {
    pattern[0][i] = scale[i / 2];
    pattern[1][i] = scale[8 + i / 2];
  }
  auto widen = [](const int8_t* c, __m512 s) { return _mm512_mul_ps(load_codes(c), s); };
  if (!values) {  // [dim / 2][16 keys][2]: 32 codes per pair of dimensions, keys 0-7 then 8-15
    const __m512 low = _mm512_load_ps(pattern[0]), high = _mm512_load_ps(pattern[1]);
    for (int64_t p = 0; p < dim / 2; ++p)
      _mm512_storeu_si512(words + p * 16,
                          (__m512i)_mm512_cvtne2ps_pbh(widen(codes + p * 32 + 16, high), widen(codes + p * 32, low)));
    return;
  }
  for (int64_t jp = 0; jp < 8; ++jp) {  // [8 pairs of keys][dim][2]: keys 2jp and 2jp + 1 alternate
    for (int i = 0; i < 16; ++i) pattern[2][i] = scale[2 * jp + i % 2];
    const __m512 pair = _mm512_load_ps(pattern[2]);
    for (int64_t d = 0; d < dim; d += 16) {
      const int8_t* c = codes + jp * 2 * dim + 2 * d;
      _mm512_storeu_si512(words + jp * dim + d, (__m512i)_mm512_cvtne2ps_pbh(widen(c + 16, pair), widen(c, pair)));
    }
  }
}

// The K and V tiles of the 64-key block at k0 in a tiled cache (k, v: one KV head's slots of any element type,
// bf16 or int8 codes; tiles as `Tile` pointers), found through the sequence's block table; tiles at or past
// `keys` are `zeros`
template <typename Cache, typename Tile>
inline void cache_tiles(const Cache* k, const Cache* v, const int32_t* table, int64_t block_size, int64_t dim,
                        int64_t k0, int64_t keys, const Tile* zeros, const Tile** key_tiles, const Tile** value_tiles) {
  for (int c = 0; c < 4; ++c) {
    const int64_t key = k0 + kTile * c;
    if (key >= keys) {
      key_tiles[c] = value_tiles[c] = zeros;
      continue;
    }
    const int64_t slot = slot_of(table, key, block_size);
    key_tiles[c] = reinterpret_cast<const Tile*>(k + slot * dim);
    value_tiles[c] = reinterpret_cast<const Tile*>(v + slot * dim);
  }
}

// visible[c]: which of tile c's keys a row sees when it sees `count` keys of the block (0..64)
inline void visible_lanes(int64_t count, __mmask16* visible) {
  for (int c = 0; c < 4; ++c) {
    const int64_t lanes = std::clamp<int64_t>(count - 16 * c, 0, 16);
    visible[c] = static_cast<__mmask16>((1u << lanes) - 1);
  }
}

}  // namespace swiftkv_tiles
#endif
