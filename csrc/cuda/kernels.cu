// CUDA launch glue over cell.h: one thread per (row, j) element of a step, 64-bit indices, math in the
// accumulate type (float for half / bfloat16 / float, double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <utility>

#include "../cell.h"
#include "kernels.h"

namespace fused_lstm::cuda {
namespace {

constexpr int kThreads = 256;

// A grid that covers n elements with grid-stride loops, capped at a few blocks per multiprocessor.
int blocks_for(int64_t n) {
  const int64_t per_sm = 8 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, per_sm)));
}

// gates: [rows, 4H]; c_state, cells, h_out: [rows, H]; h_state: [rows, H] or nullptr.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t rows, int64_t H, scalar_t* gates, scalar_t* c_state, scalar_t* cells,
                               scalar_t* h_out, scalar_t* h_state) {
  const int64_t n = rows * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    scalar_t* g = gates + (idx / H) * 4 * H + idx % H;
    const auto r = cell_forward<acc_t>(g[0], g[H], g[2 * H], g[3 * H], c_state[idx]);
    g[0] = r.i;
    g[H] = r.f;
    g[2 * H] = r.g;
    g[3 * H] = r.o;
    c_state[idx] = r.c;
    cells[idx] = r.c;
    h_out[idx] = r.h;
    if (h_state != nullptr) {
      h_state[idx] = r.h;
    }
  }
}

// gates, d_gates: [rows, 4H]; cells, c_prev, d_hidden, d_c: [rows, H].
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(int64_t rows, int64_t H, const scalar_t* gates, const scalar_t* cells,
                                const scalar_t* c_prev, const scalar_t* d_hidden, scalar_t* d_c,
                                scalar_t* d_gates) {
  const int64_t n = rows * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t gate = (idx / H) * 4 * H + idx % H;
    const auto r = cell_backward<acc_t>(gates[gate], gates[gate + H], gates[gate + 2 * H], gates[gate + 3 * H],
                                        cells[idx], c_prev[idx], d_hidden[idx], d_c[idx]);
    d_gates[gate] = r.d_pre_i;
    d_gates[gate + H] = r.d_pre_f;
    d_gates[gate + 2 * H] = r.d_pre_g;
    d_gates[gate + 3 * H] = r.d_pre_o;
    d_c[idx] = r.d_c_prev;
  }
}

// The kernels index raw pointers as dense row-major blocks on the current device: a step's tensor that is a
// strided view, of another shape, dtype or device would have them read and write the wrong memory, silently.
// The steppers (aten_stepper.h) build only leading-row views of contiguous buffers, so these are internal
// asserts: they guard the launchers against a future caller, not the user's arguments (layer.cpp checks those).
void assert_step_tensor(const at::Tensor& t, const char* name, const at::Tensor& gates, int64_t rows, int64_t width) {
  TORCH_INTERNAL_ASSERT(t.defined(), "fused_lstm CUDA step: ", name, " is undefined");
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && t.size(0) == rows && t.size(1) == width, "fused_lstm CUDA step: ", name,
                        " has shape ", t.sizes(), ", expected [", rows, ", ", width, "]");
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "fused_lstm CUDA step: ", name, " is not contiguous (strides ",
                        t.strides(), ")");
  TORCH_INTERNAL_ASSERT(t.scalar_type() == gates.scalar_type(), "fused_lstm CUDA step: ", name, " has dtype ",
                        t.scalar_type(), " but gates has ", gates.scalar_type());
  TORCH_INTERNAL_ASSERT(t.device() == gates.device(), "fused_lstm CUDA step: ", name, " is on ", t.device(),
                        " but gates is on ", gates.device());
}

// gates: [rows, 4H], on the current CUDA device (the kernels launch on its current stream).
void assert_gates(const at::Tensor& gates, int64_t H) {
  TORCH_INTERNAL_ASSERT(gates.defined() && gates.dim() == 2, "fused_lstm CUDA step: gates must be 2-D");
  TORCH_INTERNAL_ASSERT(gates.is_cuda() && gates.device().index() == c10::cuda::current_device(),
                        "fused_lstm CUDA step: gates is on ", gates.device(), " but the current device is cuda:",
                        static_cast<int>(c10::cuda::current_device()));
  assert_step_tensor(gates, "gates", gates, gates.size(0), 4 * H);
}

}  // namespace

void launch_forward_step(const CellForwardStep& s) {
  const int64_t rows = s.gates.size(0);
  const int64_t H = s.c_state.size(1);
  assert_gates(s.gates, H);
  for (auto [t, name] : {std::pair{&s.c_state, "c_state"}, {&s.cells, "cells"}, {&s.hidden, "hidden"}}) {
    assert_step_tensor(*t, name, s.gates, rows, H);
  }
  if (s.h_state.defined()) {
    assert_step_tensor(s.h_state, "h_state", s.gates, rows, H);
  }
  if (rows * H == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(rows * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows, H, s.gates.data_ptr<scalar_t>(), s.c_state.data_ptr<scalar_t>(), s.cells.data_ptr<scalar_t>(),
        s.hidden.data_ptr<scalar_t>(), s.h_state.defined() ? s.h_state.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_backward_step(const CellBackwardStep& s) {
  const int64_t rows = s.gates.size(0);
  const int64_t H = s.cells.size(1);
  assert_gates(s.gates, H);
  assert_step_tensor(s.d_gates, "d_gates", s.gates, rows, 4 * H);
  for (auto [t, name] :
       {std::pair{&s.cells, "cells"}, {&s.c_prev, "c_prev"}, {&s.d_hidden, "d_hidden"}, {&s.d_c, "d_c"}}) {
    assert_step_tensor(*t, name, s.gates, rows, H);
  }
  if (rows * H == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<blocks_for(rows * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        rows, H, s.gates.const_data_ptr<scalar_t>(), s.cells.const_data_ptr<scalar_t>(),
        s.c_prev.const_data_ptr<scalar_t>(), s.d_hidden.const_data_ptr<scalar_t>(), s.d_c.data_ptr<scalar_t>(),
        s.d_gates.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fused_lstm::cuda
