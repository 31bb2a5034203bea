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

// A 7-bit cache (`int7`, bytes) holds code + 64 for codes in [-63, 63], in the same tile order as bf16, with a
// bf16 scale per slot and KV head (value = code * scale). The bf16 with bits 0x4300 | byte is 128 + byte =
// code + 192, exactly, so one zero-extension and one OR turn 32 bytes into the 16 words `vdpbf16ps` reads, and
// the constant comes out as one correction per row: q . (code + 192) - 192 * sum(q).
constexpr float kWidenedOffset = 192.f;
using swiftkv_common::kCodeOffset;

// The 16 words (32 bf16) at word i of a tile: stored bf16, or 7-bit codes widened in registers
inline __m512bh words_at(const uint32_t* words, int64_t i) { return (__m512bh)_mm512_loadu_si512(words + i); }
inline __m512bh words_at(const uint8_t* codes, int64_t i) {
  const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 2 * i)));
  return (__m512bh)_mm512_or_si512(wide, _mm512_set1_epi16(0x4300));
}

// scores[r][0..63] = scale * q_r . key (16c + j) for R rows over the key block's 4 K tiles (bf16 words, or
// 7-bit codes read as code + 192); queries: each row's head_dim as `pairs` words
template <int R, typename W>
inline void score_block(const uint32_t* const* queries, const W* const* key_tiles, int64_t pairs, float scale,
                        float* scores) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh k[4];
    for (int c = 0; c < 4; ++c) k[c] = words_at(key_tiles[c], p * kTile);
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
template <int C, int R, typename W>
inline void add_values(const W* const* value_tiles, int64_t dim, int64_t d0, const at::BFloat16* probabilities,
                       const float* correction, float* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(out + r * dim + d0 + 16 * c), _mm512_set1_ps(correction[r]));
  for (int t = 0; t < 4; ++t) {
    for (int64_t jp = 0; jp < kTile / 2; ++jp) {
      __m512bh v[C];
      for (int c = 0; c < C; ++c) v[c] = words_at(value_tiles[t], jp * dim + d0 + 16 * c);
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
template <int R, typename W>
inline void score_rows(int rows, const uint32_t* const* queries, const W* const* key_tiles, int64_t pairs,
                       float scale, float* scores) {
  if (rows == R) return score_block<R>(queries, key_tiles, pairs, scale, scores);
  if constexpr (R > 1) score_rows<R - 1>(rows, queries, key_tiles, pairs, scale, scores);
}

template <int C, int R, typename W>
inline void value_rows(int rows, const W* const* value_tiles, int64_t dim, int64_t d0,
                       const at::BFloat16* probabilities, const float* correction, float* out) {
  if (rows == R) return add_values<C, R>(value_tiles, dim, d0, probabilities, correction, out);
  if constexpr (R > 1) value_rows<C, R - 1>(rows, value_tiles, dim, d0, probabilities, correction, out);
}

// All rows' values over one key block: every 64 (then 32) dimensions, kRows rows at a time
template <typename W>
inline void add_block_values(int64_t rows, const W* const* value_tiles, int64_t dim,
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

// An 8-bit cache holds codes in the same tiles as bf16, with a bf16 scale per slot and KV head (value = code *
// scale): int8 codes, or a 7-bit cache's bytes (code + 64, above). 16 consecutive codes as float32 lanes:
inline __m512 load_codes(const int8_t* codes) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
}
inline __m512 load_codes(const uint8_t* codes) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(bytes, _mm512_set1_epi32(kCodeOffset)));
}

// n int8 codes -> the same n values as bf16 words (exact: |code| <= 127)
inline void widen_codes(const int8_t* codes, uint32_t* words, int64_t n) {
  for (int64_t i = 0; i < n; i += 32)
    _mm512_storeu_si512(words + i / 2, (__m512i)_mm512_cvtne2ps_pbh(load_codes(codes + i + 16), load_codes(codes + i)));
}

// An 8-bit tile (K: values = false, V: true) dequantized into bf16 words (code * its key's scale, rounded once):
// what the prompt kernel packs once per call, where a block's keys serve many query rows. scale: the tile's 16
// keys' scales, 0 for keys past the prompt (their values come out 0)
template <typename Code>
inline void dequantize_tile(const Code* codes, const float* scale, bool values, int64_t dim, uint32_t* words) {
  alignas(64) float pattern[3][16];  // K: keys 0-7 / 8-15, each twice; V: set per pair of keys below
  for (int i = 0; i < 16; ++i) {
    pattern[0][i] = scale[i / 2];
    pattern[1][i] = scale[8 + i / 2];
  }
  auto widen = [](const Code* c, __m512 s) { return _mm512_mul_ps(load_codes(c), s); };
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
      const Code* c = codes + jp * 2 * dim + 2 * d;
      _mm512_storeu_si512(words + jp * dim + d, (__m512i)_mm512_cvtne2ps_pbh(widen(c + 16, pair), widen(c, pair)));
    }
  }
}

