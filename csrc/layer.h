// The layer driver: one LSTM layer, one direction, over a whole sequence. It owns the time loop, the GEMMs
// (through ATen, so they run on the inputs' device and, on CUDA, the current stream) and what forward saves
// for backward. The per-step pointwise work goes to a backend (`Kernels`: cpu/ or cuda/), which runs cell.h.
//
// Sequences are handled in packed form: x is [N, I] with a batch size per step (a PackedSequence's
// batch_sizes, non-increasing), and step t owns rows [offset_t, offset_t + batch_sizes[t]). A dense [T, B, I]
// input is the special case where every step has B rows. As the batch shrinks, the rows that stop are the
// last ones, so the state of the active rows is always the leading block of the [B, *] state buffers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <tuple>
#include <vector>

#include "step.h"

namespace fused_lstm {

// Sizes of one layer call, after validation. Hout = proj_size if projecting, else H.
struct LayerDims {
  int64_t steps = 0;  // T
  int64_t rows = 0;   // N = sum of the batch sizes (T * B for dense input)
  int64_t batch = 0;  // B, the rows of the first step
  int64_t input = 0;  // I
  int64_t hidden = 0; // H
  int64_t output = 0; // Hout
};

// One step of the time loop, in processing order (t = 0..T-1, or T-1..0 in reverse).
struct Step {
  int64_t offset;   // first row of this step in the packed [N, *] tensors
  int64_t rows;     // active rows
  int64_t carried;  // leading rows whose previous state comes from the previously processed step;
                    // rows [carried, rows) start here from h0 / c0 (the first step, or in reverse, sequences
                    // whose last element is at this step)
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

// The state each row held before each step: row r of step s gets seq's row from the previous step, or
// init's row where the sequence starts at s. seq: [N, X]; init: [B, X] -> [N, X].
at::Tensor previous_states(const at::Tensor& seq, const at::Tensor& init, const std::vector<Step>& schedule);

// gates: [N, 4H] activated; cells: [N, H] -> h before projection, o * tanh(c): [N, H].
at::Tensor unprojected_hidden(const at::Tensor& gates, const at::Tensor& cells);

// x: [T, B, I] (batch_sizes empty) or [N, I] (packed); h0: [B, Hout]; c0: [B, H]; w_ih: [4H, I];
// w_hh: [4H, Hout]; b_ih, b_hh: [4H]; w_hr: [Hout, H]; batch_sizes: [T] int64 on the CPU.
// Returns output [T, B, Hout] or [N, Hout], h_n [B, Hout], c_n [B, H], and for backward the activated
// gates [N, 4H] and cell states [N, H].
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const LayerDims dims = check_layer_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const auto schedule = make_schedule(dims, batch_sizes, reverse);
  const at::Tensor x_rows = x.reshape({dims.rows, dims.input});

  // The input projection of every step in one GEMM; the loop then adds h_{t-1} W_hh^T in place.
  at::Tensor gates = (b_ih.has_value() && b_hh.has_value())
                         ? b_ih->add(*b_hh).addmm(x_rows, w_ih.t())
                         : x_rows.mm(w_ih.t());
  at::Tensor cells = at::empty({dims.rows, dims.hidden}, x.options());
  at::Tensor output = at::empty({dims.rows, dims.output}, x.options());
  at::Tensor h_state = h0.clone(at::MemoryFormat::Contiguous);  // [B, Hout]
  at::Tensor c_state = c0.clone(at::MemoryFormat::Contiguous);  // [B, H]
  const bool project = w_hr.has_value();
  at::Tensor unprojected = project ? at::empty({dims.batch, dims.hidden}, x.options()) : at::Tensor();
  const at::Tensor w_hh_t = w_hh.t();
  const at::Tensor w_hr_t = project ? w_hr->t() : at::Tensor();

