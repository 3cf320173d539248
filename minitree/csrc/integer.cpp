// GGUF weights times activations in integers, as llama.cpp multiplies them, with one rounding for
// every row count: y[r, o] = sum_k x[r, k] * w[o, k].
//
// Each activation row is quantized by itself to int8 blocks (ggml's rules: Q8_K, 256 values per
// block and scale, for the k-quants; Q8_0, 32 per block with an fp16 scale, for the others). The
// weights' small integers (levels) times those int8 values are summed in int32, which is exact in
// any order; the integer sub-block scales and offsets are applied in int32 too, and only then does
// a block's sum meet the float scales, in one fixed order per output:
//
//   acc = acc + (xd[r, b] * d[o, b]) * float(S[r, o, b])        S = sum_j sc[o, j] * (dot_j - off * xs[r, j])
//   acc = acc + (xd[r, b] * c[o, b]) * float(M[r, o, b])        M = sum_j m[o, j] * xs[r, j]   (formats with mins)
//
// dot_j: sum of level * xq over sub-block j; xs[r, j]: sum of xq over it; off: the format's zero level.
// So a row's output depends on that row alone: alone or beside 15 others, on any path below, the
// same bits. The paths (AVX512-VNNI, AVX-VNNI, AVX2, AMX-INT8) differ only in how they form the
// integer sums (the vector paths sub-block by sub-block; AMX, for Q4_K, a block's scaled sum in one
// tile product); `mm_portable` is the specification, written as plain loops, and the tests compare
// every path with it bit for bit.
//
// The file's blocks are regrouped once, at load (`repack`), by 16 outputs: per block of inputs, the
// fp16 scales of 16 outputs, their integer sub-block scales, then each sub-block's levels as
// quads: 64 bytes hold 4 consecutive inputs of 16 outputs (byte 4 o + i: output o, input i), the
// operand of one vpdpbusd and one row of an AMX B tile. 4-bit levels pack two quads per 64 bytes
// (low and high nibbles); 5- and 6-bit levels add one 64-byte plane of their high bits per sub-block.
// The same bytes per weight as the file (Q4_K: +2.8%, its 6-bit scales unpacked).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace integer {

enum Type { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// A format's group block (16 outputs x `block` inputs): fp16 d[16]; fp16 c[16] (mins); integer
// scales sc[subs][16] (k-quants; int8 for Q6_K) and mins m[subs][16] (Q4_K); the levels of each
// sub-block (`level_bytes`). Levels are unsigned; `offset` is the level of zero.
//   Q4_0  w = d (q - 8)            Q4_1  w = d q + m        (c = m)
//   Q5_0  w = d (q - 16)           Q5_1  w = d q + m        (c = m)
//   Q8_0  w = d (q - 128)          (the file's int8 q, stored as q + 128)
//   Q4_K  w = d sc q - dmin m      (c = -dmin; sub-blocks of 32)
//   Q6_K  w = d sc (q - 32)        (sub-blocks of 16)
template <int TYPE>
struct F {
  static constexpr int type_id = TYPE;
  static constexpr bool kquant = TYPE == Q4_K || TYPE == Q6_K;
  static constexpr int block = kquant ? 256 : 32;
  static constexpr int sub = TYPE == Q6_K ? 16 : 32;
  static constexpr int subs = block / sub, quads = sub / 4;
  static constexpr int bits = TYPE == Q8_0 ? 8 : TYPE == Q6_K ? 6 : (TYPE == Q5_0 || TYPE == Q5_1) ? 5 : 4;
  static constexpr int offset = TYPE == Q4_0 ? 8 : TYPE == Q5_0 ? 16 : TYPE == Q8_0 ? 128 : TYPE == Q6_K ? 32 : 0;
  static constexpr bool mins = TYPE == Q4_1 || TYPE == Q5_1 || TYPE == Q4_K;
  static constexpr bool scales = kquant;
  static constexpr int file_bytes = TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : TYPE == Q5_0 ? 22 : TYPE == Q5_1 ? 24
                                  : TYPE == Q8_0 ? 34 : TYPE == Q4_K ? 144 : 210;
  static constexpr int level_bytes = bits == 8 ? 16 * sub : 8 * sub + (bits > 4 ? 64 : 0);
  static constexpr int d_at = 0, c_at = 32, sc_at = mins ? 64 : 32, m_at = sc_at + (scales ? 16 * subs : 0);
  static constexpr int levels_at = m_at + (TYPE == Q4_K ? 16 * subs : 0);
  static constexpr int bytes = levels_at + subs * level_bytes;
};

// Calls fn(F<TYPE>{}) for a runtime GGUF type.
template <class Fn>
static auto with_format(int64_t type, Fn fn) {
  switch (type) {
    case Q4_0: return fn(F<Q4_0>{});
    case Q4_1: return fn(F<Q4_1>{});
    case Q5_0: return fn(F<Q5_0>{});
    case Q5_1: return fn(F<Q5_1>{});
    case Q8_0: return fn(F<Q8_0>{});
    case Q4_K: return fn(F<Q4_K>{});
    case Q6_K: return fn(F<Q6_K>{});
  }
  TORCH_CHECK(false, "minitree integer kernels: no kernel for GGUF type ", type);
}

static inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ---------------------------------------------------------------------------------------------
// The file's blocks, decoded (ggml's layouts), and regrouped

// One file block: fp16 bits of d and c, integer scales and mins per sub-block, a level per weight.
struct Decoded {
  uint16_t d = 0, c = 0;
  int sc[16] = {}, m[16] = {};
  uint8_t q[256] = {};
};

template <int TYPE>
static Decoded decode(const uint8_t* b) {
  Decoded o;
  std::memcpy(&o.d, TYPE == Q6_K ? b + 208 : b, 2);
  if constexpr (TYPE == Q4_0 || TYPE == Q4_1) {
    const uint8_t* qs = b + (TYPE == Q4_1 ? 4 : 2);
    for (int i = 0; i < 16; ++i) o.q[i] = qs[i] & 0xF, o.q[i + 16] = qs[i] >> 4;
  } else if constexpr (TYPE == Q5_0 || TYPE == Q5_1) {
    const uint8_t* h = b + (TYPE == Q5_1 ? 4 : 2);
    uint32_t qh;
    std::memcpy(&qh, h, 4);
    for (int i = 0; i < 16; ++i) {
      o.q[i] = (h[4 + i] & 0xF) | ((qh >> i) & 1) << 4;
      o.q[i + 16] = (h[4 + i] >> 4) | ((qh >> (i + 16)) & 1) << 4;
    }
  } else if constexpr (TYPE == Q8_0) {
    for (int i = 0; i < 32; ++i) o.q[i] = static_cast<uint8_t>(static_cast<int8_t>(b[2 + i]) + 128);
  } else if constexpr (TYPE == Q4_K) {
    const uint8_t* s = b + 4;
    for (int j = 0; j < 4; ++j) {
      o.sc[j] = s[j] & 63, o.m[j] = s[j + 4] & 63;
      o.sc[j + 4] = (s[j + 8] & 0xF) | (s[j] >> 6) << 4;
      o.m[j + 4] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
    }
    for (int c = 0; c < 4; ++c)  // 64 weights per 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high
      for (int i = 0; i < 32; ++i) o.q[64 * c + i] = b[16 + 32 * c + i] & 0xF, o.q[64 * c + 32 + i] = b[16 + 32 * c + i] >> 4;
  } else {  // Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, fp16 d
    for (int k = 0; k < 256; ++k) {
      const int half = k / 128, l = k % 32, part = (k % 128) / 32;
      const uint8_t lo = b[64 * half + l + 32 * (part % 2)];
      o.q[k] = ((part < 2 ? lo & 0xF : lo >> 4) | ((b[128 + 32 * half + l] >> (2 * part)) & 3) << 4);
    }
    for (int j = 0; j < 16; ++j) o.sc[j] = static_cast<int8_t>(b[192 + j]);
  }
  if constexpr (TYPE == Q4_1 || TYPE == Q5_1) std::memcpy(&o.c, b + 2, 2);
  if constexpr (TYPE == Q4_K) {
    std::memcpy(&o.c, b + 2, 2);
    o.c ^= 0x8000;  // c = -dmin: the sign bit, exactly
  }
  return o;
}

// Writes output o's decoded block into group block g.
template <int TYPE>
static void put(uint8_t* g, int o, const Decoded& v) {
  using T = F<TYPE>;
  std::memcpy(g + T::d_at + 2 * o, &v.d, 2);
  if constexpr (T::mins) std::memcpy(g + T::c_at + 2 * o, &v.c, 2);
  for (int j = 0; j < T::subs; ++j) {
    if constexpr (T::scales) g[T::sc_at + 16 * j + o] = static_cast<uint8_t>(v.sc[j]);
    if constexpr (TYPE == Q4_K) g[T::m_at + 16 * j + o] = static_cast<uint8_t>(v.m[j]);
    uint8_t* L = g + T::levels_at + j * T::level_bytes;
    for (int i = 0; i < T::sub; ++i) {
      const int quad = i / 4, lane = 4 * o + i % 4, q = v.q[T::sub * j + i];
      if constexpr (T::bits == 8) {
        L[64 * quad + lane] = static_cast<uint8_t>(q);
        continue;
      }
      L[64 * (quad % (T::quads / 2)) + lane] |= (q & 0xF) << (quad < T::quads / 2 ? 0 : 4);
      if constexpr (T::bits == 5) L[8 * T::sub + lane] |= ((q >> 4) & 1) << quad;
      if constexpr (T::bits == 6) L[8 * T::sub + lane] |= ((q >> 4) & 3) << (2 * quad);
    }
  }
}

template <int TYPE>
static at::Tensor repack(const at::Tensor& w, int64_t K) {
  using T = F<TYPE>;
  const int64_t O = w.size(0), blocks = K / T::block, groups = (O + 15) / 16;
  TORCH_CHECK(K % T::block == 0 && w.size(1) == blocks * T::file_bytes, "minitree repack: ", K,
              " input features do not match ", w.size(1), " bytes per weight row");
  const auto wc = w.contiguous();
  at::Tensor out = at::zeros({groups, blocks * T::bytes}, w.options());
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  uint8_t* gp = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int o = 0; o < 16 && 16 * g + o < O; ++o)  // outputs past O stay zero (d = 0)
        for (int64_t b = 0; b < blocks; ++b)
          put<TYPE>(gp + g * out.size(1) + b * T::bytes, o, decode<TYPE>(wp + (16 * g + o) * w.size(1) + b * T::file_bytes));
  });
  return out;
}

