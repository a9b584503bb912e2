// The layer driver: one LSTM layer, one direction, over a whole sequence. It owns the time loop, the
// whole-sequence GEMMs (the input projection before the loop, the weight gradients after it; through ATen, so
// they run on the inputs' device) and what forward saves for backward. Each step goes to a backend's stepper
// (step.h): `Backend` has static make_forward_stepper(ForwardBuffers, schedule) and
// make_backward_stepper(BackwardBuffers, schedule), the input projection, input_gates (as aten_input_gates),
// and mm (as at::mm) for the whole-sequence GEMMs of backward; for inference calls, window_rows(x, dims) and
// make_input_projection(w_ih, b_ih, b_hh, windows), an InputProjection (step.h) for those windows.
//
// Sequences are handled in packed form: x is [N, I] with a batch size per step (a PackedSequence's
// batch_sizes, non-increasing), and step t owns rows [offset_t, offset_t + batch_sizes[t]). A dense [T, B, I]
// input is the special case where every step has B rows. As the batch shrinks, the rows that stop are the
// last ones, so the state of the active rows is always the leading block of the [B, *] state buffers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "step.h"

namespace fused_lstm {

// The ops compute in their inputs' dtype. Under autocast the ATen calls they make would otherwise go through
// autocast again (it sits above the backend keys in the dispatcher) and come back in the lower precision,
// mixing dtypes inside the layer. The module casts beforehand, where nn.LSTM's autocast would.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Sizes of one layer call, after validation. Hout = proj_size if projecting, else H.
struct LayerDims {
  int64_t steps = 0;  // T
  int64_t rows = 0;   // N = sum of the batch sizes (T * B for dense input)
  int64_t batch = 0;  // B, the rows of the first step
  int64_t input = 0;  // I
  int64_t hidden = 0; // H
  int64_t output = 0; // Hout
};

LayerDims check_layer_inputs(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                             const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes);

void check_backward_inputs(const LayerDims& dims, const at::Tensor& x, const at::Tensor& grad_output,
                           const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& output,
                           const at::Tensor& gates, const at::Tensor& cells);

std::vector<Step> make_schedule(const LayerDims& dims, const std::optional<at::Tensor>& batch_sizes,
                                bool reverse);

// A window of an inference call: consecutive steps of its schedule, whose gates it holds at once.
struct Window {
  int64_t first_row;        // the window's first row in the sequence's [N, *] tensors
  int64_t rows;             // its rows, the sum of its steps'
  std::vector<Step> steps;  // in processing order, with window_offset counted from first_row
};

// The schedule cut into windows of whole steps, each of at least min_rows rows but the last.
std::vector<Window> windows(const std::vector<Step>& schedule, int64_t min_rows);

// A forward call's buffers but its gates and cells: the weights made contiguous, the output [N, Hout], the
// state from h0 and c0, and the projection's scratch.
ForwardBuffers state_buffers(const LayerDims& dims, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr);

// output [N, Hout] as the op returns it: [T, B, Hout] for a dense x.
at::Tensor output_view(const LayerDims& dims, const at::Tensor& output, const std::optional<at::Tensor>& batch_sizes);

// The state each row held before each step: row r of step s gets seq's row from the previous step, or
// init's row where the sequence starts at s. seq: [N, X]; init: [B, X] -> [N, X].
at::Tensor previous_states(const at::Tensor& seq, const at::Tensor& init, const std::vector<Step>& schedule);

// gates: [N, 4H] activated; cells: [N, H] -> h before projection, o * tanh(c): [N, H].
at::Tensor unprojected_hidden(const at::Tensor& gates, const at::Tensor& cells);

// The input projection through ATen: x_rows [N, I], w_ih [4H, I], b_ih and b_hh [4H] (both or neither)
// -> x W_ih^T + b_ih + b_hh: [N, 4H]. A backend's input_gates may call it, or compute the same otherwise.
inline at::Tensor aten_input_gates(const at::Tensor& x_rows, const at::Tensor& w_ih,
                                   const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  return b_ih.has_value() ? combined_bias(b_ih, b_hh).addmm(x_rows, w_ih.t()) : x_rows.mm(w_ih.t());
}

using LayerForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerInferenceResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LayerBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// A bidirectional layer's: the forward direction's, then the reverse direction's.
using BidirectionalForwardResult = decltype(std::tuple_cat(LayerForwardResult{}, LayerForwardResult{}));
using BidirectionalBackwardResult = decltype(std::tuple_cat(LayerBackwardResult{}, LayerBackwardResult{}));

// x: [T, B, I] (batch_sizes empty) or [N, I] (packed); h0: [B, Hout]; c0: [B, H]; w_ih: [4H, I];
// w_hh: [4H, Hout]; b_ih, b_hh: [4H]; w_hr: [Hout, H]; batch_sizes: [T] int64 on the CPU.
// Returns output [T, B, Hout] or [N, Hout], h_n [B, Hout], c_n [B, H], and for backward the activated
// gates [N, 4H] and cell states [N, H].
template <class Backend>
LayerForwardResult lstm_layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const NoAutocast no_autocast;
  const LayerDims dims = check_layer_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const at::Tensor x_rows = x.reshape({dims.rows, dims.input});
  ForwardBuffers b = state_buffers(dims, x, h0, c0, w_hh, w_hr);
  // The input projection of every step in one GEMM; the steps then add h_{t-1} W_hh^T in place.
  b.gates = Backend::input_gates(x_rows, w_ih, b_ih, b_hh);
  b.cells = at::empty({dims.rows, dims.hidden}, x.options());

