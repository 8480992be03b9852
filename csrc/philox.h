// Counter-based Philox4x32-10 and the normal transform of the LNS random stream (DESIGN.md §3).
//
// Everything here is a pure function of (seed, draw index), shared verbatim by the CPU kernels,
// the CUDA kernels and the tests, so a CPU and a CUDA run draw the same numbers.
//
// Precision policy: the Box–Muller transform is evaluated in float32 on every backend. The
// transcendental functions are our own branch-free polynomials rather than libm/CUDA intrinsics,
// for two reasons: the CPU loops must auto-vectorise (libm calls do not without -ffast-math),
// and using one implementation on both backends keeps CPU and CUDA within a few ulp of each
// other. Two details keep float32 close to the exact float64 definition (~3e-7 relative):
//   * ln(u) for u near 1 is taken as log1p(-(1-u)) with 1-u formed exactly from the integer,
//     because rounding u itself to float would lose most digits of the small radius there;
//   * the angle 2πu is reduced to a quarter turn with integer arithmetic before it is scaled,
//     so the sine/cosine argument is exact up to one float rounding.
// The only deviation from "u strictly inside (0, 1)" is that float(u0) may round up to 1 for the
// top few hundred integers; the log1p path above handles those exactly anyway.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LNS_HD __host__ __device__ __forceinline__
#else
#if defined(__GNUC__) || defined(__clang__)
#define LNS_HD inline __attribute__((always_inline))
#else
#define LNS_HD inline
#endif
#endif

namespace lns {

// Round and key-schedule constants of Philox4x32 (Salmon et al., SC'11; also cuRAND's).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Words4 {
  uint32_t x0, x1, x2, x3;
};

LNS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LNS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Branch-free selection on all-ones/all-zeros masks. GCC does not if-convert the ternaries of a
// loop body this large, and a single branch stops the whole generator loop from vectorising.
LNS_HD uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }

LNS_HD float select_f(uint32_t mask, float if_set, float if_clear) {
  return bits_float((float_bits(if_set) & mask) | (float_bits(if_clear) & ~mask));
}

LNS_HD float sqrt_f(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

LNS_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

LNS_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                         uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kPhiloxM0, c0, hi0, lo0);
  mulhilo(kPhiloxM1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox4x32 with 10 rounds; the key is bumped between rounds (9 bumps), as in Random123. The
// rounds are written out because a loop with a conditional bump stops GCC vectorising callers.
LNS_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
#define LNS_PHILOX_ROUND_THEN_BUMP   \
  philox_round(c0, c1, c2, c3, k0, k1); \
  k0 += kPhiloxW0;                     \
  k1 += kPhiloxW1;
  LNS_PHILOX_ROUND_THEN_BUMP  // 1
  LNS_PHILOX_ROUND_THEN_BUMP  // 2
  LNS_PHILOX_ROUND_THEN_BUMP  // 3
  LNS_PHILOX_ROUND_THEN_BUMP  // 4
  LNS_PHILOX_ROUND_THEN_BUMP  // 5
  LNS_PHILOX_ROUND_THEN_BUMP  // 6
  LNS_PHILOX_ROUND_THEN_BUMP  // 7
  LNS_PHILOX_ROUND_THEN_BUMP  // 8
  LNS_PHILOX_ROUND_THEN_BUMP  // 9
#undef LNS_PHILOX_ROUND_THEN_BUMP
  philox_round(c0, c1, c2, c3, k0, k1);  // 10
  return Words4{c0, c1, c2, c3};
}

// log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: with s = f / (2 + f), log(1 + f) = 2 atanh(s)
// and |s| <= 0.172, so the atanh series to s^9 is below float rounding (next term ~4e-9).
LNS_HD float log1p_reduced(float f) {
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  const float p = s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  const float two_s = s + s;
  return two_s + two_s * p;
}

// ln 2 split so that e * kLn2Hi is exact for |e| < 2^11.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.42860682030941723212e-06f;

// -2 ln(u) for u = (x + 0.5) 2^-32, accurate to float rounding over the whole range.
LNS_HD float neg2_log_uniform(uint32_t x) {
  // Lower range (u < 1/sqrt(2)): split u = m 2^e with m in [1/sqrt(2), sqrt(2)).
  // x + 0.5 assembled from two exact 16-bit halves: one rounding, and only int32 -> float
  // conversions, which vectorise on x86 (uint32 -> float does not before AVX-512).
  const float x_hi = static_cast<float>(static_cast<int32_t>(x >> 16)) * 65536.0f;
  const float x_lo = static_cast<float>(static_cast<int32_t>(x & 0xFFFFu)) + 0.5f;
  const float u = (x_hi + x_lo) * 2.3283064365386963e-10f;
  const uint32_t ub = float_bits(u);
  const uint32_t mant = ub & 0x007FFFFFu;
  const uint32_t big = static_cast<uint32_t>(mant > 0x003504F3u);  // mantissa above sqrt(2): halve it
  const float m = bits_float(mant | ((127u - big) << 23));
  const float e_lo = static_cast<float>(static_cast<int32_t>(ub >> 23) - 127 + static_cast<int32_t>(big));
  const float f_lo = m - 1.0f;
  // Upper range: u = 1 - v with v formed exactly from the integer, so ln u = log1p(-v).
  const float v = (static_cast<float>(static_cast<int32_t>(~x)) + 0.5f) * 2.3283064365386963e-10f;
  const uint32_t upper = mask_if(x >= 0xB504F334u);
  const float f = select_f(upper, -v, f_lo);
  const float e = select_f(upper, 0.0f, e_lo);
  const float ln_u = e * kLn2Hi + (log1p_reduced(f) + e * kLn2Lo);
  return -2.0f * ln_u;
}

