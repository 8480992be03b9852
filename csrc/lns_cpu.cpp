// Schemas of the ami_dist LNS ops and their CPU kernels.
//
// Work is split over rows (all dims but the last) with at::parallel_for. Within a row the
// normals are generated a tile at a time into a small buffer and consumed by a second loop, so
// both loops are plain straight-line code the compiler vectorises. The hot loops are compiled
// twice, for baseline x86-64 and for AVX2+FMA, and the variant is chosen at run time, because
// extension wheels are built for the baseline ISA while the vector width decides the speed here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "lns_checks.h"
#include "lns_cpu_normals.h"
#include "lns_math.h"

namespace lns {
namespace {

using cpu::fill_normals;
using cpu::Key;
using cpu::key_of;
using cpu::kTile;
using cpu::kTileBuf;

template <typename scalar_t>
struct SampleArgs {
  const scalar_t* h;
  const scalar_t* mu;
  const bool* mask;  // nullptr: every row is a real token
  scalar_t* out;     // [k, rows, dim]
  scalar_t* strength;  // [k, rows]
  void* norms;         // [k, rows], acc_t
  int64_t rows, dim, k;
  double lam;
  uint64_t offset;
  Key key;
};

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_out;       // [k, rows, dim] or nullptr
  const scalar_t* grad_strength;  // [k, rows] or nullptr
  const scalar_t* mu;
  const void* norms;  // [k, rows], acc_t
  const bool* mask;
  scalar_t* dh;
  scalar_t* dmu;
  int64_t rows, dim, k;
  double lam;
  uint64_t offset;
  Key key;
};

template <typename scalar_t>
struct ScoreArgs {
  const scalar_t* mu;
  const void* rewards;  // [k, rows], acc_t
  const bool* mask;
  scalar_t* dmu;
  int64_t rows, dim, k;
  uint64_t offset;
  Key key;
};

// Per-thread row buffers in acc_t: mu, and softplus/sigmoid of mu (computed once per row, not
// once per sample), plus two accumulators for the backward passes.
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> mu, sp, sig, acc0, acc1;
  explicit RowScratch(int64_t dim) : mu(dim), sp(dim), sig(dim), acc0(dim), acc1(dim) {}
};

template <typename scalar_t, typename acc_t>
LNS_INLINE void load_row_stats(const scalar_t* mu, int64_t dim, RowScratch<acc_t>& s) {
  acc_t* m = s.mu.data();
  acc_t* sp = s.sp.data();
  acc_t* sig = s.sig.data();
  for (int64_t c = 0; c < dim; ++c) m[c] = static_cast<acc_t>(mu[c]);
  for (int64_t c = 0; c < dim; ++c) softplus_sigmoid(m[c], sp[c], sig[c]);
}

template <typename scalar_t, typename acc_t, bool kAvx2>
LNS_INLINE void sample_rows(const SampleArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  const int64_t n_all = a.rows * a.dim;
  const acc_t lam = static_cast<acc_t>(a.lam);
  acc_t* norms = static_cast<acc_t*>(a.norms);
  RowScratch<acc_t> s(a.dim);
  std::vector<acc_t> h_row(a.dim);
  alignas(64) float buf[kTileBuf];
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* h = a.h + r * a.dim;
    if (a.mask != nullptr && !a.mask[r]) {
      // Padding: no noise, zero strength.
      for (int64_t k = 0; k < a.k; ++k) {
        std::copy(h, h + a.dim, a.out + (k * a.rows + r) * a.dim);
        a.strength[k * a.rows + r] = scalar_t(0);
        norms[k * a.rows + r] = acc_t(0);
      }
      continue;
    }
    load_row_stats<scalar_t, acc_t>(a.mu + r * a.dim, a.dim, s);
    for (int64_t c = 0; c < a.dim; ++c) h_row[c] = static_cast<acc_t>(h[c]);
    const acc_t* m = s.mu.data();
    const acc_t* sp = s.sp.data();
    const acc_t* hr = h_row.data();
    for (int64_t k = 0; k < a.k; ++k) {
      scalar_t* out = a.out + (k * a.rows + r) * a.dim;
      const uint64_t base = a.offset + static_cast<uint64_t>(k * n_all + r * a.dim);
      acc_t sumsq = 0;
      for (int64_t c0 = 0; c0 < a.dim; c0 += kTile) {
        const int64_t n = std::min(kTile, a.dim - c0);
        const float* eps = fill_normals<kAvx2>(base + static_cast<uint64_t>(c0), n, a.key, buf);
#pragma omp simd reduction(+ : sumsq)
        for (int64_t c = 0; c < n; ++c) {
          const acc_t d = sample_delta<acc_t>(m[c0 + c], sp[c0 + c], static_cast<acc_t>(eps[c]));
          out[c0 + c] = static_cast<scalar_t>(hr[c0 + c] + lam * d);
          sumsq += d * d;
        }
      }
      const acc_t norm = std::sqrt(sumsq);
      norms[k * a.rows + r] = norm;
      a.strength[k * a.rows + r] = static_cast<scalar_t>(norm);
    }
  }
}

