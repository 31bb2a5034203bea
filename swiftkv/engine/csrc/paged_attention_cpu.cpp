// Decode attention straight from the paged KV cache on a CPU, and the KV-cache write of a compiled decode step
// (swiftkv/engine/paged_attention_cpu.py).
//
// One query token per row attends to the first key_counts[row] keys of its sequence, found through its block
// table; the cache is head-major, [kv_heads, slots, head_dim], so each block of a head is one contiguous
// [block_size, head_dim] run. Work is split over (row, KV head, share of the keys) so that one long row still
// keeps every thread busy: each task scores its keys for the query heads that share the KV head (so K and V
// are read once per group, not once per query head), then the shares are merged by their log-sum-exp
// (flash-decoding). Arithmetic is float32: AVX-512 intrinsics where the build machine has them (-march=native),
// plain loops otherwise. A bf16 cache stored as tiles (bf16_tiles.h, the engine's layout where the CPU has
// AVX512-BF16) is read by decode_tiled, with the prompt kernel's building blocks and no per-key transposes or
// unpacks. docs/engine-decode.md has the design and its measurements.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_common.h"
#include "bf16_tiles.h"
#include "int8_tiles.h"

namespace {

#if defined(__AVX512F__)
using swiftkv_math::exp_nonpositive;
using swiftkv_math::sum16;
#endif

constexpr int64_t kLanes = 16;

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

#if defined(__AVX512F__)
// 16 consecutive values as float32 lanes
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return swiftkv_math::load_bf16(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif


// scores[g * stride + j] = q[g] . key j, for `run` keys `slot_stride` apart and the group's query heads
// (q: float and scaled, rows of `padded`; q_raw: the same rows as stored, unscaled, rows of `dim`)
template <typename T>
inline void score_run(const float* q, const T* q_raw, float scale, int64_t group, int64_t padded, int64_t dim,
                      const T* keys, int64_t slot_stride, int64_t run, float* scores, int64_t stride) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  // bf16 keys and queries: dot products by pairs straight from the stored bf16 (vdpbf16ps: products exact,
  // float32 sums), no conversion; the scale applies to the sums
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (dim % (2 * kLanes) == 0) {
      for (; j + kLanes <= run; j += kLanes) {
        for (int64_t g = 0; g < group; ++g) {
          __m512 sums[kLanes];
          for (int64_t key = 0; key < kLanes; ++key) {
            const T* k = keys + (j + key) * slot_stride;
            __m512 sum = _mm512_setzero_ps();
            for (int64_t i = 0; i < dim; i += 2 * kLanes)
              sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(q_raw + g * dim + i),
                                     (__m512bh)_mm512_loadu_si512(k + i));
            sums[key] = sum;
          }
          _mm512_storeu_ps(scores + g * stride + j, _mm512_mul_ps(sum16(sums), _mm512_set1_ps(scale)));
        }
      }
    }
  }
#endif
#if defined(__AVX512F__)
  if (dim % kLanes == 0) {
    for (; j + kLanes <= run; j += kLanes) {
      for (int64_t g = 0; g < group; ++g) {
        __m512 sums[kLanes];
        for (int64_t key = 0; key < kLanes; ++key) {
          const T* k = keys + (j + key) * slot_stride;
          __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(q + g * padded), load16(k));
          for (int64_t i = kLanes; i < dim; i += kLanes)
            sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * padded + i), load16(k + i), sum);
          sums[key] = sum;
        }
        _mm512_storeu_ps(scores + g * stride + j, sum16(sums));
      }
    }
  }
#endif
  for (; j < run; ++j) {
    const T* k = keys + j * slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      float sum = 0.f;
      for (int64_t i = 0; i < dim; ++i) sum += q[g * padded + i] * to_float(k[i]);
      scores[g * stride + j] = sum;
    }
  }
}

