// Matrix products with weights held in GGUF's quantized block formats, read as the file stores
// them: y[r, o] = sum_k x[r, k] * w[o, k]. Each weight is dequantized on the fly to fp32 (the
// value the format defines, rounded once) and the products are accumulated in fp32. One pass
// over the weights serves up to MAX_NR activation rows, so a forward of a few rows reads the
// quantized weights once per MAX_NR rows. Output rows are split over torch's threads.
//
// Formats (ggml's; k-quants in super-blocks of 256 weights, the others in blocks of 32):
//   Q4_0: fp16 d, 16 bytes of 4-bit q:                           w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes of 4-bit q:                   w = d * q + m
//   Q5_1: fp16 d, fp16 m, 32 high bits, 16 bytes of low 4 bits:  w = d * q + m
//   Q5_0: fp16 d, 32 high bits, 16 bytes of low 4 bits:          w = d * (q - 16)
//   Q8_0: fp16 d, 32 int8 q:                                     w = d * q
//   Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit q:
//         w = d * sc[j] * q - dmin * m[j], sub-blocks j of 32
//   Q6_K: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, fp16 d:
//         w = d * sc[j] * (q - 32), sub-blocks j of 16
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

// 16 fp32 lanes: one AVX-512 register, two AVX2 ones, or a plain array.
#if defined(__AVX512F__)
#include <immintrin.h>
static constexpr int MAX_NR = 8;
struct V { __m512 v; };
static inline V vzero() { return {_mm512_setzero_ps()}; }
static inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
static inline V vaffine(V q, float s, float t) { return {_mm512_fmadd_ps(q.v, _mm512_set1_ps(s), _mm512_set1_ps(t))}; }
static inline float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
static inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
static inline V vu8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))}; }
static inline V vi8(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))}; }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static constexpr int MAX_NR = 4;
struct V { __m256 lo, hi; };
static inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
static inline V vaffine(V q, float s, float t) {
  const __m256 vs = _mm256_set1_ps(s), vt = _mm256_set1_ps(t);
  return {_mm256_fmadd_ps(q.lo, vs, vt), _mm256_fmadd_ps(q.hi, vs, vt)};
}
static inline float vsum(V a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}
static inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline V vu8(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
static inline V vi8(__m128i b) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
#else
#define PLAIN_LANES 1
static constexpr int MAX_NR = 4;
struct V { float v[16]; };
static inline V vzero() { return V{}; }
static inline V vload(const float* p) { V r; std::memcpy(r.v, p, 64); return r; }
static inline V vfma(V a, V b, V c) { for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
static inline V vaffine(V q, float s, float t) { for (int i = 0; i < 16; ++i) q.v[i] = q.v[i] * s + t; return q; }
static inline float vsum(V a) { float s = 0; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
static inline void vstore(float* p, V a) { std::memcpy(p, a.v, 64); }
#endif

// 16 bytes for the bit twiddling (GCC vector extensions: SSE2 on x86, NEON elsewhere).
typedef uint8_t B __attribute__((vector_size(16)));
static inline B bload(const uint8_t* p) { B b; std::memcpy(&b, p, 16); return b; }
#ifdef PLAIN_LANES
static inline V vu8(B b) { V r; for (int i = 0; i < 16; ++i) r.v[i] = b[i]; return r; }
static inline V vi8(B b) { V r; for (int i = 0; i < 16; ++i) r.v[i] = static_cast<int8_t>(b[i]); return r; }
#else
static inline V vu8(B b) { return vu8(reinterpret_cast<__m128i>(b)); }
static inline V vi8(B b) { return vi8(reinterpret_cast<__m128i>(b)); }
#endif

static inline float fp16(const uint8_t* p) {  // every block's scales start from one or two of these
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction; c10::Half's portable conversion costs a dozen
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// byte i of SPREAD[v] is bit i of v, moved to bit 4 (Q5_0's fifth bit).
struct Spread {
  uint64_t t[256];
  Spread() {
    for (int v = 0; v < 256; ++v) {
      t[v] = 0;
      for (int i = 0; i < 8; ++i) t[v] |= static_cast<uint64_t>((v >> i) & 1) << (8 * i + 4);
    }
  }
};
static const Spread SPREAD;

// The fifth bits of 32 weights (Q5_0, Q5_1: 4 bytes at p), at bit 4 of a byte each: weights 0-15, 16-31.
static inline void fifth_bits(const uint8_t* p, B& h0, B& h1) {
  uint64_t high[4];
  for (int i = 0; i < 4; ++i) high[i] = SPREAD.t[p[i]];
  std::memcpy(&h0, high, 16);
  std::memcpy(&h1, high + 2, 16);
}

// A format: bytes and weights per block; `head(block)`: what its weights share (scales), decoded once
// per block; `chunk(block, head, c, w)`: the c-th 64 weights (or the whole 32-weight block) as 4 (or
// 2) vectors of 16 fp32 weights.
enum Type { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// Q4_K's 8 scales and 8 mins (6 bits each) from the 12 bytes at s: ggml's unpacking.
static inline void q4_k_scales(const uint8_t* s, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63, m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | (s[j] >> 6) << 4;
    m[j + 4] = (s[j + 8] >> 4) | (s[j + 4] >> 6) << 4;
  }
}

struct FQ4_K {
  static constexpr int bytes = 144, weights = 256, chunk_weights = 64;
  struct Head { float scale[8], low[8]; };
  static inline Head head(const uint8_t* b) {
    const float d = fp16(b), dmin = -fp16(b + 2);
    uint8_t sc[8], m[8];
    q4_k_scales(b + 4, sc, m);
    Head h;
    for (int j = 0; j < 8; ++j) h.scale[j] = d * sc[j], h.low[j] = dmin * m[j];
    return h;
  }
  static inline void chunk(const uint8_t* b, const Head& h, int c, V* w) {
    const B q0 = bload(b + 16 + 32 * c), q1 = bload(b + 16 + 32 * c + 16);
    const int lo = 2 * c, hi = 2 * c + 1;  // sub-block 2c: the low nibbles; 2c + 1: the high ones
    w[0] = vaffine(vu8(B(q0 & 0xF)), h.scale[lo], h.low[lo]);
    w[1] = vaffine(vu8(B(q1 & 0xF)), h.scale[lo], h.low[lo]);
    w[2] = vaffine(vu8(B(q0 >> 4)), h.scale[hi], h.low[hi]);
    w[3] = vaffine(vu8(B(q1 >> 4)), h.scale[hi], h.low[hi]);
  }
};

struct FQ6_K {
  static constexpr int bytes = 210, weights = 256, chunk_weights = 64;
  struct Head { float scale[16]; };
  static inline Head head(const uint8_t* b) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = fp16(b + 208);
    Head h;
    for (int j = 0; j < 16; ++j) h.scale[j] = d * sc[j];
    return h;
  }
  static inline void chunk(const uint8_t* b, const Head& h, int c, V* w) {
    const int half = c / 2, g = c % 2;  // half of 128 weights; g: its low (0) or high (1) 64
    for (int v = 0; v < 4; ++v) {  // weights 128 half + 64 g + 16 v .. + 15
      const B lo = bload(b + 64 * half + 16 * v), hi = bload(b + 128 + 32 * half + 16 * (v % 2));
      const int shift = 2 * (2 * g + v / 2);
      const B q = (g ? B(lo >> 4) : B(lo & 0xF)) | B(((hi >> shift) & 3) << 4);
      const float scale = h.scale[8 * half + 4 * g + v];
      w[v] = vaffine(vu8(q), scale, -32.0f * scale);
    }
  }
};

struct FQ8_0 {
  static constexpr int bytes = 34, weights = 32, chunk_weights = 32;
  struct Head { float d; };
  static inline Head head(const uint8_t* b) { return {fp16(b)}; }
  static inline void chunk(const uint8_t* b, const Head& h, int, V* w) {
    w[0] = vaffine(vi8(bload(b + 2)), h.d, 0.0f);
    w[1] = vaffine(vi8(bload(b + 18)), h.d, 0.0f);
  }
};

struct FQ5_0 {
  static constexpr int bytes = 22, weights = 32, chunk_weights = 32;
  struct Head { float d; };
  static inline Head head(const uint8_t* b) { return {fp16(b)}; }
  static inline void chunk(const uint8_t* b, const Head& h, int, V* w) {
    B h0, h1;
    fifth_bits(b + 2, h0, h1);
    const B qs = bload(b + 6);
    w[0] = vaffine(vu8(B(qs & 0xF) | h0), h.d, -16.0f * h.d);
    w[1] = vaffine(vu8(B(qs >> 4) | h1), h.d, -16.0f * h.d);
  }
};

struct FQ4_1 {
  static constexpr int bytes = 20, weights = 32, chunk_weights = 32;
  struct Head { float d, m; };
  static inline Head head(const uint8_t* b) { return {fp16(b), fp16(b + 2)}; }
  static inline void chunk(const uint8_t* b, const Head& h, int, V* w) {
    const B qs = bload(b + 4);
    w[0] = vaffine(vu8(B(qs & 0xF)), h.d, h.m);
    w[1] = vaffine(vu8(B(qs >> 4)), h.d, h.m);
  }
};

struct FQ5_1 {
  static constexpr int bytes = 24, weights = 32, chunk_weights = 32;
  struct Head { float d, m; };
  static inline Head head(const uint8_t* b) { return {fp16(b), fp16(b + 2)}; }
  static inline void chunk(const uint8_t* b, const Head& h, int, V* w) {
    B h0, h1;
    fifth_bits(b + 4, h0, h1);
    const B qs = bload(b + 8);
    w[0] = vaffine(vu8(B(qs & 0xF) | h0), h.d, h.m);
    w[1] = vaffine(vu8(B(qs >> 4) | h1), h.d, h.m);
  }
};

struct FQ4_0 {
  static constexpr int bytes = 18, weights = 32, chunk_weights = 32;
  struct Head { float d; };
  static inline Head head(const uint8_t* b) { return {fp16(b)}; }
  static inline void chunk(const uint8_t* b, const Head& h, int, V* w) {
    const B qs = bload(b + 2);
    w[0] = vaffine(vu8(B(qs & 0xF)), h.d, -8.0f * h.d);
    w[1] = vaffine(vu8(B(qs >> 4)), h.d, -8.0f * h.d);
  }
};

// Output columns o0..o1 for NR activation rows x (fp32, row stride K): each chunk of weights is
// dequantized once and multiplied into every row. ACC independent sums per row keep the FMA
// units busy (one sum per row would wait on its own latency).
template <class F, int NR>
static void columns(const uint8_t* w, int64_t row_bytes, const float* x, int64_t K, float* y, int64_t ldy,
                    int64_t o0, int64_t o1) {
  constexpr int CV = F::chunk_weights / 16, CHUNKS = F::weights / F::chunk_weights;
  constexpr int ACC = NR == 1 ? 4 : NR == 2 ? 2 : 1;
  const int64_t blocks = K / F::weights;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* b = w + o * row_bytes;
    V acc[NR][ACC];
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < ACC; ++a) acc[r][a] = vzero();
    for (int64_t i = 0; i < blocks; ++i, b += F::bytes) {
      const typename F::Head h = F::head(b);
      for (int c = 0; c < CHUNKS; ++c) {
        V wv[CV];
        F::chunk(b, h, c, wv);
        const float* xc = x + i * F::weights + c * F::chunk_weights;
        for (int r = 0; r < NR; ++r)
          for (int v = 0; v < CV; ++v) acc[r][v % ACC] = vfma(vload(xc + r * K + 16 * v), wv[v], acc[r][v % ACC]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      float total = 0;
      for (int a = 0; a < ACC; ++a) total += vsum(acc[r][a]);
      y[r * ldy + o] = total;
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 activations on a CPU with AVX512_BF16: each weight's small integer is turned into a bf16
// value, multiplied with the bf16 activations 32 pairs per instruction into fp32 (vdpbf16ps: exact
// products, fp32 sums), and each sub-block's sum is scaled in fp32. The weights are the same values
// as above; only the summation order differs.
//   Q6_K: q - 32 through a table of bf16 words.
//   Q4_K: 64 bytes of nibbles (128 weights) are read as 32 16-bit words, and each word's four
//   nibbles are moved by shifts into bf16(16 + q) = 0x4180 | q << 3 (exact; no widening, no table):
//   four vectors of weights, each the even or odd elements of one sub-block per 256-bit half. The
//   activations are permuted once per call to the same order (`q4_k_order`). The 16 added to every
//   weight is taken back with the activations' sums over each sub-block (xs), which the mins
//   multiply anyway; the biased sums are about twice as large, so they round a little coarser in
//   fp32, far below the bf16 output's rounding.
#define BF16_PATH 1

// Sums of bf16 x over each n groups of 32 consecutive values, in fp32 (Q4_K's mins multiply them).
static std::vector<float> sums32(const c10::BFloat16* x, int64_t n) {
  std::vector<float> s(n);
  for (int64_t g = 0; g < n; ++g) {
    const __m512i v = _mm512_loadu_si512(x + 32 * g);
    s[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_castsi512_si256(v))),
                                              _mm512_cvtpbh_ps(reinterpret_cast<__m256bh>(_mm512_extracti64x4_epi64(v, 1)))));
  }
  return s;
}

static inline __m512i table(int offset) {  // bf16 words of offset, offset + 1, ..., offset + 31
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = c10::BFloat16(static_cast<float>(offset + i)).x;
  return _mm512_load_si512(t);
}

static inline __m512i words(const uint8_t* p) {  // 32 bytes -> 32 16-bit lanes
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

static inline __m512 dot(__m512i x, __m512i w) {  // 16 fp32 sums of 2 products each
  return _mm512_dpbf16_ps(_mm512_setzero_ps(), reinterpret_cast<__m512bh>(x), reinterpret_cast<__m512bh>(w));
}

// Q4_K's 8 scales and 8 mins of a block as fp32 vectors: d * sc[j], -dmin * m[j]. ggml's unpacking
// of the 12 bytes (32-bit words u0, u1, u2) into the 8 scales (bytes of words 0, 1) and the 8 mins
// (words 2, 3), in registers:
//   0: u0 & m1    1: (u2 & m2) | ((u0 >> 6) & m3) << 4    2: u1 & m1    3: ((u2 >> 4) & m2) | ((u1 >> 6) & m3) << 4
static inline void q4_k_head(const uint8_t* b, __m256& scale, __m256& low) {
  const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));  // u0 u1 u2 (and 4 bytes of q)
  const __m128i m1 = _mm_set1_epi32(0x3f3f3f3f), m2 = _mm_set1_epi32(0x0f0f0f0f);
  const __m128i x = _mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0)), y = _mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0));
  const __m128i lowbits = _mm_and_si128(_mm_srlv_epi32(x, _mm_set_epi32(4, 0, 0, 0)), _mm_unpacklo_epi32(m1, m2));
  const __m128i highbits = _mm_and_si128(_mm_srli_epi32(y, 2), _mm_set_epi32(0x30303030, 0, 0x30303030, 0));
  const __m128i bytes = _mm_or_si128(lowbits, highbits);
  scale = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), _mm256_set1_ps(fp16(b)));
  low = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))), _mm256_set1_ps(-fp16(b + 2)));
}

