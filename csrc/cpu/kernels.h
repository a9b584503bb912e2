// The CPU pointwise kernels: one loop over the rows of a time step, built once per CPU capability
// (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp from the same kernels_impl.h) and chosen at run
// time by backend.cpp. The interface is raw pointers on purpose: a capability build should instantiate as
// little shared inline code (Tensor methods, std containers) as possible, since the linker keeps one copy.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fused_lstm::cpu {

// One forward step; every array is row-major and contiguous, H = hidden.
template <typename scalar_t>
struct ForwardPointers {
  int64_t hidden;
  scalar_t* gates;    // [rows, 4H] in: pre-activations; out: activated gates
  scalar_t* c_state;  // [rows, H]  in: c_{t-1}; out: c_t
  scalar_t* cells;    // [rows, H]  out: c_t
  scalar_t* h_out;    // [rows, H]  out: h_t (unprojected)
  scalar_t* h_state;  // [rows, H]  out: h_t again; nullptr to skip
  int64_t col_begin = 0;  // the hidden units [col_begin, col_end) of each row to process;
  int64_t col_end = -1;   // -1: up to H
};

template <typename scalar_t>
struct BackwardPointers {
  int64_t hidden;
  const scalar_t* gates;     // [rows, 4H] activated gates
  const scalar_t* cells;     // [rows, H]  c_t
  const scalar_t* c_prev;    // [rows, H]  c_{t-1}
  const scalar_t* d_hidden;  // [rows, H]  dL/dh_t (unprojected)
  scalar_t* d_c;             // [rows, H]  in: dL/dc_t from step t+1; out: dL/dc_{t-1}
  scalar_t* d_gates;         // [rows, 4H] out: dL/d(pre-activations)
  int64_t col_begin = 0;     // the hidden units [col_begin, col_end) of each row to process;
  int64_t col_end = -1;      // -1: up to H
};

// How many tiles of `tile` cover `extent` (the last one may be partial).
inline constexpr int64_t tile_count(int64_t extent, int64_t tile) {
  return (extent + tile - 1) / tile;
}

// C[rows, n] = A[rows, k] B[k, n] (+ C if accumulate): the per-step GEMM of a small batch, where a BLAS call
// costs more than the arithmetic. B (a weight, fixed for a layer call) is packed once per call into panels of
// kSmallGemmPanel columns, each panel's k rows contiguous and its last one zero-padded: the kernel then
// streams B in order (rows of a plain row-major B lie kilobytes apart, which starved it, profiled) and reads
// each panel once per block of rows.
template <typename scalar_t>
inline constexpr int64_t kSmallGemmPanel = 128 / sizeof(scalar_t);

template <typename scalar_t>
struct SmallGemm {
  int64_t n, k;
  const scalar_t* a;  // [rows, k], contiguous
  const scalar_t* b;  // panels: [ceil(n / kSmallGemmPanel), k, kSmallGemmPanel]
  scalar_t* c;        // [rows, n], row stride ldc
  int64_t ldc;
  bool accumulate;
  bool last_panel_first;  // visit the panels from the last to the first (the results are the same)
};

// Declares the kernels of one capability, over rows [row_begin, row_end).
#define FUSED_LSTM_DECLARE_CPU_KERNELS(capability)                                                    \
  namespace capability {                                                                              \
  template <typename scalar_t>                                                                        \
  void forward_rows(const ForwardPointers<scalar_t>& p, int64_t row_begin, int64_t row_end);         \
  template <typename scalar_t>                                                                        \
  void backward_rows(const BackwardPointers<scalar_t>& p, int64_t row_begin, int64_t row_end);       \
  template <typename scalar_t>                                                                        \
  void small_gemm_rows(const SmallGemm<scalar_t>& g, int64_t row_begin, int64_t row_end);            \
  }

FUSED_LSTM_DECLARE_CPU_KERNELS(DEFAULT)
FUSED_LSTM_DECLARE_CPU_KERNELS(AVX2)
FUSED_LSTM_DECLARE_CPU_KERNELS(AVX512)
#undef FUSED_LSTM_DECLARE_CPU_KERNELS

}  // namespace fused_lstm::cpu