// acc[g] += weights[g * stride + j] * value j, for `run` values `slot_stride` apart and the group's query heads
// (acc: float, rows of `padded`)
template <typename T>
inline void value_run(float* acc, int64_t group, int64_t padded, int64_t dim, const T* values,
                      int64_t slot_stride, int64_t run, const float* weights, int64_t stride) {
#if defined(__AVX512F__)
  if (dim % kLanes == 0) {
    constexpr int64_t kHeads = 4;  // accumulators held in registers at once
    for (int64_t i = 0; i < dim; i += kLanes) {
      for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
        const int64_t heads = std::min(kHeads, group - g0);
        __m512 sums[kHeads];
        for (int64_t g = 0; g < heads; ++g) sums[g] = _mm512_loadu_ps(acc + (g0 + g) * padded + i);
        for (int64_t j = 0; j < run; ++j) {
          const __m512 v = load16(values + j * slot_stride + i);
          for (int64_t g = 0; g < heads; ++g)
            sums[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[(g0 + g) * stride + j]), v, sums[g]);
        }
        for (int64_t g = 0; g < heads; ++g) _mm512_storeu_ps(acc + (g0 + g) * padded + i, sums[g]);
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < run; ++j) {
    const T* v = values + j * slot_stride;
    for (int64_t i = 0; i < dim; ++i) {
      const float value = to_float(v[i]);
      for (int64_t g = 0; g < group; ++g) acc[g * padded + i] += weights[g * stride + j] * value;
    }
  }
}

// s[t] = e^(s[t] - top) for n scores; returns their sum
inline float exp_shifted(float* s, int64_t n, float top) {
  int64_t t = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 sums = _mm512_setzero_ps();
  for (; t + kLanes <= n; t += kLanes) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(top)));
    _mm512_storeu_ps(s + t, e);
    sums = _mm512_add_ps(sums, e);
  }
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - top);
    sum += s[t];
  }
  return sum;
}

#if defined(__AVX512BF16__)
// bf16 values: acc += weights . values by pairs of keys (vdpbf16ps), the weights rounded to bf16 as PyTorch's
// bf16 attention rounds its probabilities. Two keys' rows interleaved by 16-bit unpacks give, per 128-bit lane
// l of a 32-value chunk at i, values i + 8l + {0..3} (low unpack) and i + 8l + {4..7} (high unpack): acc is kept
// in that order while the task runs (see unpermute_values), so no shuffle is spent per key.
inline void value_run_bf16(float* acc, int64_t group, int64_t padded, int64_t dim, const at::BFloat16* values,
                           int64_t slot_stride, int64_t run, const at::BFloat16* weights, int64_t stride) {
  constexpr int64_t kHeads = 4;  // 2 accumulators per head held in registers at once
  auto pair = [&](int64_t g, int64_t j, bool both) {  // weights of keys j, j + 1 as one bf16x2, broadcast
    uint32_t bits = weights[g * stride + j].x;
    if (both) bits |= static_cast<uint32_t>(weights[g * stride + j + 1].x) << 16;
    return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(bits));
  };
  for (int64_t i = 0; i < dim; i += 2 * kLanes) {
    for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
      const int64_t heads = std::min(kHeads, group - g0);
      __m512 low[kHeads], high[kHeads];
      for (int64_t g = 0; g < heads; ++g) {
        low[g] = _mm512_loadu_ps(acc + (g0 + g) * padded + i);
        high[g] = _mm512_loadu_ps(acc + (g0 + g) * padded + i + kLanes);
      }
      for (int64_t j = 0; j < run; j += 2) {
        const bool both = j + 1 < run;
        const __m512i a = _mm512_loadu_si512(values + j * slot_stride + i);
        const __m512i b = both ? _mm512_loadu_si512(values + (j + 1) * slot_stride + i) : _mm512_setzero_si512();
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b), hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int64_t g = 0; g < heads; ++g) {
          const __m512bh w = pair(g0 + g, j, both);
          low[g] = _mm512_dpbf16_ps(low[g], lo, w);
          high[g] = _mm512_dpbf16_ps(high[g], hi, w);
        }
      }
      for (int64_t g = 0; g < heads; ++g) {
        _mm512_storeu_ps(acc + (g0 + g) * padded + i, low[g]);
        _mm512_storeu_ps(acc + (g0 + g) * padded + i + kLanes, high[g]);
      }
    }
  }
}