// Sums per row: A independent ones, so that the FMA units are not waiting on one sum's latency.
template <int NR>
static constexpr int ACCS = NR >= 4 ? 1 : 4 / NR;

static inline __m512i bits_or(__m512i a, __m512i mask, __m512i c) {  // (a & mask) | c, one instruction
  return _mm512_ternarylogic_epi32(a, mask, c, 0xEA);
}

// Streaming the weights from memory runs at well under the memory's bandwidth unless the next ones
// are asked for ahead of use: `lines` cache lines from AHEAD bytes past p (the kernels read forward).
static constexpr int AHEAD = 4096;
static inline void prefetch(const uint8_t* p, int lines) {
  for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + AHEAD + 64 * l), _MM_HINT_T0);
}

// The index of activation k of a Q4_K row in the order its weights are decoded: per 128 weights
// (chunks of 64: sub-block 2c in the low nibbles, 2c + 1 in the high ones), four vectors of 32 —
// low nibbles of even bytes, of odd bytes, high nibbles of even bytes, of odd bytes — each holding
// 16 of the first chunk, then 16 of the second.
static inline int64_t q4_k_order(int64_t k) {
  const int64_t group = k / 128, chunk = k / 64 % 2, in_chunk = k % 64;
  const int64_t high = in_chunk / 32, odd = in_chunk % 2, pair = in_chunk % 32 / 2;
  return 128 * group + 32 * (2 * high + odd) + 16 * chunk + pair;
}

