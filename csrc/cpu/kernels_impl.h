// The CPU pointwise loops, compiled once per capability: the including file sets CPU_CAPABILITY (and the
// matching CPU_CAPABILITY_* macro and target) first. at::vec::Vectorized then has that capability's width,
// and its exp / tanh are libtorch's vectorized (Sleef) functions.
//
// float and double run cell.h on Vectorized lanes, the row's tail as a partial vector (zero-filled lanes are
// harmless: the cell math is finite at 0). float16 and bfloat16 run it on float, one element at a time; the
// DEFAULT build instantiates those.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "../cell.h"
#include "kernels.h"

namespace fused_lstm {

template <typename S>
struct Elementwise<at::vec::Vectorized<S>> {
  static at::vec::Vectorized<S> exp(const at::vec::Vectorized<S>& x) { return x.exp(); }
  static at::vec::Vectorized<S> tanh(const at::vec::Vectorized<S>& x) { return x.tanh(); }
};

// float: Sleef's 1-ulp tanh cost more than the rest of the cell together (7% of a B=8, H=128 forward against
// 0.8% for exp, profiled). tanh(x) = 1 - 2 / (e^{2x} + 1) on the 2-ulp exp is within ~1e-7 absolute of it
// (the float32 parity tolerance is 1e-5) and saturates exactly: e^{2x} = inf gives 1, e^{2x} = 0 gives -1.
//
// exp_u20 clamps its argument into [ln FLT_MIN, ln FLT_MAX] first, with a min and a max that turn NaN into the
// bound: alone it returns a finite number for NaN (so a NaN input vanished from float32 outputs) and FLT_MAX
// past ln FLT_MAX. exp() restores what std::exp gives there, NaN and inf, so NaN and Inf propagate as in nn.LSTM.
template <>
struct Elementwise<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static constexpr float kLogFloatMax = 88.72283935546875f;  // ln FLT_MAX, exp_u20's upper clamp (0x42b17218)
  static V exp(const V& x) {
    const V overflowed = V::blendv(x.exp_u20(), V(std::numeric_limits<float>::infinity()), x > V(kLogFloatMax));
    return V::blendv(overflowed, x, x.isnan());
  }
  static V tanh(const V& x) { return V(1.0f) - V(2.0f) / (exp(x + x) + V(1.0f)); }
};

namespace cpu::CPU_CAPABILITY {
namespace {

// How a math value type V moves to and from memory of storage type S, `count` elements at a time.
template <typename S, typename V>
struct Lanes;

template <typename S>
struct Lanes<S, at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static constexpr int64_t width = V::size();
  static V load(const S* p, int64_t count) { return V::loadu(p, count); }
  static void store(const V& v, S* p, int64_t count) { v.store(p, count); }
};

template <typename S>
struct Lanes<S, float> {
  static constexpr int64_t width = 1;
  static float load(const S* p, int64_t) { return static_cast<float>(*p); }
  static void store(float v, S* p, int64_t) { *p = static_cast<S>(v); }
};

template <typename S, typename V>
void forward_rows_as(const ForwardPointers<S>& p, int64_t row_begin, int64_t row_end) {
  using L = Lanes<S, V>;
  const int64_t H = p.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    S* gates = p.gates + row * 4 * H;
    S* c_state = p.c_state + row * H;
    S* cells = p.cells + row * H;
    S* h_out = p.h_out + row * H;
    S* h_state = p.h_state ? p.h_state + row * H : nullptr;
    const int64_t end = p.col_end < 0 ? H : p.col_end;
    for (int64_t j = p.col_begin; j < end; j += L::width) {
      const int64_t n = std::min(L::width, end - j);
      const auto r = cell_forward(L::load(gates + j, n), L::load(gates + H + j, n), L::load(gates + 2 * H + j, n),
                                  L::load(gates + 3 * H + j, n), L::load(c_state + j, n));
      L::store(r.i, gates + j, n);
      L::store(r.f, gates + H + j, n);
      L::store(r.g, gates + 2 * H + j, n);
      L::store(r.o, gates + 3 * H + j, n);
      L::store(r.c, c_state + j, n);
      L::store(r.c, cells + j, n);
      L::store(r.h, h_out + j, n);
      if (h_state) {
        L::store(r.h, h_state + j, n);
      }
    }
  }
}

template <typename S, typename V>
void backward_rows_as(const BackwardPointers<S>& p, int64_t row_begin, int64_t row_end) {
  using L = Lanes<S, V>;
  const int64_t H = p.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const S* gates = p.gates + row * 4 * H;
    const S* cells = p.cells + row * H;
    const S* c_prev = p.c_prev + row * H;
    const S* d_hidden = p.d_hidden + row * H;
    S* d_c = p.d_c + row * H;
    S* d_gates = p.d_gates + row * 4 * H;
    const int64_t end = p.col_end < 0 ? H : p.col_end;
    for (int64_t j = p.col_begin; j < end; j += L::width) {
      const int64_t n = std::min(L::width, end - j);
      const auto r = cell_backward(L::load(gates + j, n), L::load(gates + H + j, n), L::load(gates + 2 * H + j, n),
                                   L::load(gates + 3 * H + j, n), L::load(cells + j, n), L::load(c_prev + j, n),
                                   L::load(d_hidden + j, n), L::load(d_c + j, n));
      L::store(r.d_pre_i, d_gates + j, n);
      L::store(r.d_pre_f, d_gates + H + j, n);
      L::store(r.d_pre_g, d_gates + 2 * H + j, n);
      L::store(r.d_pre_o, d_gates + 3 * H + j, n);
      L::store(r.d_c_prev, d_c + j, n);
    }
  }
}

