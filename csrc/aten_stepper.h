// Steppers whose GEMMs are ATen calls on per-step views, with a backend's cell kernel (`Cell`, a policy with
// static forward_step(CellForwardStep) and backward_step(CellBackwardStep)). CUDA uses them for every dtype:
// ATen's GEMMs run on the current stream. The CPU uses them where it has no direct BLAS path.
#pragma once

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include <optional>

#include "step.h"

namespace fused_lstm {

template <class Cell>
class AtenForwardStepper final : public ForwardStepper {
 public:
  explicit AtenForwardStepper(const ForwardBuffers& b) : b_(b), w_hh_t_(b.w_hh.t()) {
    if (b.w_hr.defined()) {
      w_hr_t_ = b.w_hr.t();
    }
  }

  void run(const Step& step) override {
    at::Tensor gates = b_.gates.narrow(0, step.window_offset, step.rows);
    at::Tensor h = b_.h_state.narrow(0, 0, step.rows);
    at::Tensor output = b_.output.narrow(0, step.offset, step.rows);
    const bool project = b_.w_hr.defined();
    gates.addmm_(h, w_hh_t_);
    CellForwardStep cell{gates, b_.c_state.narrow(0, 0, step.rows), b_.cells.narrow(0, step.window_offset, step.rows),
                         project ? b_.unprojected.narrow(0, 0, step.rows) : output,
                         project ? at::Tensor() : h};
    Cell::forward_step(cell);
    if (project) {
      at::mm_out(output, cell.hidden, w_hr_t_);
      h.copy_(output);
    }
  }

 private:
  const ForwardBuffers& b_;
  at::Tensor w_hh_t_;
  at::Tensor w_hr_t_;
};

// An inference call's input projection as one ATen GEMM per window (layer.h).
class AtenInputProjection final : public InputProjection {
 public:
  // w_ih: [4H, I]; b_ih, b_hh: [4H], both or neither.
  AtenInputProjection(const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh)
      : w_ih_t_(w_ih.t()), bias_(combined_bias(b_ih, b_hh)) {}

  void operator()(const at::Tensor& x_rows, at::Tensor& gates) override {
    if (bias_.defined()) {
      at::addmm_out(gates, bias_, x_rows, w_ih_t_);
    } else {
      at::mm_out(gates, x_rows, w_ih_t_);
    }
  }

 private:
  at::Tensor w_ih_t_;  // [I, 4H], a view
  at::Tensor bias_;    // [4H]: b_ih + b_hh, or undefined
};

template <class Cell>
class AtenBackwardStepper final : public BackwardStepper {
 public:
  explicit AtenBackwardStepper(const BackwardBuffers& b) : b_(b) {}

  void run(const Step& step) override {
    at::Tensor d_h = b_.d_h_state.narrow(0, 0, step.rows);
    d_h.add_(b_.grad_output.narrow(0, step.offset, step.rows));
    at::Tensor d_hidden = d_h;
    if (b_.w_hr.defined()) {
      b_.d_output_all.narrow(0, step.offset, step.rows).copy_(d_h);
      d_hidden = b_.d_unprojected.narrow(0, 0, step.rows);
      at::mm_out(d_hidden, d_h, b_.w_hr);
    }
    CellBackwardStep cell{b_.gates.narrow(0, step.offset, step.rows), b_.cells.narrow(0, step.offset, step.rows),
                          b_.c_prev.narrow(0, step.offset, step.rows), d_hidden,
                          b_.d_c_state.narrow(0, 0, step.rows), b_.d_gates.narrow(0, step.offset, step.rows)};
    Cell::backward_step(cell);
    at::mm_out(d_h, cell.d_gates, b_.w_hh);
  }

 private:
  const BackwardBuffers& b_;
};

}  // namespace fused_lstm
