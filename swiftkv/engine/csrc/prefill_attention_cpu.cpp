// Prompt attention straight from the paged KV cache on a CPU: a prompt chunk's queries, causal over their
// sequence's keys (swiftkv/engine/paged_attention_cpu.py).
//
// A chunk of n queries sits at positions [keys - n, keys) and attends to the first `keys` keys of its sequence,
// found through the sequence's block table; the cache is head-major, [kv_heads, slots, head_dim]. This is a
// flash-attention forward shaped for AVX512-BF16 and grouped-query attention:
//   * K and V of each KV head are first packed once into the layouts `vdpbf16ps` reads by pairs (K: 16 keys x a
//     pair of dimensions per vector; V: 16 dimensions x a pair of keys; bf16_tiles.h), so the products run on
//     the stored bf16 with float32 sums and no conversion; a tiled cache holds them so already and is read in place;
//   * a task is (KV head, block of 16 query positions): the query heads that share the KV head are rows of one
//     tile (48 rows for 9 query heads over 3 KV heads), so each packed key block is read once per tile, and the
//     tile walks the key blocks its last position can see, 64 keys at a time, with an online softmax (running
//     maximum and sum per row; probabilities rounded to bf16 as PyTorch's bf16 attention rounds them);
//   * the causal mask costs nothing off the diagonal: only key blocks that cross a row's position are masked,
//     and none beyond the tile's last position are read;
//   * tasks are taken heaviest first from a shared counter, so the long rows at the end of a prompt do not
//     leave one thread working alone.
// Other dtypes, head sizes (a multiple of 32 is needed) and CPUs without AVX512-BF16 take a plain loop, which
// is correct but slow: the engine uses PyTorch's SDPA there (`prefill_attention_is_fast`).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_common.h"
#include "bf16_tiles.h"

namespace {

using swiftkv_common::slot_of;

#if defined(__AVX512BF16__)
using namespace swiftkv_tiles;

constexpr int64_t kPositions = 16;  // query positions per task (times the GQA group: the tile's rows)

// K of each KV head as [tile of 16 keys][pair of dimensions][16 keys] words and V as [pair of keys][dim] words,
// keys padded with zeros to whole key blocks
void pack(const at::BFloat16* k, const at::BFloat16* v, int64_t k_head, int64_t k_slot, int64_t v_head,
          int64_t v_slot, const int32_t* table, int64_t block_size, int64_t keys, int64_t kv_heads, int64_t dim,
          int64_t padded_keys, uint32_t* k_packed, uint32_t* v_packed) {
  const int64_t pairs = dim / 2, tiles = padded_keys / 16;
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv = task / tiles, tile = task % tiles;
      uint32_t* kp = k_packed + (kv * tiles + tile) * pairs * 16;
      uint32_t* vp = v_packed + (kv * padded_keys / 2 + tile * 8) * dim;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = tile * 16 + j;
        if (key >= keys) {
          for (int64_t p = 0; p < pairs; ++p) kp[p * 16 + j] = 0;
        } else {
          const at::BFloat16* row = k + kv * k_head + slot_of(table, key, block_size) * k_slot;
          for (int64_t p = 0; p < pairs; ++p) kp[p * 16 + j] = pair_at(row + 2 * p);
        }
      }
      for (int64_t jp = 0; jp < 8; ++jp) {
        const int64_t key = tile * 16 + 2 * jp;
        const at::BFloat16* a = key < keys ? v + kv * v_head + slot_of(table, key, block_size) * v_slot : nullptr;
        const at::BFloat16* b = key + 1 < keys ? v + kv * v_head + slot_of(table, key + 1, block_size) * v_slot : nullptr;
        for (int64_t d = 0; d < dim; ++d)
          vp[jp * dim + d] = (a ? a[d].x : 0) | static_cast<uint32_t>(b ? b[d].x : 0) << 16;
      }
    }
  });
}

