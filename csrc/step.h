// The interface between the time loop (layer.h) and a backend (cpu/, cuda/): what one time step reads and
// writes, and the objects that run steps.
//
// A layer call allocates its buffers once; a backend's stepper is built on them (where it can take raw
// pointers, pack weights, and so on, once per call) and then runs the steps, one at a time or in a loop of its
// own over a schedule (run_all). Step t owns rows [offset, offset + rows) of the [N, *] buffers, rows
// [window_offset, window_offset + rows) of the forward gates and cells, and the leading `rows` rows of the
// [B, *] state buffers. A call that keeps what backward needs holds every step's gates and cells
// (window_offset = offset); an inference call holds those of a window of steps at a time (layer.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fused_lstm {

// One step of the time loop, in processing order (t = 0..T-1, or T-1..0 in reverse).
struct Step {
  int64_t offset;   // first row of this step in the packed [N, *] tensors
  int64_t rows;     // active rows
  int64_t carried;  // leading rows whose previous state comes from the previously processed step; rows
                    // [carried, rows) start here from h0 / c0 (the first step, or in reverse, sequences
                    // whose last element is at this step)
  int64_t window_offset;  // first row of this step in ForwardBuffers' gates and cells: offset, or its row
                          // in the window of steps they hold (an inference call's)
};

// All contiguous. H = hidden size, Hout = output size (proj_size, or H).
struct ForwardBuffers {
  at::Tensor w_hh;         // [4H, Hout]
  at::Tensor w_hr;         // [Hout, H], or undefined without projection
  at::Tensor gates;        // [N, 4H]   in: x W_ih^T + b_ih + b_hh; out: activated gates i, f, g, o
                           //           (or [window rows, 4H]: by Step::window_offset)
  at::Tensor cells;        // [N, H]    out: c_t (or [window rows, H])
  at::Tensor output;       // [N, Hout] out: h_t (projected)
  at::Tensor h_state;      // [B, Hout] in: h0; out: h_n
  at::Tensor c_state;      // [B, H]    in: c0; out: c_n
  at::Tensor unprojected;  // [B, H]    scratch for h_t before projection (projection only)
};

struct BackwardBuffers {
  at::Tensor w_hh;           // [4H, Hout]
  at::Tensor w_hr;           // [Hout, H], or undefined
  at::Tensor gates;          // [N, 4H]   activated gates saved by forward
  at::Tensor cells;          // [N, H]    c_t
  at::Tensor c_prev;         // [N, H]    c_{t-1}
  at::Tensor grad_output;    // [N, Hout] dL/d output
  at::Tensor d_gates;        // [N, 4H]   out: dL/d(gate pre-activations)
  at::Tensor d_h_state;      // [B, Hout] in: dL/dh_n; out: dL/dh0
  at::Tensor d_c_state;      // [B, H]    in: dL/dc_n; out: dL/dc0
  at::Tensor d_output_all;   // [N, Hout] out: dL/dh_t of every step (projection only, for dW_hr)
  at::Tensor d_unprojected;  // [B, H]    scratch: dL/d(h_t before projection) (projection only)
};

// Runs forward steps over one layer call's buffers (which must outlive it).
class ForwardStepper {
 public:
  virtual ~ForwardStepper() = default;
  // gates[t] += h_{t-1} W_hh^T; the cell (cell.h); output[t] = h_t (projected); h_state, c_state updated.
  virtual void run(const Step& step) = 0;
  // Every step of the schedule (the whole sequence, or a window of it), in order: one run() each, unless a
  // backend has a loop of its own over a schedule.
  virtual void run_all(const std::vector<Step>& schedule) {
    for (const Step& step : schedule) {
      run(step);
    }
  }
};

// b_ih + b_hh [4H], contiguous, or an undefined tensor without biases (both or neither).
inline at::Tensor combined_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  return b_ih.has_value() ? b_ih->add(*b_hh) : at::Tensor();
}

// The input projection of an inference call, one window of steps at a time (layer.h), with whatever it
// prepares from W_ih (a packed copy) made once per call.
class InputProjection {
 public:
  virtual ~InputProjection() = default;
  // gates[rows, 4H] = x_rows[rows, I] W_ih^T + b_ih + b_hh; gates contiguous.
  virtual void operator()(const at::Tensor& x_rows, at::Tensor& gates) = 0;
};

class BackwardStepper {
 public:
  virtual ~BackwardStepper() = default;
  // d_h = d_h_state + grad_output[t]; through the projection and the cell to d_gates[t] and d_c_state;
  // then d_h_state = d_gates[t] W_hh (dL/dh_{t-1}).
  virtual void run(const Step& step) = 0;
  // Every step of the schedule, from its last to its first: one run() each, unless a backend has a loop of
  // its own over the whole sequence.
  virtual void run_all(const std::vector<Step>& schedule) {
    for (auto step = schedule.rbegin(); step != schedule.rend(); ++step) {
      run(*step);
    }
  }
};

// The cell alone, on per-step views: the pointwise kernel interface of backends whose GEMMs go through ATen.
struct CellForwardStep {
  at::Tensor gates;    // [rows, 4H] in: gate pre-activations; out: activated gates i, f, g, o
  at::Tensor c_state;  // [rows, H]  in: c_{t-1}; out: c_t
  at::Tensor cells;    // [rows, H]  out: c_t, saved for backward
  at::Tensor hidden;   // [rows, H]  out: h_t = o * tanh(c_t), before any projection
  at::Tensor h_state;  // [rows, H]  out: a second copy of h_t (the recurrent state); undefined to skip
};

struct CellBackwardStep {
  at::Tensor gates;     // [rows, 4H] in: activated gates saved by forward
  at::Tensor cells;     // [rows, H]  in: c_t
  at::Tensor c_prev;    // [rows, H]  in: c_{t-1}
  at::Tensor d_hidden;  // [rows, H]  in: dL/dh_t of the unprojected h_t
  at::Tensor d_c;       // [rows, H]  in: dL/dc_t from step t+1; out: dL/dc_{t-1}
  at::Tensor d_gates;   // [rows, 4H] out: dL/d(gate pre-activations)
};

}  // namespace fused_lstm