  // After the buffers, so that sizes too large for memory fail in at::empty, with its message.
  const auto schedule = make_schedule(dims, batch_sizes, reverse);
  Backend::make_forward_stepper(b, schedule)->run_all(schedule);
  return {output_view(dims, b.output, batch_sizes), b.h_state, b.c_state, b.gates, b.cells};
}

// lstm_layer_forward's output, h_n and c_n alone (the same values, but for rounding where the input
// projection's GEMM runs in other blocks), for calls that need no gradient: nothing is kept for backward, so
// the call holds the gates and cells of a window of steps at a time (of at least Backend::window_rows(x, dims)
// rows), projecting each window's inputs just before its steps. Unlike the whole sequence's [N, 4H] gates,
// the window is reused from one window to the next, and still in cache when its steps read it.
template <class Backend>
LayerInferenceResult lstm_layer_inference(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const NoAutocast no_autocast;
  const LayerDims dims = check_layer_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  ForwardBuffers b = state_buffers(dims, x, h0, c0, w_hh, w_hr);
  const auto schedule = make_schedule(dims, batch_sizes, reverse);  // after the output's at::empty, as above
  const std::vector<Window> steps_by_window = windows(schedule, Backend::window_rows(x, dims));
  int64_t largest_window = 0;
  for (const Window& window : steps_by_window) {
    largest_window = std::max(largest_window, window.rows);
  }
  b.gates = at::empty({largest_window, 4 * dims.hidden}, x.options());
  b.cells = at::empty({largest_window, dims.hidden}, x.options());

  const at::Tensor x_rows = x.reshape({dims.rows, dims.input});
  const auto project_inputs = Backend::make_input_projection(w_ih, b_ih, b_hh, steps_by_window);
  const auto stepper = Backend::make_forward_stepper(b, schedule);
  for (const Window& window : steps_by_window) {
    at::Tensor gates = b.gates.narrow(0, 0, window.rows);
    (*project_inputs)(x_rows.narrow(0, window.first_row, window.rows), gates);
    stepper->run_all(window.steps);
  }
  return {output_view(dims, b.output, batch_sizes), b.h_state, b.c_state};
}

// Which of lstm_layer_backward's results to compute, in their order: grad_x, grad_h0, grad_c0, grad_w_ih,
// grad_w_hh, grad_bias, grad_w_hr. Autograd asks only for those its inputs need: x from a data loader, or
// frozen weights, then cost no GEMM.
using BackwardMask = std::array<bool, 7>;
enum BackwardOutput { kGradX, kGradH0, kGradC0, kGradWih, kGradWhh, kGradBias, kGradWhr };

