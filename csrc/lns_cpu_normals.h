// CPU generator of the LNS normals: Philox words for a tile of draws, then Box–Muller.
//
// Same numbers as philox.h's normals_of_counter, produced a tile at a time so that the loops
// vectorise: an AVX2 variant (Philox with intrinsics, chosen at run time where the CPU has AVX2)
// and a baseline x86-64 / portable one. Included by lns_cpu.cpp only.
#pragma once

#include <climits>
#include <cstdint>

#include "philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LNS_HAVE_AVX2_CLONE 1
#define LNS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define LNS_HAVE_AVX2_CLONE 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define LNS_INLINE inline __attribute__((always_inline))
#else
#define LNS_INLINE inline
#endif

namespace lns {
namespace cpu {

// Normals per tile: large enough to amortise the loop overhead, small enough for L1.
constexpr int64_t kTile = 1024;
// Slack for the partial counter groups at both ends of a tile.
constexpr int64_t kTileBuf = kTile + 8;

struct Key {
  uint32_t k0, k1;
};

inline Key key_of(uint64_t seed) {
  return Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// Counter groups per tile, padded to a multiple of the two 8-lane Philox batches.
constexpr int64_t kTileGroups = kTileBuf / 4 + 16;

struct TileWords {
  alignas(32) uint32_t w0[kTileGroups];
  alignas(32) uint32_t w1[kTileGroups];
  alignas(32) uint32_t w2[kTileGroups];
  alignas(32) uint32_t w3[kTileGroups];
};

// Box–Muller over a tile of Philox words, interleaved into buf in draw order.
LNS_INLINE void box_muller_tile(const TileWords& w, int64_t groups, float* buf) {
  for (int64_t g = 0; g < groups; ++g) {
    float c01, s01, c23, s23;
    cos_sin_turn(w.w1[g], c01, s01);
    cos_sin_turn(w.w3[g], c23, s23);
    const float r01 = sqrt_f(neg2_log_uniform(w.w0[g]));
    const float r23 = sqrt_f(neg2_log_uniform(w.w2[g]));
    buf[4 * g + 0] = r01 * c01;
    buf[4 * g + 1] = r01 * s01;
    buf[4 * g + 2] = r23 * c23;
    buf[4 * g + 3] = r23 * s23;
  }
}

// The Philox words of counters q0 .. q0+groups-1 (groups <= kTileGroups - 16), portable version.
inline void philox_words_base(uint64_t q0, int64_t groups, Key key, TileWords& w) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t q = q0 + static_cast<uint64_t>(g);
    const Words4 x = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u,
                                   key.k0, key.k1);
    w.w0[g] = x.x0;
    w.w1[g] = x.x1;
    w.w2[g] = x.x2;
    w.w3[g] = x.x3;
  }
}

// Normals of draws j0 .. j0+n-1 (n <= kTile), written from buf + (j0 & 3); returns that pointer.
inline const float* fill_normals_base(uint64_t j0, int64_t n, Key key, float* buf) {
  const int64_t groups = (static_cast<int64_t>(j0 & 3u) + n + 3) >> 2;
  TileWords w;
  philox_words_base(j0 >> 2, groups, key, w);
  box_muller_tile(w, groups, buf);
  return buf + (j0 & 3u);
}

#if LNS_HAVE_AVX2_CLONE
// Eight Philox counters per step with 32-bit lanes. Written with intrinsics because AVX2 has no
// 32x32 -> high-32 multiply: GCC's auto-vectorised version shuffles between 32- and 64-bit lanes
// and ran ~3x slower. Here the even and odd lanes are multiplied separately and blended back.
LNS_TARGET_AVX2 LNS_INLINE void mulhilo8(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The Philox words of counters q0 .. q0+groups-1, sixteen counters at a time.
inline LNS_TARGET_AVX2 void philox_words_avx2(uint64_t q0, int64_t groups, Key key, TileWords& w) {
  __m256i round_k0[10], round_k1[10];
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    round_k0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    round_k1[r] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bias = _mm256_set1_epi32(INT32_MIN);  // turns signed compares into unsigned ones
  // Two independent batches per step: one batch's ten rounds form a dependency chain, and
  // interleaving a second one hides its latency (~20% faster here).
  constexpr int kBatches = 2;
  for (int64_t g = 0; g < groups; g += 8 * kBatches) {
    __m256i c0[kBatches], c1[kBatches], c2[kBatches], c3[kBatches];
    for (int b = 0; b < kBatches; ++b) {
      const uint64_t q = q0 + static_cast<uint64_t>(g + 8 * b);
      const __m256i q_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q)));
      c0[b] = _mm256_add_epi32(q_lo, lane);
      // A lane whose low word wrapped around carries one into the high word.
      const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(q_lo, bias), _mm256_xor_si256(c0[b], bias));
      c1[b] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q >> 32))), carry);
      c2[b] = _mm256_setzero_si256();
      c3[b] = _mm256_setzero_si256();
    }
    for (int r = 0; r < 10; ++r) {
      for (int b = 0; b < kBatches; ++b) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[b], m0, hi0, lo0);
        mulhilo8(c2[b], m1, hi1, lo1);
        c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), round_k0[r]);
        c1[b] = lo1;
        c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), round_k1[r]);
        c3[b] = lo0;
      }
    }
    for (int b = 0; b < kBatches; ++b) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(w.w0 + g + 8 * b), c0[b]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w.w1 + g + 8 * b), c1[b]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w.w2 + g + 8 * b), c2[b]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w.w3 + g + 8 * b), c3[b]);
    }
  }
}

inline LNS_TARGET_AVX2 const float* fill_normals_avx2(uint64_t j0, int64_t n, Key key, float* buf) {
  const int64_t groups = (static_cast<int64_t>(j0 & 3u) + n + 3) >> 2;
  TileWords w;
  philox_words_avx2(j0 >> 2, groups, key, w);
  box_muller_tile(w, groups, buf);
  return buf + (j0 & 3u);
}
#endif

template <bool kAvx2>
LNS_INLINE const float* fill_normals(uint64_t j0, int64_t n, Key key, float* buf) {
#if LNS_HAVE_AVX2_CLONE
  if constexpr (kAvx2) return fill_normals_avx2(j0, n, key, buf);
#endif
  return fill_normals_base(j0, n, key, buf);
}

}  // namespace cpu
}  // namespace lns
