// Argument checks shared by the CPU and CUDA entry points of the LNS op.
//
// Every message names what was expected, because these surface as the user-facing RuntimeError
// when the op is called through torch.ops directly (the Python face checks first, with the same
// wording, so both routes fail the same way).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace lns {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float64 accumulates in float64, every other supported dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<int64_t> prepend(int64_t k, at::IntArrayRef sizes) {
  std::vector<int64_t> out;
  out.reserve(sizes.size() + 1);
  out.push_back(k);
  out.insert(out.end(), sizes.begin(), sizes.end());
  return out;
}

inline void check_mu(const at::Tensor& mu, const char* op) {
  TORCH_CHECK(mu.defined(), op, ": mu must be a tensor");
  TORCH_CHECK(is_supported_float(mu.scalar_type()), op,
              ": mu must be float16, bfloat16, float32 or float64, got ", mu.scalar_type());
  TORCH_CHECK(mu.dim() >= 1, op, ": mu must have at least one dimension (the model dim D)");
  TORCH_CHECK(mu.is_contiguous(), op, ": mu must be contiguous (call .contiguous())");
}

inline void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& mu, const char* op) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", m.scalar_type());
  TORCH_CHECK(m.device() == mu.device(), op, ": mask must be on ", mu.device(), " like mu, got ",
              m.device());
  TORCH_CHECK(m.sizes() == mu.sizes().slice(0, mu.dim() - 1), op, ": mask must have shape ",
              mu.sizes().slice(0, mu.dim() - 1), " (mu's shape without the last dim), got ",
              m.sizes());
  TORCH_CHECK(m.is_contiguous(), op, ": mask must be contiguous");
}

inline void check_sample_args(const at::Tensor& h, const at::Tensor& mu, int64_t k,
                              const std::optional<at::Tensor>& mask) {
  const char* op = "lns_sample";
  check_mu(mu, op);
  TORCH_CHECK(h.defined(), op, ": h must be a tensor");
  TORCH_CHECK(h.device() == mu.device(), op, ": h and mu must be on the same device, got ",
              h.device(), " and ", mu.device());
  TORCH_CHECK(h.scalar_type() == mu.scalar_type(), op, ": h and mu must have the same dtype, got ",
              h.scalar_type(), " and ", mu.scalar_type());
  TORCH_CHECK(h.sizes() == mu.sizes(), op, ": h and mu must have the same shape, got ", h.sizes(),
              " and ", mu.sizes());
  TORCH_CHECK(h.is_contiguous(), op, ": h must be contiguous (call .contiguous())");
  TORCH_CHECK(k >= 1, op, ": the number of samples k must be >= 1, got ", k);
  check_mask(mask, mu, op);
}

inline void check_per_row(const at::Tensor& t, const at::Tensor& mu, int64_t k, at::ScalarType dtype,
                          const char* op, const char* name) {
  TORCH_CHECK(t.device() == mu.device(), op, ": ", name, " must be on ", mu.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  const auto want = prepend(k, mu.sizes().slice(0, mu.dim() - 1));
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ",
              at::IntArrayRef(want), " ((k,) + mu.shape[:-1]), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_backward_args(const std::optional<at::Tensor>& grad_h_noisy,
                                const std::optional<at::Tensor>& grad_strength,
                                const at::Tensor& mu, const at::Tensor& norms,
                                const std::optional<at::Tensor>& mask, int64_t k) {
  const char* op = "lns_sample_backward";
  check_mu(mu, op);
  TORCH_CHECK(k >= 1, op, ": the number of samples k must be >= 1, got ", k);
  if (grad_h_noisy.has_value()) {
    const at::Tensor& g = *grad_h_noisy;
    TORCH_CHECK(g.device() == mu.device(), op, ": grad_h_noisy must be on ", mu.device());
    TORCH_CHECK(g.scalar_type() == mu.scalar_type(), op, ": grad_h_noisy must have dtype ",
                mu.scalar_type(), ", got ", g.scalar_type());
    const auto want = prepend(k, mu.sizes());
    TORCH_CHECK(g.sizes() == at::IntArrayRef(want), op, ": grad_h_noisy must have shape ",
                at::IntArrayRef(want), ", got ", g.sizes());
    TORCH_CHECK(g.is_contiguous(), op, ": grad_h_noisy must be contiguous");
  }
  if (grad_strength.has_value()) {
    check_per_row(*grad_strength, mu, k, mu.scalar_type(), op, "grad_strength");
  }
  check_per_row(norms, mu, k, acc_dtype(mu.scalar_type()), op, "norms");
  check_mask(mask, mu, op);
}

inline void check_score_args(const at::Tensor& mu, const at::Tensor& rewards,
                             const std::optional<at::Tensor>& mask) {
  const char* op = "lns_score_grad";
  check_mu(mu, op);
  TORCH_CHECK(rewards.defined() && rewards.dim() >= 1, op,
              ": rewards must be a tensor of shape (k,) + mu.shape[:-1]");
  const int64_t k = rewards.size(0);
  TORCH_CHECK(k >= 1, op, ": rewards must hold at least one sample (k >= 1), got k = ", k);
  check_per_row(rewards, mu, k, acc_dtype(mu.scalar_type()), op, "rewards");
  check_mask(mask, mu, op);
}

}  // namespace lns
