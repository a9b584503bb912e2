// The op schemas, argument validation and the backend-independent helpers of the time loop (layer.h).
#include "layer.h"

#include <Python.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <sstream>

namespace fused_lstm {
namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "fused_lstm: expected ", name, " of shape ",
              shape_string(expected), ", got ", shape_string(t.sizes()));
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "fused_lstm: ", name, " is an undefined tensor");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_lstm: ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_lstm: ", name, " is on device ", t.device(),
              " but x is on device ", x.device());
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank) {
  TORCH_CHECK(t.dim() == rank, "fused_lstm: expected ", name, " to be ", rank, "-D, got ", t.dim(), "-D");
}

// Validates batch_sizes (a PackedSequence's) against the packed row count, and returns it as a vector. The
// sum is checked for overflow: sizes that wrap around int64 could otherwise add up to any row count.
std::vector<int64_t> checked_batch_sizes(const at::Tensor& batch_sizes, int64_t rows) {
  TORCH_CHECK(batch_sizes.defined(), "fused_lstm: batch_sizes is an undefined tensor");
  TORCH_CHECK(batch_sizes.device().is_cpu(), "fused_lstm: batch_sizes must be on the CPU, got ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, "fused_lstm: batch_sizes must be int64, got ",
              batch_sizes.scalar_type());
  check_rank(batch_sizes, "batch_sizes", 1);
  const at::Tensor sizes = batch_sizes.contiguous();
  const int64_t* data = sizes.data_ptr<int64_t>();
  std::vector<int64_t> out(data, data + sizes.numel());
  int64_t total = 0;
  for (size_t t = 0; t < out.size(); ++t) {
    TORCH_CHECK(out[t] > 0, "fused_lstm: batch_sizes must be positive, got ", out[t], " at step ", t);
    TORCH_CHECK(t == 0 || out[t] <= out[t - 1], "fused_lstm: batch_sizes must be non-increasing, got ",
                out[t - 1], " then ", out[t], " at step ", t);
    TORCH_CHECK(!c10::add_overflows(total, out[t], &total), "fused_lstm: batch_sizes sum past int64 at step ", t);
  }
  TORCH_CHECK(total == rows, "fused_lstm: batch_sizes sum to ", total, " but x has ", rows, " rows");
  return out;
}

// rows * columns, or an error naming the buffer if that many elements do not fit in int64.
int64_t checked_elements(int64_t rows, int64_t columns, const char* buffer) {
  int64_t elements = 0;
  TORCH_CHECK(!c10::mul_overflows(rows, columns, &elements), "fused_lstm: ", buffer, " would have ", rows,
              " x ", columns, " elements, more than int64 can count");
  return elements;
}

}  // namespace

LayerDims check_layer_inputs(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                             const std::optional<at::Tensor>& w_hr,
                             const std::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(x.defined(), "fused_lstm: x is an undefined tensor");
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(x.dim() == (packed ? 2 : 3), "fused_lstm: x must be ",
              packed ? "[N, I] when batch_sizes is given" : "[T, B, I] when batch_sizes is None", ", got a ",
              x.dim(), "-D tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_lstm: x must be float32, float64, float16 or bfloat16, got ", dtype);
  for (auto [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}}) {
    check_like_x(*t, name, x);
  }
  for (auto [t, name] : {std::pair{&b_ih, "b_ih"}, {&b_hh, "b_hh"}, {&w_hr, "w_hr"}}) {
    if (t->has_value()) {
      check_like_x(**t, name, x);
    }
  }
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "fused_lstm: give both b_ih and b_hh, or neither");
  // Every rank before any size is read: size(0) of a 0-D tensor would throw an IndexError instead.
  for (auto [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}, {&w_ih, "w_ih"}, {&w_hh, "w_hh"}}) {
    check_rank(*t, name, 2);
  }
  for (auto [t, name, rank] : {std::tuple{&b_ih, "b_ih", 1}, {&b_hh, "b_hh", 1}, {&w_hr, "w_hr", 2}}) {
    if (t->has_value()) {
      check_rank(**t, name, rank);
    }
  }

  LayerDims dims;
  // Hidden size 0 is refused as nn.LSTM refuses it: a layer with no units has nothing to compute, yet
  // would still run (and schedule) every step of a sequence that costs no memory at all.
  TORCH_CHECK(w_ih.size(0) > 0 && w_ih.size(0) % 4 == 0,
              "fused_lstm: w_ih must have 4 * hidden_size rows with hidden_size > 0, got ", w_ih.size(0));
  dims.hidden = w_ih.size(0) / 4;
  dims.input = x.size(-1);
  // A projection to size 0 would leave the BLAS leading dimensions of 0, which it refuses (with a message).
  TORCH_CHECK(!w_hr.has_value() || w_hr->size(0) > 0, "fused_lstm: w_hr must have rows (proj_size > 0), got ",
              shape_string(w_hr->sizes()));
  dims.output = w_hr.has_value() ? w_hr->size(0) : dims.hidden;
  // A zero-size x of any shape exists without memory, so T * B can overflow even though x exists.
  dims.rows = packed ? x.size(0) : checked_elements(x.size(0), x.size(1), "x's [T * B, I] rows");
  if (packed) {
    // With an empty batch_sizes (no steps) the batch is h0's, as for a dense sequence of no steps.
    const auto sizes = checked_batch_sizes(*batch_sizes, dims.rows);
    dims.steps = static_cast<int64_t>(sizes.size());
    dims.batch = sizes.empty() ? h0.size(0) : sizes[0];
  } else {
    dims.steps = x.size(0);
    dims.batch = x.size(1);
  }
  const int64_t gates = 4 * dims.hidden;
  check_shape(w_ih, "w_ih", {gates, dims.input});
  if (w_hr.has_value()) {
    check_shape(*w_hr, "w_hr", {dims.output, dims.hidden});
  }
  check_shape(w_hh, "w_hh", {gates, dims.output});
  if (b_ih.has_value()) {
    check_shape(*b_ih, "b_ih", {gates});
    check_shape(*b_hh, "b_hh", {gates});
  }
  check_shape(h0, "h0", {dims.batch, dims.output});
  check_shape(c0, "c0", {dims.batch, dims.hidden});
  // The buffers a call allocates, [N, 4H] the largest, must be countable before at::empty sees them.
  checked_elements(dims.rows, gates, "the gates buffer [N, 4H]");
  checked_elements(dims.rows, dims.output, "the output [N, Hout]");
  return dims;
}

