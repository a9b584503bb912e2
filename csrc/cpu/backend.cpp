// The CPU backend: hands each time step's pointwise work to the loops built for the best capability this
// CPU has (kernels.h), split over threads by rows, and registers the layer ops for the CPU dispatch key.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "../layer.h"
#include "kernels.h"

namespace fused_lstm::cpu {
namespace {

enum class Capability { Default = 0, Avx2 = 1, Avx512 = 2 };

Capability hardware_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma")) {
    return Capability::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Capability::Avx2;
  }
#endif
  return Capability::Default;
}

// The hardware's best, lowered (never raised) by ATEN_CPU_CAPABILITY as for PyTorch's own kernels, so that
// tests can run every build on one machine.
Capability chosen_capability() {
  Capability best = hardware_capability();
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string name(env);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
    const Capability asked = name == "avx512" ? Capability::Avx512
                             : name == "avx2" ? Capability::Avx2
                                              : Capability::Default;
    best = std::min(best, asked);
  }
  return best;
}

Capability capability() {
  static const Capability chosen = chosen_capability();
  return chosen;
}

// Rows per thread chunk: enough elements that a chunk outweighs the cost of waking a thread.
int64_t row_grain(int64_t hidden) {
  constexpr int64_t kElementsPerChunk = 16384;
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, hidden));
}

template <typename Fn>
Fn pick(Fn default_loop, Fn avx2_loop, Fn avx512_loop) {
  switch (capability()) {
    case Capability::Avx512:
      return avx512_loop;
    case Capability::Avx2:
      return avx2_loop;
    default:
      return default_loop;
  }
}

// float and double run the chosen capability's loops; float16 and bfloat16 only have DEFAULT ones.
template <typename S>
constexpr bool kVectorized = std::is_same_v<S, float> || std::is_same_v<S, double>;

template <typename S>
auto forward_loop() {
  if constexpr (kVectorized<S>) {
    return pick(&DEFAULT::forward_rows<S>, &AVX2::forward_rows<S>, &AVX512::forward_rows<S>);
  } else {
    return &DEFAULT::forward_rows<S>;
  }
}

template <typename S>
auto backward_loop() {
  if constexpr (kVectorized<S>) {
    return pick(&DEFAULT::backward_rows<S>, &AVX2::backward_rows<S>, &AVX512::backward_rows<S>);
  } else {
    return &DEFAULT::backward_rows<S>;
  }
}

template <typename Pointers, typename Loop>
void parallel_rows(const Pointers& p, int64_t rows, Loop loop) {
  at::parallel_for(0, rows, row_grain(p.hidden), [&](int64_t begin, int64_t end) { loop(p, begin, end); });
}

template <typename S>
S* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<S>() : nullptr;
}

}  // namespace

// The Kernels policy of layer.h for the CPU.
struct CpuCell {
  static void forward_step(const CellForwardStep& s) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cpu_forward", [&] {
      const ForwardPointers<scalar_t> p{s.c_state.size(1),          s.gates.data_ptr<scalar_t>(),
                                        s.c_state.data_ptr<scalar_t>(), s.cells.data_ptr<scalar_t>(),
                                        s.hidden.data_ptr<scalar_t>(),  pointer_or_null<scalar_t>(s.h_state)};
      parallel_rows(p, s.gates.size(0), forward_loop<scalar_t>());
    });
  }

  static void backward_step(const CellBackwardStep& s) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cpu_backward", [&] {
      const BackwardPointers<scalar_t> p{s.cells.size(1),
                                         s.gates.const_data_ptr<scalar_t>(),
                                         s.cells.const_data_ptr<scalar_t>(),
                                         s.c_prev.const_data_ptr<scalar_t>(),
                                         s.d_hidden.const_data_ptr<scalar_t>(),
                                         s.d_c.data_ptr<scalar_t>(),
                                         s.d_gates.data_ptr<scalar_t>()};
      parallel_rows(p, s.gates.size(0), backward_loop<scalar_t>());
    });
  }
};

// Which build of the CPU loops runs float and double here: "avx512", "avx2" or "default".
std::string cpu_capability_name() {
  switch (capability()) {
    case Capability::Avx512:
      return "avx512";
    case Capability::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("cpu_capability() -> str", &cpu_capability_name);
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward<CpuCell>);
  m.impl("lstm_layer_backward", &lstm_layer_backward<CpuCell>);
}

}  // namespace fused_lstm::cpu
