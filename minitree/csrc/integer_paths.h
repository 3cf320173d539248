// The vector paths' driver (integer.cpp), included once per instruction set inside its namespace,
// after that set's `halves` (16 fp16 -> fp32), `sub_dots` and `begin_rows`/`end_rows` (tile setup).
// It computes integer.cpp's formulas in the same order as mm_portable, 16 outputs per vector.

// Sub-block levels -> W [quads] of 64 bytes (byte 4 o + i: output o, input 4 quad + i).
template <class T>
static inline void unpack(const uint8_t* L, U8* W) {
  if constexpr (T::bits == 8) {
    for (int q = 0; q < T::quads; ++q) std::memcpy(&W[q], L + 64 * q, 64);
  } else {
    constexpr int H = T::quads / 2;
    for (int v = 0; v < H; ++v) {
      U8 b;
      std::memcpy(&b, L + 64 * v, 64);
      W[v] = b & 15;
      W[v + H] = b >> 4;
    }
    if constexpr (T::bits > 4) {
      U8 h;
      std::memcpy(&h, L + 8 * T::sub, 64);
      for (int q = 0; q < T::quads; ++q) W[q] |= T::bits == 5 ? ((h >> q) & 1) << 4 : ((h >> (2 * q)) & 3) << 4;
    }
  }
}

template <bool SIGNED>
static inline I32 widen(const uint8_t* p) {  // 16 bytes -> 16 int32 lanes
  if constexpr (SIGNED) {
    I8x16 v;
    std::memcpy(&v, p, 16);
    return __builtin_convertvector(v, I32);
  } else {
    U8x16 v;
    std::memcpy(&v, p, 16);
    return __builtin_convertvector(v, I32);
  }
}

// One group of 16 outputs for R <= 16 rows (from row r0 of a), into y (row stride ldy).
template <class T>
static void group(const uint8_t* g, const Act& a, int64_t r0, int R, float* y, int64_t ldy) {
  constexpr int J = T::subs;
  const int64_t K = a.K, nb = K / T::block, ns = K / T::sub;
  const int8_t* xq = a.q.data() + r0 * K;
  const float* xd = a.d.data() + r0 * nb;
  const int32_t* xs = a.s.data() + r0 * ns;
  F32 acc[16];
  for (int r = 0; r < R; ++r) acc[r] = F32{};
  alignas(64) U8 W[T::quads];
  alignas(64) int32_t dots[16][16];
  for (int64_t b = 0; b < nb; ++b, g += T::bytes) {
    // Streaming weights from memory runs well under the memory's bandwidth unless they are asked for ahead of use.
    for (int line = 0; line < T::bytes; line += 64) __builtin_prefetch(g + AHEAD + line);
    I32 S[16], M[16];
    for (int r = 0; r < R; ++r) S[r] = I32{}, M[r] = I32{};
    for (int j = 0; j < J; ++j) {
      unpack<T>(g + T::levels_at + j * T::level_bytes, W);
      sub_dots<T::bits, T::quads>(W, xq + b * T::block + j * T::sub, K, R, dots);
      I32 sc{}, m{};
      if constexpr (T::scales) sc = widen<T::type_id == Q6_K>(g + T::sc_at + 16 * j);
      if constexpr (T::type_id == Q4_K) m = widen<false>(g + T::m_at + 16 * j);
      for (int r = 0; r < R; ++r) {
        I32 t;
        std::memcpy(&t, dots[r], 64);
        const int32_t s = xs[r * ns + b * J + j];
        if constexpr (T::offset != 0) t -= T::offset * s;
        if constexpr (T::scales) S[r] += sc * t;
        else S[r] += t;
        if constexpr (T::type_id == Q4_K) M[r] += m * s;
        else if constexpr (T::mins) M[r] += s;
      }
    }
    const F32 d = halves(g + T::d_at);
    F32 c{};
    if constexpr (T::mins) c = halves(g + T::c_at);
    for (int r = 0; r < R; ++r) {
      const float x = xd[r * nb + b];
      acc[r] = acc[r] + (x * d) * __builtin_convertvector(S[r], F32);
      if constexpr (T::mins) acc[r] = acc[r] + (x * c) * __builtin_convertvector(M[r], F32);
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(y + r * ldy, &acc[r], 64);
}

// y [R, ldy] (ldy: 16 per group) = the groups times a's rows; each group's weights are read once
// for all rows, threads split the groups.
template <class T>
static void mm(const uint8_t* gp, int64_t group_bytes, const Act& a, int64_t R, int64_t ldy, float* y) {
  at::parallel_for(0, ldy / 16, 1, [&](int64_t g0, int64_t g1) {
    int configured = 0;
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int64_t r = 0; r < R; r += 16) {
        const int n = static_cast<int>(std::min<int64_t>(16, R - r));
        if (n != configured) begin_rows(n, T::sub), configured = n;
        group<T>(gp + gi * group_bytes, a, r, n, y + r * ldy + 16 * gi, ldy);
      }
    if (configured) end_rows();
  });
}