void check_backward_inputs(const LayerDims& dims, const at::Tensor& x, const at::Tensor& grad_output,
                           const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& output,
                           const at::Tensor& gates, const at::Tensor& cells) {
  for (auto [t, name] : {std::pair{&grad_output, "grad_output"}, {&grad_h_n, "grad_h_n"},
                         {&grad_c_n, "grad_c_n"}, {&output, "output"}, {&gates, "gates"}, {&cells, "cells"}}) {
    check_like_x(*t, name, x);
  }
  std::vector<int64_t> output_shape = x.sizes().vec();
  output_shape.back() = dims.output;
  check_shape(output, "output", output_shape);
  check_shape(grad_output, "grad_output", output_shape);
  check_shape(grad_h_n, "grad_h_n", {dims.batch, dims.output});
  check_shape(grad_c_n, "grad_c_n", {dims.batch, dims.hidden});
  check_shape(gates, "gates", {dims.rows, 4 * dims.hidden});
  check_shape(cells, "cells", {dims.rows, dims.hidden});
}

std::vector<Step> make_schedule(const LayerDims& dims, const std::optional<at::Tensor>& batch_sizes,
                                bool reverse) {
  if (dims.rows == 0) {
    // Nothing to compute (no steps, or a batch of 0), and T may be as large as int64 for a [T, 0, I] x.
    return {};
  }
  const std::vector<int64_t> sizes = batch_sizes.has_value()
                                         ? checked_batch_sizes(*batch_sizes, dims.rows)
                                         : std::vector<int64_t>(dims.steps, dims.batch);
  std::vector<int64_t> offsets(sizes.size());
  int64_t offset = 0;
  for (size_t t = 0; t < sizes.size(); ++t) {
    offsets[t] = offset;
    offset += sizes[t];
  }
  std::vector<Step> schedule;
  schedule.reserve(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k) {
    const size_t t = reverse ? sizes.size() - 1 - k : k;
    const int64_t carried = k == 0 ? 0 : std::min(sizes[t], schedule.back().rows);
    schedule.push_back(Step{offsets[t], sizes[t], carried, offsets[t]});
  }
  return schedule;
}

ForwardBuffers state_buffers(const LayerDims& dims, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                             const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr) {
  const bool project = w_hr.has_value();
  ForwardBuffers b;
  b.w_hh = w_hh.contiguous();
  b.w_hr = project ? w_hr->contiguous() : at::Tensor();
  b.output = at::empty({dims.rows, dims.output}, x.options());
  b.h_state = h0.clone(at::MemoryFormat::Contiguous);
  b.c_state = c0.clone(at::MemoryFormat::Contiguous);
  b.unprojected = project ? at::empty({dims.batch, dims.hidden}, x.options()) : at::Tensor();
  return b;
}

at::Tensor output_view(const LayerDims& dims, const at::Tensor& output, const std::optional<at::Tensor>& batch_sizes) {
  return batch_sizes.has_value() ? output : output.view({dims.steps, dims.batch, dims.output});
}

