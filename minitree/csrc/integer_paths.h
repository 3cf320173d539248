// The AVX-VNNI and AVX512-VNNI paths' driver (integer.cpp; AVX2 has its own), included once per
// instruction set inside its namespace, after that set's `halves` (16 fp16 -> fp32), `widen` (16 bytes
// -> int32), `dpwssd` (int16 pair products) and `sub_dots` (one sub-block's int32 dots with R rows).
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
    if constexpr (T::bits > 4) {  // quad q's high bits (bit q; bits 2q, 2q + 1) moved to bit 4 by one shift and a mask
      // (with sub_dots' one sum per row for Q6_K: a 1536x8960 Q6_K layer on a Zen 4, 1 row 142 -> 115 us, 4 rows 257 -> 215)
      constexpr int step = T::bits - 4;
      constexpr uint8_t mask = ((1 << step) - 1) << 4;
      U8 h;
      std::memcpy(&h, L + 8 * T::sub, 64);
      for (int q = 0; q < T::quads; ++q) {
        const int at = step * q;  // where quad q's bits are
        W[q] |= (at <= 4 ? h << (4 - at) : h >> (at - 4)) & mask;
      }
    }
  }
}

// A Q4_K block's mins (`by`: [subs][16 outputs] bytes), two sub-blocks per int32 lane as an int16
// pair: the operand of one pair product with Act::s_pairs.
template <class T>
static inline void min_pairs(const uint8_t* by, I32* pairs) {
  for (int p = 0; p < T::subs / 2; ++p) pairs[p] = (widen<false>(by + 32 * p) & 0xFFFF) | (widen<false>(by + 32 * p + 16) << 16);
}

// Sum over a block's sub-blocks of those mins times one row's sub-block sums (s2: the
// row's Act::s_pairs of the block), 16 outputs.
template <class T>
static inline I32 pair_sum(const I32* pairs, const int32_t* s2) {
  I32 sum{};
  for (int p = 0; p < T::subs / 2; ++p) sum = dpwssd(sum, pairs[p], I32{} + s2[p]);
  return sum;
}

// One group of 16 outputs (from output col) for R rows (from row r0 of a), into y; R is a compile-time
// count, so that a few rows' sums stay in registers.
template <class T, int R>
static void group(const uint8_t* g, const Act& a, int64_t r0, const Out& y, int64_t col) {
  constexpr int J = T::subs;
  const int64_t K = a.K, nb = K / T::block, ns = K / T::sub;
  const int8_t* xq = a.q.data() + r0 * K;
  const float* xd = a.d.data() + r0 * nb;
  const int32_t* xs = a.s.data() + r0 * ns;
  // A sub-block's dots start from -offset xs (Act::s_off), so that they come out as the sums of
  // (level - offset) x: the offset costs no product per row (Q6_K: one pair product fewer per row and
  // two sub-blocks, beside their 8 vpdpbusd and 2 vpmulld).
  const int32_t* start = T::offset ? a.s_off.data() + r0 * ns : nullptr;
  F32 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = F32{};

  // Block b's sums: dots(j) gives sub-block j's dots with the R rows.
  auto finish = [&](int64_t b, auto dots) {
    const uint8_t* gb = g + b * T::bytes;
    I32 S[R], M[R];
    for (int r = 0; r < R; ++r) S[r] = I32{}, M[r] = I32{};
    if constexpr (T::type_id == Q4_K) {
      // The rows' sub-block sums times the mins (M), two sub-blocks per int16 pair product.
      I32 pairs[J / 2];
      min_pairs<T>(gb + T::m_at, pairs);
      for (int r = 0; r < R; ++r) M[r] = pair_sum<T>(pairs, a.s_pairs.data() + (r0 + r) * ns / 2 + b * J / 2);
    }
    for (int j = 0; j < J; ++j) {
      const I32* d = dots(j);
      if constexpr (T::scales) {
        const I32 sc = widen<T::type_id == Q6_K>(gb + T::sc_at + 16 * j);
        for (int r = 0; r < R; ++r) S[r] += sc * d[r];
      } else {
        for (int r = 0; r < R; ++r) {
          S[r] += d[r];
          if constexpr (T::mins) M[r] += xs[r * ns + b * J + j];
        }
      }
    }
    const F32 d = halves(gb + T::d_at);
    F32 c{};
    if constexpr (T::mins) c = halves(gb + T::c_at);
    for (int r = 0; r < R; ++r) {
      const float x = xd[r * nb + b];
      acc[r] = acc[r] + (x * d) * __builtin_convertvector(S[r], F32);
      if constexpr (T::mins) acc[r] = acc[r] + (x * c) * __builtin_convertvector(M[r], F32);
    }
  };
  alignas(64) U8 W[T::quads];
  alignas(64) I32 dots[R];
  for (int64_t b = 0; b < nb; ++b) {
    finish(b, [&](int j) {
      prefetch<T::bytes, J>(g + b * T::bytes, j);
      unpack<T>(g + b * T::bytes + T::levels_at + j * T::level_bytes, W);
      sub_dots<T::bits, T::quads, R>(W, xq + b * T::block + j * T::sub, K, start ? start + b * J + j : nullptr, ns, dots);
      return static_cast<const I32*>(dots);
    });
  }
  for (int r = 0; r < R; ++r) y.put(r0 + r, col, reinterpret_cast<const float*>(&acc[r]), 16);
}

// y [R, y.ld] (16 outputs per group) = the groups times a's rows; each group's weights are read from
// memory once for all rows, threads split the groups.
template <class T>
static void mm(const uint8_t* gp, int64_t group_bytes, const Act& a, int64_t R, const Out& y) {
  at::parallel_for(0, y.ld / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int64_t r = 0, n; r < R; r += n) {
        const int64_t left = R - r;
        n = left >= 8 ? 8 : left >= 6 ? 6 : std::min<int64_t>(4, left);
        const uint8_t* g = gp + gi * group_bytes;
        switch (n) {
          case 1: group<T, 1>(g, a, r, y, 16 * gi); break;
          case 2: group<T, 2>(g, a, r, y, 16 * gi); break;
          case 3: group<T, 3>(g, a, r, y, 16 * gi); break;
          case 4: group<T, 4>(g, a, r, y, 16 * gi); break;
          case 6: group<T, 6>(g, a, r, y, 16 * gi); break;
          default: group<T, 8>(g, a, r, y, 16 * gi);
        }
      }
  });
}