// pack() for an int8 tiled cache: each tile dequantized (code * scale), keys past `keys` zero
void pack_codes(const int8_t* k, const int8_t* v, const at::BFloat16* k_scales, const at::BFloat16* v_scales,
                int64_t k_head, int64_t v_head, int64_t slots, const int32_t* table, int64_t block_size, int64_t keys,
                int64_t kv_heads, int64_t dim, int64_t padded_keys, uint32_t* k_packed, uint32_t* v_packed) {
  const int64_t pairs = dim / 2, tiles = padded_keys / 16;
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float key_scale[16], value_scale[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv = task / tiles, tile = task % tiles;
      uint32_t* kp = k_packed + (kv * tiles + tile) * pairs * 16;
      uint32_t* vp = v_packed + (kv * tiles + tile) * 8 * dim;
      if (tile * 16 >= keys) {
        std::fill(kp, kp + pairs * 16, 0u);
        std::fill(vp, vp + 8 * dim, 0u);
        continue;
      }
      const int64_t slot = slot_of(table, tile * 16, block_size);  // a tile's 16 slots: one run of a block
      for (int j = 0; j < 16; ++j) {
        const bool seen = tile * 16 + j < keys;
        key_scale[j] = seen ? static_cast<float>(k_scales[kv * slots + slot + j]) : 0.f;
        value_scale[j] = seen ? static_cast<float>(v_scales[kv * slots + slot + j]) : 0.f;
      }
      dequantize_tile(k + kv * k_head + slot * dim, key_scale, false, dim, kp);
      dequantize_tile(v + kv * v_head + slot * dim, value_scale, true, dim, vp);
    }
  });
}

