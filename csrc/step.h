// One time step's pointwise work, as the time loop (layer.h) hands it to a backend (cpu/, cuda/).
//
// Every tensor is a contiguous row block of `rows` batch rows (the rows active at this step), all of the
// same floating dtype and on the same device; H is the hidden size. The backend runs cell.h on each element.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_lstm {

struct CellForwardStep {
  at::Tensor gates;    // [rows, 4H] in: gate pre-activations; out: activated gates i, f, g, o
  at::Tensor c_state;  // [rows, H]  in: c_{t-1}; out: c_t
  at::Tensor cells;    // [rows, H]  out: c_t, saved for backward
  at::Tensor hidden;   // [rows, H]  out: h_t = o * tanh(c_t), before any projection
  at::Tensor h_state;  // [rows, H]  out: a second copy of h_t (the recurrent state); undefined to skip
};

struct CellBackwardStep {
  at::Tensor gates;    // [rows, 4H] in: activated gates saved by forward
  at::Tensor cells;    // [rows, H]  in: c_t
  at::Tensor c_prev;   // [rows, H]  in: c_{t-1}
  at::Tensor d_hidden; // [rows, H]  in: dL/dh_t of the unprojected h_t
  at::Tensor d_c;      // [rows, H]  in: dL/dc_t from step t+1; out: dL/dc_{t-1}
  at::Tensor d_gates;  // [rows, 4H] out: dL/d(gate pre-activations)
};

}  // namespace fused_lstm