// The gradients of lstm_layer_forward. grad_output is shaped like output; grad_h_n: [B, Hout];
// grad_c_n: [B, H]; output, gates, cells: what forward returned. Returns grad_x (shaped like x), grad_h0,
// grad_c0, grad_w_ih, grad_w_hh, grad_bias [4H] (the gradient of b_ih and of b_hh alike) and grad_w_hr; each
// is an empty [0] tensor where output_mask is false, as grad_bias is without a bias and grad_w_hr without a
// projection. The weight gradients are single GEMMs over all steps.
template <class Backend>
LayerBackwardResult lstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                        const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const std::optional<at::Tensor>& w_hr,
                                        const std::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias,
                                        const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                                        BackwardMask output_mask) {
  const NoAutocast no_autocast;
  const LayerDims dims =
      check_layer_inputs(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, batch_sizes);
  check_backward_inputs(dims, x, grad_output, grad_h_n, grad_c_n, output, gates, cells);
  const auto none = [&] { return at::empty({0}, x.options()); };
  if (std::none_of(output_mask.begin(), output_mask.end(), [](bool wanted) { return wanted; })) {
    return {none(), none(), none(), none(), none(), none(), none()};  // as a frozen direction of a layer pair
  }
  const auto schedule = make_schedule(dims, batch_sizes, reverse);
  const at::Tensor x_rows = x.reshape({dims.rows, dims.input});
  const bool project = w_hr.has_value();

  BackwardBuffers b;
  b.w_hh = w_hh.contiguous();
  b.w_hr = project ? w_hr->contiguous() : at::Tensor();
  b.gates = gates.contiguous();
  b.cells = cells.contiguous();
  b.c_prev = previous_states(b.cells, c0, schedule);
  b.grad_output = grad_output.reshape({dims.rows, dims.output}).contiguous();
  b.d_gates = at::empty({dims.rows, 4 * dims.hidden}, x.options());
  b.d_h_state = grad_h_n.clone(at::MemoryFormat::Contiguous);
  b.d_c_state = grad_c_n.clone(at::MemoryFormat::Contiguous);
  // With projection, dW_hr = sum_t dL/dh_t^T (unprojected h_t): every step's dL/dh_t is kept for one GEMM.
  b.d_output_all = project ? at::empty({dims.rows, dims.output}, x.options()) : at::Tensor();
  b.d_unprojected = project ? at::empty({dims.batch, dims.hidden}, x.options()) : at::Tensor();

  Backend::make_backward_stepper(b, schedule)->run_all(schedule);

  const auto wanted = [&](BackwardOutput result, bool exists = true) { return exists && output_mask[result]; };
  at::Tensor grad_x = wanted(kGradX) ? Backend::mm(b.d_gates, w_ih).view(x.sizes()) : none();
  at::Tensor grad_w_ih = wanted(kGradWih) ? Backend::mm(b.d_gates.t(), x_rows) : none();
  at::Tensor grad_w_hh =
      wanted(kGradWhh)
          ? Backend::mm(b.d_gates.t(), previous_states(output.reshape({dims.rows, dims.output}), h0, schedule))
          : none();
  at::Tensor grad_bias = wanted(kGradBias, has_bias) ? b.d_gates.sum(0) : none();
  at::Tensor grad_w_hr = wanted(kGradWhr, project)
                             ? Backend::mm(b.d_output_all.t(), unprojected_hidden(b.gates, b.cells))
                             : none();
  return {grad_x,    wanted(kGradH0) ? b.d_h_state : none(), wanted(kGradC0) ? b.d_c_state : none(),
          grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// Both directions of a bidirectional layer, each as lstm_layer_forward, lstm_layer_inference or
// lstm_layer_backward computes it (outputs the same to the bit; gradients too, but to rounding where a
// backend's whole-sequence GEMMs split their sums by the threads they have, as MKL's do at large sizes), run
// at once where the backend can: Backend::concurrently(first, second) runs the two and rethrows the first's
// exception before the second's. Forwards run them so only where Backend::forwards_at_once(w_hh,
// w_hh_reverse). An error in the reverse direction's arguments says so.

template <class Direction>
void in_reverse_direction(const Direction& direction) {
  try {
    direction();
  } catch (c10::Error& error) {
    error.add_context("fused_lstm: in the reverse direction's arguments");
    throw;
  }
}

// The arguments of lstm_layer_forward, then the reverse direction's h0 to w_hr, then batch_sizes; returns
// kLayer's results (lstm_layer_forward's or lstm_layer_inference's, for Backend) for the forward direction,
// then for the reverse one.
template <class Backend, auto kLayer>
auto both_directions(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                     const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                     const at::Tensor& h0_reverse, const at::Tensor& c0_reverse, const at::Tensor& w_ih_reverse,
                     const at::Tensor& w_hh_reverse, const std::optional<at::Tensor>& b_ih_reverse,
                     const std::optional<at::Tensor>& b_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
                     const std::optional<at::Tensor>& batch_sizes) {
  decltype(kLayer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, false)) forward, reverse;
  const auto forward_direction = [&] {
    forward = kLayer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, false);
  };
  const auto reverse_direction = [&] {
    in_reverse_direction([&] {
      reverse = kLayer(x, h0_reverse, c0_reverse, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse,
                       w_hr_reverse, batch_sizes, true);
    });
  };
  if (Backend::forwards_at_once(w_hh, w_hh_reverse)) {
    Backend::concurrently(forward_direction, reverse_direction);
  } else {
    forward_direction();
    reverse_direction();
  }
  return std::tuple_cat(std::move(forward), std::move(reverse));
}