template <typename scalar_t, typename acc_t, bool kAvx2>
LNS_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  const int64_t n_all = a.rows * a.dim;
  const acc_t lam = static_cast<acc_t>(a.lam);
  const acc_t* norms = static_cast<const acc_t*>(a.norms);
  RowScratch<acc_t> s(a.dim);
  alignas(64) float buf[kTileBuf];
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* dh = s.acc0.data();
    acc_t* dmu = s.acc1.data();
    std::fill(dh, dh + a.dim, acc_t(0));
    std::fill(dmu, dmu + a.dim, acc_t(0));
    const bool real = a.mask == nullptr || a.mask[r];
    // h_noisy depends on h with slope 1 at every position, padding included.
    if (a.grad_out != nullptr) {
      for (int64_t k = 0; k < a.k; ++k) {
        const scalar_t* g = a.grad_out + (k * a.rows + r) * a.dim;
        for (int64_t c = 0; c < a.dim; ++c) dh[c] += static_cast<acc_t>(g[c]);
      }
    }
    if (real) {
      load_row_stats<scalar_t, acc_t>(a.mu + r * a.dim, a.dim, s);
      const acc_t* m = s.mu.data();
      const acc_t* sp = s.sp.data();
      const acc_t* sig = s.sig.data();
      for (int64_t k = 0; k < a.k; ++k) {
        acc_t coef = 0;
        if (a.grad_strength != nullptr) {
          const acc_t nrm = norms[k * a.rows + r];
          // d‖δ‖/dδ is undefined at δ = 0; use the zero subgradient there.
          coef = nrm > acc_t(0) ? static_cast<acc_t>(a.grad_strength[k * a.rows + r]) / nrm : acc_t(0);
        }
        if (a.grad_out == nullptr && coef == acc_t(0)) continue;  // this sample adds nothing
        const scalar_t* g = a.grad_out != nullptr ? a.grad_out + (k * a.rows + r) * a.dim : nullptr;
        const uint64_t base = a.offset + static_cast<uint64_t>(k * n_all + r * a.dim);
        for (int64_t c0 = 0; c0 < a.dim; c0 += kTile) {
          const int64_t n = std::min(kTile, a.dim - c0);
          const float* eps = fill_normals<kAvx2>(base + static_cast<uint64_t>(c0), n, a.key, buf);
          if (g != nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const acc_t e = static_cast<acc_t>(eps[c]);
              const acc_t d = sample_delta<acc_t>(m[c0 + c], sp[c0 + c], e);
              dmu[c0 + c] += dmu_term<acc_t>(lam * static_cast<acc_t>(g[c0 + c]), coef, d, sig[c0 + c], e);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const acc_t e = static_cast<acc_t>(eps[c]);
              const acc_t d = sample_delta<acc_t>(m[c0 + c], sp[c0 + c], e);
              dmu[c0 + c] += dmu_term<acc_t>(acc_t(0), coef, d, sig[c0 + c], e);
            }
          }
        }
      }
    }
    scalar_t* dh_out = a.dh + r * a.dim;
    scalar_t* dmu_out = a.dmu + r * a.dim;
    for (int64_t c = 0; c < a.dim; ++c) dh_out[c] = static_cast<scalar_t>(dh[c]);
    for (int64_t c = 0; c < a.dim; ++c) dmu_out[c] = static_cast<scalar_t>(dmu[c]);
  }
}

