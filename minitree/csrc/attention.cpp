// Attention under minitree's tree mask with one rounding per query, whatever shares the forward.
//
// Query t (at cache slot q_slot[t], tree node q_node[t]) sees slot v iff v <= q_slot[t] and
// (v < base or bit v - base of anc_bits[q_node[t]] is set): attention.py's rule. The slots a query
// sees, in ascending order, are the same keys and values, in the same order, as its token sees in
// plain decoding (the prefix below the tree's root, then its ancestors by depth), so every sum
// here runs over that list by its index in the list, never by slot and never across queries:
//   s_i = (q . k_i) * scale     16 lanes over the head dimension, then a fixed halving tree
//   p_i = exp(s_i - max s)      one polynomial for every lane
//   l   = sum p_i               16 lanes by i mod 16, then the halving tree
//   o   = (sum_i p_i v_i) / l   in order of i, the head dimension in lanes
// So a token's attention rounds alike in a prefill chunk, a plain step, a chain or any tree. One
// implementation (GCC vector extensions: SIMD where the build has it, the same arithmetic anyway).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <vector>

namespace attention {

typedef float F32 __attribute__((vector_size(64)));
typedef int32_t I32 __attribute__((vector_size(64)));
typedef uint32_t U32 __attribute__((vector_size(64)));
typedef uint16_t U16 __attribute__((vector_size(32)));

static inline float reduce(F32 v) {  // the halving tree: lane l + lane l + w for w = 8, 4, 2, 1
  v = v + __builtin_shuffle(v, I32{8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15});
  v = v + __builtin_shuffle(v, I32{4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7});
  v = v + __builtin_shuffle(v, I32{2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3});
  v = v + __builtin_shuffle(v, I32{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  return v[0];
}

// exp(x) for x <= 0: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], p of degree 6 (relative error ~2e-7).
static inline F32 exp_nonpositive(F32 x) {
  const I32 below = x < -87.0f;  // all bits set where exp underflows: 0 there
  x = below ? F32{} - 87.0f : x;
  const F32 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, I32), F32);  // round(x / ln 2)
  const F32 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  F32 p = r * (1.0f / 720) + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I32 bits = (__builtin_convertvector(n, I32) + 127) << 23;
  F32 scale;
  std::memcpy(&scale, &bits, 64);
  const F32 e = p * scale;
  return reinterpret_cast<F32>(reinterpret_cast<I32>(e) & ~below);
}

template <class T>
static inline void to_float(const T* p, int64_t D, F32* out) {  // D values (zero-padded to 16s) -> fp32 lanes
  for (int64_t c = 0; c < (D + 15) / 16; ++c) {
    float v[16] = {};
    const int64_t n = std::min<int64_t>(16, D - 16 * c);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (n == 16) {  // a bfloat16 is the high half of an fp32
#ifdef __AVX512F__  // (GCC widens the generic form below in two halves)
        out[c] = reinterpret_cast<F32>(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * c))), 16));
#else
        U16 h;
        std::memcpy(&h, p + 16 * c, 32);
        const U32 w = __builtin_convertvector(h, U32) << 16;
        std::memcpy(&out[c], &w, 64);
#endif
        continue;
      }
    }
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[16 * c + i]);
    std::memcpy(&out[c], v, 64);
  }
}