// The K and V tiles of the 64-key block at k0 in a tiled cache (k, v: one KV head's slots, bf16 or 8-bit codes),
// found through the sequence's block table, as tile pointers of type W; tiles at or past `keys` are `zeros`
template <typename Stored, typename W>
inline void cache_tiles(const Stored* k, const Stored* v, const int32_t* table, int64_t block_size, int64_t dim,
                        int64_t k0, int64_t keys, const W* zeros, const W** key_tiles, const W** value_tiles) {
  for (int c = 0; c < 4; ++c) {
    const int64_t key = k0 + kTile * c;
    if (key >= keys) {
      key_tiles[c] = value_tiles[c] = zeros;
      continue;
    }
    const int64_t slot = slot_of(table, key, block_size);
    key_tiles[c] = reinterpret_cast<const W*>(k + slot * dim);
    value_tiles[c] = reinterpret_cast<const W*>(v + slot * dim);
  }
}

// The scales of the 64-key block at k0 of an 8-bit cache (k_scales, v_scales: one KV head's [slots]); 0 past `keys`
inline void tile_scales(const at::BFloat16* k_scales, const at::BFloat16* v_scales, const int32_t* table,
                        int64_t block_size, int64_t k0, int64_t keys, float* key_scale, float* value_scale) {
  for (int c = 0; c < 4; ++c) {
    const int64_t key = k0 + kTile * c;
    const bool seen = key < keys;
    const int64_t slot = seen ? slot_of(table, key, block_size) : 0;
    _mm512_storeu_ps(key_scale + kTile * c, seen ? load_bf16(k_scales + slot) : _mm512_setzero_ps());
    _mm512_storeu_ps(value_scale + kTile * c, seen ? load_bf16(v_scales + slot) : _mm512_setzero_ps());
  }
}

// An int8 block's tiles widened into `widened` (4 K then 4 V tiles of 8 * head_dim words, from `cache_tiles`'
// code pointers, `zeros` standing for tiles past the last key)
inline void widen_tiles(const int8_t* const* key_codes, const int8_t* const* value_codes, const int8_t* zero_codes,
                        int64_t dim, const uint32_t* zeros, uint32_t* widened, const uint32_t** key_tiles,
                        const uint32_t** value_tiles) {
  for (int c = 0; c < 4; ++c) {
    if (key_codes[c] == zero_codes) {
      key_tiles[c] = value_tiles[c] = zeros;
      continue;
    }
    uint32_t* key_words = widened + c * 8 * dim;
    uint32_t* value_words = widened + (4 + c) * 8 * dim;
    widen_codes(key_codes[c], key_words, kTile * dim);
    widen_codes(value_codes[c], value_words, kTile * dim);
    key_tiles[c] = key_words;
    value_tiles[c] = value_words;
  }
}

// q . (codes * key scale) = (q . codes) * key scale: rows x 64 scores. offsets (7-bit codes, else nullptr): what
// each row's scores carry from reading code + 192 (scale * 192 * sum(q)), taken off first
inline void scale_scores(float* scores, int64_t rows, const float* key_scale, const float* offsets) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 offset = _mm512_set1_ps(offsets ? offsets[r] : 0.f);
    for (int c = 0; c < 4; ++c) {
      float* s = scores + r * kKeyBlock + 16 * c;
      _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s), offset), _mm512_loadu_ps(key_scale + 16 * c)));
    }
  }
}

// p . (codes * value scale) = (p * value scale) . codes: rows x 64 bf16 probabilities, rounded again; with
// `sums` (7-bit codes), each row's sum of the rounded probabilities, the weight of the 192 its values carry
inline void scale_probabilities(at::BFloat16* probabilities, int64_t rows, const float* value_scale, float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      at::BFloat16* p = probabilities + r * kKeyBlock + 16 * c;
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16(p), _mm512_loadu_ps(value_scale + 16 * c)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)rounded);
      if (sums) sum = _mm512_add_ps(sum, load_bf16(p));
    }
    if (sums) sums[r] = _mm512_reduce_add_ps(sum);
  }
}

// out[r] -= 192 * sums[r] over head_dim: a 7-bit block's values, read as code + 192, back to code
inline void remove_value_offsets(float* out, int64_t rows, int64_t dim, const float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 offset = _mm512_set1_ps(kWidenedOffset * sums[r]);
    for (int64_t d = 0; d < dim; d += 16)
      _mm512_storeu_ps(out + r * dim + d, _mm512_sub_ps(_mm512_loadu_ps(out + r * dim + d), offset));
  }
}

// sum(q) over a bf16 row of `dim` (a multiple of 16), in float32
inline float row_sum(const at::BFloat16* q, int64_t dim) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) sum = _mm512_add_ps(sum, load_bf16(q + d));
  return _mm512_reduce_add_ps(sum);
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