template <typename scalar_t, typename acc_t, bool kAvx2>
LNS_INLINE void score_rows(const ScoreArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  const int64_t n_all = a.rows * a.dim;
  const acc_t* rewards = static_cast<const acc_t*>(a.rewards);
  RowScratch<acc_t> s(a.dim);
  alignas(64) float buf[kTileBuf];
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* out = a.dmu + r * a.dim;
    if (a.mask != nullptr && !a.mask[r]) {
      std::fill(out, out + a.dim, scalar_t(0));
      continue;
    }
    load_row_stats<scalar_t, acc_t>(a.mu + r * a.dim, a.dim, s);
    acc_t* sum_a = s.acc0.data();
    acc_t* sum_b = s.acc1.data();
    std::fill(sum_a, sum_a + a.dim, acc_t(0));
    std::fill(sum_b, sum_b + a.dim, acc_t(0));
    for (int64_t k = 0; k < a.k; ++k) {
      const acc_t rw = rewards[k * a.rows + r];
      const uint64_t base = a.offset + static_cast<uint64_t>(k * n_all + r * a.dim);
      for (int64_t c0 = 0; c0 < a.dim; c0 += kTile) {
        const int64_t n = std::min(kTile, a.dim - c0);
        const float* eps = fill_normals<kAvx2>(base + static_cast<uint64_t>(c0), n, a.key, buf);
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) {
          score_accumulate<acc_t>(rw, static_cast<acc_t>(eps[c]), sum_a[c0 + c], sum_b[c0 + c]);
        }
      }
    }
    const acc_t* sp = s.sp.data();
    const acc_t* sig = s.sig.data();
    for (int64_t c = 0; c < a.dim; ++c) {
      out[c] = static_cast<scalar_t>(score_finish<acc_t>(sum_a[c], sum_b[c], sp[c], sig[c]));
    }
  }
}

// The two ISA variants of each row kernel; the bodies above are force-inlined into both.
template <typename scalar_t, typename acc_t>
void sample_rows_base(const SampleArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  sample_rows<scalar_t, acc_t, false>(a, r0, r1);
}
template <typename scalar_t, typename acc_t>
void backward_rows_base(const BackwardArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  backward_rows<scalar_t, acc_t, false>(a, r0, r1);
}
template <typename scalar_t, typename acc_t>
void score_rows_base(const ScoreArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  score_rows<scalar_t, acc_t, false>(a, r0, r1);
}

#if LNS_HAVE_AVX2_CLONE
template <typename scalar_t, typename acc_t>
LNS_TARGET_AVX2 void sample_rows_avx2(const SampleArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  sample_rows<scalar_t, acc_t, true>(a, r0, r1);
}
template <typename scalar_t, typename acc_t>
LNS_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  backward_rows<scalar_t, acc_t, true>(a, r0, r1);
}
template <typename scalar_t, typename acc_t>
LNS_TARGET_AVX2 void score_rows_avx2(const ScoreArgs<scalar_t>& a, int64_t r0, int64_t r1) {
  score_rows<scalar_t, acc_t, true>(a, r0, r1);
}

bool cpu_supports_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

// Whether the AVX2 variants are used. Switchable (set_cpu_avx2) so that the tests can also run
// the baseline variants on an AVX2 machine, where they would otherwise never execute.
std::atomic<bool>& avx2_enabled() {
#if LNS_HAVE_AVX2_CLONE
  static std::atomic<bool> on{cpu_supports_avx2()};
#else
  static std::atomic<bool> on{false};
#endif
  return on;
}

bool cpu_has_avx2() { return avx2_enabled().load(std::memory_order_relaxed); }

template <typename scalar_t, typename acc_t>
auto pick_sample_rows() {
#if LNS_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return &sample_rows_avx2<scalar_t, acc_t>;
#endif
  return &sample_rows_base<scalar_t, acc_t>;
}
template <typename scalar_t, typename acc_t>
auto pick_backward_rows() {
#if LNS_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return &backward_rows_avx2<scalar_t, acc_t>;
#endif
  return &backward_rows_base<scalar_t, acc_t>;
}
template <typename scalar_t, typename acc_t>
auto pick_score_rows() {
#if LNS_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return &score_rows_avx2<scalar_t, acc_t>;
#endif
  return &score_rows_base<scalar_t, acc_t>;
}

// Rows per parallel task: about 32K elements of per-sample work, at least one row.
int64_t row_grain(int64_t dim, int64_t k) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, dim * k));
}

// Number of rows (product of all dims but the last); counted directly so that D = 0 works.
int64_t row_count(const at::Tensor& mu) { return c10::multiply_integers(mu.sizes().slice(0, mu.dim() - 1)); }

}  // namespace