  for (const Step& step : schedule) {
    at::Tensor step_gates = gates.narrow(0, step.offset, step.rows);
    at::Tensor step_h = h_state.narrow(0, 0, step.rows);
    at::Tensor step_output = output.narrow(0, step.offset, step.rows);
    step_gates.addmm_(step_h, w_hh_t);
    CellForwardStep cell{step_gates, c_state.narrow(0, 0, step.rows), cells.narrow(0, step.offset, step.rows),
                         project ? unprojected.narrow(0, 0, step.rows) : step_output,
                         project ? at::Tensor() : step_h};
    Kernels::forward_step(cell);
    if (project) {
      at::mm_out(step_output, cell.hidden, w_hr_t);
      step_h.copy_(step_output);
    }
  }
  const auto output_shape = batch_sizes.has_value()
                                ? std::vector<int64_t>{dims.rows, dims.output}
                                : std::vector<int64_t>{dims.steps, dims.batch, dims.output};
  return {output.view(output_shape), h_state, c_state, gates, cells};
}

// The gradients of lstm_layer_forward. grad_output is shaped like output; grad_h_n: [B, Hout];
// grad_c_n: [B, H]; output, gates, cells: what forward returned. Returns grad_x (shaped like x), grad_h0,
// grad_c0, grad_w_ih, grad_w_hh, grad_bias [4H] (the gradient of b_ih and of b_hh alike; [0] when has_bias
// is false) and grad_w_hr ([0] without projection). The weight gradients are single GEMMs over all steps.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool has_bias,
                    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  const LayerDims dims =
      check_layer_inputs(x, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, batch_sizes);
  check_backward_inputs(dims, x, grad_output, grad_h_n, grad_c_n, output, gates, cells);
  const auto schedule = make_schedule(dims, batch_sizes, reverse);
  const at::Tensor x_rows = x.reshape({dims.rows, dims.input});
  const at::Tensor output_rows = output.reshape({dims.rows, dims.output});
  const at::Tensor grad_output_rows = grad_output.reshape({dims.rows, dims.output});
  const at::Tensor gates_c = gates.contiguous();
  const at::Tensor cells_c = cells.contiguous();
  const at::Tensor h_prev = previous_states(output_rows, h0, schedule);  // [N, Hout]
  const at::Tensor c_prev = previous_states(cells_c, c0, schedule);      // [N, H]

  at::Tensor d_gates = at::empty({dims.rows, 4 * dims.hidden}, x.options());
  at::Tensor d_h_state = grad_h_n.clone(at::MemoryFormat::Contiguous);  // [B, Hout]: dL/dh_t, then dL/dh0
  at::Tensor d_c_state = grad_c_n.clone(at::MemoryFormat::Contiguous);  // [B, H]:    dL/dc_t, then dL/dc0
  const bool project = w_hr.has_value();
  // With projection, dW_hr = sum_t dL/dh_t^T (unprojected h_t): keep every step's dL/dh_t for one GEMM.
  at::Tensor d_output_all = project ? at::empty({dims.rows, dims.output}, x.options()) : at::Tensor();
  at::Tensor d_unprojected = project ? at::empty({dims.batch, dims.hidden}, x.options()) : at::Tensor();

  for (auto it = schedule.rbegin(); it != schedule.rend(); ++it) {
    const Step& step = *it;
    at::Tensor step_d_h = d_h_state.narrow(0, 0, step.rows);
    step_d_h.add_(grad_output_rows.narrow(0, step.offset, step.rows));
    at::Tensor step_d_hidden = step_d_h;
    if (project) {
      d_output_all.narrow(0, step.offset, step.rows).copy_(step_d_h);
      step_d_hidden = d_unprojected.narrow(0, 0, step.rows);
      at::mm_out(step_d_hidden, step_d_h, *w_hr);
    }
    CellBackwardStep cell{gates_c.narrow(0, step.offset, step.rows), cells_c.narrow(0, step.offset, step.rows),
                          c_prev.narrow(0, step.offset, step.rows), step_d_hidden,
                          d_c_state.narrow(0, 0, step.rows), d_gates.narrow(0, step.offset, step.rows)};
    Kernels::backward_step(cell);
    at::mm_out(step_d_h, cell.d_gates, w_hh);
  }

  at::Tensor grad_x = d_gates.mm(w_ih).view(x.sizes());
  at::Tensor grad_w_ih = d_gates.t().mm(x_rows);
  at::Tensor grad_w_hh = d_gates.t().mm(h_prev);
  at::Tensor grad_bias = has_bias ? d_gates.sum(0) : at::empty({0}, x.options());
  at::Tensor grad_w_hr = project ? d_output_all.t().mm(unprojected_hidden(gates_c, cells_c))
                                 : at::empty({0}, x.options());
  return {grad_x, d_h_state, d_c_state, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace fused_lstm
