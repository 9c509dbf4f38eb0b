// Small float32 vector primitives for attention and element-wise work, dispatched at
// run time like the matrix kernels (scalar / AVX2 / AVX-512).
#pragma once

#include <cstdint>

namespace moe {

// The paged KV cache of one layer, as attend() reads it: block b, KV head g, position i
// of the block (0 <= i < block_size), dimension d (0 <= d < head_dim).
//   key    at keys   + ((b * kv_heads + g) * head_dim + d) * block_size + i
//          (transposed within a block: a block's positions are contiguous per dimension,
//          so the scores of a block's positions are one vector per query head)
//   value  at values + ((b * kv_heads + g) * block_size + i) * head_dim + d
inline int64_t kv_key_index(int64_t b, int64_t g, int64_t i, int64_t d, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
  return ((b * kv_heads + g) * head_dim + d) * block_size + i;
}
inline int64_t kv_value_index(int64_t b, int64_t g, int64_t i, int64_t d, int64_t kv_heads, int64_t head_dim, int64_t block_size) {
  return ((b * kv_heads + g) * block_size + i) * head_dim + d;
}

// Causal attention of one token for the nq query heads of KV head g:
//   out[h] = sum_p softmax_p(scale * q[h] . key[p]) value[p],  p < visible,
// position p living in block blocks[p / block_size] at i = p % block_size.
// q and out are nq rows of head_dim floats (contiguous); the cache holds float32, or
// IEEE float16 when f16 is set (converted to float32 as it is read).
struct AttnArgs {
  const float* q;
  int64_t nq;
  int64_t head_dim;
  const void* keys;
  const void* values;
  bool f16;
  const int32_t* blocks;
  int64_t block_size;
  int64_t kv_heads;
  int64_t g;
  int64_t visible;
  float scale;
  float* out;
};

struct VecOps {
  float (*dot)(const float* a, const float* b, int64_t n);
  // y += a * x
  void (*axpy)(float* y, float a, const float* x, int64_t n);
  void (*attend)(const AttnArgs& a);
  // out[i] = silu(gate[i]) * up[i] (SwiGLU), silu(x) = x / (1 + e^-x)
  void (*silu_mul)(float* out, const float* gate, const float* up, int64_t n);
  // Sampling weights: out[i] = e^((x[i] - max x) * inv_t), computed in float32, stored as
  // doubles; returns their sum (double). n >= 1.
  double (*exp_weights)(const float* x, int64_t n, float inv_t, double* out);
};

// The variant matching the active matrix-kernel ISA (see kernels.h).
const VecOps& vecops();

// The scalar attend(): the plain two-pass softmax every variant is tested against.
void attend_scalar(const AttnArgs& a);

// Per-ISA tables; a variant is only called when the CPU supports it.
const VecOps& vecops_scalar();
const VecOps& vecops_avx2();
const VecOps& vecops_avx512();

}  // namespace moe
