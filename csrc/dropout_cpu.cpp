// Inverted-dropout keep-masks from the Philox stream (philox.h), on CPU.
//
// Element j of a mask keeps (value 1/(1-p)) when word j of the stream (seed, offset + j) is at
// least p * 2^32, and drops (value 0) otherwise: P(keep) = 1 - p to within 2^-32. torch.rand draws
// its uniforms one Mersenne-Twister step at a time on a single thread (~2.5 ns per element here);
// this is sixteen Philox counters per AVX2 step on every intra-op thread. The stream layout (four
// words per counter, counter = draw >> 2) is the LNS op's, so ami_dist.ops.reference can check it.
// dropout applies the mask of (seed, offset 0) as it draws it and keeps one byte per element for the
// backward pass; dropout_backward applies it to the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "lns_cpu_normals.h"

namespace lns {

bool avx2_in_use();  // lns_cpu.cpp: the CPU has AVX2 and the set_cpu_avx2 switch is on

namespace {

// Calls emit(i, keep_bits) for the elements i = 0 .. n-1 of draws j0 .. j0+n-1, keep_bits all ones
// where element i is kept, zero where it is dropped.
template <bool kAvx2, typename Emit>
void keep_tile(uint64_t j0, int64_t n, cpu::Key key, uint32_t threshold, Emit emit) {
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
    emit(4 * g + 0, mask_if(w.w0[g] >= threshold));
    emit(4 * g + 1, mask_if(w.w1[g] >= threshold));
    emit(4 * g + 2, mask_if(w.w2[g] >= threshold));
    emit(4 * g + 3, mask_if(w.w3[g] >= threshold));
  }
  const uint32_t* words[4] = {w.w0, w.w1, w.w2, w.w3};
  for (int64_t i = 4 * whole; i < n; ++i) {
    const int64_t d = head + i;
    emit(i, mask_if(words[d & 3][d >> 2] >= threshold));
  }
}

struct Stream {
  cpu::Key key;
  uint32_t threshold;  // a word keeps its element when at least this
  float keep;          // the value of a kept element of the mask: 1/(1-p)
};

// The value of a kept element of the mask, 1/(1-p), once p is checked.
float keep_value(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  return static_cast<float>(1.0 / (1.0 - p));
}

Stream stream_of(double p, int64_t seed, const char* op) {
  const float keep = keep_value(p, op);
  const double scaled = std::ldexp(p, 32);
  return {cpu::key_of(static_cast<uint64_t>(seed)),
          scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled), keep};
}

// Runs tile(c0, n, j0, avx2) over the tiles of count draws from offset, on the intra-op threads.
template <typename Tile>
void for_each_tile(int64_t count, int64_t offset, Tile tile) {
  const bool avx2 = avx2_in_use();
  at::parallel_for(0, (count + cpu::kTile - 1) / cpu::kTile, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * cpu::kTile;
      tile(c0, std::min(cpu::kTile, count - c0), static_cast<uint64_t>(offset) + static_cast<uint64_t>(c0), avx2);
    }
  });
}

at::Tensor keep_mask_cpu(c10::IntArrayRef shape, double p, int64_t seed, int64_t offset) {
  const Stream s = stream_of(p, seed, "keep_mask");
  auto out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  for_each_tile(out.numel(), offset, [&](int64_t c0, int64_t n, uint64_t j0, bool avx2) {
    float* o = op + c0;
    auto emit = [&](int64_t i, uint32_t bits) { o[i] = select_f(bits, s.keep, 0.0f); };
    avx2 ? keep_tile<true>(j0, n, s.key, s.threshold, emit) : keep_tile<false>(j0, n, s.key, s.threshold, emit);
  });
  return out;
}

// Dropout of x in one pass: out = x * keep_mask(x.shape, p, seed, 0), element for element the same
// float32 products (so NaN and -0 come through as they would), and the keep flags (1 kept, 0 dropped)
// as one byte per element for the backward pass, a quarter of the float mask's memory.
std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "dropout: x must be a float32 CPU tensor");
  const Stream s = stream_of(p, seed, "dropout");
  const auto input = x.contiguous();
  auto out = at::empty_like(input);
  auto kept = at::empty(input.sizes(), input.options().dtype(at::kByte));
  const float* xp = input.data_ptr<float>();
  float* op = out.data_ptr<float>();
  uint8_t* kp = kept.data_ptr<uint8_t>();
  for_each_tile(input.numel(), 0, [&](int64_t c0, int64_t n, uint64_t j0, bool avx2) {
    const float* xi = xp + c0;
    float* o = op + c0;
    uint8_t* k = kp + c0;
    auto emit = [&](int64_t i, uint32_t bits) {
      o[i] = xi[i] * select_f(bits, s.keep, 0.0f);
      k[i] = static_cast<uint8_t>(bits & 1u);
    };
    avx2 ? keep_tile<true>(j0, n, s.key, s.threshold, emit) : keep_tile<false>(j0, n, s.key, s.threshold, emit);
  });
  return {out, kept};
}

// The gradient of dropout_cpu: grad * mask, the mask rebuilt from the keep flags.
at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& kept, double p) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && kept.scalar_type() == at::kByte &&
                  grad.sizes() == kept.sizes(),
              "dropout_backward: a float32 CPU gradient and uint8 keep flags of its shape");
  const float keep = keep_value(p, "dropout_backward");
  const auto g = grad.contiguous();
  const auto k = kept.contiguous();
  auto out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const uint8_t* kp = k.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      op[i] = gp[i] * select_f(mask_if(kp[i] != 0), keep, 0.0f);
    }
  });
  return out;
}

}  // namespace
}  // namespace lns

TORCH_LIBRARY_FRAGMENT(ami_dist, m) {
  m.def("keep_mask(int[] shape, float p, int seed, int offset) -> Tensor", &lns::keep_mask_cpu);
  m.def("dropout(Tensor x, float p, int seed) -> (Tensor, Tensor)", &lns::dropout_cpu);
  m.def("dropout_backward(Tensor grad, Tensor kept, float p) -> Tensor", &lns::dropout_backward_cpu);
}