// The weights of outputs `outputs` (int64 [n]: a layer's every output, or the rows an embedding looks
// up), in fp32 [n, K], computed in the gguf package's order (so equal to its reading).
template <int TYPE>
static at::Tensor dequantize(const at::Tensor& groups, int64_t K, const at::Tensor& outputs) {
  using T = F<TYPE>;
  const int64_t blocks = K / T::block, n = outputs.numel();
  TORCH_CHECK(groups.size(1) == blocks * T::bytes, "minitree dequantize: groups do not hold ", K, " inputs per output");
  const auto index = outputs.to(at::kLong).contiguous();
  const int64_t* op = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(op[i] >= 0 && op[i] < 16 * groups.size(0), "minitree dequantize: output ", op[i], " is not in the groups");
  at::Tensor y = at::empty({n, K}, at::kFloat);
  const uint8_t* gp = groups.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* g = gp + (op[i] / 16) * groups.size(1) + b * T::bytes;
        const int lane = op[i] % 16;
        const float d = half(g + T::d_at + 2 * lane), c = T::mins ? half(g + T::c_at + 2 * lane) : 0.0f;
        for (int j = 0; j < T::subs; ++j) {
          const uint8_t* L = g + T::levels_at + j * T::level_bytes;
          const int sc = !T::scales ? 1 : TYPE == Q6_K ? static_cast<int8_t>(g[T::sc_at + 16 * j + lane]) : g[T::sc_at + 16 * j + lane];
          const int m = TYPE == Q4_K ? g[T::m_at + 16 * j + lane] : 1;
          for (int k = 0; k < T::sub; ++k) {
            const int quad = k / 4, at = 4 * lane + k % 4;
            int q;
            if constexpr (T::bits == 8) {
              q = L[64 * quad + at];
            } else {
              q = (L[64 * (quad % (T::quads / 2)) + at] >> (quad < T::quads / 2 ? 0 : 4)) & 0xF;
              if constexpr (T::bits == 5) q |= ((L[8 * T::sub + at] >> quad) & 1) << 4;
              if constexpr (T::bits == 6) q |= ((L[8 * T::sub + at] >> (2 * quad)) & 3) << 4;
            }
            float w;
            if constexpr (T::mins) w = T::scales ? (d * sc) * q + c * m : d * q + c;
            else w = T::scales ? (d * sc) * (q - T::offset) : d * (q - T::offset);
            yp[i * K + b * T::block + T::sub * j + k] = w;
          }
        }
      }
  });
  return y;
}