// acc rows from value_run_bf16's order back to value order
inline void unpermute_values(float* acc, int64_t group, int64_t padded, int64_t dim) {
  float chunk[2 * kLanes];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < dim; i += 2 * kLanes) {
      float* a = acc + g * padded + i;
      for (int64_t lane = 0; lane < 4; ++lane)
        for (int64_t k = 0; k < 4; ++k) {
          chunk[8 * lane + k] = a[4 * lane + k];
          chunk[8 * lane + 4 + k] = a[kLanes + 4 * lane + k];
        }
      std::copy(chunk, chunk + 2 * kLanes, a);
    }
}

// n float weights -> bf16, rounded to nearest even
inline void to_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + t)));
  for (; t < n; ++t) dst[t] = static_cast<at::BFloat16>(src[t]);
}
#endif

// Shares per (row, KV head): enough tasks for 4 per thread, none shorter than kMinShare keys.
constexpr int64_t kMinShare = 256;
inline int64_t key_splits(int64_t row_heads, int64_t longest) {
  const int64_t wanted = (4 * at::get_num_threads() + row_heads - 1) / row_heads;
  return std::max<int64_t>(1, std::min(wanted, longest / kMinShare));
}

// A task's share of its row's keys, [first, last) (shares a multiple of `align` keys), with its accumulators
// reset: the unnormalised output [group][width], running maximum and sum [group]; tasks are (row, KV head, share)
struct Share {
  int64_t row, kv, first, last;
  float *acc, *best, *total;
};
inline Share start_share(int64_t task, int64_t kv_heads, int64_t splits, const int32_t* counts, int64_t align,
                         int64_t group, int64_t width, std::vector<float>& partial, std::vector<float>& best,
                         std::vector<float>& total) {
  const int64_t row = task / (kv_heads * splits), keys = counts[row];
  const int64_t share = ((keys + splits - 1) / splits + align - 1) / align * align;
  const int64_t first = task % splits * share;
  Share s{row, task / splits % kv_heads, first, std::min(keys, first + share), &partial[task * group * width],
          &best[task * group], &total[task * group]};
  std::fill(s.acc, s.acc + group * width, 0.f);
  std::fill(s.best, s.best + group, -std::numeric_limits<float>::infinity());
  std::fill(s.total, s.total + group, 0.f);
  return s;
}

// out[row, head] = the row's shares of keys merged by their log-sum-exp: partial [task][group][padded]
// (unnormalised outputs), best / total [task][group] (running maximum and sum), tasks ordered (row, KV head, share)
template <typename T>
void merge_shares(const std::vector<float>& partial, const std::vector<float>& best, const std::vector<float>& total,
                  int64_t splits, int64_t group, int64_t padded, torch::Tensor& out) {
  const int64_t rows = out.size(0), heads = out.size(1), dim = out.size(2), kv_heads = heads / group;
  T* o = out.data_ptr<T>();
  const int64_t o_row = out.stride(0), o_head = out.stride(1);
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dim);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t row = index / heads, head = index % heads, kv = head / group, g = head % group;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t split = 0; split < splits; ++split)
        top = std::max(top, best[((row * kv_heads + kv) * splits + split) * group + g]);
      float sum = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t split = 0; split < splits; ++split) {
        const int64_t task = (row * kv_heads + kv) * splits + split;
        if (total[task * group + g] == 0.f) continue;  // an empty share
        const float weight = std::exp(best[task * group + g] - top);
        sum += weight * total[task * group + g];
        const float* a = &partial[(task * group + g) * padded];
        for (int64_t i = 0; i < dim; ++i) merged[i] += weight * a[i];
      }
      T* target = o + row * o_row + head * o_head;
      for (int64_t i = 0; i < dim; ++i) target[i] = static_cast<T>(merged[i] / sum);
    }
  });
}

