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
  // An inference call projects its whole sequence in one GEMM, as a forward call does: the GPU's GEMMs want
  // the rows (a window only saves memory there).
  static int64_t window_rows(const at::Tensor&, const LayerDims& dims) { return dims.rows; }
  static std::unique_ptr<InputProjection> make_input_projection(const at::Tensor& w_ih,
                                                                const std::optional<at::Tensor>& b_ih,
                                                                const std::optional<at::Tensor>& b_hh,
                                                                const std::vector<Window>&) {
    return std::make_unique<AtenInputProjection>(w_ih, b_ih, b_hh);
  }
  // One after the other: both are queued on the same stream anyway.
  static bool forwards_at_once(const at::Tensor&, const at::Tensor&) { return false; }
  template <typename First, typename Second>
  static void concurrently(const First& first, const Second& second) {
    first();
    second();
  }
  static std::unique_ptr<ForwardStepper> make_forward_stepper(const ForwardBuffers& b, const std::vector<Step>&) {
    return std::make_unique<AtenForwardStepper<CudaCell>>(b);
  }
  static std::unique_ptr<BackwardStepper> make_backward_stepper(const BackwardBuffers& b, const std::vector<Step>&) {
    return std::make_unique<AtenBackwardStepper<CudaCell>>(b);
  }
};

// The kernels with a guard on their first argument's device (x's, or backward's grad_output, which must be
// on x's device). Optional, and not CUDAGuard: these kernels also run when only h0 or a weight is on CUDA,
// and a CPU x must then reach the argument checks of layer.cpp, which name the mismatch.
template <auto kernel>
struct OnFirstArgumentsDevice;

template <typename Result, typename... Rest, Result (*kernel)(const at::Tensor&, Rest...)>
struct OnFirstArgumentsDevice<kernel> {
  static Result call(const at::Tensor& first, Rest... rest) {
    const c10::OptionalDeviceGuard guard(first.device());
    return kernel(first, rest...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_layer_forward", &OnFirstArgumentsDevice<&lstm_layer_forward<CudaBackend>>::call);
  m.impl("lstm_layer_backward", &OnFirstArgumentsDevice<&lstm_layer_backward<CudaBackend>>::call);
  m.impl("lstm_bidirectional_layer_forward",
         &OnFirstArgumentsDevice<lstm_bidirectional_layer_forward<CudaBackend>>::call);
  m.impl("lstm_bidirectional_layer_backward",
         &OnFirstArgumentsDevice<&lstm_bidirectional_layer_backward<CudaBackend>>::call);
  m.impl("lstm_layer_inference", &OnFirstArgumentsDevice<&lstm_layer_inference<CudaBackend>>::call);
  m.impl("lstm_bidirectional_layer_inference",
         &OnFirstArgumentsDevice<lstm_bidirectional_layer_inference<CudaBackend>>::call);
}

}  // namespace fused_lstm::cuda
