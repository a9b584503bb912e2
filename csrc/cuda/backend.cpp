// The CUDA backend: the layer driver of layer.h with the CUDA pointwise kernels, registered for the CUDA
// dispatch key. The guard makes x's device current, so ATen's GEMMs and our launches share its current stream.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "../aten_stepper.h"
#include "../layer.h"
#include "kernels.h"

namespace fused_lstm::cuda {
namespace {

struct CudaCell {
  static void forward_step(const CellForwardStep& s) { launch_forward_step(s); }
  static void backward_step(const CellBackwardStep& s) { launch_backward_step(s); }
};

// The Backend policy of layer.h for CUDA: ATen's GEMMs (cuBLAS on the current stream) and our cell kernels.
struct CudaBackend {
  static at::Tensor input_gates(const at::Tensor& x_rows, const at::Tensor& w_ih,
                                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
    return aten_input_gates(x_rows, w_ih, b_ih, b_hh);
  }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return a.mm(b); }
  static std::unique_ptr<ForwardStepper> make_forward_stepper(const ForwardBuffers& b, const std::vector<Step>&) {
    return std::make_unique<AtenForwardStepper<CudaCell>>(b);
  }
  static std::unique_ptr<BackwardStepper> make_backward_stepper(const BackwardBuffers& b, const std::vector<Step>&) {
    return std::make_unique<AtenBackwardStepper<CudaCell>>(b);
  }
};

// A guard on x's device. Optional, so that a CPU x among CUDA arguments reaches the device check in
// check_layer_inputs and fails with its message instead of the guard's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  // Not CUDAGuard: this kernel also runs when only h0 or a weight is on CUDA, and x's CPU device must then
  // reach the argument checks, which name the mismatch.
  const c10::OptionalDeviceGuard guard(x.device());
  return lstm_layer_forward<CudaBackend>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& x,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse,
    bool has_bias, const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    BackwardMask output_mask) {
  const c10::OptionalDeviceGuard guard(x.device());
  return lstm_layer_backward<CudaBackend>(grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
                                       reverse, has_bias, output, gates, cells, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_layer_forward", &forward);
  m.impl("lstm_layer_backward", &backward);
}

}  // namespace fused_lstm::cuda