template <typename T>
void decode(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& block_tables, const torch::Tensor& key_counts, torch::Tensor& out,
            int64_t block_size, double scale) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = k_cache.size(0), group = heads / kv_heads;
  const int64_t width = block_tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* k = k_cache.data_ptr<T>();
  const T* v = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* counts = key_counts.data_ptr<int32_t>();
  const int64_t q_row = query.stride(0), q_head = query.stride(1);
  const int64_t k_head = k_cache.stride(0), k_slot = k_cache.stride(1);
  const int64_t v_head = v_cache.stride(0), v_slot = v_cache.stride(1);
  const int64_t padded = (dim + kLanes - 1) / kLanes * kLanes;
  const int32_t longest = *std::max_element(counts, counts + rows);
  const int64_t splits = key_splits(rows * kv_heads, longest);

  // each share's unnormalised output [group, padded], running max and sum [group]
  const int64_t tasks = rows * kv_heads * splits;
  std::vector<float> partial(tasks * group * padded), best(tasks * group), total(tasks * group);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_f(group * padded, 0.f), scores;
    std::vector<T> q_raw(group * dim), weights;
    for (int64_t task = begin; task < end; ++task) {
      const Share share = start_share(task, kv_heads, splits, counts, 1, group, padded, partial, best, total);
      const int64_t row = share.row, kv = share.kv, first = share.first, last = share.last;
      float *acc = share.acc, *m = share.best, *l = share.total;
      if (first >= last) continue;
      for (int64_t g = 0; g < group; ++g) {
        const T* query_row = q + row * q_row + (kv * group + g) * q_head;
        std::copy(query_row, query_row + dim, &q_raw[g * dim]);
        load_row(query_row, &q_f[g * padded], dim);
        for (int64_t i = 0; i < dim; ++i) q_f[g * padded + i] *= static_cast<float>(scale);
      }
      const int64_t n = last - first;
      scores.resize(group * n);
      const int32_t* table = tables + row * width;
      // keys [first, last) as runs of consecutive slots, one run per block: fn(t, slot, run)
      auto for_each_run = [&](auto&& fn) {
        for (int64_t position = first; position < last;) {
          const int64_t offset = position % block_size, run = std::min(last - position, block_size - offset);
          fn(position - first, static_cast<int64_t>(table[position / block_size]) * block_size + offset, run);
          position += run;
        }
      };
      for_each_run([&](int64_t t, int64_t slot, int64_t run) {  // scores: every query head of the group per key
        score_run(q_f.data(), q_raw.data(), static_cast<float>(scale), group, padded, dim,
                  k + kv * k_head + slot * k_slot, k_slot, run, &scores[t], n);
      });
      for (int64_t g = 0; g < group; ++g) {  // softmax numerators
        float* s = &scores[g * n];
        const float top = *std::max_element(s, s + n);
        m[g] = top;
        l[g] = exp_shifted(s, n, top);
      }
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (dim % (2 * kLanes) == 0) {
          weights.resize(group * n);
          to_bf16(scores.data(), weights.data(), group * n);
          for_each_run([&](int64_t t, int64_t slot, int64_t run) {  // weighted values
            value_run_bf16(acc, group, padded, dim, v + kv * v_head + slot * v_slot, v_slot, run, &weights[t], n);
          });
          unpermute_values(acc, group, padded, dim);
          continue;
        }
      }
#endif
      for_each_run([&](int64_t t, int64_t slot, int64_t run) {  // weighted values
        value_run(acc, group, padded, dim, v + kv * v_head + slot * v_slot, v_slot, run, &scores[t], n);
      });
    }
  });

  merge_shares<T>(partial, best, total, splits, group, padded, out);
}