template <int NR>
static inline void bf16_q4_k(const uint8_t* b, const uint16_t* x, int64_t K, const float* xs, int64_t ldxs,
                             __m512* acc, __m512* shift) {  // x in q4_k_order
  constexpr int A = ACCS<NR>;
  __m256 scale, low;
  q4_k_head(b, scale, low);
  const __m512 offset = _mm512_zextps256_ps512(_mm256_fnmadd_ps(scale, _mm256_set1_ps(16.0f), low));  // min - 16 scale
  for (int r = 0; r < NR; ++r)
    shift[r] = _mm512_fmadd_ps(offset, _mm512_zextps256_ps512(_mm256_loadu_ps(xs + r * ldxs)), shift[r]);
  const __m512 scales = _mm512_zextps256_ps512(scale);
  const __m512i nib = _mm512_set1_epi16(0x78), bias = _mm512_set1_epi16(0x4180);  // q << 3 | bf16(16)
  for (int p = 0; p < 2; ++p) {  // 128 weights: chunks 2p and 2p + 1, sub-blocks 4p .. 4p + 3
    const __m512i q = _mm512_loadu_si512(b + 16 + 64 * p);
    const __m512i even_lo = bits_or(_mm512_slli_epi16(q, 3), nib, bias), odd_lo = bits_or(_mm512_srli_epi16(q, 5), nib, bias);
    const __m512i even_hi = bits_or(_mm512_srli_epi16(q, 1), nib, bias), odd_hi = bits_or(_mm512_srli_epi16(q, 9), nib, bias);
    const int j = 4 * p;  // the low nibbles: sub-blocks j (lanes 0-7), j + 2 (lanes 8-15); the high ones: j + 1, j + 3
    const __m512 s_lo = _mm512_permutexvar_ps(
        _mm512_set_epi32(j + 2, j + 2, j + 2, j + 2, j + 2, j + 2, j + 2, j + 2, j, j, j, j, j, j, j, j), scales);
    const __m512 s_hi = _mm512_permutexvar_ps(
        _mm512_set_epi32(j + 3, j + 3, j + 3, j + 3, j + 3, j + 3, j + 3, j + 3, j + 1, j + 1, j + 1, j + 1, j + 1,
                         j + 1, j + 1, j + 1), scales);
    for (int r = 0; r < NR; ++r) {
      const uint16_t* xr = x + r * K + 128 * p;
      const __m512 lo = _mm512_dpbf16_ps(dot(_mm512_loadu_si512(xr), even_lo),
                                         reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr + 32)),
                                         reinterpret_cast<__m512bh>(odd_lo));
      const __m512 hi = _mm512_dpbf16_ps(dot(_mm512_loadu_si512(xr + 64), even_hi),
                                         reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr + 96)),
                                         reinterpret_cast<__m512bh>(odd_hi));
      __m512& a = acc[r * A + p % A];
      a = _mm512_fmadd_ps(hi, s_hi, _mm512_fmadd_ps(lo, s_lo, a));
    }
  }
}