// Float weights [O, K] -> the file blocks of a 32-block type (ggml's reference quantizers): Q4_1 (min-max
// levels: the lossy "q4" form of draft weights) or Q8_0.
static at::Tensor quantize_weights(const at::Tensor& w, int64_t type) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 32 == 0 && (type == Q4_1 || type == Q8_0), "minitree quantize: float w [O, K] "
              "with K a multiple of 32, to Q4_1 or Q8_0");
  const auto wf = w.to(at::kFloat).contiguous();
  const int64_t O = w.size(0), nb = w.size(1) / 32, bytes = type == Q4_1 ? F<Q4_1>::file_bytes : F<Q8_0>::file_bytes;
  auto out = at::empty({O, nb * bytes}, w.options().dtype(at::kByte));
  const float* src = wf.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, O * nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const float* x = src + 32 * i;
      uint8_t* y = dst + bytes * i;
      if (type == Q4_1) {
        float lo = x[0], hi = x[0];
        for (int j = 1; j < 32; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
        const float d = (hi - lo) / 15, id = d != 0 ? 1 / d : 0.0f;
        const c10::Half dh(d), mh(lo);
        std::memcpy(y, &dh.x, 2);
        std::memcpy(y + 2, &mh.x, 2);
        for (int j = 0; j < 16; ++j) {
          const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - lo) * id + 0.5f)));
          const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j + 16] - lo) * id + 0.5f)));
          y[4 + j] = static_cast<uint8_t>(q0 | q1 << 4);
        }
      } else {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127, id = d != 0 ? 1 / d : 0.0f;
        const c10::Half dh(d);
        std::memcpy(y, &dh.x, 2);
        for (int j = 0; j < 32; ++j) y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Activations: each row quantized by itself (ggml's reference rules)

struct Act {
  std::vector<int8_t> q;         // [R, K]
  std::vector<float> d;          // [R, K / block]
  std::vector<int32_t> s;        // [R, K / sub]: sums of q over each sub-block
  std::vector<int32_t> s_pairs;  // [R, K / sub / 2] (k-quants): those sums two by two as int16 pairs,
                                 // the operand of one pair product with two sub-blocks' scales or mins
  std::vector<int32_t> s_off;    // [R, K / sub] (formats with a zero level): -offset times the sums, the
                                 // value the VNNI paths start a sub-block's dots from
  int64_t K;
};

// Q8_K (k-quants): per 256 values, the scale from the value of largest magnitude, rounded to nearest even.
// Q8_0 (the others): per 32, d = amax / 127 rounded to fp16, the values by x / d rounded half away from zero.
// One block of x -> its int8 values q and their sums over each sub-block; returns its scale. The
// specification (the vector paths' quantize_block computes the same operations, 8 or 16 values at a time).
template <class T, class S>
static float quantize_block(const S* x, int8_t* q, int32_t* sums) {
  float v[T::block], amax = 0, max = 0, d;
  for (int i = 0; i < T::block; ++i) v[i] = static_cast<float>(x[i]);  // exact from bf16 and fp16
  for (int i = 0; i < T::block; ++i)
    if (std::fabs(v[i]) > amax) amax = std::fabs(v[i]), max = v[i];
  if constexpr (T::kquant) {
    const float iscale = amax == 0 ? 0.0f : -127.0f / max;
    for (int i = 0; i < T::block; ++i) q[i] = static_cast<int8_t>(std::min(127.0f, std::nearbyint(iscale * v[i])));
    d = amax == 0 ? 0.0f : 1 / iscale;
  } else {
    const float dd = amax / 127, id = dd != 0 ? 1 / dd : 0.0f;
    for (int i = 0; i < T::block; ++i) q[i] = static_cast<int8_t>(std::round(v[i] * id));
    d = static_cast<float>(c10::Half(dd));
  }
  for (int j = 0; j < T::subs; ++j) {
    sums[j] = 0;
    for (int i = 0; i < T::sub; ++i) sums[j] += q[T::sub * j + i];
  }
  return d;
}

// The output [R, ld] in x's dtype: each output's float sum rounded once, as torch's .to() rounds it.
struct Out {
  void* p;
  int64_t ld;
  at::ScalarType dtype;
  void put(int64_t r, int64_t col, const float* v, int n) const {  // row r, outputs col.. col + n - 1
    const int64_t at = r * ld + col;
    if (dtype == at::kBFloat16)
      for (int i = 0; i < n; ++i) static_cast<c10::BFloat16*>(p)[at + i] = c10::BFloat16(v[i]);
    else if (dtype == at::kHalf)
      for (int i = 0; i < n; ++i) static_cast<c10::Half*>(p)[at + i] = c10::Half(v[i]);
    else
      std::memcpy(static_cast<float*>(p) + at, v, 4 * n);
  }
};

// ---------------------------------------------------------------------------------------------
// The specification: plain loops, one output at a time

template <int TYPE>
static void mm_portable(const uint8_t* gp, int64_t group_bytes, const Act& a, int64_t R, const Out& y) {
  using T = F<TYPE>;
  const int64_t K = a.K, nb = K / T::block, ns = K / T::sub;
  at::parallel_for(0, y.ld / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int o = 0; o < 16; ++o)
        for (int64_t r = 0; r < R; ++r) {
          float acc = 0;
          for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* g = gp + gi * group_bytes + b * T::bytes;
            int32_t S = 0, M = 0;
            for (int j = 0; j < T::subs; ++j) {
              const uint8_t* L = g + T::levels_at + j * T::level_bytes;
              const int8_t* xq = a.q.data() + r * K + b * T::block + T::sub * j;
              int32_t dot = 0;
              for (int i = 0; i < T::sub; ++i) {
                const int quad = i / 4, at = 4 * o + i % 4;
                int q;
                if constexpr (T::bits == 8) {
                  q = L[64 * quad + at];
                } else {
                  q = (L[64 * (quad % (T::quads / 2)) + at] >> (quad < T::quads / 2 ? 0 : 4)) & 0xF;
                  if constexpr (T::bits == 5) q |= ((L[8 * T::sub + at] >> quad) & 1) << 4;
                  if constexpr (T::bits == 6) q |= ((L[8 * T::sub + at] >> (2 * quad)) & 3) << 4;
                }
                dot += q * xq[i];
              }
              const int32_t xs = a.s[r * ns + b * T::subs + j], t = dot - T::offset * xs;
              if constexpr (T::scales) {
                const int sc = TYPE == Q6_K ? static_cast<int8_t>(g[T::sc_at + 16 * j + o]) : g[T::sc_at + 16 * j + o];
                S += sc * t;
              } else {
                S += t;
              }
              if constexpr (TYPE == Q4_K) M += g[T::m_at + 16 * j + o] * xs;
              else if constexpr (T::mins) M += xs;
            }
            const float xd = a.d[r * nb + b];
            acc = acc + (xd * half(g + T::d_at + 2 * o)) * static_cast<float>(S);
            if constexpr (T::mins) acc = acc + (xd * half(g + T::c_at + 2 * o)) * static_cast<float>(M);
          }
          y.put(r, 16 * gi + o, &acc, 1);
        }
  });
}

// ---------------------------------------------------------------------------------------------
// The vector paths: one driver (integer_paths.h), compiled for AVX-VNNI and AVX512-VNNI, each with its
// own `sub_dots`: the int32 dots of one sub-block's levels W [quads][64] with R rows of int8 x; AVX2
// has a driver of its own (fewer registers).

