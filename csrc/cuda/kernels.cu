// CUDA launch glue over cell.h: one thread per (row, j) element of a step, 64-bit indices, math in the
// accumulate type (float for half / bfloat16 / float, double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

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

}  // namespace

void launch_forward_step(const CellForwardStep& s) {
  const int64_t rows = s.gates.size(0);
  const int64_t H = s.c_state.size(1);
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