// For the other CPU kernels of the extension (dropout_cpu.cpp): the same switch as the LNS kernels.
bool avx2_in_use() { return cpu_has_avx2(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> lns_sample_cpu(const at::Tensor& h, const at::Tensor& mu,
                                                              int64_t k, double lam, int64_t seed,
                                                              int64_t offset,
                                                              const std::optional<at::Tensor>& mask) {
  check_sample_args(h, mu, k, mask);
  TORCH_CHECK(mu.device().is_cpu(), "lns_sample: the CPU kernel got tensors on ", mu.device());
  const int64_t dim = mu.size(-1);
  const int64_t rows = row_count(mu);
  auto out = at::empty(prepend(k, mu.sizes()), mu.options());
  auto strength = at::empty(prepend(k, mu.sizes().slice(0, mu.dim() - 1)), mu.options());
  auto norms = at::empty(prepend(k, mu.sizes().slice(0, mu.dim() - 1)),
                         mu.options().dtype(acc_dtype(mu.scalar_type())));
  if (out.numel() == 0 && strength.numel() == 0) return {out, strength, norms};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "lns_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SampleArgs<scalar_t> a{h.data_ptr<scalar_t>(),
                           mu.data_ptr<scalar_t>(),
                           mask.has_value() ? mask->data_ptr<bool>() : nullptr,
                           out.data_ptr<scalar_t>(),
                           strength.data_ptr<scalar_t>(),
                           norms.data_ptr(),
                           rows,
                           dim,
                           k,
                           lam,
                           static_cast<uint64_t>(offset),
                           key_of(static_cast<uint64_t>(seed))};
    const auto fn = pick_sample_rows<scalar_t, acc_t>();
    at::parallel_for(0, rows, row_grain(dim, k), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
  return {out, strength, norms};
}

std::tuple<at::Tensor, at::Tensor> lns_sample_backward_cpu(
    const std::optional<at::Tensor>& grad_h_noisy, const std::optional<at::Tensor>& grad_strength,
    const at::Tensor& mu, const at::Tensor& norms, const std::optional<at::Tensor>& mask, int64_t k,
    double lam, int64_t seed, int64_t offset) {
  check_backward_args(grad_h_noisy, grad_strength, mu, norms, mask, k);
  TORCH_CHECK(mu.device().is_cpu(), "lns_sample_backward: the CPU kernel got tensors on ", mu.device());
  const int64_t dim = mu.size(-1);
  const int64_t rows = row_count(mu);
  auto dh = at::empty_like(mu);
  auto dmu = at::empty_like(mu);
  if (mu.numel() == 0) return {dh, dmu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "lns_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a{grad_h_noisy.has_value() ? grad_h_noisy->data_ptr<scalar_t>() : nullptr,
                             grad_strength.has_value() ? grad_strength->data_ptr<scalar_t>() : nullptr,
                             mu.data_ptr<scalar_t>(),
                             norms.data_ptr(),
                             mask.has_value() ? mask->data_ptr<bool>() : nullptr,
                             dh.data_ptr<scalar_t>(),
                             dmu.data_ptr<scalar_t>(),
                             rows,
                             dim,
                             k,
                             lam,
                             static_cast<uint64_t>(offset),
                             key_of(static_cast<uint64_t>(seed))};
    const auto fn = pick_backward_rows<scalar_t, acc_t>();
    at::parallel_for(0, rows, row_grain(dim, k), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
  return {dh, dmu};
}

at::Tensor lns_score_grad_cpu(const at::Tensor& mu, const at::Tensor& rewards, int64_t seed, int64_t offset,
                              const std::optional<at::Tensor>& mask) {
  check_score_args(mu, rewards, mask);
  TORCH_CHECK(mu.device().is_cpu(), "lns_score_grad: the CPU kernel got tensors on ", mu.device());
  const int64_t dim = mu.size(-1);
  const int64_t rows = row_count(mu);
  const int64_t k = rewards.size(0);
  auto dmu = at::empty_like(mu);
  if (mu.numel() == 0) return dmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "lns_score_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ScoreArgs<scalar_t> a{mu.data_ptr<scalar_t>(),
                          rewards.data_ptr(),
                          mask.has_value() ? mask->data_ptr<bool>() : nullptr,
                          dmu.data_ptr<scalar_t>(),
                          rows,
                          dim,
                          k,
                          static_cast<uint64_t>(offset),
                          key_of(static_cast<uint64_t>(seed))};
    const auto fn = pick_score_rows<scalar_t, acc_t>();
    at::parallel_for(0, rows, row_grain(dim, k), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
  return dmu;
}

// Select the AVX2 (true) or baseline (false) CPU kernels; AVX2 is only used where the CPU has it.
// Returns whether AVX2 kernels are in use afterwards.
bool set_cpu_avx2(bool enable) {
#if LNS_HAVE_AVX2_CLONE
  avx2_enabled().store(enable && cpu_supports_avx2());
#endif
  return cpu_has_avx2();
}

// Raw Philox4x32-10 blocks, for checking against published known-answer vectors. Words are
// carried in int64 tensors because torch has no full uint32 arithmetic.
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.dim() == 2 && counter.size(1) == 4,
              "philox4x32_10: counter must be an int64 tensor of shape [n, 4]");
  TORCH_CHECK(key.scalar_type() == at::kLong && key.dim() == 1 && key.size(0) == 2,
              "philox4x32_10: key must be an int64 tensor of shape [2]");
  auto c = counter.contiguous();
  auto kk = key.contiguous();
  auto out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = kk.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const Words4 w = philox4x32_10(static_cast<uint32_t>(cp[4 * i]), static_cast<uint32_t>(cp[4 * i + 1]),
                                   static_cast<uint32_t>(cp[4 * i + 2]), static_cast<uint32_t>(cp[4 * i + 3]),
                                   static_cast<uint32_t>(kp[0]), static_cast<uint32_t>(kp[1]));
    op[4 * i] = w.x0;
    op[4 * i + 1] = w.x1;
    op[4 * i + 2] = w.x2;
    op[4 * i + 3] = w.x3;
  }
  return out;
}