typedef uint8_t U8 __attribute__((vector_size(64)));
typedef int32_t I32 __attribute__((vector_size(64)));
typedef float F32 __attribute__((vector_size(64)));

// Streaming weights from memory runs well under the memory's bandwidth unless they are asked for ahead
// of use: prefetch<BYTES, N>(gb, j) asks for share j of N of the block of BYTES bytes AHEAD bytes past
// gb. Paths spread a block's lines over its sub-blocks (N = subs): asked for at once, they filled the
// core's queue of misses and stalled the arithmetic of many rows (a Zen 4's linears at 8 rows: 81 -> 56 ms).
static constexpr int AHEAD = 4096;
template <int BYTES, int N = 1>
static inline void prefetch(const uint8_t* gb, int j = 0) {
  constexpr int share = (BYTES + 64 * N - 1) / (64 * N) * 64;
  for (int line = share * j; line < std::min(share * (j + 1), BYTES); line += 64) __builtin_prefetch(gb + AHEAD + line);
}

static inline int32_t word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
static inline __m256 halves8(const uint8_t* p) {  // 8 fp16 -> fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <bool SIGNED>
static inline __m256i bytes8(const uint8_t* p) {  // 8 bytes -> 8 int32 lanes
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return SIGNED ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v);
}
// 16 values as two 8-lane halves, for the AVX-VNNI path's shared driver (integer_paths.h).
static inline F32 halves(const uint8_t* p) {  // 16 fp16 -> fp32
  F32 v;
  const __m256 lo = halves8(p), hi = halves8(p + 16);
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
}
template <bool SIGNED>
static inline I32 widen(const uint8_t* p) {  // 16 bytes -> 16 int32 lanes
  const __m256i a = bytes8<SIGNED>(p), b = bytes8<SIGNED>(p + 8);
  I32 v;
  std::memcpy(&v, &a, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &b, 32);
  return v;
}
// quantize_block's operations, 8 values per vector (as the AVX-512 paths', on 8 lanes).
template <class S>
static inline __m256 load8(const S* x) {  // 8 values -> fp32 (exact)
  if constexpr (std::is_same_v<S, float>) return _mm256_loadu_ps(x);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  if constexpr (std::is_same_v<S, c10::Half>) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bfloat16: the high half of an fp32
}
template <class T, class S>
static float quantize_block(const S* x, int8_t* q, int32_t* sums) {
  constexpr int V = T::block / 8;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[V], top = _mm256_setzero_ps();
  for (int k = 0; k < V; ++k) v[k] = load8(x + 8 * k), top = _mm256_max_ps(top, _mm256_and_ps(v[k], magnitude));
  float amax = 0;
  for (int l = 0; l < 8; ++l) amax = std::max(amax, top[l]);
  __m256 rounded[V];
  float d;
  if constexpr (T::kquant) {
    float max = 0;
    for (int k = 0; k < V; ++k)
      if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(v[k], magnitude), _mm256_set1_ps(amax), _CMP_EQ_OQ))) {
        max = v[k][__builtin_ctz(hit)];
        break;
      }
    const float iscale = amax == 0 ? 0.0f : -127.0f / max;
    d = amax == 0 ? 0.0f : 1 / iscale;
    for (int k = 0; k < V; ++k)
      rounded[k] = _mm256_min_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_set1_ps(iscale), v[k]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                 _mm256_set1_ps(127.0f));
  } else {
    const float dd = amax / 127, id = dd != 0 ? 1 / dd : 0.0f;
    d = static_cast<float>(c10::Half(dd));
    for (int k = 0; k < V; ++k) {
      const __m256 y = _mm256_mul_ps(v[k], _mm256_set1_ps(id)), a = _mm256_and_ps(y, magnitude);
      const __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, t), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
      rounded[k] = _mm256_or_ps(_mm256_add_ps(t, _mm256_and_ps(up, _mm256_set1_ps(1.0f))), _mm256_andnot_ps(magnitude, y));
    }
  }
  __m256i n[V];
  for (int k = 0; k < V; ++k) {
    n[k] = _mm256_cvtps_epi32(rounded[k]);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(n[k]), _mm256_extracti128_si256(n[k], 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + 8 * k), _mm_packs_epi16(words, words));
  }
  constexpr int per = T::sub / 8;  // vectors per sub-block
  for (int j = 0; j < T::subs; ++j) {
    __m256i sum = n[per * j];
    for (int i = 1; i < per; ++i) sum = _mm256_add_epi32(sum, n[per * j + i]);
    sums[j] = 0;
    for (int l = 0; l < 8; ++l) sums[j] += reinterpret_cast<__v8si>(sum)[l];
  }
  return d;
}
// The AVX2 driver. Its 16 registers cannot hold the shared driver's (integer_paths.h) sums of 8 rows
// (AVX-512 has 32), so here a block's levels are unpacked once into memory (from 4 rows on), then each
// row's sums are formed by itself, 8 outputs per register, and the rows' accumulators live in memory.
// The same integer sums and float operations per output as mm_portable.
//
// vpmaddubsw sums level x int8 pairs in int16 (exact: |level x| <= 63 x 128); those int16 sums are
// added for G quads (|sum| < 2^15: G = 8, 4, 2 quads of 4-, 5-, 6-bit levels), then vpmaddwd multiplies
// them by the sub-block's scale (or 1) and adds the pairs into int32. 8-bit levels go in two halves,
// 16 * high + low nibbles.
using V = __m256i;
static inline V load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const V*>(p)); }
static inline V pair(V lo, V hi) {  // int32 lanes -> int16 pairs (lo, hi)
  return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(hi, 16));
}

// Block b of a group for 16 outputs: levels W [subs * quads][2 halves of 8 outputs], the sub-block
// scales as int16 pairs (sc, sc) per output (SC [subs][2]), and the pairs of two sub-blocks' scales
// or mins that meet the rows' sub-block sums (P [subs / 2][2]).
template <class T>
struct Block {
  alignas(32) V W[T::subs * T::quads][2];
  alignas(32) V SC[T::scales ? T::subs : 1][2];
  alignas(32) V P[T::scales ? T::subs / 2 : 1][2];