#if defined(__AVX512BF16__)
// Rows over a tiled cache (bf16_tiles.h): tasks as in decode(), each walking its share of keys (a multiple of 64)
// a key block at a time, the group's query heads as the rows, with an online softmax; no transposes or unpacks,
// since the tiles are already in the order the products read. bf16 (Cache = at::BFloat16): vdpbf16ps with the
// prompt kernel's building blocks. int8 (Cache = int8_t; k_scales/v_scales [kv_heads, slots] bf16): int16
// products of the codes with quantized queries and probabilities (int8_tiles.h).
template <typename Cache>
void decode_tiled(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                  const torch::Tensor& block_tables, const torch::Tensor& key_counts, torch::Tensor& out,
                  int64_t block_size, double scale, const at::BFloat16* k_scales, const at::BFloat16* v_scales) {
  using namespace swiftkv_tiles;
  constexpr bool kCodes = std::is_same_v<Cache, int8_t>;
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2), pairs = dim / 2;
  const int64_t kv_heads = k_cache.size(0), group = heads / kv_heads, slots = k_cache.size(1);
  const int64_t width = block_tables.size(1);
  const at::BFloat16* q = query.data_ptr<at::BFloat16>();
  const Cache* k = k_cache.data_ptr<Cache>();
  const Cache* v = v_cache.data_ptr<Cache>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* counts = key_counts.data_ptr<int32_t>();
  const int64_t q_row = query.stride(0), q_head = query.stride(1);
  const int64_t k_head = k_cache.stride(0), v_head = v_cache.stride(0);
  const int32_t longest = *std::max_element(counts, counts + rows);
  const int64_t splits = key_splits(rows * kv_heads, longest), tasks = rows * kv_heads * splits;
  std::vector<float> partial(tasks * group * dim), best(tasks * group), total(tasks * group);
  const std::vector<uint32_t> zeros(8 * dim, 0u);  // stands in for the tiles past a share's last key

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * kKeyBlock), correction(group);
    std::vector<at::BFloat16> probabilities(group * kKeyBlock);
    std::vector<const uint32_t*> queries(group);
    // int8: the rows' int16 queries and their scales (times the softmax scale), a block's int16 probabilities
    std::vector<int16_t> query_codes(kCodes ? group * dim : 0), probability_codes(kCodes ? group * kKeyBlock : 0);
    std::vector<float> row_scale(group), probability_scale(group), query_row(dim);
    alignas(64) float key_scale[kKeyBlock], value_scale[kKeyBlock];
    for (int64_t task = begin; task < end; ++task) {
      const Share share = start_share(task, kv_heads, splits, counts, kKeyBlock, group, dim, partial, best, total);
      const int64_t row = share.row, kv = share.kv, first = share.first, last = share.last;
      float *acc = share.acc, *m = share.best, *l = share.total;
      if (first >= last) continue;
      for (int64_t g = 0; g < group; ++g) {
        const at::BFloat16* query_head = q + row * q_row + (kv * group + g) * q_head;
        if constexpr (kCodes) {
          row_scale[g] = static_cast<float>(scale) *
                         swiftkv_int8_tiles::quantize_query(query_head, dim, query_row.data(), &query_codes[g * dim]);
          queries[g] = reinterpret_cast<const uint32_t*>(&query_codes[g * dim]);
        } else {
          queries[g] = reinterpret_cast<const uint32_t*>(query_head);
        }
      }
      const int32_t* table = tables + row * width;
      for (int64_t k0 = first; k0 < last; k0 += kKeyBlock) {
        const int8_t *key_codes[4], *value_codes[4];    // int8
        const uint32_t *key_words[4], *value_words[4];  // bf16
        if constexpr (kCodes) {
          swiftkv_int8_tiles::code_tiles(k + kv * k_head, v + kv * v_head, k_scales + kv * slots,
                                         v_scales + kv * slots, table, block_size, dim, k0, last,
                                         reinterpret_cast<const int8_t*>(zeros.data()), key_codes, value_codes,
                                         key_scale, value_scale);
          swiftkv_int8_tiles::score_block_codes(group, queries.data(), key_codes, pairs, row_scale.data(), key_scale,
                                                scores.data());
        } else {
          cache_tiles(k + kv * k_head, v + kv * v_head, table, block_size, dim, k0, last, zeros.data(), key_words,
                      value_words);
          for (int64_t r = 0; r < group; r += kRows)
            score_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, group - r)), &queries[r], key_words, pairs,
                              static_cast<float>(scale), &scores[r * kKeyBlock]);
        }
        __mmask16 visible[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
        if (k0 + kKeyBlock > last) visible_lanes(last - k0, visible);
        for (int64_t g = 0; g < group; ++g)
          softmax_block(&scores[g * kKeyBlock], visible, m[g], l[g], correction[g], &probabilities[g * kKeyBlock]);
        if constexpr (kCodes) {
          swiftkv_int8_tiles::quantize_probabilities(probabilities.data(), group, value_scale,
                                                     probability_codes.data(), probability_scale.data());
          swiftkv_int8_tiles::add_block_value_codes(group, value_codes, dim, probability_codes.data(),
                                                    probability_scale.data(), correction.data(), acc);
        } else {
          add_block_values(group, value_words, dim, probabilities.data(), correction.data(), acc);
        }
      }
    }
  });
  merge_shares<at::BFloat16>(partial, best, total, splits, group, dim, out);
}
#endif

}  // namespace

