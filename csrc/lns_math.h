// Per-element maths of the LNS op (forward, backward, score gradient), shared by CPU and CUDA.
//
// acc_t is the accumulation type: float for float16/bfloat16/float32 inputs, double for float64.
// The float versions of softplus/sigmoid use branch-free polynomials (see philox.h for why);
// the double versions use libm, because float64 exists for gradcheck, whose finite differences
// need full double precision in everything that depends on mu.
#pragma once

#include "philox.h"

namespace lns {

LNS_HD double exp_d(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

LNS_HD double log1p_d(double x) {
#if defined(__CUDA_ARCH__)
  return log1p(x);
#else
  return std::log1p(x);
#endif
}

// exp(y) for y <= 0; below -104 the result underflows to 0 as in IEEE float.
LNS_HD float exp_nonpos_f(float y) {
  y = select_f(mask_if(y < -104.0f), -104.0f, y);
  // Round to nearest by adding and removing 1.5 * 2^23; unlike floor() this needs no SSE4.1,
  // so the baseline x86-64 build vectorises too.
  const float n = (y * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  const float r = (y - n * kLn2Hi) - n * kLn2Lo;  // |r| <= ln(2)/2
  // Taylor series of e^r; the first omitted term is r^8/8! ~ 5e-9.
  const float p6 = 1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f));
  const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * p6))));
  // Scale by 2^n in two halves so that results in the subnormal range are rounded, not lost.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni / 2;
  const int32_t n2 = ni - n1;
  return p * bits_float(static_cast<uint32_t>(n1 + 127) << 23) *
         bits_float(static_cast<uint32_t>(n2 + 127) << 23);
}

// log(1 + t) for t in [0, 1], reduced to log1p_reduced's interval.
LNS_HD float log1p_unit_f(float t) {
  const uint32_t big = mask_if(t > 0.41421356237309503f);
  const float f = select_f(big, (t - 1.0f) * 0.5f, t);  // (1 + t) / 2 - 1, exact for t >= 1/2
  const float e = select_f(big, 1.0f, 0.0f);
  return e * kLn2Hi + (log1p_reduced(f) + e * kLn2Lo);
}

// softplus(x) = log(1 + e^x) and sigmoid(x) = softplus'(x), computed from one exponential.
LNS_HD void softplus_sigmoid(float x, float& sp, float& sig) {
  const uint32_t neg = mask_if(x < 0.0f);
  const float t = exp_nonpos_f(select_f(neg, x, -x));  // e^-|x|
  sp = select_f(neg, 0.0f, x) + log1p_unit_f(t);
  const float inv = 1.0f / (1.0f + t);
  sig = select_f(neg, t * inv, inv);
}

LNS_HD void softplus_sigmoid(double x, double& sp, double& sig) {
  const double ax = x < 0.0 ? -x : x;
  const double t = exp_d(-ax);
  sp = (x > 0.0 ? x : 0.0) + log1p_d(t);
  const double inv = 1.0 / (1.0 + t);
  sig = x >= 0.0 ? inv : t * inv;
}

// Forward for one element and one sample: δ = μ + σ ε, h̃ = h + λ δ. Returns δ.
template <typename acc_t>
LNS_HD acc_t sample_delta(acc_t mu, acc_t sp, acc_t eps) {
  return mu + sp * eps;
}

// Backward contribution of one sample to dμ:
//   (λ g + coef δ) (1 + sigmoid(μ) ε),  coef = ∂L/∂strength / ‖δ‖
// (0 where ‖δ‖ = 0 or the row is padding).
template <typename acc_t>
LNS_HD acc_t dmu_term(acc_t lam_g, acc_t coef, acc_t delta, acc_t sig, acc_t eps) {
  return (lam_g + coef * delta) * (acc_t(1) + sig * eps);
}

// Score gradient ∂ log N(δ; μ, σ)/∂μ = ε/σ + (ε² − 1) sigmoid(μ)/σ, summed over samples with
// per-row rewards r_k. The sums a = Σ r_k ε_k and b = Σ r_k (ε_k² − 1) are accumulated first.
template <typename acc_t>
LNS_HD void score_accumulate(acc_t reward, acc_t eps, acc_t& a, acc_t& b) {
  a += reward * eps;
  b += reward * (eps * eps - acc_t(1));
}

template <typename acc_t>
LNS_HD acc_t score_finish(acc_t a, acc_t b, acc_t sp, acc_t sig) {
  return (a + b * sig) / sp;
}

}  // namespace lns