// The stream's normals for draws offset .. offset+count-1, through the same tiled generator the
// kernels use (so its handling of partial counter groups is tested directly).
at::Tensor normal_stream_cpu(int64_t seed, int64_t offset, int64_t count) {
  TORCH_CHECK(count >= 0, "normal_stream: count must be >= 0, got ", count);
  auto out = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const Key key = key_of(static_cast<uint64_t>(seed));
  alignas(64) float buf[kTileBuf];
  for (int64_t c0 = 0; c0 < count; c0 += kTile) {
    const int64_t n = std::min(kTile, count - c0);
    const uint64_t j0 = static_cast<uint64_t>(offset) + static_cast<uint64_t>(c0);
#if LNS_HAVE_AVX2_CLONE
    const float* z =
        cpu_has_avx2() ? cpu::fill_normals_avx2(j0, n, key, buf) : cpu::fill_normals_base(j0, n, key, buf);
#else
    const float* z = cpu::fill_normals_base(j0, n, key, buf);
#endif
    std::copy(z, z + n, op + c0);
  }
  return out;
}

}  // namespace lns

// seed and offset are carried as int64 by the dispatcher and reinterpreted as uint64 here, so
// the whole 64-bit range of DESIGN.md §3 is reachable from Python (see ami_dist/ops/_checks.py).
TORCH_LIBRARY(ami_dist, m) {
  m.def(
      "lns_sample(Tensor h, Tensor mu, int k, float lam, int seed, int offset, Tensor? mask=None) "
      "-> (Tensor h_noisy, Tensor strength, Tensor norms)");
  m.def(
      "lns_sample_backward(Tensor? grad_h_noisy, Tensor? grad_strength, Tensor mu, Tensor norms, "
      "Tensor? mask, int k, float lam, int seed, int offset) -> (Tensor grad_h, Tensor grad_mu)");
  m.def("lns_score_grad(Tensor mu, Tensor rewards, int seed, int offset, Tensor? mask=None) -> Tensor");
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("normal_stream(int seed, int offset, int count) -> Tensor", &lns::normal_stream_cpu);
  m.def("set_cpu_avx2(bool enable) -> bool", &lns::set_cpu_avx2);
}

TORCH_LIBRARY_IMPL(ami_dist, CPU, m) {
  m.impl("lns_sample", &lns::lns_sample_cpu);
  m.impl("lns_sample_backward", &lns::lns_sample_backward_cpu);
  m.impl("lns_score_grad", &lns::lns_score_grad_cpu);
  m.impl("philox4x32_10", &lns::philox4x32_10_cpu);
}