template <int NR>
static inline void bf16_q6_k(const uint8_t* b, const uint16_t* x, int64_t K, const __m512i& lut,
                             const __m512i& lut_high, __m512* acc) {
  constexpr int A = ACCS<NR>;
  const __m512 scales = _mm512_mul_ps(  // d * sc[j], j < 16
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)))),
      _mm512_set1_ps(fp16(b + 208)));
  const __m512i nib = _mm512_set1_epi16(0xF), two = _mm512_set1_epi16(0x30);
  for (int half = 0; half < 2; ++half) {
    const __m512i qh = words(b + 128 + 32 * half);
    for (int g = 0; g < 2; ++g) {
      for (int s2 = 0; s2 < 2; ++s2) {  // 32 weights: 128 half + 64 g + 32 s2 .. + 31
        const __m512i ql = words(b + 64 * half + 32 * s2);
        const __m512i low4 = g ? _mm512_srli_epi16(ql, 4) : _mm512_and_si512(ql, nib);
        const int shift = 2 * (2 * g + s2);  // the 2 high bits sit at `shift` in qh; we want them at 4
        const __m512i high2 = shift <= 4 ? _mm512_slli_epi16(qh, 4 - shift) : _mm512_srli_epi16(qh, shift - 4);
        const __m512i idx = _mm512_ternarylogic_epi32(low4, high2, two, 0xF8);  // low4 | (high2 & 0x30)
        const __m512i w = _mm512_permutex2var_epi16(lut, idx, lut_high);  // q - 32
        const int j = 8 * half + 4 * g + 2 * s2;  // sub-blocks j (lanes 0-7) and j + 1 (lanes 8-15)
        const __m512 sv = _mm512_permutexvar_ps(
            _mm512_set_epi32(j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j + 1, j, j, j, j, j, j, j, j), scales);
        for (int r = 0; r < NR; ++r) {
          __m512& a = acc[r * A + (2 * g + s2) % A];
          a = _mm512_fmadd_ps(dot(_mm512_loadu_si512(x + r * K + 128 * half + 64 * g + 32 * s2), w), sv, a);
        }
      }
    }
  }
}

// Output columns o0..o1 for NR bf16 activation rows (row stride K; Q4_K: in q4_k_order, with xs).
template <int NR, bool Q4K>
static void columns_bf16(const uint8_t* w, int64_t row_bytes, const uint16_t* x, int64_t K, const float* xs,
                         c10::BFloat16* y, int64_t ldy, int64_t o0, int64_t o1) {
  constexpr int A = ACCS<NR>;
  const __m512i lut = table(-32), lut_high = table(0);
  const int64_t blocks = K / 256, ldxs = K / 32;
  const int bytes = Q4K ? FQ4_K::bytes : FQ6_K::bytes;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* b = w + o * row_bytes;
    __m512 acc[NR * A], shift[NR];
    for (int r = 0; r < NR; ++r) {
      shift[r] = _mm512_setzero_ps();
      for (int a = 0; a < A; ++a) acc[r * A + a] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < blocks; ++i, b += bytes) {
      prefetch(b, (bytes + 63) / 64);
      if constexpr (Q4K) bf16_q4_k<NR>(b, x + 256 * i, K, xs + 8 * i, ldxs, acc, shift);
      else bf16_q6_k<NR>(b, x + 256 * i, K, lut, lut_high, acc);
    }
    for (int r = 0; r < NR; ++r) {
      __m512 sum = acc[r * A];
      for (int a = 1; a < A; ++a) sum = _mm512_add_ps(sum, acc[r * A + a]);
      y[r * ldy + o] = c10::BFloat16(_mm512_reduce_add_ps(sum) + (Q4K ? _mm512_reduce_add_ps(shift[r]) : 0.0f));
    }
  }
}

template <bool Q4K, int NR = MAX_NR>
static void columns_bf16_for(int nr, const uint8_t* w, int64_t row_bytes, const uint16_t* x, int64_t K,
                             const float* xs, c10::BFloat16* y, int64_t ldy, int64_t o0, int64_t o1) {
  if constexpr (NR > 1) {
    if (nr < NR) return columns_bf16_for<Q4K, NR - 1>(nr, w, row_bytes, x, K, xs, y, ldy, o0, o1);
  }
  columns_bf16<NR, Q4K>(w, row_bytes, x, K, xs, y, ldy, o0, o1);
}

template <bool Q4K>
static torch::Tensor mm_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t R = x.size(0), K = x.size(1), O = w.size(0);
  const int bytes = Q4K ? FQ4_K::bytes : FQ6_K::bytes;
  TORCH_CHECK(K % 256 == 0 && w.size(1) == K / 256 * bytes, "gguf mm: ", K, " input features do not match ",
              w.size(1), " bytes per weight row");
  const auto xc = x.contiguous();
  const auto wc = w.contiguous();
  auto y = torch::empty({R, O}, x.options());
  const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
  const std::vector<float> xs = sums32(xb, Q4K ? R * K / 32 : 0);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  std::vector<uint16_t> ordered(Q4K ? R * K : 0);  // Q4_K: the activations in the order of its weights
  for (int64_t r = 0; r < (Q4K ? R : 0); ++r)
    for (int64_t k = 0; k < K; ++k) ordered[r * K + q4_k_order(k)] = xp[r * K + k];
  if (Q4K) xp = ordered.data();
  const float* xsp = xs.data();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t r = 0; r < R; r += MAX_NR) {
      const int nr = static_cast<int>(std::min<int64_t>(MAX_NR, R - r));
      columns_bf16_for<Q4K>(nr, wp, w.size(1), xp + r * K, K, xsp + r * (K / 32), yp + r * O, O, o0, o1);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Weights regrouped by 16 outputs. Q4_K and Q6_K ("tiles" form) on AMX tiles for forwards of 2 or
// more rows (verify passes), one row by vector_group; minitree's own lossy 4-bit draft form ("q4",
// TQ4) by vector_group at every row count (AVX512_BF16 only, no AMX needed). One tile multiply
// takes up to 16 activation rows' inputs of one sub-block (A: rows x 32 bf16 for Q4_K, 16 for
// Q6_K, read straight from x) and the same sub-block of 16 output rows' weights (B: pairs of
// weights per output, bf16, exact as above), giving the rows x 16 sub-block sums in fp32 (C);
// each sum is then scaled by its output's sub-block scale in fp32, as in the vector kernel. So the
// weights stay exact and only the summation order differs; the decoding is paid once for all rows.
// B needs the weights of 16 outputs side by side, so `tile` repacks the file's blocks once into
// groups of 16 outputs (the same bytes per weight, rearranged; the scales pre-unpacked for Q4_K),
// which also serve one row better than the file's layout (vector_group: no scale shuffling):
//   Q4_K group block (16 outputs x 256 weights, 2368 bytes): d[16], dmin[16] (fp16); sc[8][16],
//     m[8][16] (6-bit, bytes); per sub-block j and c < 4, 64 bytes: in the 32-bit word of output o,
//     nibble k of the low 16 bits holds weight 8c + 2k and of the high 16 bits weight 8c + 2k + 1,
//     so that one shift and one bit merge give pair row 4c + k of B (as the vector kernel's words).
//   Q6_K group block (3360 bytes): d[16] (fp16); sc[16][16] (int8); per sub-block j (16 weights):
//     4 x 32 bytes of low 4 bits (byte 2o + e of row p < 4: weight 2p + e low, 2p + 8 + e high), then
//     2 x 32 bytes of high 2 bits (byte 2o + e of row h: weights 2(4h + t) + e at bits 2t).
static inline uint8_t q4_k_at(const uint8_t* b, int k) {  // weight k's 4-bit q in a Q4_K block
  const uint8_t byte = b[16 + 32 * (k / 64) + k % 32];
  return k % 64 < 32 ? byte & 0xF : byte >> 4;
}

static inline uint8_t q6_k_at(const uint8_t* b, int k) {  // weight k's 6-bit q in a Q6_K block
  const int n = k / 128, s = k % 128 / 32, l = k % 32;
  const uint8_t low = b[64 * n + 32 * (s % 2) + l], high = b[128 + 32 * n + l] >> (2 * s) & 3;
  return (s < 2 ? low & 0xF : low >> 4) | high << 4;
}

// emit(p, row) for the 16 pair rows p of one sub-block of 32 weights of 16 outputs, bf16(16 + q) each,
// from its 256 bytes of nibbles: in the 32-bit word of output o of the c-th 64 bytes, nibble k of the
// low 16 bits holds weight 8c + 2k and of the high 16 bits weight 8c + 2k + 1.
template <class Emit>
static inline void nibble_rows(const uint8_t* s, Emit emit) {
  const __m512i nib = _mm512_set1_epi16(0x78), bias = _mm512_set1_epi16(0x4180);  // q << 3 | bf16(16)
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_loadu_si512(s + 64 * c);
    emit(4 * c, bits_or(_mm512_slli_epi16(v, 3), nib, bias));
    emit(4 * c + 1, bits_or(_mm512_srli_epi16(v, 1), nib, bias));
    emit(4 * c + 2, bits_or(_mm512_srli_epi16(v, 5), nib, bias));
    emit(4 * c + 3, bits_or(_mm512_srli_epi16(v, 9), nib, bias));
  }
}

