// The LSTM cell's pointwise math, forward and backward: the one source of truth for every backend.
//
// Everything here is a template over the value type T, compiled for the CPU (T = float, double, and
// at::vec::Vectorized<float/double> in csrc/cpu/) and for CUDA (T = float, double in csrc/cuda/). Callers
// convert half and bfloat16 to float before calling, so the math always runs in the accumulate type.
//
// Gate order is PyTorch's: the 4H pre-activations of one row are [i | f | g | o], each H wide.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fused_lstm {

// exp and tanh for a value type. The primary template serves scalars on the host and the device (std::exp
// and std::tanh resolve to the float or double overload, never a float-only call that would truncate
// double); csrc/cpu/ specializes it for at::vec::Vectorized.
template <typename T>
struct Elementwise {
  static C10_HOST_DEVICE T exp(T x) { return std::exp(x); }
  static C10_HOST_DEVICE T tanh(T x) { return std::tanh(x); }
};

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T x) {
  // 1 / (1 + e^-x): saturates cleanly to 0 (e^-x = inf) and 1 without producing NaN.
  return T(1) / (T(1) + Elementwise<T>::exp(T(0) - x));
}

// One element of the forward step: activated gates, the new cell state and the (unprojected) hidden state.
template <typename T>
struct CellForward {
  T i, f, g, o;  // activated gates
  T c;           // c_t = f * c_{t-1} + i * g
  T h;           // h_t = o * tanh(c_t), before any projection
};

template <typename T>
C10_HOST_DEVICE inline T hidden_from_cell(T o, T c) {
  return o * Elementwise<T>::tanh(c);
}

// pre_*: gate pre-activations (x W_ih^T + b_ih + h W_hh^T + b_hh); c_prev: c_{t-1}.
template <typename T>
C10_HOST_DEVICE inline CellForward<T> cell_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  CellForward<T> out;
  out.i = sigmoid(pre_i);
  out.f = sigmoid(pre_f);
  out.g = Elementwise<T>::tanh(pre_g);
  out.o = sigmoid(pre_o);
  out.c = out.f * c_prev + out.i * out.g;
  out.h = hidden_from_cell(out.o, out.c);
  return out;
}

// One element of the backward step: gradients of the four gate pre-activations and of c_{t-1}.
template <typename T>
struct CellBackward {
  T d_pre_i, d_pre_f, d_pre_g, d_pre_o;
  T d_c_prev;
};

// i, f, g, o: activated gates saved by the forward step; c: c_t; c_prev: c_{t-1};
// d_h: dL/dh_t (unprojected h); d_c: dL/dc_t arriving from step t+1 (not yet including the path through h_t).
// tanh(c_t) is recomputed here rather than stored: one tanh is cheaper than a [T, B, H] buffer.
template <typename T>
C10_HOST_DEVICE inline CellBackward<T> cell_backward(T i, T f, T g, T o, T c, T c_prev, T d_h, T d_c) {
  const T one(1);
  const T tanh_c = Elementwise<T>::tanh(c);
  const T d_c_total = d_c + d_h * o * (one - tanh_c * tanh_c);
  CellBackward<T> out;
  out.d_pre_i = d_c_total * g * i * (one - i);
  out.d_pre_f = d_c_total * c_prev * f * (one - f);
  out.d_pre_g = d_c_total * i * (one - g * g);
  out.d_pre_o = d_h * tanh_c * o * (one - o);
  out.d_c_prev = d_c_total * f;
  return out;
}

}  // namespace fused_lstm
