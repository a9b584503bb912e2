// The CPU backend. float and double steps call the BLAS directly (blas.h) on raw pointers and run the cell
// with the loops built for the best capability this CPU has (kernels.h), split over threads by rows;
// float16 and bfloat16 steps go through ATen (aten_stepper.h) with the same loops. Registers the layer ops
// for the CPU dispatch key.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../aten_stepper.h"
#include "../layer.h"
#include "blas.h"
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

// The cell alone on per-step views, for the ATen steppers (float16, bfloat16).
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

// Sizes of one layer call, read off its buffers.
struct Widths {
  int64_t hidden;  // H
  int64_t output;  // Hout
  explicit Widths(const at::Tensor& w_hh) : hidden(w_hh.size(0) / 4), output(w_hh.size(1)) {}
};

// The recurrent weights, packed once per layer call for MKL where that pays: float, MKL's packed API present,
// and every step with the same rows (a dense sequence; the packing depends on the row count) and enough of
// them (measured: no gain at B=8, 1.3x at B=32).
constexpr int64_t kMinRowsToPack = 16;

template <typename S>
std::unique_ptr<blas::PackedWeight> pack_if_worth_it(const std::vector<Step>& schedule, int64_t n, int64_t k,
                                                     const S* b, bool transpose_b) {
  if constexpr (std::is_same_v<S, float>) {
    const int64_t rows = schedule.empty() ? 0 : schedule.front().rows;
    const bool uniform = std::all_of(schedule.begin(), schedule.end(), [&](const Step& s) { return s.rows == rows; });
    if (uniform && rows >= kMinRowsToPack && blas::PackedWeight::available()) {
      return std::make_unique<blas::PackedWeight>(rows, n, k, b, transpose_b);
    }
  }
  return nullptr;
}

// C[rows, n] = A[rows, k] op(B) + beta C, through the packed weights when they were packed for these rows.
template <typename S>
void gemm(const blas::PackedWeight* packed, int64_t rows, int64_t n, int64_t k, const S* a, const S* b,
          bool transpose_b, S beta, S* c) {
  if constexpr (std::is_same_v<S, float>) {
    if (packed != nullptr && packed->m() == rows) {
      packed->gemm(a, beta, c);
      return;
    }
  }
  blas::row_major_gemm<S>(rows, n, k, a, b, transpose_b, beta, c);
}

template <typename S>
class BlasForwardStepper final : public ForwardStepper {
 public:
  BlasForwardStepper(const ForwardBuffers& b, const std::vector<Step>& schedule)
      : w_(b.w_hh), w_hh_(b.w_hh.const_data_ptr<S>()), w_hr_(pointer_or_null<S>(b.w_hr)),
        gates_(b.gates.data_ptr<S>()), cells_(b.cells.data_ptr<S>()), output_(b.output.data_ptr<S>()),
        h_state_(b.h_state.data_ptr<S>()), c_state_(b.c_state.data_ptr<S>()),
        unprojected_(pointer_or_null<S>(b.unprojected)), loop_(forward_loop<S>()),
        packed_w_hh_(pack_if_worth_it(schedule, 4 * w_.hidden, w_.output, w_hh_, /*transpose_b=*/true)) {}

  void run(const Step& step) override {
    const int64_t H = w_.hidden, Hout = w_.output, rows = step.rows;
    S* gates = gates_ + step.offset * 4 * H;
    S* output = output_ + step.offset * Hout;
    gemm<S>(packed_w_hh_.get(), rows, 4 * H, Hout, h_state_, w_hh_, /*transpose_b=*/true, S(1), gates);
    const ForwardPointers<S> p{H, gates, c_state_, cells_ + step.offset * H, w_hr_ ? unprojected_ : output,
                               w_hr_ ? nullptr : h_state_};
    parallel_rows(p, rows, loop_);
    if (w_hr_) {
      blas::row_major_gemm<S>(rows, Hout, H, unprojected_, w_hr_, /*transpose_b=*/true, S(0), output);
      std::memcpy(h_state_, output, sizeof(S) * rows * Hout);
    }
  }

 private:
  Widths w_;
  const S* w_hh_;
  const S* w_hr_;
  S* gates_;
  S* cells_;
  S* output_;
  S* h_state_;
  S* c_state_;
  S* unprojected_;
  decltype(forward_loop<S>()) loop_;
  std::unique_ptr<blas::PackedWeight> packed_w_hh_;
};

