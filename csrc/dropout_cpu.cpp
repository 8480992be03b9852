// Inverted-dropout keep-masks from the Philox stream (philox.h), on CPU.
//
// Element j of a mask keeps (value 1/(1-p)) when word j of the stream (seed, offset + j) is at
// least p * 2^32, and drops (value 0) otherwise: P(keep) = 1 - p to within 2^-32. torch.rand draws
// its uniforms one Mersenne-Twister step at a time on a single thread (~2.5 ns per element here);
// this is sixteen Philox counters per AVX2 step on every intra-op thread. The stream layout (four
// words per counter, counter = draw >> 2) is the LNS op's, so ami_dist.ops.reference can check it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "lns_cpu_normals.h"

namespace lns {

bool avx2_in_use();  // lns_cpu.cpp: the CPU has AVX2 and the set_cpu_avx2 switch is on

namespace {

template <bool kAvx2>
void fill_mask_tile(uint64_t j0, int64_t n, cpu::Key key, uint32_t threshold, float keep, float* out) {
  const int64_t head = static_cast<int64_t>(j0 & 3u);
  const int64_t groups = (head + n + 3) >> 2;
  cpu::TileWords w;
#if LNS_HAVE_AVX2_CLONE
  if constexpr (kAvx2) {
    cpu::philox_words_avx2(j0 >> 2, groups, key, w);
  } else {
    cpu::philox_words_base(j0 >> 2, groups, key, w);
  }
#else
  cpu::philox_words_base(j0 >> 2, groups, key, w);
#endif
  const int64_t whole = head == 0 ? n >> 2 : 0;  // groups written four at a time (the usual case)
  for (int64_t g = 0; g < whole; ++g) {
    out[4 * g + 0] = select_f(mask_if(w.w0[g] >= threshold), keep, 0.0f);
    out[4 * g + 1] = select_f(mask_if(w.w1[g] >= threshold), keep, 0.0f);
    out[4 * g + 2] = select_f(mask_if(w.w2[g] >= threshold), keep, 0.0f);
    out[4 * g + 3] = select_f(mask_if(w.w3[g] >= threshold), keep, 0.0f);
  }
  const uint32_t* words[4] = {w.w0, w.w1, w.w2, w.w3};
  for (int64_t i = 4 * whole; i < n; ++i) {
    const int64_t d = head + i;
    out[i] = words[d & 3][d >> 2] >= threshold ? keep : 0.0f;
  }
}

at::Tensor keep_mask_cpu(c10::IntArrayRef shape, double p, int64_t seed, int64_t offset) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "keep_mask: p must be in [0, 1), got ", p);
  auto out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t count = out.numel();
  float* op = out.data_ptr<float>();
  const cpu::Key key = cpu::key_of(static_cast<uint64_t>(seed));
  const double scaled = std::ldexp(p, 32);
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  const bool avx2 = avx2_in_use();
  at::parallel_for(0, (count + cpu::kTile - 1) / cpu::kTile, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * cpu::kTile;
      const int64_t n = std::min(cpu::kTile, count - c0);
      const uint64_t j0 = static_cast<uint64_t>(offset) + static_cast<uint64_t>(c0);
      if (avx2) {
        fill_mask_tile<true>(j0, n, key, threshold, keep, op + c0);
      } else {
        fill_mask_tile<false>(j0, n, key, threshold, keep, op + c0);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace lns

TORCH_LIBRARY_FRAGMENT(ami_dist, m) {
  m.def("keep_mask(int[] shape, float p, int seed, int offset) -> Tensor", &lns::keep_mask_cpu);
}