  // Quad q of sub-block j's levels, outputs 8h..8h + 7, from the group block's bytes gb.
  static V level(const uint8_t* gb, int j, int q, int h) {
    constexpr int H = T::quads / 2;
    const uint8_t* L = gb + T::levels_at + j * T::level_bytes;
    if constexpr (T::bits == 8) return load(L + 64 * q + 32 * h);
    const V nib = _mm256_set1_epi8(0xF), l = load(L + 64 * (q % H) + 32 * h);
    V w = q < H ? _mm256_and_si256(l, nib) : _mm256_and_si256(_mm256_srli_epi16(l, 4), nib);
    if constexpr (T::bits > 4) {  // bit q (5-bit) or bits 2q, 2q + 1 (6-bit) of the high plane: level bit 4 up
      const V hb = load(L + 8 * T::sub + 32 * h), mask = _mm256_set1_epi8(T::bits == 5 ? 1 : 3);
      w = _mm256_or_si256(w, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, (T::bits - 4) * q), mask), 4));
    }
    return w;
  }

  // The block's scales (SC, P), and its levels (W) where four or more rows will use them (for fewer,
  // unpacking each quad again per row costs less than storing and reloading them).
  void unpack(const uint8_t* gb, bool levels) {
    for (int j = 0; j < T::subs; ++j) {
      prefetch<T::bytes, T::subs>(gb, j);  // spread over the sub-blocks
      if (levels)
        for (int q = 0; q < T::quads; ++q)
          for (int h = 0; h < 2; ++h) W[j * T::quads + q][h] = level(gb, j, q, h);
    }
    if constexpr (T::scales) {
      constexpr bool SIGNED = T::type_id == Q6_K;
      const uint8_t* by = gb + (T::type_id == Q4_K ? T::m_at : T::sc_at);
      for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < T::subs; ++j) {
          const V sc = bytes8<SIGNED>(gb + T::sc_at + 16 * j + 8 * h);
          SC[j][h] = pair(sc, sc);
        }
        for (int p = 0; p < T::subs / 2; ++p) P[p][h] = pair(bytes8<SIGNED>(by + 32 * p + 8 * h), bytes8<SIGNED>(by + 32 * p + 16 + 8 * h));
      }
    }
  }

  // Sub-block j's level x int8 sums with the row's values x (its 4 * quads values), times `scale`
  // (int16 pairs), added to S [2 halves]. The levels come from W (unpacked) or straight from the group
  // block's bytes gb.
  template <bool UNPACKED>
  void sub_dot(const uint8_t* gb, int j, const int8_t* x, const V scale[2], V S[2]) const {
    constexpr int G = T::bits == 5 ? 4 : T::bits == 6 ? 2 : 8;
    const V nib = _mm256_set1_epi8(0xF);
    for (int q0 = 0; q0 < T::quads; q0 += G) {
      V lo[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, hi[2] = {lo[0], lo[1]};
      for (int q = q0; q < std::min(q0 + G, T::quads); ++q) {
        const V xv = _mm256_set1_epi32(word(x + 4 * q));
        for (int h = 0; h < 2; ++h) {
          const V w = UNPACKED ? W[j * T::quads + q][h] : level(gb, j, q, h);
          if constexpr (T::bits == 8) {
            lo[h] = _mm256_add_epi16(lo[h], _mm256_maddubs_epi16(_mm256_and_si256(w, nib), xv));
            hi[h] = _mm256_add_epi16(hi[h], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), nib), xv));
          } else {
            lo[h] = _mm256_add_epi16(lo[h], _mm256_maddubs_epi16(w, xv));
          }
        }
      }
      for (int h = 0; h < 2; ++h) {
        S[h] = _mm256_add_epi32(S[h], _mm256_madd_epi16(lo[h], scale[h]));
        if constexpr (T::bits == 8) S[h] = _mm256_add_epi32(S[h], _mm256_slli_epi32(_mm256_madd_epi16(hi[h], scale[h]), 4));
      }
    }
  }
};