// The inverse of nibble_rows for output o: its 32 levels q of one sub-block into the sub-block's 256 bytes s.
static inline void put_nibbles(uint8_t* s, int o, const uint8_t* q) {
  for (int c = 0; c < 4; ++c)
    for (int h = 0; h < 2; ++h) {
      uint16_t word = 0;
      for (int k = 0; k < 4; ++k) word |= q[8 * c + 2 * k + h] << (4 * k);
      std::memcpy(s + 64 * c + 4 * o + 2 * h, &word, 2);
    }
}

struct TQ4_K {
  static constexpr int bytes = 2368, sub = 32, subs = 8;
  static constexpr bool mins = true;  // sums scaled, plus the activations' sums times offsets
  static void repack(const uint8_t* const* rows, uint8_t* g) {  // 16 outputs' blocks -> one group block
    for (int o = 0; o < 16; ++o) {
      const uint8_t* b = rows[o];
      std::memcpy(g + 2 * o, b, 2);
      std::memcpy(g + 32 + 2 * o, b + 2, 2);
      uint8_t sc[8], m[8];
      q4_k_scales(b + 4, sc, m);
      for (int j = 0; j < 8; ++j) g[64 + 16 * j + o] = sc[j], g[192 + 16 * j + o] = m[j];
      for (int j = 0; j < 8; ++j) {
        uint8_t q[32];
        for (int e = 0; e < 32; ++e) q[e] = q4_k_at(b, 32 * j + e);
        put_nibbles(g + 320 + 256 * j, o, q);
      }
    }
  }
  static inline void head(const uint8_t* g, __m512* scale, __m512* offset) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32)));
    for (int j = 0; j < 8; ++j) {
      const auto bytes = [&](int at) {
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + at))));
      };
      scale[j] = _mm512_mul_ps(bytes(64 + 16 * j), d);
      // min - 16 scale: the weights are decoded as 16 + q (below)
      offset[j] = _mm512_fnmadd_ps(bytes(192 + 16 * j), dmin, _mm512_mul_ps(scale[j], _mm512_set1_ps(-16.0f)));
    }
  }
  template <class Emit>
  static inline void decode(const uint8_t* g, int j, Emit emit) { nibble_rows(g + 320 + 256 * j, emit); }
};

struct TQ6_K {
  static constexpr int bytes = 3360, sub = 16, subs = 16;
  static constexpr bool mins = false;
  static void repack(const uint8_t* const* rows, uint8_t* g) {
    for (int o = 0; o < 16; ++o) {
      const uint8_t* b = rows[o];
      std::memcpy(g + 2 * o, b + 208, 2);
      for (int j = 0; j < 16; ++j) g[32 + 16 * j + o] = b[192 + j];
      for (int j = 0; j < 16; ++j) {
        uint8_t* s = g + 288 + 192 * j;
        for (int e = 0; e < 2; ++e) {
          for (int p = 0; p < 4; ++p)
            s[32 * p + 2 * o + e] = (q6_k_at(b, 16 * j + 2 * p + e) & 0xF) | (q6_k_at(b, 16 * j + 2 * p + 8 + e) & 0xF) << 4;
          for (int h = 0; h < 2; ++h) {
            uint8_t byte = 0;
            for (int t = 0; t < 4; ++t) byte |= (q6_k_at(b, 16 * j + 2 * (4 * h + t) + e) >> 4) << (2 * t);
            s[128 + 32 * h + 2 * o + e] = byte;
          }
        }
      }
    }
  }
  static inline void head(const uint8_t* g, __m512* scale, __m512*) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g)));
    for (int j = 0; j < 16; ++j)
      scale[j] = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + 32 + 16 * j)))), d);
  }
  template <class Emit>  // emit(p, row): pair row p < 8 of sub-block j, bf16(q - 32) pairs of 16 outputs
  static inline void decode(const uint8_t* g, int j, Emit emit) {
    static const __m512i lut = table(-32), lut_high = table(0);
    const uint8_t* s = g + 288 + 192 * j;
    const __m512i nib = _mm512_set1_epi16(0xF), two = _mm512_set1_epi16(0x30);
    for (int h = 0; h < 2; ++h) {
      const __m512i high = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 128 + 32 * h)));
      for (int t = 0; t < 4; ++t) {
        const int p = 4 * h + t;  // pair row p: low 4 bits in row p % 4 of the low part, low or high nibble
        const __m512i low = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32 * (p % 4))));
        const __m512i low4 = p < 4 ? _mm512_and_si512(low, nib) : _mm512_srli_epi16(low, 4);
        const __m512i high2 = 2 * t <= 4 ? _mm512_slli_epi16(high, 4 - 2 * t) : _mm512_srli_epi16(high, 2 * t - 4);
        const __m512i idx = _mm512_ternarylogic_epi32(low4, high2, two, 0xF8);  // low4 | (high2 & 0x30)
        emit(p, _mm512_permutex2var_epi16(lut, idx, lut_high));  // q - 32
      }
    }
  }
};

