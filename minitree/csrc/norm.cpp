// RMSNorm with one rounding per row, whatever shares the forward: y = w * (x * rsqrt(mean(x^2) + eps)).
// Inductor's code for a forward of one row splits that row's sum of squares over the threads (each
// sums a half, then the halves are added), a forward of several rows sums each row whole: two
// roundings of the same row. Here every row is summed alone, in 16 lanes by index mod 16, then a
// fixed halving tree, as torch computes the rest: in fp32, the normalized row rounded to the
// input's dtype, then multiplied by the weight in that dtype (upcast, multiply, round).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>

namespace norm {

typedef float F32 __attribute__((vector_size(64)));
typedef int32_t I32 __attribute__((vector_size(64)));

template <class T>
static void rms_norm(const T* x, const T* w, T* y, int64_t R, int64_t D, float eps) {
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * D;
      float lanes[16] = {};
      for (int64_t i = 0; i < D; ++i) {
        const float v = static_cast<float>(row[i]);
        lanes[i % 16] = lanes[i % 16] + v * v;
      }
      F32 s;
      std::memcpy(&s, lanes, 64);
      s = s + __builtin_shuffle(s, I32{8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
      s = s + __builtin_shuffle(s, I32{4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
      s = s + __builtin_shuffle(s, I32{2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
      s = s + __builtin_shuffle(s, I32{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
      const float scale = 1.0f / std::sqrt(s[0] / static_cast<float>(D) + eps);
      for (int64_t i = 0; i < D; ++i)
        y[r * D + i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(static_cast<T>(static_cast<float>(row[i]) * scale)));
    }
  });
}

// x [..., D], weight [D] -> [..., D] in x's dtype.
at::Tensor rms_norm_op(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "minitree rms_norm: x [..., D], weight [D]");
  const auto xc = x.contiguous(), wc = weight.to(x.scalar_type()).contiguous();
  auto y = at::empty_like(xc);
  const int64_t D = x.size(-1), R = x.numel() / std::max<int64_t>(D, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minitree rms_norm", [&] {
    rms_norm<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), R, D,
                       static_cast<float>(eps));
  });
  return y;
}

}  // namespace norm

TORCH_LIBRARY_FRAGMENT(minitree_kernels, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(minitree_kernels, CPU, m) { m.impl("rms_norm", &norm::rms_norm_op); }