// y [R, y.ld] = the groups times a's rows; threads split the groups, each group's weights are read
// from memory once for all rows.
template <class T>
static void mm(const uint8_t* gp, int64_t group_bytes, const Act& a, int64_t R, const Out& y) {
  const int64_t K = a.K, nb = K / T::block, ns = K / T::sub;
  at::parallel_for(0, y.ld / 16, 1, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<float> acc;
    thread_local Block<T> blk;
    acc.resize(16 * R);
    const V ones = _mm256_set1_epi16(1);
    const V unit[2] = {ones, ones};
    for (int64_t gi = g0; gi < g1; ++gi) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const uint8_t* g = gp + gi * group_bytes;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* gb = g + b * T::bytes;
        blk.unpack(gb, R > 3);
        const __m256 d[2] = {halves8(gb + T::d_at), halves8(gb + T::d_at + 16)};
        __m256 c[2] = {};
        if constexpr (T::mins) c[0] = halves8(gb + T::c_at), c[1] = halves8(gb + T::c_at + 16);
        auto each_row = [&](auto unpacked) {
          for (int64_t r = 0; r < R; ++r) {
            const int8_t* x = a.q.data() + r * K + b * T::block;
            const int32_t* xs = a.s.data() + r * ns + b * T::subs;
            V S[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, M[2] = {S[0], S[1]};
            if constexpr (T::scales) {
              // The row's sub-block sums times Q4_K's mins (M) or Q6_K's scales (its offset: S starts at
              // -32 sum_j sc_j xs_j), two sub-blocks per int16 pair product.
              const int32_t* s2 = a.s_pairs.data() + r * ns / 2 + b * T::subs / 2;
              V sum[2] = {S[0], S[1]};
              for (int p = 0; p < T::subs / 2; ++p)
                for (int h = 0; h < 2; ++h) sum[h] = _mm256_add_epi32(sum[h], _mm256_madd_epi16(blk.P[p][h], _mm256_set1_epi32(s2[p])));
              for (int h = 0; h < 2; ++h) {
                if constexpr (T::type_id == Q4_K) M[h] = sum[h];
                else S[h] = _mm256_mullo_epi32(sum[h], _mm256_set1_epi32(-T::offset));
              }
              for (int j = 0; j < T::subs; ++j) blk.template sub_dot<decltype(unpacked)::value>(gb, j, x + j * T::sub, blk.SC[j], S);
            } else {  // one sub-block per block
              blk.template sub_dot<decltype(unpacked)::value>(gb, 0, x, unit, S);
              for (int h = 0; h < 2; ++h) {
                S[h] = _mm256_sub_epi32(S[h], _mm256_set1_epi32(T::offset * xs[0]));
                if constexpr (T::mins) M[h] = _mm256_set1_epi32(xs[0]);
              }
            }
            const __m256 xd = _mm256_set1_ps(a.d[r * nb + b]);
            for (int h = 0; h < 2; ++h) {
              float* at = acc.data() + 16 * r + 8 * h;
              __m256 v = _mm256_add_ps(_mm256_loadu_ps(at), _mm256_mul_ps(_mm256_mul_ps(xd, d[h]), _mm256_cvtepi32_ps(S[h])));
              if constexpr (T::mins) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_mul_ps(xd, c[h]), _mm256_cvtepi32_ps(M[h])));
              _mm256_storeu_ps(at, v);
            }
          }
        };
        if (R > 3) each_row(std::true_type{});
        else each_row(std::false_type{});
      }
      for (int64_t r = 0; r < R; ++r) y.put(r, 16 * gi, acc.data() + 16 * r, 16);
    }
  });
}
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#ifdef MINITREE_AVX_VNNI_ON_AVX512
// Tests only (test_gguf_read_exactly.py): the AVX-VNNI path built with the EVEX (AVX512-VL) encodings
// of its two instructions, the same operations, so that a CPU with AVX512-VNNI and without AVX-VNNI runs it.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#define AVX_VNNI_OP(op) _mm256_##op##_epi32
#else
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define AVX_VNNI_OP(op) _mm256_##op##_avx_epi32
#endif
namespace avx_vnni {
using avx2::halves;
using avx2::widen;
static inline I32 dpwssd(I32 acc, I32 a, I32 b) {  // acc + the int16 pair products of a and b, per int32 lane
  __m256i r[2], x[2], y[2];
  std::memcpy(r, &acc, 64), std::memcpy(x, &a, 64), std::memcpy(y, &b, 64);
  for (int h = 0; h < 2; ++h) r[h] = AVX_VNNI_OP(dpwssd)(r[h], x[h], y[h]);
  std::memcpy(&acc, r, 64);
  return acc;
}
template <int BITS, int QUADS, int R>
static inline void sub_dots(const U8* W, const int8_t* x, int64_t ldx, const int32_t* start, int64_t lds, I32* dots) {
  for (int r = 0; r < R; ++r) {
    const __m256i s0 = start ? _mm256_set1_epi32(start[r * lds]) : _mm256_setzero_si256();
    __m256i acc[2] = {s0, s0};  // outputs 0-7, 8-15
    for (int q = 0; q < QUADS; ++q) {
      const __m256i xv = _mm256_set1_epi32(word(x + r * ldx + 4 * q));
      for (int h = 0; h < 2; ++h)
        acc[h] = AVX_VNNI_OP(dpbusd)(acc[h], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                 reinterpret_cast<const uint8_t*>(W + q) + 32 * h)), xv);
    }
    std::memcpy(&dots[r], &acc[0], 32);
    std::memcpy(reinterpret_cast<char*>(&dots[r]) + 32, &acc[1], 32);
  }
}
#include "integer_paths.h"
}  // namespace avx_vnni
#undef AVX_VNNI_OP
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")
namespace avx512_vnni {
static inline F32 halves(const uint8_t* p) {
  return reinterpret_cast<F32>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
static inline I32 dpwssd(I32 acc, I32 a, I32 b) {  // acc + the int16 pair products of a and b, per int32 lane
  return reinterpret_cast<I32>(_mm512_dpwssd_epi32(reinterpret_cast<__m512i>(acc), reinterpret_cast<__m512i>(a),
                                                   reinterpret_cast<__m512i>(b)));
}
template <bool SIGNED>
static inline I32 widen(const uint8_t* p) {  // 16 bytes -> 16 int32 lanes
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<I32>(SIGNED ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
}
// acc + the dot products of w's bytes with the 4 int8 values at x, in each int32 lane: vpdpbusd with
// x broadcast from memory inside the instruction ({1to16}; GCC emits a separate vpbroadcastd per
// product, 6-8% slower at 4-8 rows on a Zen 4).
static inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}
template <int BITS, int QUADS, int R>
static inline void sub_dots(const U8* W, const int8_t* x, int64_t ldx, const int32_t* start, int64_t lds, I32* dots) {
  // Two sums per row for 8 quads (half the dependency chain; integer sums, any order), one for 4 (Q6_K):
  // no second sum to clear and add per row (a 1536x8960 Q6_K layer at 8 rows on a Zen 4: 437 -> 416 us).
  constexpr int C = QUADS > 4 ? 2 : 1;
  for (int r = 0; r < R; ++r) {
    __m512i acc[C] = {};
    if (start) acc[0] = _mm512_set1_epi32(start[r * lds]);
    for (int q = 0; q < QUADS; ++q)
      acc[q % C] = dpbusd_broadcast(acc[q % C], reinterpret_cast<__m512i>(W[q]), x + r * ldx + 4 * q);
    for (int c = 1; c < C; ++c) acc[0] = _mm512_add_epi32(acc[0], acc[c]);
    dots[r] = reinterpret_cast<I32>(acc[0]);
  }
}
// quantize_block's operations, 16 values per vector: the largest magnitude, the first value of it (as
// the plain loop finds it), then each value scaled and rounded (to nearest even, or half away from zero:
// the truncation plus one where the dropped fraction, exact, is at least a half).
template <class S>
static inline __m512 load16(const S* x) {  // 16 values -> fp32 (exact)
  if constexpr (std::is_same_v<S, float>) return _mm512_loadu_ps(x);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (std::is_same_v<S, c10::Half>) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bfloat16: the high half of an fp32
}
template <class T, class S>
static float quantize_block(const S* x, int8_t* q, int32_t* sums) {
  constexpr int V = T::block / 16;
  __m512 v[V], top = _mm512_setzero_ps();
  for (int k = 0; k < V; ++k) v[k] = load16(x + 16 * k), top = _mm512_max_ps(top, _mm512_abs_ps(v[k]));
  const float amax = _mm512_reduce_max_ps(top);
  __m512 rounded[V];
  float d;
  if constexpr (T::kquant) {
    float max = 0;
    for (int k = 0; k < V; ++k)
      if (const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(v[k]), _mm512_set1_ps(amax), _CMP_EQ_OQ)) {
        max = v[k][__builtin_ctz(hit)];
        break;
      }
    const float iscale = amax == 0 ? 0.0f : -127.0f / max;
    d = amax == 0 ? 0.0f : 1 / iscale;
    for (int k = 0; k < V; ++k)
      rounded[k] = _mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_set1_ps(iscale), v[k]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                 _mm512_set1_ps(127.0f));
  } else {
    const float dd = amax / 127, id = dd != 0 ? 1 / dd : 0.0f;
    d = static_cast<float>(c10::Half(dd));
    for (int k = 0; k < V; ++k) {
      const __m512 y = _mm512_mul_ps(v[k], _mm512_set1_ps(id)), a = _mm512_abs_ps(y);
      const __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(INT32_MIN));
      rounded[k] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0f))), sign));
    }
  }
  __m512i n[V];
  for (int k = 0; k < V; ++k) {
    n[k] = _mm512_cvtps_epi32(rounded[k]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * k), _mm512_cvtepi32_epi8(n[k]));
  }
  constexpr int per = T::sub / 16;  // vectors per sub-block
  for (int j = 0; j < T::subs; ++j)
    sums[j] = _mm512_reduce_add_epi32(per == 1 ? n[j] : _mm512_add_epi32(n[per * j], n[per * j + 1]));
  return d;
}
#include "integer_paths.h"
}  // namespace avx512_vnni
#pragma GCC pop_options