// k_scales/v_scales: an int8 tiled cache's [kv_heads, slots] scales (its tiles are dequantized into the packed
// layout once per call: each key block serves every query row), else nullptr
void prefill_bf16(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                  const int32_t* table, int64_t keys, int64_t block_size, float scale, bool tiled, torch::Tensor& out,
                  const at::BFloat16* k_scales, const at::BFloat16* v_scales) {
  const int64_t n = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = k_cache.size(0), group = heads / kv_heads, pairs = dim / 2, slots = k_cache.size(1);
  const int64_t padded_keys = (keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock, offset = keys - n;
  // a slot-ordered cache is packed into tiles once per call; a tiled one is read in place
  const bool codes = k_scales != nullptr;
  const at::BFloat16* k = codes ? nullptr : k_cache.data_ptr<at::BFloat16>();
  const at::BFloat16* v = codes ? nullptr : v_cache.data_ptr<at::BFloat16>();
  const int8_t* k_codes = codes ? k_cache.data_ptr<int8_t>() : nullptr;
  const int8_t* v_codes = codes ? v_cache.data_ptr<int8_t>() : nullptr;
  std::vector<uint32_t> k_packed, v_packed;
  const std::vector<uint32_t> zeros(8 * dim, 0u);
  if (!tiled || codes) {
    k_packed.resize(kv_heads * padded_keys * pairs);
    v_packed.resize(kv_heads * padded_keys / 2 * dim);
    if (codes)
      pack_codes(k_codes, v_codes, k_scales, v_scales, k_cache.stride(0), v_cache.stride(0), slots, table, block_size,
                 keys, kv_heads, dim, padded_keys, k_packed.data(), v_packed.data());
    else
      pack(k, v, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), table, block_size, keys,
           kv_heads, dim, padded_keys, k_packed.data(), v_packed.data());
  }
  const bool in_place = tiled && !codes;  // a bf16 tiled cache is read where it is

  const at::BFloat16* q = query.data_ptr<at::BFloat16>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const int64_t q_pos = query.stride(0), q_head = query.stride(1), o_pos = out.stride(0), o_head = out.stride(1);
  const int64_t position_blocks = (n + kPositions - 1) / kPositions, tasks = position_blocks * kv_heads;
  const int64_t tile_rows = kPositions * group;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(tile_rows * kKeyBlock), acc(tile_rows * dim), best(tile_rows), total(tile_rows),
        correction(tile_rows);
    std::vector<at::BFloat16> probabilities(tile_rows * kKeyBlock);
    std::vector<const uint32_t*> queries(tile_rows);
    std::vector<int64_t> row_position(tile_rows);
    for (int64_t task; (task = next.fetch_add(1)) < tasks;) {
      // heaviest first: the last block of positions sees the most keys
      const int64_t block = position_blocks - 1 - task / kv_heads, kv = task % kv_heads;
      const int64_t first = block * kPositions, last = std::min(n, first + kPositions);
      const int64_t rows = (last - first) * group;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = first + r / group, head = kv * group + r % group;
        queries[r] = reinterpret_cast<const uint32_t*>(q + i * q_pos + head * q_head);
        row_position[r] = offset + i;
      }
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.f);
      std::fill(best.begin(), best.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.begin() + rows, 0.f);
      const int64_t first_position = offset + first, last_position = offset + last - 1;
      const uint32_t* k_head_packed = in_place ? nullptr : k_packed.data() + kv * padded_keys * pairs;
      const uint32_t* v_head_packed = in_place ? nullptr : v_packed.data() + kv * padded_keys / 2 * dim;
      for (int64_t k0 = 0; k0 <= last_position; k0 += kKeyBlock) {
        const uint32_t *key_tiles[4], *value_tiles[4];
        if (in_place) {
          cache_tiles(k + kv * k_cache.stride(0), v + kv * v_cache.stride(0), table, block_size, dim, k0, keys,
                      zeros.data(), key_tiles, value_tiles);
        } else {
          for (int c = 0; c < 4; ++c) {
            key_tiles[c] = k_head_packed + (k0 / 16 + c) * pairs * 16;
            value_tiles[c] = v_head_packed + (k0 / 2 + 8 * c) * dim;
          }
        }
        for (int64_t r = 0; r < rows; r += kRows)
          score_rows<kRows>(static_cast<int>(std::min<int64_t>(kRows, rows - r)), &queries[r], key_tiles, pairs,
                            scale, &scores[r * kKeyBlock]);
        const bool masked = k0 + kKeyBlock - 1 > first_position;
        for (int64_t r = 0; r < rows; ++r) {  // online softmax
          __mmask16 visible[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
          if (masked) visible_lanes(row_position[r] - k0 + 1, visible);  // the keys up to its position
          softmax_block(&scores[r * kKeyBlock], visible, best[r], total[r], correction[r],
                        &probabilities[r * kKeyBlock]);
        }
        add_block_values(rows, value_tiles, dim, probabilities.data(), correction.data(), acc.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = first + r / group, head = kv * group + r % group;
        const __m512 inverse = _mm512_set1_ps(1.f / total[r]);
        at::BFloat16* target = o + i * o_pos + head * o_head;
        for (int64_t d = 0; d < dim; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(target + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&acc[r * dim + d]), inverse)));
      }
    }
  });
}
#endif

// Any dtype, head size and CPU: one query row at a time, float32, two passes over its keys
template <typename T>
void prefill_plain(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const int32_t* table, int64_t keys, int64_t block_size, float scale, torch::Tensor& out) {
  const int64_t n = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t group = heads / k_cache.size(0), offset = keys - n;
  const T* q = query.data_ptr<T>();
  const T* k = k_cache.data_ptr<T>();
  const T* v = v_cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(keys), acc(dim);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t i = index / heads, head = index % heads, kv = head / group, seen = offset + i + 1;
      const T* query_row = q + i * query.stride(0) + head * query.stride(1);
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seen; ++j) {
        const T* key = k + kv * k_cache.stride(0) + slot_of(table, j, block_size) * k_cache.stride(1);
        float sum = 0.f;
        for (int64_t d = 0; d < dim; ++d) sum += static_cast<float>(query_row[d]) * static_cast<float>(key[d]);
        scores[j] = sum * scale;
        top = std::max(top, scores[j]);
      }
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < seen; ++j) {
        const float weight = std::exp(scores[j] - top);
        total += weight;
        const T* value = v + kv * v_cache.stride(0) + slot_of(table, j, block_size) * v_cache.stride(1);
        for (int64_t d = 0; d < dim; ++d) acc[d] += weight * static_cast<float>(value[d]);
      }
      T* target = o + i * out.stride(0) + head * out.stride(1);
      for (int64_t d = 0; d < dim; ++d) target[d] = static_cast<T>(acc[d] / total);
    }
  });
}