// query [rows, heads, head_dim]; k_cache/v_cache [kv_heads, slots, head_dim] (one cache entry);
// block_tables [rows, width] int32; key_counts [rows] int32 (each >= 1) -> [rows, heads * head_dim]
torch::Tensor paged_decode_attention(const torch::Tensor& query, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& key_counts, int64_t block_size, double scale, bool tiled,
                                     const c10::optional<torch::Tensor>& k_scale,
                                     const c10::optional<torch::Tensor>& v_scale) {
  const bool codes = k_scale.has_value() && k_scale->defined();  // an int8 cache, with bf16 scales
  swiftkv_common::check_query_and_caches(query, k_cache, v_cache, block_size, codes);
  swiftkv_common::check_tiled(tiled, query, k_cache, block_size);
  if (codes) swiftkv_common::check_scales(tiled, k_cache, *k_scale, v_scale);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && key_counts.scalar_type() == at::kInt,
              "block_tables and key_counts must be int32");
  TORCH_CHECK(query.size(0) == block_tables.size(0) && query.size(0) == key_counts.size(0) && query.size(0) > 0,
              "one block table and key count per query row");
  auto tables = block_tables.contiguous();
  auto counts = key_counts.contiguous();
  auto out = torch::empty({query.size(0), query.size(1), query.size(2)}, query.options());
#if defined(__AVX512BF16__)
  if (codes) {
    decode_tiled<int8_t>(query, k_cache, v_cache, tables, counts, out, block_size, scale,
                         k_scale->data_ptr<at::BFloat16>(), v_scale->data_ptr<at::BFloat16>());
    return out.view({query.size(0), query.size(1) * query.size(2)});
  }
  if (tiled) {
    decode_tiled<at::BFloat16>(query, k_cache, v_cache, tables, counts, out, block_size, scale, nullptr, nullptr);
    return out.view({query.size(0), query.size(1) * query.size(2)});
  }
#endif
  switch (query.scalar_type()) {
    case at::kBFloat16: decode<at::BFloat16>(query, k_cache, v_cache, tables, counts, out, block_size, scale); break;
    case at::kFloat: decode<float>(query, k_cache, v_cache, tables, counts, out, block_size, scale); break;
    case at::kHalf: decode<at::Half>(query, k_cache, v_cache, tables, counts, out, block_size, scale); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out.view({query.size(0), query.size(1) * query.size(2)});
}

// states [entries, kv_heads, tokens, head_dim] into cache entries [first, last) at slots: the KV-cache write of
// a torch.compile'd decode step as one opaque in-place op (swiftkv/engine/compiled.py)
void write_kv_cache(at::Tensor& cache, int64_t first, int64_t last, const at::Tensor& slots, const at::Tensor& states) {
  cache.slice(0, first, last).index_copy_(2, slots, states);
}

// The same for a tiled cache (bf16_tiles.h; int8 codes in the same places): each token's K (values=false) or V
// (values=true) into its slot's place in its tile. With `scales` (an int8 cache fed bf16 states), each token and
// head is quantized on the way, as ModelRunner._encoded does in bf16 arithmetic (scale = absmax / 127, code =
// round(x / scale)), and its scale written to scales[entry][head][slot]
template <typename T, typename Source>
void write_tiles(at::Tensor& cache, int64_t first, int64_t last, const int64_t* slot_ids, int64_t tokens,
                 const at::Tensor& states, bool values, at::BFloat16* scales) {
  const int64_t kv_heads = cache.size(1), slot_count = cache.size(2), dim = cache.size(3);
  T* base = cache.data_ptr<T>();
  const Source* source = states.data_ptr<Source>();
  const int64_t s0 = states.stride(0), s1 = states.stride(1), s2 = states.stride(2), s3 = states.stride(3);
  // a decode step's few tokens are written on the calling thread: a parallel region would cost more than them
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, tokens * dim));
  at::parallel_for(0, (last - first) * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> row(dim);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t entry = index / kv_heads, head = index % kv_heads;
      T* head_base = base + ((first + entry) * kv_heads + head) * slot_count * dim;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t slot = slot_ids[t], j = slot % 16;
        T* tile = head_base + (slot - j) * dim;
        const Source* x = source + entry * s0 + head * s1 + t * s2;
        if constexpr (std::is_same_v<T, Source>) {
          for (int64_t d = 0; d < dim; ++d) row[d] = x[d * s3];
        } else {  // bf16 -> int8 codes, each step rounded to bf16 as PyTorch's bf16 ops round it
          float top = 0.f;
          for (int64_t d = 0; d < dim; ++d) top = std::max(top, std::fabs(static_cast<float>(x[d * s3])));
          const float clamped = static_cast<float>(at::BFloat16(std::max(top, 1e-8f)));
          const at::BFloat16 scale(clamped / 127.f);
          for (int64_t d = 0; d < dim; ++d) {
            const float ratio =
                static_cast<float>(at::BFloat16(static_cast<float>(x[d * s3]) / static_cast<float>(scale)));
            row[d] = static_cast<T>(std::clamp(std::nearbyint(ratio), -127.f, 127.f));
          }
          scales[((first + entry) * kv_heads + head) * slot_count + slot] = scale;
        }
        if (values) {
          for (int64_t d = 0; d < dim; ++d) tile[2 * (j / 2 * dim + d) + j % 2] = row[d];
        } else {
          for (int64_t d = 0; d < dim; ++d) tile[2 * (d / 2 * 16 + j) + d % 2] = row[d];
        }
      }
    }
  });
}