static bool amx_permitted() {  // Linux hands out the tile registers' state on request, once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,f16c,fma,amx-tile,amx-int8")
namespace amx {
using avx512_vnni::halves;
using avx512_vnni::pair_sum;
using avx512_vnni::min_pairs;
using avx512_vnni::unpack;
struct alignas(64) TileConfig {
  uint8_t palette = 1, start = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Q4_K on tiles (AMX-INT8), for any number of rows. The sub-block scales (6 bits) enter the tile
// operands, so that one pair of C tiles sums a whole block: B holds level * (sc & 7) and level *
// (sc >> 3) (each at most 105, one unsigned byte, looked up in a table of products), and
// S = C_lo + 8 C_hi is the specification's integer sum over sub-blocks of sc * dot. A block's levels
// are expanded once and multiplied into every 16 rows of x (rows past R are zeros: mm_op pads them).
// The work is a pipeline, so that no tile load waits on the vector stores just made and no vector
// load on a tile store: blocks are expanded two ahead of their products, and 16 rows' products are
// scaled two steps behind.
static void mm_q4_k(const uint8_t* gp, int64_t group_bytes, const Act& a, int64_t R, const Out& y) {
  using T = F<Q4_K>;
  constexpr int J = T::subs, Q = T::quads;
  const int64_t K = a.K, nb = K / T::block, ns = K / T::sub, chunks = (R + 15) / 16;
  alignas(64) uint8_t table[128], idx[64];  // table[16 s + q] = s q: s a 3-bit piece of a scale, q a level
  for (int i = 0; i < 128; ++i) table[i] = static_cast<uint8_t>((i / 16) * (i % 16));
  for (int i = 0; i < 64; ++i) idx[i] = static_cast<uint8_t>(i / 4);
  const __m512i tab0 = _mm512_load_si512(table), tab1 = _mm512_load_si512(table + 64);
  const __m512i spread = _mm512_load_si512(idx);  // byte 4 o + i <- byte o: a scale beside its output's levels
  at::parallel_for(0, y.ld / 16, 1, [&](int64_t g0, int64_t g1) {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;  // 0, 1: C lo, hi; then A, B lo, B hi twice
    _tile_loadconfig(&c);
    alignas(64) U8 W[Q], B[3][2][J][Q];  // [block % 3][lo, hi][sub-block][quad]
    alignas(64) I32 C[3][2][16];         // [item % 3][lo, hi][row]
    std::vector<F32> acc(R);
    auto expand = [&](const uint8_t* gb, U8 (*out)[J][Q]) {
      prefetch<T::bytes>(gb);
      for (int j = 0; j < J; ++j) {
        const __m512i sc = _mm512_permutexvar_epi8(spread, _mm512_castsi128_si512(
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(gb + T::sc_at + 16 * j))));
        const __m512i lo = _mm512_and_si512(_mm512_slli_epi16(sc, 4), _mm512_set1_epi8(0x70));
        const __m512i hi = _mm512_and_si512(_mm512_slli_epi16(sc, 1), _mm512_set1_epi8(0x70));
        unpack<T>(gb + T::levels_at + j * T::level_bytes, W);
        for (int q = 0; q < Q; ++q) {
          const __m512i w = reinterpret_cast<__m512i>(W[q]);
          out[0][j][q] = reinterpret_cast<U8>(_mm512_permutex2var_epi8(tab0, _mm512_or_si512(w, lo), tab1));
          out[1][j][q] = reinterpret_cast<U8>(_mm512_permutex2var_epi8(tab0, _mm512_or_si512(w, hi), tab1));
        }
      }
    };
    // Block b's products with rows r0.. (C: lo, hi) into acc.
    auto finish = [&](const uint8_t* gb, int64_t b, int64_t r0, const I32 (*Cs)[16]) {
      I32 mins[J / 2];
      min_pairs<T>(gb + T::m_at, mins);
      const F32 d = halves(gb + T::d_at), cm = halves(gb + T::c_at);
      for (int64_t r = r0; r < std::min(R, r0 + 16); ++r) {
        const I32 S = Cs[0][r - r0] + (Cs[1][r - r0] << 3);
        const I32 M = pair_sum<T>(mins, a.s_pairs.data() + r * ns / 2 + b * J / 2);
        const float x = a.d[r * nb + b];
        acc[r] = acc[r] + (x * d) * __builtin_convertvector(S, F32);
        acc[r] = acc[r] + (x * cm) * __builtin_convertvector(M, F32);
      }
    };
    for (int64_t gi = g0; gi < g1; ++gi) {
      const uint8_t* g = gp + gi * group_bytes;
      for (int64_t r = 0; r < R; ++r) acc[r] = F32{};
      expand(g, B[0]);
      if (nb > 1) expand(g + T::bytes, B[1]);
      for (int64_t i = 0; i < nb * chunks; ++i) {  // items: (block, 16 rows), block by block
        const int64_t b = i / chunks, r0 = 16 * (i % chunks);
        _tile_zero(0);
        _tile_zero(1);
        // 64 inputs (two sub-blocks) per product; operands alternate between two tile sets (A: 2, 5;
        // B lo: 3, 6; B hi: 4, 7), so that one set loads while the other multiplies.
#define PRODUCTS(k, A, LO, HI)                                              \
  _tile_loadd(A, a.q.data() + r0 * K + b * T::block + 64 * k, K);          \
  _tile_loadd(LO, &B[b % 3][0][2 * k], 64);                                \
  _tile_loadd(HI, &B[b % 3][1][2 * k], 64);                                \
  _tile_dpbsud(0, A, LO);                                                  \
  _tile_dpbsud(1, A, HI);
        PRODUCTS(0, 2, 3, 4) PRODUCTS(1, 5, 6, 7) PRODUCTS(2, 2, 3, 4) PRODUCTS(3, 5, 6, 7)
#undef PRODUCTS
        _tile_stored(0, C[i % 3][0], 64);
        _tile_stored(1, C[i % 3][1], 64);
        if (r0 == 0 && b + 2 < nb) expand(g + (b + 2) * T::bytes, B[(b + 2) % 3]);
        if (i > 1) finish(g + (i - 2) / chunks * T::bytes, (i - 2) / chunks, 16 * ((i - 2) % chunks), C[(i - 2) % 3]);
      }
      for (int64_t i = std::max<int64_t>(0, nb * chunks - 2); i < nb * chunks; ++i)
        finish(g + i / chunks * T::bytes, i / chunks, 16 * (i % chunks), C[i % 3]);
      for (int64_t r = 0; r < R; ++r) y.put(r, 16 * gi, reinterpret_cast<const float*>(&acc[r]), 16);
    }
    _tile_release();
  });
}
}  // namespace amx
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// Paths and ops

enum Path { PORTABLE, AVX2, AVX_VNNI, AVX512_VNNI, AMX, PATHS };
static const char* PATH_NAMES[PATHS] = {"portable", "avx2", "avx_vnni", "avx512_vnni", "amx"};

static bool available(int path) {
  __builtin_cpu_init();
  switch (path) {
    case PORTABLE: return true;
    case AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#ifdef MINITREE_AVX_VNNI_ON_AVX512
    case AVX_VNNI: return available(AVX2) && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    case AVX_VNNI: return available(AVX2) && __builtin_cpu_supports("avxvnni");
#endif
    case AVX512_VNNI: return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
    case AMX: return available(AVX512_VNNI) && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("amx-tile") &&
                     __builtin_cpu_supports("amx-int8") &&
                     amx_permitted();
  }
  return false;
}

// The path taken unless one is named: the widest vector dot product here. (AMX is named by the plan
// where it measures faster: minitree's "tiles" setting.)
static int best() {
  static const int vector = available(AVX512_VNNI) ? AVX512_VNNI : available(AVX_VNNI) ? AVX_VNNI
                          : available(AVX2) ? AVX2 : PORTABLE;
  return vector;
}

std::vector<std::string> paths() {
  std::vector<std::string> out;
  for (int p = 0; p < PATHS; ++p)
    if (available(p)) out.push_back(PATH_NAMES[p]);
  return out;
}

// x [R, K] -> its blocks, by the quantize_block of `path`'s instruction set (the plain loops on the
// portable path): the same bits.
template <class T>
static Act quantize(const at::Tensor& x, int path) {
  const auto xc = x.contiguous();
  const int64_t R = xc.size(0), K = xc.size(1), nb = K / T::block, ns = K / T::sub;
  Act a{std::vector<int8_t>(R * K), std::vector<float>(R * nb), std::vector<int32_t>(R * ns),
        std::vector<int32_t>(T::scales ? R * ns / 2 : 0), std::vector<int32_t>(T::offset ? R * ns : 0), K};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "minitree quantize", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const auto block = path == PORTABLE ? quantize_block<T, scalar_t>
                     : path == AVX2 || path == AVX_VNNI ? avx2::quantize_block<T, scalar_t> : avx512_vnni::quantize_block<T, scalar_t>;
    // Blocks are quantized independently: threads split them (a block's result does not depend on which).
    at::parallel_for(0, R * nb, std::max<int64_t>(1, 4096 / T::block), [&](int64_t i0, int64_t i1) {
      for (int64_t rb = i0; rb < i1; ++rb) {  // block rb % nb of row rb / nb
        int32_t* sums = a.s.data() + rb * T::subs;
        a.d[rb] = block(xp + rb * T::block, a.q.data() + rb * T::block, sums);
        if constexpr (T::scales)  // |sum| <= 127 * 32: an int16
          for (int p = 0; p < T::subs / 2; ++p) a.s_pairs[rb * T::subs / 2 + p] = (sums[2 * p] & 0xFFFF) | (sums[2 * p + 1] << 16);
        if constexpr (T::offset != 0)
          for (int j = 0; j < T::subs; ++j) a.s_off[rb * T::subs + j] = -T::offset * sums[j];
      }
    });
  });
  return a;
}

