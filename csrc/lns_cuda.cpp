// CUDA entry points of the ami_dist LNS ops: check tensors, pick the current stream, launch.
//
// The kernels themselves are in the torch-free lns_cuda_kernels.cu; this file is the only CUDA
// code that sees ATen, and it is compiled by the host compiler. Only c10's stream and guard
// headers are used (not ATen/cuda/CUDAContext.h), which keeps cuBLAS/cuSPARSE headers out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "lns_checks.h"
#include "lns_cuda_kernels.h"

namespace lns {
namespace {

cuda::Dtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kDouble: return cuda::Dtype::kFloat64;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "LNS CUDA kernels: unsupported dtype ", t);
  }
}

void check_cuda(const at::Tensor& mu, const char* op) {
  TORCH_CHECK(mu.is_cuda(), op, ": the CUDA kernel got tensors on ", mu.device());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

int64_t row_count(const at::Tensor& mu) { return c10::multiply_integers(mu.sizes().slice(0, mu.dim() - 1)); }

const bool* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->data_ptr<bool>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lns_sample_cuda(const at::Tensor& h, const at::Tensor& mu,
                                                               int64_t k, double lam, int64_t seed,
                                                               int64_t offset,
                                                               const std::optional<at::Tensor>& mask) {
  check_sample_args(h, mu, k, mask);
  check_cuda(mu, "lns_sample");
  const c10::cuda::CUDAGuard guard(mu.device());
  const auto rows_shape = prepend(k, mu.sizes().slice(0, mu.dim() - 1));
  auto out = at::empty(prepend(k, mu.sizes()), mu.options());
  auto strength = at::empty(rows_shape, mu.options());
  auto norms = at::empty(rows_shape, mu.options().dtype(acc_dtype(mu.scalar_type())));
  cuda::SampleLaunch a{h.data_ptr(),
                       mu.data_ptr(),
                       mask_ptr(mask),
                       out.data_ptr(),
                       strength.data_ptr(),
                       norms.data_ptr(),
                       row_count(mu),
                       mu.size(-1),
                       k,
                       lam,
                       static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset)};
  check_launch(cuda::launch_sample(dtype_code(mu.scalar_type()), a, c10::cuda::getCurrentCUDAStream()),
               "lns_sample");
  return {out, strength, norms};
}

std::tuple<at::Tensor, at::Tensor> lns_sample_backward_cuda(
    const std::optional<at::Tensor>& grad_h_noisy, const std::optional<at::Tensor>& grad_strength,
    const at::Tensor& mu, const at::Tensor& norms, const std::optional<at::Tensor>& mask, int64_t k,
    double lam, int64_t seed, int64_t offset) {
  check_backward_args(grad_h_noisy, grad_strength, mu, norms, mask, k);
  check_cuda(mu, "lns_sample_backward");
  const c10::cuda::CUDAGuard guard(mu.device());
  auto dh = at::empty_like(mu);
  auto dmu = at::empty_like(mu);
  cuda::BackwardLaunch a{grad_h_noisy.has_value() ? grad_h_noisy->data_ptr() : nullptr,
                         grad_strength.has_value() ? grad_strength->data_ptr() : nullptr,
                         mu.data_ptr(),
                         norms.data_ptr(),
                         mask_ptr(mask),
                         dh.data_ptr(),
                         dmu.data_ptr(),
                         row_count(mu),
                         mu.size(-1),
                         k,
                         lam,
                         static_cast<uint64_t>(seed),
                         static_cast<uint64_t>(offset)};
  check_launch(cuda::launch_backward(dtype_code(mu.scalar_type()), a, c10::cuda::getCurrentCUDAStream()),
               "lns_sample_backward");
  return {dh, dmu};
}

at::Tensor lns_score_grad_cuda(const at::Tensor& mu, const at::Tensor& rewards, int64_t seed, int64_t offset,
                               const std::optional<at::Tensor>& mask) {
  check_score_args(mu, rewards, mask);
  check_cuda(mu, "lns_score_grad");
  const c10::cuda::CUDAGuard guard(mu.device());
  auto dmu = at::empty_like(mu);
  cuda::ScoreLaunch a{mu.data_ptr(),
                      rewards.data_ptr(),
                      mask_ptr(mask),
                      dmu.data_ptr(),
                      row_count(mu),
                      mu.size(-1),
                      rewards.size(0),
                      static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset)};
  check_launch(cuda::launch_score(dtype_code(mu.scalar_type()), a, c10::cuda::getCurrentCUDAStream()),
               "lns_score_grad");
  return dmu;
}

}  // namespace lns

TORCH_LIBRARY_IMPL(ami_dist, CUDA, m) {
  m.impl("lns_sample", &lns::lns_sample_cuda);
  m.impl("lns_sample_backward", &lns::lns_sample_backward_cuda);
  m.impl("lns_score_grad", &lns::lns_score_grad_cuda);
}