std::vector<Window> windows(const std::vector<Step>& schedule, int64_t min_rows) {
  std::vector<Window> result;
  for (const Step& step : schedule) {
    if (result.empty() || result.back().rows >= min_rows) {
      result.push_back(Window{step.offset, 0, {}});
    }
    Window& window = result.back();
    // Rows are consecutive in processing order: in reverse, each step's come before the previous one's.
    window.first_row = std::min(window.first_row, step.offset);
    window.rows += step.rows;
    window.steps.push_back(step);
  }
  for (Window& window : result) {
    for (Step& step : window.steps) {
      step.window_offset = step.offset - window.first_row;
    }
  }
  return result;
}

at::Tensor previous_states(const at::Tensor& seq, const at::Tensor& init, const std::vector<Step>& schedule) {
  at::Tensor prev = at::empty_like(seq, at::MemoryFormat::Contiguous);
  const int64_t batch = init.size(0);
  const bool dense = std::all_of(schedule.begin(), schedule.end(), [&](const Step& s) { return s.rows == batch; });
  if (dense && !schedule.empty()) {
    // Every step has all B rows: the previous states are the sequence shifted by one step, h0 / c0 first.
    const int64_t shifted = seq.size(0) - batch;
    const bool reverse = schedule.front().offset != 0;
    prev.narrow(0, reverse ? 0 : batch, shifted).copy_(seq.narrow(0, reverse ? batch : 0, shifted));
    prev.narrow(0, reverse ? shifted : 0, batch).copy_(init);
    return prev;
  }
  const Step* before = nullptr;
  for (const Step& step : schedule) {
    at::Tensor rows = prev.narrow(0, step.offset, step.rows);
    if (step.carried > 0) {
      rows.narrow(0, 0, step.carried).copy_(seq.narrow(0, before->offset, step.carried));
    }
    if (step.carried < step.rows) {
      const int64_t fresh = step.rows - step.carried;
      rows.narrow(0, step.carried, fresh).copy_(init.narrow(0, step.carried, fresh));
    }
    before = &step;
  }
  return prev;
}

at::Tensor unprojected_hidden(const at::Tensor& gates, const at::Tensor& cells) {
  const int64_t hidden = cells.size(1);
  return gates.narrow(1, 3 * hidden, hidden).mul(cells.tanh());
}

TORCH_LIBRARY(fused_lstm, m) {
  m.def(
      "lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool has_bias, "
      "Tensor output, Tensor gates, Tensor cells, "
      "bool[7] output_mask=[True, True, True, True, True, True, True]) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  // lstm_layer_forward without what backward needs (layer.h lstm_layer_inference): for calls that need no
  // gradient, which then hold a window of steps' gates at a time instead of every step's.
  m.def(
      "lstm_layer_inference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // Both directions of a bidirectional layer at once (layer.h): lstm_layer_forward's arguments and results for
  // the forward direction, then for the reverse one, which shares x and batch_sizes.
  m.def(
      "lstm_bidirectional_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor h0_reverse, Tensor c0_reverse, Tensor w_ih_reverse, Tensor w_hh_reverse, "
      "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? batch_sizes) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor output_reverse, "
      "Tensor h_n_reverse, Tensor c_n_reverse, Tensor gates_reverse, Tensor cells_reverse)");
  m.def(
      "lstm_bidirectional_layer_inference(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor h0_reverse, Tensor c0_reverse, Tensor w_ih_reverse, Tensor w_hh_reverse, "
      "Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? batch_sizes) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor output_reverse, Tensor h_n_reverse, Tensor c_n_reverse)");
  m.def(
      "lstm_bidirectional_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor grad_output_reverse, Tensor grad_h_n_reverse, Tensor grad_c_n_reverse, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor h0_reverse, Tensor c0_reverse, "
      "Tensor w_ih_reverse, Tensor w_hh_reverse, Tensor? w_hr_reverse, Tensor? batch_sizes, bool has_bias, "
      "bool has_bias_reverse, Tensor output, Tensor gates, Tensor cells, Tensor output_reverse, "
      "Tensor gates_reverse, Tensor cells_reverse, "
      "bool[7] output_mask=[True, True, True, True, True, True, True], "
      "bool[7] output_mask_reverse=[True, True, True, True, True, True, True]) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr, Tensor grad_x_reverse, Tensor grad_h0_reverse, "
      "Tensor grad_c0_reverse, Tensor grad_w_ih_reverse, Tensor grad_w_hh_reverse, Tensor grad_bias_reverse, "
      "Tensor grad_w_hr_reverse)");
  // The gradients of lstm_layer_forward as differentiable tensors (double backward), by a recomputation with
  // ATen ops: fused_lstm/ops.py implements it (CompositeImplicitAutograd), csrc/autograd.cpp calls it. Returns
  // the gradients of x, h0, c0, w_ih, w_hh, b_ih, b_hh and w_hr, empty where needs_input_grad is false.
  m.def(
      "lstm_layer_recompute_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, bool[] needs_input_grad) -> Tensor[]");
}

}  // namespace fused_lstm

// `import fused_lstm._C` loads this library, which runs the TORCH_LIBRARY registrations above and in the
// backends; the module itself is empty (the ops are reached through torch.ops.fused_lstm).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