// reduce(v[j]) for j = 0..15 at once, in lane j: the halving tree's additions, each on 16 lanes (two
// vectors' lanes paired by shuffles), so the same sums as 16 calls of reduce.
static inline F32 reduce16(const F32* v) {
  F32 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // lanes 0-7: lane i + lane i + 8 of v[2k]; 8-15: of v[2k + 1]
    a[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], I32{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(v[2 * k], v[2 * k + 1], I32{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int k = 0; k < 4; ++k)  // lanes 4q .. 4q + 3: v[4k + q]'s i + i + 4
    b[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], I32{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(a[2 * k], a[2 * k + 1], I32{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int k = 0; k < 2; ++k)  // lanes 2r, 2r + 1: v[8k + r]'s i + i + 2
    c[k] = __builtin_shuffle(b[2 * k], b[2 * k + 1], I32{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(b[2 * k], b[2 * k + 1], I32{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(c[0], c[1], I32{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(c[0], c[1], I32{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}

static constexpr int MAX_GROUP = 16;  // query heads per key/value head
static constexpr int MAX_C = 16;      // 16-lane vectors per head: D <= 256
static constexpr int QB = 16;         // queries per work item: each key and value is converted once for all of them

// C: vectors per head (D / 16 rounded up), a compile-time count so that a head's sums stay in registers.
template <class T, int C>
static void attend(const T* q, const T* k, const T* v, T* out, int64_t Tq, int64_t H, int64_t Hkv, int64_t S, int64_t D,
                   const int64_t* q_slot, const int64_t* q_node, int64_t base, const int64_t* anc, float scale) {
  const int64_t G = H / Hkv, blocks = (Tq + QB - 1) / QB;
  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t w0, int64_t w1) {
    // kept by each thread from call to call: fresh pages for every forward cost more than the work
    static thread_local std::vector<F32> keys, values;
    static thread_local std::vector<int64_t> seen;  // the slots a query sees, ascending: its list
    static thread_local std::vector<float> scores;  // [g][i]: score, then weight, of the list's i-th slot for query head g
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t kvh = w / blocks, t0 = w % blocks * QB, nt = std::min<int64_t>(QB, Tq - t0);
      int64_t last = 0;
      for (int64_t t = 0; t < nt; ++t) last = std::max(last, q_slot[t0 + t]);
      keys.resize((last + 1) * C), values.resize((last + 1) * C);  // slots 0 .. last in fp32, for all nt queries
      for (int64_t s = 0; s <= last; ++s) {
        to_float(k + (kvh * S + s) * D, D, &keys[s * C]);
        to_float(v + (kvh * S + s) * D, D, &values[s * C]);
      }
      for (int64_t t = t0; t < t0 + nt; ++t) {
        seen.resize(q_slot[t] + 1);
        int64_t n = 0;
        for (int64_t s = 0; s <= q_slot[t]; ++s)
          if (s < base || ((anc[q_node[t]] >> std::min<int64_t>(s - base, 63)) & 1)) seen[n++] = s;
        const int64_t padded = (n + 15) / 16 * 16;
        scores.assign(G * padded, -INFINITY);
        F32 qf[MAX_GROUP][C];
        for (int64_t g = 0; g < G; ++g) to_float(q + (t * H + kvh * G + g) * D, D, qf[g]);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {  // 16 slots' dot lanes, then their halving trees together
          const int64_t m = std::min<int64_t>(16, n - i0);
          const F32* key[16];
          for (int j = 0; j < 16; ++j) key[j] = &keys[seen[std::min(i0 + j, n - 1)] * C];
          for (int64_t g = 0; g < G; ++g) {
            // 16 independent sums side by side, each in the order of c (before: one slot's sum at a time, a
            // chain of additions; a Zen 4 layer, 16 queries over 250 slots: 288 -> 239 us, 128 over 600: 4.98 -> 4.0 ms)
            F32 dot[16] = {};
            for (int c = 0; c < C; ++c)
              for (int j = 0; j < 16; ++j) dot[j] = dot[j] + qf[g][c] * key[j][c];
            const F32 s = reduce16(dot) * scale;
            std::memcpy(&scores[g * padded + i0], &s, 4 * m);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sc = scores.data() + g * padded;
          F32 top = F32{} - INFINITY;  // the largest score (by lanes, then across them: the same value)
          for (int64_t j = 0; j < padded; j += 16) {
            F32 x;
            std::memcpy(&x, sc + j, 64);
            top = x > top ? x : top;
          }
          float max = top[0];
          for (int l = 1; l < 16; ++l) max = std::max(max, top[l]);
          F32 sum{};
          for (int64_t j = 0; j < padded; j += 16) {  // padded slots: -inf, below -87 after the max: 0
            F32 x;
            std::memcpy(&x, sc + j, 64);
            const F32 p = exp_nonpositive(x - max);
            std::memcpy(sc + j, &p, 64);
            sum = sum + p;
          }
          const float total = reduce(sum);
          F32 acc[C] = {};
          for (int64_t i = 0; i < n; ++i) {
            const F32* value = &values[seen[i] * C];
            for (int c = 0; c < C; ++c) acc[c] = acc[c] + sc[i] * value[c];
          }
          float o[16 * C];
          for (int c = 0; c < C; ++c) {
            const F32 r = acc[c] / total;
            std::memcpy(o + 16 * c, &r, 64);
          }
          T* dst = out + (t * H + kvh * G + g) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d]);
        }
      }
    }
  });
}

// attend<T, C> for the runtime count c (1 .. MAX_C).
template <class T, int C = 1, class... Args>
static void attend_c(int64_t c, Args... args) {
  if constexpr (C <= MAX_C) {
    if (c == C) return attend<T, C>(args...);
    attend_c<T, C + 1>(c, args...);
  }
}

// q [1, H, T, D]; keys, values [1, H_kv, S, D] (the cache); q_slot, q_node [T]; base []; anc_bits [n]
// -> [1, H, T, D] in q's dtype.
at::Tensor attend_op(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor q_slot,
                        at::Tensor q_node, at::Tensor base, at::Tensor anc_bits) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && q.size(0) == 1 && keys.size(0) == 1, "minitree attend: q [1, H, T, D], "
              "keys [1, H_kv, S, D]");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "minitree attend: q, keys and values share a dtype");
  const int64_t H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = keys.size(1), S = keys.size(2);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= MAX_GROUP && D <= 16 * MAX_C, "minitree attend: ", H, " heads over ", Hkv,
              " key/value heads of ", D, " dimensions are not supported");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "minitree attend: a contiguous cache");
  const auto qt = q[0].transpose(0, 1).contiguous();  // [T, H, D]
  auto out = at::empty({Tq, H, D}, q.options());
  const auto slots = q_slot.to(at::kLong).contiguous(), nodes = q_node.to(at::kLong).contiguous();
  const auto anc = anc_bits.to(at::kLong).contiguous();
  const int64_t b = base.item<int64_t>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "minitree attend", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "minitree attend: no double");
    } else {
      attend_c<scalar_t>((D + 15) / 16, qt.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), Tq, H, Hkv, S, D, slots.data_ptr<int64_t>(), nodes.data_ptr<int64_t>(), b,
                       anc.data_ptr<int64_t>(), scale);
    }
  });
  return out.transpose(0, 1).unsqueeze(0);  // [1, H, T, D]
}

}  // namespace attention

TORCH_LIBRARY_FRAGMENT(minitree_kernels, m) {
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor q_slot, Tensor q_node, Tensor base, Tensor anc_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(minitree_kernels, CPU, m) { m.impl("attend", &attention::attend_op); }