void write_tiled_kv_cache(at::Tensor& cache, int64_t first, int64_t last, const at::Tensor& slots,
                          const at::Tensor& states, bool values, const c10::optional<at::Tensor>& scales) {
  const bool quantize = scales.has_value() && scales->defined();
  TORCH_CHECK((cache.scalar_type() == at::kBFloat16 || cache.scalar_type() == at::kChar) && cache.is_contiguous() &&
                  states.scalar_type() == (quantize ? at::kBFloat16 : cache.scalar_type()),
              "a tiled cache is contiguous bf16 or int8; the states written to it share its dtype, or are bf16 "
              "quantized into an int8 one with `scales`");
  TORCH_CHECK(states.dim() == 4 && states.size(0) == last - first && states.size(1) == cache.size(1) &&
              states.size(2) == slots.numel() && states.size(3) == cache.size(3), "states must be [entries, kv_heads, "
              "tokens, head_dim] for entries [first, last) and one slot per token");
  const int64_t slot_count = cache.size(2), dim = cache.size(3), tokens = slots.numel();
  TORCH_CHECK(slot_count % 16 == 0 && dim % 2 == 0, "a tiled cache holds whole tiles of 16 slots and pairs of dims");
  if (quantize)
    TORCH_CHECK(cache.scalar_type() == at::kChar && scales->scalar_type() == at::kBFloat16 && scales->is_contiguous() &&
                    scales->numel() == cache.size(0) * cache.size(1) * slot_count,
                "scales must be contiguous bf16 [entries, kv_heads, slots(, 1)] for an int8 cache");
  const auto ids = slots.to(at::kLong).contiguous();
  const int64_t* slot_ids = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot_ids[t] >= 0 && slot_ids[t] < slot_count, "slot ", slot_ids[t], " is outside the cache");
  if (quantize)
    write_tiles<int8_t, at::BFloat16>(cache, first, last, slot_ids, tokens, states, values,
                                      scales->data_ptr<at::BFloat16>());
  else if (cache.scalar_type() == at::kChar)
    write_tiles<int8_t, int8_t>(cache, first, last, slot_ids, tokens, states, values, nullptr);
  else
    write_tiles<at::BFloat16, at::BFloat16>(cache, first, last, slot_ids, tokens, states, values, nullptr);
}

// C++ operators: no Python on the call path, which a decode step would otherwise pay on every layer
TORCH_LIBRARY(swiftkv_cpu, m) {
  m.def("paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor key_counts, int block_size, float scale, bool tiled=False, Tensor? k_scale=None, "
        "Tensor? v_scale=None) -> Tensor");
  m.def("write_kv_cache(Tensor(a!) cache, int first, int last, Tensor slots, Tensor states) -> ()");
  m.def("write_tiled_kv_cache(Tensor(a!) cache, int first, int last, Tensor slots, Tensor states, bool values, "
        "Tensor(b!)? scales=None) -> ()");
}
TORCH_LIBRARY_IMPL(swiftkv_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("write_tiled_kv_cache", &write_tiled_kv_cache);
}