template <typename S>
class BlasBackwardStepper final : public BackwardStepper {
 public:
  BlasBackwardStepper(const BackwardBuffers& b, const std::vector<Step>& schedule)
      : w_(b.w_hh), w_hh_(b.w_hh.const_data_ptr<S>()), w_hr_(pointer_or_null<S>(b.w_hr)),
        gates_(b.gates.const_data_ptr<S>()), cells_(b.cells.const_data_ptr<S>()),
        c_prev_(b.c_prev.const_data_ptr<S>()), grad_output_(b.grad_output.const_data_ptr<S>()),
        d_gates_(b.d_gates.data_ptr<S>()), d_h_state_(b.d_h_state.data_ptr<S>()),
        d_c_state_(b.d_c_state.data_ptr<S>()), d_output_all_(pointer_or_null<S>(b.d_output_all)),
        d_unprojected_(pointer_or_null<S>(b.d_unprojected)), loop_(backward_loop<S>()),
        packed_w_hh_(pack_if_worth_it(schedule, w_.output, 4 * w_.hidden, w_hh_, /*transpose_b=*/false)) {}

  void run(const Step& step) override {
    const int64_t H = w_.hidden, Hout = w_.output, rows = step.rows;
    const S* grad_output = grad_output_ + step.offset * Hout;
    for (int64_t i = 0; i < rows * Hout; ++i) {
      d_h_state_[i] += grad_output[i];
    }
    const S* d_hidden = d_h_state_;
    if (w_hr_) {
      std::memcpy(d_output_all_ + step.offset * Hout, d_h_state_, sizeof(S) * rows * Hout);
      blas::row_major_gemm<S>(rows, H, Hout, d_h_state_, w_hr_, /*transpose_b=*/false, S(0), d_unprojected_);
      d_hidden = d_unprojected_;
    }
    S* d_gates = d_gates_ + step.offset * 4 * H;
    const BackwardPointers<S> p{H, gates_ + step.offset * 4 * H, cells_ + step.offset * H, c_prev_ + step.offset * H,
                                d_hidden, d_c_state_, d_gates};
    parallel_rows(p, rows, loop_);
    gemm<S>(packed_w_hh_.get(), rows, Hout, 4 * H, d_gates, w_hh_, /*transpose_b=*/false, S(0), d_h_state_);
  }

 private:
  Widths w_;
  const S* w_hh_;
  const S* w_hr_;
  const S* gates_;
  const S* cells_;
  const S* c_prev_;
  const S* grad_output_;
  S* d_gates_;
  S* d_h_state_;
  S* d_c_state_;
  S* d_output_all_;
  S* d_unprojected_;
  decltype(backward_loop<S>()) loop_;
  std::unique_ptr<blas::PackedWeight> packed_w_hh_;
};

// The largest GEMM dimension of a layer call's steps, for blas::available.
int64_t largest_step_dimension(const at::Tensor& w_hh, const at::Tensor& state) {
  return std::max({w_hh.size(0), w_hh.size(1), state.size(0)});
}

// The Backend policy of layer.h for the CPU.
struct CpuBackend {
  static std::unique_ptr<ForwardStepper> make_forward_stepper(const ForwardBuffers& b,
                                                              const std::vector<Step>& schedule) {
    return make<ForwardStepper, BlasForwardStepper, AtenForwardStepper<CpuCell>>(b, b.h_state, schedule);
  }

  static std::unique_ptr<BackwardStepper> make_backward_stepper(const BackwardBuffers& b,
                                                                const std::vector<Step>& schedule) {
    return make<BackwardStepper, BlasBackwardStepper, AtenBackwardStepper<CpuCell>>(b, b.d_h_state, schedule);
  }

 private:
  template <class Base, template <typename> class Blas, class Aten, class Buffers>
  static std::unique_ptr<Base> make(const Buffers& b, const at::Tensor& state, const std::vector<Step>& schedule) {
    const int64_t largest = largest_step_dimension(b.w_hh, state);
    switch (b.gates.scalar_type()) {
      case at::kFloat:
        if (blas::available<float>(largest)) {
          return std::make_unique<Blas<float>>(b, schedule);
        }
        break;
      case at::kDouble:
        if (blas::available<double>(largest)) {
          return std::make_unique<Blas<double>>(b, schedule);
        }
        break;
      default:
        break;
    }
    return std::make_unique<Aten>(b);
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

// How the CPU steps run their GEMMs: "mkl-packed" (MKL's GEMM and its packed-weight API found in libtorch),
// "mkl" (GEMM only), or "aten" (neither: every step goes through ATen).
std::string cpu_gemm_name() {
  if (!blas::available<float>(0) || !blas::available<double>(0)) {
    return "aten";
  }
  return blas::PackedWeight::available() ? "mkl-packed" : "mkl";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("cpu_capability() -> str", &cpu_capability_name);
  m.def("cpu_gemm() -> str", &cpu_gemm_name);
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward<CpuBackend>);
  m.impl("lstm_layer_backward", &lstm_layer_backward<CpuBackend>);
}

}  // namespace fused_lstm::cpu