at::Tensor repack_op(at::Tensor w, int64_t type, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, "minitree repack: w [O, bytes] uint8");
  return with_format(type, [&](auto f) { return repack<decltype(f)::type_id>(w, K); });
}

at::Tensor dequantize_op(at::Tensor groups, int64_t type, int64_t K, at::Tensor outputs) {
  TORCH_CHECK(groups.dim() == 2 && groups.scalar_type() == at::kByte && groups.is_contiguous() && outputs.dim() == 1,
              "minitree dequantize: groups [O / 16, bytes] uint8, outputs [n]");
  return with_format(type, [&](auto f) { return dequantize<decltype(f)::type_id>(groups, K, outputs); });
}

// x [R, K] (float, bf16 or half), groups of GGUF type `type` holding O outputs -> [R, O] in x's dtype.
// path: one of PATH_NAMES' indices, or -1 for the fastest here (every path gives the same bits).
at::Tensor mm_op(at::Tensor x, at::Tensor groups, int64_t type, int64_t O, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && groups.dim() == 2 && groups.scalar_type() == at::kByte && groups.is_contiguous(),
              "minitree mm: x [R, K], groups [O / 16, bytes] uint8");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "minitree mm: x in float32, bfloat16 or float16");
  const int64_t R = x.size(0), K = x.size(1);
  path = path < 0 ? best() : path;
  TORCH_CHECK(path < PATHS && available(path), "minitree mm: path ", path, " does not run on this CPU");
  const int64_t padded = 16 * groups.size(0);
  auto y = at::empty({R, padded}, x.options());
  with_format(type, [&](auto f) {
    using T = decltype(f);
    TORCH_CHECK(K % T::block == 0 && groups.size(1) == K / T::block * T::bytes && 16 * groups.size(0) >= O,
                "minitree mm: x of ", K, " features does not match groups of ", groups.size(1), " bytes");
    Act a = quantize<T>(x, path);
    if (path == AMX && T::type_id == Q4_K) a.q.resize((R + 15) / 16 * 16 * K);  // whole tiles of rows: zeros past R
    const uint8_t* gp = groups.data_ptr<uint8_t>();
    const Out yp{y.data_ptr(), padded, x.scalar_type()};
    constexpr int TYPE = T::type_id;
    switch (path) {
      case PORTABLE: return mm_portable<TYPE>(gp, groups.size(1), a, R, yp);
      case AVX2: return avx2::mm<T>(gp, groups.size(1), a, R, yp);
      case AVX_VNNI: return avx_vnni::mm<T>(gp, groups.size(1), a, R, yp);
      case AVX512_VNNI: return avx512_vnni::mm<T>(gp, groups.size(1), a, R, yp);
      default:  // AMX: Q4_K on tiles, the other formats on the AVX512-VNNI path
        if constexpr (TYPE == Q4_K) return amx::mm_q4_k(gp, groups.size(1), a, R, yp);
        else return avx512_vnni::mm<T>(gp, groups.size(1), a, R, yp);
    }
  });
  return padded == O ? y : y.narrow(1, 0, O).contiguous();
}

}  // namespace integer

TORCH_LIBRARY_FRAGMENT(minitree_kernels, m) {
  m.def("int_paths", &integer::paths);
  m.def("int_quantize(Tensor w, int type) -> Tensor");
  m.def("int_repack(Tensor w, int type, int K) -> Tensor");
  m.def("int_dequantize(Tensor groups, int type, int K, Tensor outputs) -> Tensor");
  m.def("int_mm(Tensor x, Tensor groups, int type, int O, int path=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(minitree_kernels, CPU, m) {
  m.impl("int_quantize", &integer::quantize_weights);
  m.impl("int_repack", &integer::repack_op);
  m.impl("int_dequantize", &integer::dequantize_op);
  m.impl("int_mm", &integer::mm_op);
}