// The ops' kernels: lstm_bidirectional_layer_forward / _inference<Backend> return lstm_layer_forward's /
// lstm_layer_inference's results for the forward direction, then for the reverse one.
template <class Backend>
constexpr auto lstm_bidirectional_layer_forward = &both_directions<Backend, &lstm_layer_forward<Backend>>;
template <class Backend>
constexpr auto lstm_bidirectional_layer_inference = &both_directions<Backend, &lstm_layer_inference<Backend>>;

// The gradients of lstm_bidirectional_layer_forward: lstm_layer_backward's arguments and results, first for
// the forward direction, then for the reverse one (grad_x too: the caller adds the two).
template <class Backend>
BidirectionalBackwardResult lstm_bidirectional_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& grad_output_reverse, const at::Tensor& grad_h_n_reverse, const at::Tensor& grad_c_n_reverse,
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& h0_reverse, const at::Tensor& c0_reverse,
    const at::Tensor& w_ih_reverse, const at::Tensor& w_hh_reverse, const std::optional<at::Tensor>& w_hr_reverse,
    const std::optional<at::Tensor>& batch_sizes, bool has_bias, bool has_bias_reverse, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& output_reverse,
    const at::Tensor& gates_reverse, const at::Tensor& cells_reverse, BackwardMask output_mask,
    BackwardMask output_mask_reverse) {
  LayerBackwardResult forward, reverse;
  Backend::concurrently(
      [&] {
        forward = lstm_layer_backward<Backend>(grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                                               batch_sizes, false, has_bias, output, gates, cells, output_mask);
      },
      [&] {
        in_reverse_direction([&] {
          reverse = lstm_layer_backward<Backend>(grad_output_reverse, grad_h_n_reverse, grad_c_n_reverse, x,
                                                 h0_reverse, c0_reverse, w_ih_reverse, w_hh_reverse, w_hr_reverse,
                                                 batch_sizes, true, has_bias_reverse, output_reverse, gates_reverse,
                                                 cells_reverse, output_mask_reverse);
        });
      });
  return std::tuple_cat(std::move(forward), std::move(reverse));
}

}  // namespace fused_lstm
