// CUDA kernels of the LNS op. Torch-free on purpose (see lns_cuda_kernels.h).
//
// Each thread owns four consecutive elements of a row, which is one Philox counter when the
// row's first draw is a multiple of 4 (the usual case: offsets advance in multiples of 4) and two
// otherwise. Inputs are read with one vector load per four elements when the row length and
// the pointers allow it. All arithmetic is in acc_t (float, or double for float64 tensors).
//   forward:  one block per row, looping over the K samples; ‖δ_k‖ needs a block reduction.
//   backward and score gradient: elementwise over (row, 4-element chunk), looping over K.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "lns_cuda_kernels.h"
#include "lns_math.h"

namespace lns {
namespace cuda {
namespace {

constexpr int kMaxSampleThreads = 256;
constexpr int kElementwiseThreads = 256;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

// Four elements as one aligned unit, so that a load or store is a single 8/16-byte access
// (two 16-byte accesses for double).
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Elements [0, n) of p into x, zero beyond; kVec requires n == 4 and an aligned p.
template <typename T, bool kVec, typename acc_t>
__device__ __forceinline__ void load4(const T* p, int n, acc_t (&x)[4]) {
  if (kVec) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = to_acc(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = i < n ? to_acc(p[i]) : acc_t(0);
  }
}

template <typename T, bool kVec, typename acc_t>
__device__ __forceinline__ void store4(T* p, int n, const acc_t (&x)[4]) {
  if (kVec) {
    Pack4<T> pk;
#pragma unroll
    for (int i = 0; i < 4; ++i) pk.v[i] = from_acc<T>(x[i]);
    *reinterpret_cast<Pack4<T>*>(p) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < n) p[i] = from_acc<T>(x[i]);
    }
  }
}

// Sum over the block; the result is valid in thread 0. Every thread of the block must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* partial) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? partial[lane] : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // partial is reused by the next call
  return v;
}

