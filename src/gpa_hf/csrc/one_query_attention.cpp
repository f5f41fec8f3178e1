// Attention of one new token per sequence over a KV cache, on CPU: `gpa_hf::one_query_attention`.
//
// A batched decoding step of GPA's LM reads more key-value cache than weights (batch 8, ~180 positions: 330 MB of
// float32 keys and values per step, 220 MB of int8 weights), so its attention is a streaming read and should run at
// memory speed. SDPA's CPU kernel is built for long queries and reaches about half of that on one-token queries;
// this kernel reads every key and value row once, with all queries of its key-value head (grouped-query attention),
// and reads bfloat16 caches directly, which halves the bytes a step reads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMaxDim = 512;  // largest head size (`ONE_QUERY_MAX_HEAD_SIZE` in cpu_kernels.py)

inline float to_float(float value) { return value; }

inline float to_float(at::BFloat16 value) {
  uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// One key-value head: `Groups` queries of size `Dim` (0: `dim`, known at run time) against `length` positions.
// A fixed size lets the compiler keep a row and the outputs in vector registers.
template <typename T, int Groups, int Dim>
void attend_head(const float* query, const T* key, const T* value, const bool* mask, int64_t mask_stride,
                 float* output, int64_t dim, int64_t length, int64_t key_stride, int64_t value_stride, float scale,
                 float* scores) {
  const int64_t size = Dim > 0 ? Dim : dim;
  float row[Dim > 0 ? Dim : kMaxDim];
  for (int64_t position = 0; position < length; ++position) {
    const T* key_row = key + position * key_stride;
#pragma omp simd
    for (int64_t d = 0; d < size; ++d) row[d] = to_float(key_row[d]);
    const bool visible = mask == nullptr || mask[position * mask_stride];
    for (int group = 0; group < Groups; ++group) {
      const float* query_row = query + group * size;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < size; ++d) dot += query_row[d] * row[d];
      scores[group * length + position] = visible ? dot * scale : -std::numeric_limits<float>::infinity();
    }
  }
  for (int group = 0; group < Groups; ++group) {
    float* group_scores = scores + group * length;
    const float top = *std::max_element(group_scores, group_scores + length);
    float total = 0.f;
    for (int64_t position = 0; position < length; ++position) {
      group_scores[position] = std::exp(group_scores[position] - top);
      total += group_scores[position];
    }
    const float inverse = 1.f / total;
    for (int64_t position = 0; position < length; ++position) group_scores[position] *= inverse;
  }
  float sums[Groups * (Dim > 0 ? Dim : kMaxDim)];
  std::fill(sums, sums + Groups * size, 0.f);
  for (int64_t position = 0; position < length; ++position) {
    const T* value_row = value + position * value_stride;
#pragma omp simd
    for (int64_t d = 0; d < size; ++d) row[d] = to_float(value_row[d]);
    for (int group = 0; group < Groups; ++group) {
      const float weight = scores[group * length + position];
      float* sum = sums + group * size;
#pragma omp simd
      for (int64_t d = 0; d < size; ++d) sum[d] += weight * row[d];
    }
  }
  std::memcpy(output, sums, sizeof(float) * Groups * size);
}

template <typename T, int Groups, int Dim>
void attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor* mask,
            at::Tensor& output, double scale) {
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(3), length = key.size(2);
  const float* query_data = query.data_ptr<float>();
  const T* key_data = key.data_ptr<T>();
  const T* value_data = value.data_ptr<T>();
  const bool* mask_data = mask ? mask->data_ptr<bool>() : nullptr;
  float* output_data = output.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(Groups * length);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads;
      attend_head<T, Groups, Dim>(
          query_data + item * Groups * dim, key_data + b * key.stride(0) + h * key.stride(1),
          value_data + b * value.stride(0) + h * value.stride(1),
          mask_data ? mask_data + b * mask->stride(0) : nullptr, mask ? mask->stride(3) : 0,
          output_data + item * Groups * dim, dim, length, key.stride(2), value.stride(2), static_cast<float>(scale),
          scores.data());
    }
  });
}

template <typename T, int Groups>
void attend_dim(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor* mask,
                at::Tensor& output, double scale) {
  switch (query.size(3)) {
    case 64: return attend<T, Groups, 64>(query, key, value, mask, output, scale);
    case 128: return attend<T, Groups, 128>(query, key, value, mask, output, scale);
    default: return attend<T, Groups, 0>(query, key, value, mask, output, scale);
  }
}

template <typename T>
void attend_groups(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor* mask,
                   at::Tensor& output, double scale) {
  switch (query.size(2)) {
    case 1: return attend_dim<T, 1>(query, key, value, mask, output, scale);
    case 2: return attend_dim<T, 2>(query, key, value, mask, output, scale);
    case 4: return attend_dim<T, 4>(query, key, value, mask, output, scale);
    case 8: return attend_dim<T, 8>(query, key, value, mask, output, scale);
    default: TORCH_CHECK(false, "one_query_attention: 1, 2, 4 or 8 queries per key-value head, got ", query.size(2));
  }
}

// query (batch, kv_heads, groups, dim) float32; key, value (batch, kv_heads, positions, dim) float32 or bfloat16,
// rows contiguous; mask (batch, 1, 1, positions) bool, true where a position is attended, or none.
// Returns (batch, kv_heads, groups, dim) float32: each query's softmax(q k^T * scale) v over its head's positions.
at::Tensor one_query_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "one_query_attention: 4-D tensors expected");
  TORCH_CHECK(query.scalar_type() == at::kFloat, "one_query_attention: float32 queries expected, got ",
              query.scalar_type());
  TORCH_CHECK(key.scalar_type() == value.scalar_type() &&
                  (key.scalar_type() == at::kFloat || key.scalar_type() == at::kBFloat16),
              "one_query_attention: float32 or bfloat16 keys and values expected, got ", key.scalar_type(), " and ",
              value.scalar_type());
  TORCH_CHECK(key.sizes() == value.sizes(), "one_query_attention: keys ", key.sizes(), " and values ",
              value.sizes(), " differ in shape");
  TORCH_CHECK(query.size(0) == key.size(0) && query.size(1) == key.size(1) && query.size(3) == key.size(3),
              "one_query_attention: queries ", query.sizes(), " do not match keys ", key.sizes());
  TORCH_CHECK(query.size(3) <= kMaxDim, "one_query_attention: head size up to ", kMaxDim, ", got ", query.size(3));
  TORCH_CHECK(key.size(2) > 0, "one_query_attention: no positions to attend to");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1,
              "one_query_attention: key and value rows must be contiguous");
  const at::Tensor contiguous_query = query.contiguous();
  at::Tensor output = at::empty_like(contiguous_query);
  const at::Tensor* mask_pointer = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(0) == query.size(0) &&
                    mask->size(1) == 1 && mask->size(2) == 1 && mask->size(3) == key.size(2),
                "one_query_attention: a bool mask (batch, 1, 1, positions) expected, got ", mask->scalar_type(), " ",
                mask->sizes());
    mask_pointer = &mask.value();
  }
  if (key.scalar_type() == at::kBFloat16) {
    attend_groups<at::BFloat16>(contiguous_query, key, value, mask_pointer, output, scale);
  } else {
    attend_groups<float>(contiguous_query, key, value, mask_pointer, output, scale);
  }
  return output;
}

}  // namespace

TORCH_LIBRARY(gpa_hf, m) {
  m.def("one_query_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpa_hf, CPU, m) { m.impl("one_query_attention", one_query_attention); }