// (cos 2πu, sin 2πu) for u = (x + 0.5) 2^-32. 4u = n + ρ with integer n and |ρ| <= 1/2 is
// computed in integer arithmetic, so only the quarter-turn remainder is ever rounded.
LNS_HD void cos_sin_turn(uint32_t x, float& c_out, float& s_out) {
  const uint32_t n = ((x + 0x20000000u) >> 30) & 3u;
  const int32_t rho_int = static_cast<int32_t>(x - (n << 30));   // 4u - n in units of 2^-30
  const float rho = static_cast<float>(2 * rho_int + 1) * 4.656612873077393e-10f;  // 2^-31
  const float a = rho * 1.5707963267948966f;                      // |a| <= π/4
  const float a2 = a * a;
  // Taylor series on |a| <= π/4; the first omitted terms are ~2e-9 (sin) and ~1e-10 (cos).
  const float sin_a =
      a + a * a2 *
              (-1.0f / 6.0f +
               a2 * (1.0f / 120.0f +
                     a2 * (-1.0f / 5040.0f + a2 * (1.0f / 362880.0f + a2 * (-1.0f / 39916800.0f)))));
  const float cos_a =
      1.0f + a2 * (-0.5f + a2 * (1.0f / 24.0f +
                                 a2 * (-1.0f / 720.0f + a2 * (1.0f / 40320.0f + a2 * (-1.0f / 3628800.0f)))));
  // Rotate by n quarter turns: swap for odd n, then flip signs (cos for n = 1, 2; sin for 2, 3).
  const uint32_t swap = mask_if((n & 1u) != 0u);
  const float c = select_f(swap, sin_a, cos_a);
  const float s = select_f(swap, cos_a, sin_a);
  c_out = bits_float(float_bits(c) ^ (((n + 1u) & 2u) << 30));
  s_out = bits_float(float_bits(s) ^ ((n & 2u) << 30));
}

struct Normals4 {
  float z0, z1, z2, z3;
};

// The four normals of counter q: Box–Muller on (u0, u1) -> (z0, z1) and (u2, u3) -> (z2, z3).
LNS_HD Normals4 normals_of_counter(uint64_t q, uint32_t key0, uint32_t key1) {
  const Words4 w = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), 0u, 0u,
                                 key0, key1);
  float c01, s01, c23, s23;
  cos_sin_turn(w.x1, c01, s01);
  cos_sin_turn(w.x3, c23, s23);
  const float r01 = sqrt_f(neg2_log_uniform(w.x0));
  const float r23 = sqrt_f(neg2_log_uniform(w.x2));
  return Normals4{r01 * c01, r01 * s01, r23 * c23, r23 * s23};
}

LNS_HD float pick(const Normals4& z, uint32_t lane) {
  return lane == 0 ? z.z0 : lane == 1 ? z.z1 : lane == 2 ? z.z2 : z.z3;
}

// The normal of one draw index j: component j mod 4 of counter j div 4.
LNS_HD float normal_of_draw(uint64_t j, uint32_t key0, uint32_t key1) {
  return pick(normals_of_counter(j >> 2, key0, key1), static_cast<uint32_t>(j & 3u));
}

// Normals of the four consecutive draws j0 .. j0+3; one Philox call when j0 is a multiple of 4,
// two otherwise. The shift is spelled out case by case (no runtime-indexed array) so that CUDA
// keeps everything in registers.
LNS_HD Normals4 normals_of_draws4(uint64_t j0, uint32_t key0, uint32_t key1) {
  const uint32_t a = static_cast<uint32_t>(j0 & 3u);
  const Normals4 f = normals_of_counter(j0 >> 2, key0, key1);
  if (a == 0u) return f;
  const Normals4 s = normals_of_counter((j0 >> 2) + 1u, key0, key1);
  if (a == 1u) return Normals4{f.z1, f.z2, f.z3, s.z0};
  if (a == 2u) return Normals4{f.z2, f.z3, s.z0, s.z1};
  return Normals4{f.z3, s.z0, s.z1, s.z2};
}

}  // namespace lns