template <typename T, bool kVec>
__global__ void sample_kernel(const SampleLaunch a) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t partial[32];
  const T* h_all = static_cast<const T*>(a.h);
  const T* mu_all = static_cast<const T*>(a.mu);
  T* out_all = static_cast<T*>(a.out);
  T* strength = static_cast<T*>(a.strength);
  acc_t* norms = static_cast<acc_t*>(a.norms);
  const uint32_t key0 = static_cast<uint32_t>(a.seed);
  const uint32_t key1 = static_cast<uint32_t>(a.seed >> 32);
  const int64_t chunks = (a.dim + 3) >> 2;
  const uint64_t n_all = static_cast<uint64_t>(a.rows) * static_cast<uint64_t>(a.dim);
  const acc_t lam = static_cast<acc_t>(a.lam);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* h = h_all + row * a.dim;
    const T* mu = mu_all + row * a.dim;
    const bool real = a.mask == nullptr || a.mask[row];  // uniform over the block
    for (int64_t k = 0; k < a.k; ++k) {
      T* out = out_all + (k * a.rows + row) * a.dim;
      const uint64_t base = a.offset + static_cast<uint64_t>(k) * n_all + static_cast<uint64_t>(row * a.dim);
      acc_t sumsq = 0;
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int64_t e0 = 4 * c;
        const int n = static_cast<int>(a.dim - e0 < 4 ? a.dim - e0 : 4);
        acc_t hv[4], ov[4];
        load4<T, kVec>(h + e0, n, hv);
        if (real) {
          acc_t mv[4];
          load4<T, kVec>(mu + e0, n, mv);
          const Normals4 z = normals_of_draws4(base + static_cast<uint64_t>(e0), key0, key1);
          const float eps[4] = {z.z0, z.z1, z.z2, z.z3};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            acc_t sp, sig;
            softplus_sigmoid(mv[i], sp, sig);
            const acc_t d = sample_delta<acc_t>(mv[i], sp, static_cast<acc_t>(eps[i]));
            ov[i] = hv[i] + lam * d;
            if (i < n) sumsq += d * d;  // lanes past the row end hold no element
          }
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) ov[i] = hv[i];
        }
        store4<T, kVec>(out + e0, n, ov);
      }
      if (real) sumsq = block_sum(sumsq, partial);
      if (threadIdx.x == 0) {
        const acc_t norm = real ? sqrt_acc(sumsq) : acc_t(0);
        norms[k * a.rows + row] = norm;
        strength[k * a.rows + row] = from_acc<T>(norm);
      }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kElementwiseThreads) backward_kernel(const BackwardLaunch a) {
  using acc_t = typename AccOf<T>::type;
  const T* g_all = static_cast<const T*>(a.grad_out);
  const T* gs = static_cast<const T*>(a.grad_strength);
  const T* mu_all = static_cast<const T*>(a.mu);
  const acc_t* norms = static_cast<const acc_t*>(a.norms);
  T* dh_all = static_cast<T*>(a.dh);
  T* dmu_all = static_cast<T*>(a.dmu);
  const uint32_t key0 = static_cast<uint32_t>(a.seed);
  const uint32_t key1 = static_cast<uint32_t>(a.seed >> 32);
  const int64_t chunks = (a.dim + 3) >> 2;
  const int64_t total = a.rows * chunks;
  const uint64_t n_all = static_cast<uint64_t>(a.rows) * static_cast<uint64_t>(a.dim);
  const acc_t lam = static_cast<acc_t>(a.lam);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / chunks;
    const int64_t e0 = 4 * (t - row * chunks);
    const int n = static_cast<int>(a.dim - e0 < 4 ? a.dim - e0 : 4);
    const int64_t at = row * a.dim + e0;
    const bool real = a.mask == nullptr || a.mask[row];
    acc_t mv[4] = {0, 0, 0, 0}, sp[4], sig[4];
    acc_t dh[4] = {0, 0, 0, 0}, dmu[4] = {0, 0, 0, 0};
    if (real) {
      load4<T, kVec>(mu_all + at, n, mv);
#pragma unroll
      for (int i = 0; i < 4; ++i) softplus_sigmoid(mv[i], sp[i], sig[i]);
    }
    for (int64_t k = 0; k < a.k; ++k) {
      acc_t gv[4] = {0, 0, 0, 0};
      if (g_all != nullptr) {
        load4<T, kVec>(g_all + k * a.rows * a.dim + at, n, gv);
#pragma unroll
        for (int i = 0; i < 4; ++i) dh[i] += gv[i];  // h_noisy has slope 1 in h, padding too
      }
      if (!real) continue;
      acc_t coef = 0;
      if (gs != nullptr) {
        const acc_t nrm = norms[k * a.rows + row];
        // d‖δ‖/dδ is undefined at δ = 0; use the zero subgradient there.
        coef = nrm > acc_t(0) ? to_acc(gs[k * a.rows + row]) / nrm : acc_t(0);
      }
      if (g_all == nullptr && coef == acc_t(0)) continue;  // this sample adds nothing
      const uint64_t draw = a.offset + static_cast<uint64_t>(k) * n_all + static_cast<uint64_t>(at);
      const Normals4 z = normals_of_draws4(draw, key0, key1);
      const float eps[4] = {z.z0, z.z1, z.z2, z.z3};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const acc_t e = static_cast<acc_t>(eps[i]);
        const acc_t d = sample_delta<acc_t>(mv[i], sp[i], e);
        dmu[i] += dmu_term<acc_t>(lam * gv[i], coef, d, sig[i], e);
      }
    }
    store4<T, kVec>(dh_all + at, n, dh);
    store4<T, kVec>(dmu_all + at, n, dmu);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kElementwiseThreads) score_kernel(const ScoreLaunch a) {
  using acc_t = typename AccOf<T>::type;
  const T* mu_all = static_cast<const T*>(a.mu);
  const acc_t* rewards = static_cast<const acc_t*>(a.rewards);
  T* dmu_all = static_cast<T*>(a.dmu);
  const uint32_t key0 = static_cast<uint32_t>(a.seed);
  const uint32_t key1 = static_cast<uint32_t>(a.seed >> 32);
  const int64_t chunks = (a.dim + 3) >> 2;
  const int64_t total = a.rows * chunks;
  const uint64_t n_all = static_cast<uint64_t>(a.rows) * static_cast<uint64_t>(a.dim);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / chunks;
    const int64_t e0 = 4 * (t - row * chunks);
    const int n = static_cast<int>(a.dim - e0 < 4 ? a.dim - e0 : 4);
    const int64_t at = row * a.dim + e0;
    acc_t out[4] = {0, 0, 0, 0};
    if (a.mask == nullptr || a.mask[row]) {
      acc_t mv[4], sum_a[4] = {0, 0, 0, 0}, sum_b[4] = {0, 0, 0, 0};
      load4<T, kVec>(mu_all + at, n, mv);
      for (int64_t k = 0; k < a.k; ++k) {
        const acc_t rw = rewards[k * a.rows + row];
        const uint64_t draw = a.offset + static_cast<uint64_t>(k) * n_all + static_cast<uint64_t>(at);
        const Normals4 z = normals_of_draws4(draw, key0, key1);
        const float eps[4] = {z.z0, z.z1, z.z2, z.z3};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          score_accumulate<acc_t>(rw, static_cast<acc_t>(eps[i]), sum_a[i], sum_b[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc_t sp, sig;
        softplus_sigmoid(mv[i], sp, sig);
        out[i] = score_finish<acc_t>(sum_a[i], sum_b[i], sp, sig);
      }
    }
    store4<T, kVec>(dmu_all + at, n, out);
  }
}

template <typename T>
bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

int elementwise_blocks(int64_t work) {
  const int64_t blocks = (work + kElementwiseThreads - 1) / kElementwiseThreads;
  // Grid-stride loops cover the rest; 2^20 blocks already saturate any current GPU.
  return static_cast<int>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

template <typename T>
cudaError_t sample_typed(const SampleLaunch& a, cudaStream_t stream) {
  if (a.rows == 0 || a.k == 0) return cudaSuccess;
  const int64_t chunks = (a.dim + 3) >> 2;
  const int64_t warps = (chunks + 31) / 32;
  const int threads = static_cast<int>(warps * 32 < kMaxSampleThreads ? (warps > 0 ? warps * 32 : 32)
                                                                      : kMaxSampleThreads);
  const int blocks = static_cast<int>(a.rows < INT_MAX ? a.rows : INT_MAX);
  const bool vec = a.dim % 4 == 0 && aligned4<T>(a.h) && aligned4<T>(a.mu) && aligned4<T>(a.out);
  if (vec) {
    sample_kernel<T, true><<<blocks, threads, 0, stream>>>(a);
  } else {
    sample_kernel<T, false><<<blocks, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const BackwardLaunch& a, cudaStream_t stream) {
  const int64_t work = a.rows * ((a.dim + 3) >> 2);
  if (work == 0) return cudaSuccess;
  const bool vec = a.dim % 4 == 0 && aligned4<T>(a.mu) && aligned4<T>(a.dh) && aligned4<T>(a.dmu) &&
                   (a.grad_out == nullptr || aligned4<T>(a.grad_out));
  if (vec) {
    backward_kernel<T, true><<<elementwise_blocks(work), kElementwiseThreads, 0, stream>>>(a);
  } else {
    backward_kernel<T, false><<<elementwise_blocks(work), kElementwiseThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t score_typed(const ScoreLaunch& a, cudaStream_t stream) {
  const int64_t work = a.rows * ((a.dim + 3) >> 2);
  if (work == 0) return cudaSuccess;
  const bool vec = a.dim % 4 == 0 && aligned4<T>(a.mu) && aligned4<T>(a.dmu);
  if (vec) {
    score_kernel<T, true><<<elementwise_blocks(work), kElementwiseThreads, 0, stream>>>(a);
  } else {
    score_kernel<T, false><<<elementwise_blocks(work), kElementwiseThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sample(Dtype dtype, const SampleLaunch& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return sample_typed<float>(args, stream);
    case Dtype::kFloat64: return sample_typed<double>(args, stream);
    case Dtype::kFloat16: return sample_typed<__half>(args, stream);
    case Dtype::kBFloat16: return sample_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(Dtype dtype, const BackwardLaunch& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return backward_typed<float>(args, stream);
    case Dtype::kFloat64: return backward_typed<double>(args, stream);
    case Dtype::kFloat16: return backward_typed<__half>(args, stream);
    case Dtype::kBFloat16: return backward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_score(Dtype dtype, const ScoreLaunch& args, cudaStream_t stream) {
  switch (dtype) {
    case Dtype::kFloat32: return score_typed<float>(args, stream);
    case Dtype::kFloat64: return score_typed<double>(args, stream);
    case Dtype::kFloat16: return score_typed<__half>(args, stream);
    case Dtype::kBFloat16: return score_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lns