// minitree's own lossy 4-bit form for drafts ("q4", made by q4_pack from float weights): per 16
// outputs x 128 inputs, 1280 bytes: an fp16 scale[4][16] and offset[4][16] per sub-block of 32 inputs
// and output, then each sub-block's 256 bytes of nibbles as in TQ4_K: w = scale * (16 + q) + offset.
struct TQ4 {
  static constexpr int bytes = 1280, sub = 32, subs = 4;
  static constexpr bool mins = true;
  static inline void head(const uint8_t* g, __m512* scale, __m512* offset) {
    for (int j = 0; j < 4; ++j) {
      scale[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 32 * j)));
      offset[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(g + 128 + 32 * j)));
    }
  }
  template <class Emit>
  static inline void decode(const uint8_t* g, int j, Emit emit) { nibble_rows(g + 256 + 256 * j, emit); }
};

// A sub-block's share of a group block's cache lines (what the kernels prefetch per sub-block).
template <class T>
static constexpr int sub_lines = (T::bytes + 64 * T::subs - 1) / (64 * T::subs);

// The weights one block of T spans.
template <class T>
static constexpr int block_k = T::sub * T::subs;

// The outputs of one group of 16 for NR <= 4 rows of x (row stride K; y: row stride ldy), without
// tiles: each pair row of weights, decoded as for B, is multiplied with each row's two inputs
// broadcast (vdpbf16ps: 16 outputs' pair products, summed in fp32), four sums per row and sub-block,
// then scaled. Each row's arithmetic is the same whatever NR, so a row rounds alike in every batch.
template <class T, int NR = 1>
static void vector_group(const uint8_t* g, int64_t blocks, const c10::BFloat16* x, int64_t K, const float* xs,
                         c10::BFloat16* y, int64_t ldy = 0) {
  __m512 acc[NR], scale[T::subs], offset[T::subs];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i, g += T::bytes) {
    T::head(g, scale, offset);
    for (int j = 0; j < T::subs; ++j) {
      const int64_t k = block_k<T> * i + T::sub * j;
      prefetch(g + 64 * sub_lines<T> * j, sub_lines<T>);
      __m512 sums[NR][4];
      for (int r = 0; r < NR; ++r)
        for (int a = 0; a < 4; ++a) sums[r][a] = _mm512_setzero_ps();
      T::decode(g, j, [&](int p, __m512i row) {
        for (int r = 0; r < NR; ++r) {
          int32_t pair;
          std::memcpy(&pair, x + r * K + k + 2 * p, 4);
          sums[r][p % 4] = _mm512_dpbf16_ps(sums[r][p % 4], reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)),
                                            reinterpret_cast<__m512bh>(row));
        }
      });
      for (int r = 0; r < NR; ++r) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(sums[r][0], sums[r][1]), _mm512_add_ps(sums[r][2], sums[r][3]));
        acc[r] = _mm512_fmadd_ps(sum, scale[j], acc[r]);
        if constexpr (T::mins) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * (K / 32) + k / 32]), offset[j], acc[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[r])));
}

template <class T>
static void vector_rows(int nr, const uint8_t* g, int64_t blocks, const c10::BFloat16* x, int64_t K, const float* xs,
                        c10::BFloat16* y, int64_t ldy) {
  switch (nr) {
    case 1: return vector_group<T, 1>(g, blocks, x, K, xs, y, ldy);
    case 2: return vector_group<T, 2>(g, blocks, x, K, xs, y, ldy);
    case 3: return vector_group<T, 3>(g, blocks, x, K, xs, y, ldy);
    default: return vector_group<T, 4>(g, blocks, x, K, xs, y, ldy);
  }
}

template <class T, class F>
static torch::Tensor tile(const torch::Tensor& w, int64_t K) {  // the file's blocks -> group blocks
  const int64_t O = w.size(0), blocks = K / 256;
  TORCH_CHECK(O % 16 == 0 && K % 256 == 0 && w.size(1) == blocks * F::bytes, "gguf tile: ", O, "x", K,
              " weights in rows of ", w.size(1), " bytes do not form groups of 16 rows");
  const auto wc = w.contiguous();
  torch::Tensor t = torch::empty({O / 16, blocks * T::bytes}, w.options());
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  uint8_t* tp = t.data_ptr<uint8_t>();
  at::parallel_for(0, O / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < blocks; ++i) {
        const uint8_t* rows[16];
        for (int o = 0; o < 16; ++o) rows[o] = wp + (16 * g + o) * w.size(1) + i * F::bytes;
        T::repack(rows, tp + g * t.size(1) + i * T::bytes);
      }
  });
  return t;
}

// Float weights [O, K] -> TQ4 groups [O / 16, K / 128 * 1280]: per output and 32 inputs, min-max
// 4-bit levels (the scale and offset rounded to fp16 first, the levels fitted to the rounded ones).
static torch::Tensor q4_pack(const torch::Tensor& w) {
  const int64_t O = w.size(0), K = w.size(1);
  TORCH_CHECK(O % 16 == 0 && K % block_k<TQ4> == 0, "q4 pack: ", O, "x", K, " weights do not form groups of 16 ",
              "outputs x ", block_k<TQ4>, " inputs");
  const auto wf = w.to(torch::kFloat).contiguous();
  const float* wp = wf.data_ptr<float>();
  torch::Tensor t = torch::empty({O / 16, K / block_k<TQ4> * TQ4::bytes}, w.options().dtype(torch::kUInt8));
  uint8_t* tp = t.data_ptr<uint8_t>();
  at::parallel_for(0, O / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int64_t i = 0; i < K / block_k<TQ4>; ++i) {
        uint8_t* g = tp + gi * t.size(1) + i * TQ4::bytes;
        for (int o = 0; o < 16; ++o)
          for (int j = 0; j < 4; ++j) {
            const float* v = wp + (16 * gi + o) * K + block_k<TQ4> * i + 32 * j;
            float lo = v[0], hi = v[0];
            for (int e = 1; e < 32; ++e) lo = std::min(lo, v[e]), hi = std::max(hi, v[e]);
            const c10::Half scale(std::max((hi - lo) / 15, 1e-7f)), offset(lo - 16 * static_cast<float>(scale));
            const float step = scale, first = static_cast<float>(offset) + 16 * step;  // the value of q = 0
            std::memcpy(g + 2 * (16 * j + o), &scale.x, 2);
            std::memcpy(g + 128 + 2 * (16 * j + o), &offset.x, 2);
            uint8_t q[32];
            for (int e = 0; e < 32; ++e) q[e] = static_cast<uint8_t>(std::clamp(std::nearbyint((v[e] - first) / step), 0.0f, 15.0f));
            put_nibbles(g + 256 + 256 * j, o, q);
          }
      }
  });
  return t;
}

