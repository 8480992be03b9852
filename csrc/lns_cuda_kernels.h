// Torch-free interface of the LNS CUDA kernels: raw pointers, sizes and a stream.
//
// Kept free of torch/ATen/c10 so that the .cu file compiles with a bare nvcc (DESIGN.md §5b);
// lns_cuda.cpp turns tensors into these structs after checking them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lns {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Tensors are contiguous; [k, rows, dim] means k-major. "acc" buffers are float32, or float64
// when the dtype is float64.
struct SampleLaunch {
  const void* h;       // [rows, dim]
  const void* mu;      // [rows, dim]
  const bool* mask;    // [rows] or nullptr (all real)
  void* out;           // [k, rows, dim]
  void* strength;      // [k, rows]
  void* norms;         // [k, rows], acc
  int64_t rows, dim, k;
  double lam;
  uint64_t seed, offset;
};

struct BackwardLaunch {
  const void* grad_out;       // [k, rows, dim] or nullptr
  const void* grad_strength;  // [k, rows] or nullptr
  const void* mu;             // [rows, dim]
  const void* norms;          // [k, rows], acc
  const bool* mask;           // [rows] or nullptr
  void* dh;                   // [rows, dim]
  void* dmu;                  // [rows, dim]
  int64_t rows, dim, k;
  double lam;
  uint64_t seed, offset;
};

struct ScoreLaunch {
  const void* mu;       // [rows, dim]
  const void* rewards;  // [k, rows], acc
  const bool* mask;     // [rows] or nullptr
  void* dmu;            // [rows, dim]
  int64_t rows, dim, k;
  uint64_t seed, offset;
};

// Each returns the launch status (cudaGetLastError after the launch).
cudaError_t launch_sample(Dtype dtype, const SampleLaunch& args, cudaStream_t stream);
cudaError_t launch_backward(Dtype dtype, const BackwardLaunch& args, cudaStream_t stream);
cudaError_t launch_score(Dtype dtype, const ScoreLaunch& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lns