bool is_fast(at::ScalarType dtype, int64_t head_dim) {
#if defined(__AVX512BF16__)
  return dtype == at::kBFloat16 && head_dim % 32 == 0;
#else
  return false;
#endif
}

}  // namespace

// query [n, heads, head_dim] at positions [keys - n, keys); k_cache/v_cache [kv_heads, slots, head_dim] (one
// cache entry); block_table [>= keys / block_size] int32 -> [n, heads * head_dim], causal
torch::Tensor prefill_attention(const torch::Tensor& query, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                const torch::Tensor& block_table, int64_t keys, int64_t block_size, double scale,
                                bool tiled, const c10::optional<torch::Tensor>& k_scale,
                                const c10::optional<torch::Tensor>& v_scale) {
  const bool codes = k_scale.has_value() && k_scale->defined();  // an int8 cache, with bf16 scales
  swiftkv_common::check_query_and_caches(query, k_cache, v_cache, block_size, codes);
  if (codes) swiftkv_common::check_scales(tiled, k_cache, *k_scale, v_scale);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 1, "block_table must be 1-d int32");
  TORCH_CHECK(query.size(0) >= 1 && keys >= query.size(0), "need 1 <= queries <= keys");
  TORCH_CHECK(block_table.size(0) * block_size >= keys, "block_table holds fewer than `keys` slots");
  auto table = block_table.contiguous();
  const int32_t* blocks = table.data_ptr<int32_t>();
  const int64_t slots = k_cache.size(1);
  for (int64_t b = 0; b < (keys + block_size - 1) / block_size; ++b)
    TORCH_CHECK(blocks[b] >= 0 && (blocks[b] + 1) * block_size <= slots, "block ", blocks[b], " is outside the cache");
  auto out = torch::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  const float s = static_cast<float>(scale);
  swiftkv_common::check_tiled(tiled, query, k_cache, block_size);
#if defined(__AVX512BF16__)
  if (is_fast(query.scalar_type(), query.size(2)) && reinterpret_cast<uintptr_t>(query.data_ptr()) % 4 == 0 &&
      query.stride(0) % 2 == 0 && query.stride(1) % 2 == 0) {
    prefill_bf16(query, k_cache, v_cache, blocks, keys, block_size, s, tiled, out,
                 codes ? k_scale->data_ptr<at::BFloat16>() : nullptr,
                 codes ? v_scale->data_ptr<at::BFloat16>() : nullptr);
    return out.view({query.size(0), query.size(1) * query.size(2)});
  }
#endif
  TORCH_CHECK(!codes, "an int8 KV cache needs the AVX512-BF16 path");
  switch (query.scalar_type()) {
    case at::kBFloat16: prefill_plain<at::BFloat16>(query, k_cache, v_cache, blocks, keys, block_size, s, out); break;
    case at::kFloat: prefill_plain<float>(query, k_cache, v_cache, blocks, keys, block_size, s, out); break;
    case at::kHalf: prefill_plain<at::Half>(query, k_cache, v_cache, blocks, keys, block_size, s, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", query.scalar_type());
  }
  return out.view({query.size(0), query.size(1) * query.size(2)});
}

bool prefill_attention_is_fast(at::ScalarType dtype, int64_t head_dim) { return is_fast(dtype, head_dim); }

TORCH_LIBRARY_FRAGMENT(swiftkv_cpu, m) {
  m.def("prefill_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_table, int keys, "
        "int block_size, float scale, bool tiled=False, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  m.def("prefill_attention_is_fast(ScalarType dtype, int head_dim) -> bool", &prefill_attention_is_fast);
}
TORCH_LIBRARY_IMPL(swiftkv_cpu, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