static torch::Tensor q4_mm(const torch::Tensor& x, const torch::Tensor& t) {
  const int64_t R = x.size(0), K = x.size(1), O = 16 * t.size(0), blocks = K / block_k<TQ4>;
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && K % block_k<TQ4> == 0 && t.size(1) == blocks * TQ4::bytes,
              "q4 mm: bf16 x of ", K, " features does not match groups of ", t.size(1), " bytes");
  const auto xc = x.contiguous();
  auto y = torch::empty({R, O}, x.options());
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const std::vector<float> xs = sums32(xp, R * K / 32);
  const uint8_t* tp = t.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, O / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)  // a group's weights are read from memory once, for every row
      for (int64_t r = 0; r < R; r += 4)
        vector_rows<TQ4>(static_cast<int>(std::min<int64_t>(4, R - r)), tp + g * t.size(1), blocks, xp + r * K, K,
                         xs.data() + r * (K / 32), yp + r * O + 16 * g, O);
  });
  return y;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// ---------------------------------------------------------------------------------------------
// AMX tiles: the Q4_K and Q6_K groups above, for 2 to 16 rows.
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_PATH 1

static bool amx() {  // Linux hands out the tile registers' state on request, once per process
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0, 3: C [R, 16 fp32]; 1, 4: A [R, S bf16]; 2, 5: B [S / 2 pairs, 16 pairs]; S: a sub-block's weights.
static void configure_tiles(int R, int S) {
  TileConfig c;
  for (int t : {0, 3}) c.rows[t] = R, c.colsb[t] = 64;
  for (int t : {1, 4}) c.rows[t] = R, c.colsb[t] = 2 * S;
  for (int t : {2, 5}) c.rows[t] = S / 2, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// C = A B of one sub-block, stored to c (tile numbers are literals: gcc's intrinsics are macros).
#define SUB_BLOCK_SUMS(C, A, Bt, a, lda, b, c) \
  do {                                         \
    _tile_loadd(A, a, lda);                    \
    _tile_loadd(Bt, b, 64);                    \
    _tile_zero(C);                             \
    _tile_dpbf16ps(C, A, Bt);                  \
    _tile_stored(C, c, 64);                    \
  } while (0)

// Outputs of one group of 16 for R <= 16 rows of x (row stride K; xs: Q4_K's sub-block sums [R][K / 32]).
template <class T>
static void tiles_group(const uint8_t* g, int64_t blocks, const c10::BFloat16* x, int64_t K, int R, const float* xs,
                        c10::BFloat16* y, int64_t ldy) {
  alignas(64) uint16_t b0[16][32], b1[16][32];
  alignas(64) float c0[16][16], c1[16][16];
  __m512 acc[16], scale[T::subs], offset[T::subs];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i, g += T::bytes) {
    T::head(g, scale, offset);
    for (int j = 0; j < T::subs; j += 2) {
      const int64_t k = block_k<T> * i + T::sub * j;  // the sub-block's first input
      prefetch(g + 64 * sub_lines<T> * j, 2 * sub_lines<T>);
      T::decode(g, j, [&](int p, __m512i row) { _mm512_store_si512(b0[p], row); });
      T::decode(g, j + 1, [&](int p, __m512i row) { _mm512_store_si512(b1[p], row); });
      SUB_BLOCK_SUMS(0, 1, 2, x + k, 2 * K, b0, c0);
      SUB_BLOCK_SUMS(3, 4, 5, x + k + T::sub, 2 * K, b1, c1);
      for (int r = 0; r < R; ++r) {
        __m512 a = _mm512_fmadd_ps(_mm512_load_ps(c0[r]), scale[j], acc[r]);
        a = _mm512_fmadd_ps(_mm512_load_ps(c1[r]), scale[j + 1], a);
        if constexpr (T::mins) {
          a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * (K / 32) + k / 32]), offset[j], a);
          a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * (K / 32) + k / 32 + 1]), offset[j + 1], a);
        }
        acc[r] = a;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[r])));
}

template <class T>
static torch::Tensor tiled_mm(const torch::Tensor& x, const torch::Tensor& t) {
  const int64_t R = x.size(0), K = x.size(1), O = 16 * t.size(0), blocks = K / 256;
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && K % 256 == 0 && t.size(1) == blocks * T::bytes,
              "gguf tiled mm: bf16 x of ", K, " features does not match groups of ", t.size(1), " bytes");
  TORCH_CHECK(amx(), "gguf tiled mm: this process may not use AMX tiles");
  const auto xc = x.contiguous();
  auto y = torch::empty({R, O}, x.options());
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const std::vector<float> xs = sums32(xp, T::mins ? R * K / 32 : 0);
  const uint8_t* tp = t.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, O / 16, 1, [&](int64_t g0, int64_t g1) {
    if (R == 1) {
      for (int64_t g = g0; g < g1; ++g) vector_group<T>(tp + g * t.size(1), blocks, xp, K, xs.data(), yp + 16 * g);
      return;
    }
    for (int64_t r = 0; r < R; r += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, R - r));
      configure_tiles(n, T::sub);
      for (int64_t g = g0; g < g1; ++g)
        tiles_group<T>(tp + g * t.size(1), blocks, xp + r * K, K, n, xs.data() + r * (K / 32), yp + r * O + 16 * g, O);
    }
    _tile_release();
  });
  return y;
}
#endif
#endif

template <class F, int NR = MAX_NR>
static void columns_for(int nr, const uint8_t* w, int64_t row_bytes, const float* x, int64_t K, float* y,
                        int64_t ldy, int64_t o0, int64_t o1) {
  if constexpr (NR > 1) {
    if (nr < NR) return columns_for<F, NR - 1>(nr, w, row_bytes, x, K, y, ldy, o0, o1);
  }
  columns<F, NR>(w, row_bytes, x, K, y, ldy, o0, o1);
}

template <class F>
static torch::Tensor mm(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t R = x.size(0), K = x.size(1), O = w.size(0);
  TORCH_CHECK(K % F::weights == 0 && w.size(1) == K / F::weights * F::bytes, "gguf mm: ", K,
              " input features do not match ", w.size(1), " bytes per weight row");
  const auto xf = x.to(torch::kFloat).contiguous();
  const auto wc = w.contiguous();
  auto y = torch::empty({R, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t r = 0; r < R; r += MAX_NR) {
      const int nr = static_cast<int>(std::min<int64_t>(MAX_NR, R - r));
      columns_for<F>(nr, wp, w.size(1), xp + r * K, K, yp + r * O, O, o0, o1);
    }
  });
  return y.to(x.scalar_type());
}

