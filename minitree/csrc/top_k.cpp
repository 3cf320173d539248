// The k largest values of each row and their indices: largest first, equal values by lower index
// (k = 1 is torch.argmax's first maximum), a NaN counted as -inf. torch's CPU topk and argmax read a
// row of 151936 logits one value at a time (about 250 and 126 us on a Zen 4 core, per draft level and
// per verified node); here 64 values at a time are compared with the k-th largest so far (GCC vector
// extensions: SIMD where the build has it), and only a block holding a larger one is read value by value.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <tuple>

namespace top_k {

typedef float F32 __attribute__((vector_size(64)));
typedef int32_t I32 __attribute__((vector_size(64)));

// Whether any of p[0..64) is above the bound (never a NaN).
static inline bool any_above(const float* p, float bound) {
  I32 m{};
  for (int v = 0; v < 4; ++v) {
    F32 x;
    std::memcpy(&x, p + 16 * v, 64);
    m |= x > bound;  // all bits set in the lanes above the bound
  }
  for (int l = 0; l < 16; ++l)
    if (m[l]) return true;
  return false;
}

// row [n] -> its k largest values, largest first, into val[k], and their indices into idx[k].
static void row_top_k(const float* row, int64_t n, int64_t k, float* val, int64_t* idx) {
  int64_t filled = 0;
  auto offer = [&](float x, int64_t i) {  // indices come in ascending order: an equal value stays behind
    x = std::isnan(x) ? -INFINITY : x;
    if (filled == k && !(x > val[k - 1])) return;
    int64_t at = filled < k ? filled++ : k - 1;
    for (; at > 0 && x > val[at - 1]; --at) val[at] = val[at - 1], idx[at] = idx[at - 1];
    val[at] = x, idx[at] = i;
  };
  int64_t i = 0;
  for (; i < k; ++i) offer(row[i], i);
  for (; i + 64 <= n; i += 64)  // 64 values at a time: any above the k-th largest (never a NaN)?
    if (any_above(row + i, val[k - 1]))
      for (int j = 0; j < 64; ++j) offer(row[i + j], i + j);
  for (; i < n; ++i) offer(row[i], i);
}

// x [R, n] float32 -> (values [R, k], indices [R, k] int64); threads split the rows.
std::tuple<at::Tensor, at::Tensor> top_k_op(at::Tensor x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "minitree top_k: x [R, n] float32");
  TORCH_CHECK(1 <= k && k <= x.size(1), "minitree top_k: k must be in 1..", x.size(1), ", got ", k);
  const auto xc = x.contiguous();
  const int64_t R = xc.size(0), n = xc.size(1);
  auto values = at::empty({R, k}, xc.options());
  auto indices = at::empty({R, k}, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_top_k(xp + r * n, n, k, vp + r * k, ip + r * k);
  });
  return {values, indices};
}

}  // namespace top_k

TORCH_LIBRARY_FRAGMENT(minitree_kernels, m) { m.def("top_k(Tensor x, int k) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(minitree_kernels, CPU, m) { m.impl("top_k", &top_k::top_k_op); }