// Rows [row, row + R) of a SmallGemm, one panel of columns at a time: R x (panel / vector width)
// accumulators stay in registers while k runs, and each loaded row of the panel serves all R rows. KU > 1
// splits the sum over k into KU interleaved partial sums, added at the end: rows_in_blocks picks it so that
// R x NV x KU >= 8 sums are independent, or each FMA would wait on the previous one (latency-bound).
template <typename S, int R, int KU>
void small_gemm_block(const SmallGemm<S>& g, int64_t row) {
  using V = at::vec::Vectorized<S>;
  constexpr int64_t W = V::size();
  constexpr int64_t P = kSmallGemmPanel<S>;
  constexpr int NV = static_cast<int>(P / W);
  const int64_t panels = tile_count(g.n, P);
  for (int64_t visit = 0; visit < panels; ++visit) {
    const int64_t index = g.last_panel_first ? panels - 1 - visit : visit;
    const int64_t j = index * P;
    const S* panel = g.b + index * g.k * P;
    V acc[KU][R][NV];
    for (int u = 0; u < KU; ++u) {
      for (int r = 0; r < R; ++r) {
        for (int v = 0; v < NV; ++v) {
          const int64_t count = std::min<int64_t>(W, g.n - j - v * W);
          const bool load = u == 0 && g.accumulate && count > 0;
          acc[u][r][v] = load ? V::loadu(g.c + (row + r) * g.ldc + j + v * W, count) : V(S(0));
        }
      }
    }
    const auto multiply_add = [&](V(&sums)[R][NV], int64_t kk) {
      V b[NV];
      for (int v = 0; v < NV; ++v) {
        b[v] = V::loadu(panel + kk * P + v * W);
      }
      for (int r = 0; r < R; ++r) {
        const V a(g.a[(row + r) * g.k + kk]);
        for (int v = 0; v < NV; ++v) {
          sums[r][v] = at::vec::fmadd(a, b[v], sums[r][v]);
        }
      }
    };
    int64_t kk = 0;
    for (; kk + KU <= g.k; kk += KU) {
      for (int u = 0; u < KU; ++u) {
        multiply_add(acc[u], kk + u);
      }
    }
    for (; kk < g.k; ++kk) {
      multiply_add(acc[0], kk);
    }
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) {
        for (int u = 1; u < KU; ++u) {
          acc[0][r][v] = acc[0][r][v] + acc[u][r][v];
        }
        const int64_t count = std::min<int64_t>(W, g.n - j - v * W);
        if (count > 0) {
          acc[0][r][v].store(g.c + (row + r) * g.ldc + j + v * W, count);
        }
      }
    }
  }
}

// Rows [row, row_end) of a SmallGemm in blocks of R while R of them remain; advances row past them. Blocks
// of fewer than 8 accumulators split k: an FMA's latency of 4 cycles on 2 ports needs 8 independent sums.
template <typename S, int R>
void rows_in_blocks(const SmallGemm<S>& g, int64_t& row, int64_t row_end) {
  constexpr int kVectors = static_cast<int>(kSmallGemmPanel<S> / at::vec::Vectorized<S>::size());
  constexpr int kSplitK = std::max(1, 8 / (R * kVectors));
  for (; row + R <= row_end; row += R) {
    small_gemm_block<S, R, kSplitK>(g, row);
  }
}

// Full-precision types run on vectors; reduced ones on float scalars.
template <typename S>
using MathType = std::conditional_t<std::is_same_v<S, float> || std::is_same_v<S, double>, at::vec::Vectorized<S>,
                                    float>;

}  // namespace

template <typename S>
void forward_rows(const ForwardPointers<S>& p, int64_t row_begin, int64_t row_end) {
  forward_rows_as<S, MathType<S>>(p, row_begin, row_end);
}

template <typename S>
void backward_rows(const BackwardPointers<S>& p, int64_t row_begin, int64_t row_end) {
  backward_rows_as<S, MathType<S>>(p, row_begin, row_end);
}

template <typename S>
void small_gemm_rows(const SmallGemm<S>& g, int64_t row_begin, int64_t row_end) {
  // Two rows at a time, so that each panel row loaded serves both (the batches this kernel gets have one or
  // two rows: backend.cpp StepGemm), then a last row alone.
  int64_t row = row_begin;
  rows_in_blocks<S, 2>(g, row, row_end);
  rows_in_blocks<S, 1>(g, row, row_end);
}

template void small_gemm_rows<float>(const SmallGemm<float>&, int64_t, int64_t);
template void small_gemm_rows<double>(const SmallGemm<double>&, int64_t, int64_t);
template void forward_rows<float>(const ForwardPointers<float>&, int64_t, int64_t);
template void forward_rows<double>(const ForwardPointers<double>&, int64_t, int64_t);
template void backward_rows<float>(const BackwardPointers<float>&, int64_t, int64_t);
template void backward_rows<double>(const BackwardPointers<double>&, int64_t, int64_t);

}  // namespace cpu::CPU_CAPABILITY
}  // namespace fused_lstm