template <class F>
static torch::Tensor dequantize(const torch::Tensor& w, int64_t K) {
  constexpr int CV = F::chunk_weights / 16, CHUNKS = F::weights / F::chunk_weights;
  const int64_t O = w.size(0), blocks = K / F::weights;
  TORCH_CHECK(K % F::weights == 0 && w.size(1) == blocks * F::bytes, "gguf dequantize: ", K,
              " input features do not match ", w.size(1), " bytes per weight row");
  const auto wc = w.contiguous();
  auto y = torch::empty({O, K}, torch::kFloat);
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, 16, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const uint8_t* b = wp + o * w.size(1);
      float* out = yp + o * K;
      for (int64_t i = 0; i < blocks; ++i, b += F::bytes)
        for (int c = 0; c < CHUNKS; ++c) {
          V wv[CV];
          F::chunk(b, F::head(b), c, wv);
          for (int v = 0; v < CV; ++v) vstore(out + i * F::weights + c * F::chunk_weights + 16 * v, wv[v]);
        }
    }
  });
  return y;
}

// w [O, bytes per row] uint8 of GGUF type `type`, K weights per row -> [O, K] fp32: the values mm uses.
torch::Tensor gguf_dequantize(torch::Tensor w, int64_t type, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "gguf dequantize: w [O, bytes] uint8");
  switch (type) {
    case Q4_0: return dequantize<FQ4_0>(w, K);
    case Q4_1: return dequantize<FQ4_1>(w, K);
    case Q5_1: return dequantize<FQ5_1>(w, K);
    case Q5_0: return dequantize<FQ5_0>(w, K);
    case Q8_0: return dequantize<FQ8_0>(w, K);
    case Q4_K: return dequantize<FQ4_K>(w, K);
    case Q6_K: return dequantize<FQ6_K>(w, K);
  }
  TORCH_CHECK(false, "gguf dequantize: no kernel for GGUF type ", type);
}

// x [R, K] (float, bfloat16 or half), w [O, bytes per row] uint8 of GGUF type `type` -> [R, O] in x's dtype.
torch::Tensor gguf_mm(torch::Tensor x, torch::Tensor w, int64_t type) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.scalar_type() == torch::kUInt8, "gguf mm: x [R, K], w [O, bytes] uint8");
#ifdef BF16_PATH
  if (x.scalar_type() == torch::kBFloat16 && (type == Q4_K || type == Q6_K))
    return type == Q4_K ? mm_bf16<true>(x, w) : mm_bf16<false>(x, w);
#endif
  switch (type) {
    case Q4_0: return mm<FQ4_0>(x, w);
    case Q4_1: return mm<FQ4_1>(x, w);
    case Q5_1: return mm<FQ5_1>(x, w);
    case Q5_0: return mm<FQ5_0>(x, w);
    case Q8_0: return mm<FQ8_0>(x, w);
    case Q4_K: return mm<FQ4_K>(x, w);
    case Q6_K: return mm<FQ6_K>(x, w);
  }
  TORCH_CHECK(false, "gguf mm: no kernel for GGUF type ", type);
}

// Q4_K/Q6_K blocks [O, bytes per row] -> group blocks [O / 16, ...] for tiled_mm (AMX machines only).
torch::Tensor gguf_tile(torch::Tensor w, int64_t type, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "gguf tile: w [O, bytes] uint8");
#ifdef AMX_PATH
  if (type == Q4_K) return tile<TQ4_K, FQ4_K>(w, K);
  if (type == Q6_K) return tile<TQ6_K, FQ6_K>(w, K);
#endif
  TORCH_CHECK(false, "gguf tile: no tiled kernel for GGUF type ", type, " on this CPU");
}

// x [R, K] bf16, t: `tile`'s groups of GGUF type `type` -> [R, O] bf16.
torch::Tensor gguf_tiled_mm(torch::Tensor x, torch::Tensor t, int64_t type) {
  TORCH_CHECK(x.dim() == 2 && t.dim() == 2 && t.scalar_type() == torch::kUInt8, "gguf tiled mm: x [R, K], t [O / 16, bytes]");
#ifdef AMX_PATH
  if (type == Q4_K) return tiled_mm<TQ4_K>(x, t);
  if (type == Q6_K) return tiled_mm<TQ6_K>(x, t);
#endif
  TORCH_CHECK(false, "gguf tiled mm: no tiled kernel for GGUF type ", type, " on this CPU");
}

// float weights [O, K] -> minitree's lossy 4-bit groups ("q4": drafts only).
torch::Tensor gguf_q4_pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_floating_point(), "q4 pack: w [O, K] float");
#ifdef BF16_PATH
  return q4_pack(w);
#else
  TORCH_CHECK(false, "q4 pack: this CPU has no AVX512_BF16");
#endif
}

// x [R, K] bf16, t: q4_pack's groups -> [R, O] bf16.
torch::Tensor gguf_q4_mm(torch::Tensor x, torch::Tensor t) {
  TORCH_CHECK(x.dim() == 2 && t.dim() == 2 && t.scalar_type() == torch::kUInt8, "q4 mm: x [R, K], t [O / 16, bytes]");
#ifdef BF16_PATH
  return q4_mm(x, t);
#else
  TORCH_CHECK(false, "q4 mm: this CPU has no AVX512_BF16");
#endif
}

// Whether this build can run the q4 form (q4_pack, q4_mm).
bool gguf_q4() {
#ifdef BF16_PATH
  return true;
#else
  return false;
#endif
}

// Whether this build and process can use AMX tiles (tile, tiled_mm).
bool gguf_amx() {
#ifdef AMX_PATH
  return amx();
#else
  return false;
#endif
}

TORCH_LIBRARY(minitree_gguf, m) {
  m.def("amx", &gguf_amx);
  m.def("q4", &gguf_q4);
  m.def("q4_pack(Tensor w) -> Tensor");
  m.def("q4_mm(Tensor x, Tensor t) -> Tensor");
  m.def("tile(Tensor w, int type, int K) -> Tensor");
  m.def("tiled_mm(Tensor x, Tensor t, int type) -> Tensor");
  m.def("mm(Tensor x, Tensor w, int type) -> Tensor");
  m.def("dequantize(Tensor w, int type, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(minitree_gguf, CPU, m) {
  m.impl("mm", &gguf_mm);
  m.impl("dequantize", &gguf_dequantize);
  m.impl("tile", &gguf_tile);
  m.impl("tiled_mm", &gguf_tiled_mm);
  m.impl("q4_pack", &gguf_q4_pack);
  m.impl("q4_mm", &gguf_q4_mm);
}
