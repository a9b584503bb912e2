// The CPU backend. float and double steps call the BLAS directly (blas.h) on raw pointers and run the cell
// with the loops built for the best capability this CPU has (kernels.h), split over threads by rows (small
// batches: by hidden units, the whole sequence in one parallel region); float16 and bfloat16 steps go through
// ATen (aten_stepper.h) with the same loops. Registers the layer ops for the CPU dispatch key.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>

#include "../aten_stepper.h"
#include "../layer.h"
#include "blas.h"
#include "kernels.h"

namespace fused_lstm::cpu {
namespace {

enum class Capability { Default = 0, Avx2 = 1, Avx512 = 2 };

Capability hardware_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma")) {
    return Capability::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Capability::Avx2;
  }
#endif
  return Capability::Default;
}

// The hardware's best, lowered (never raised) by ATEN_CPU_CAPABILITY as for PyTorch's own kernels, so that
// tests can run every build on one machine.
Capability chosen_capability() {
  Capability best = hardware_capability();
  if (const char* env = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string name(env);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
    const Capability asked = name == "avx512" ? Capability::Avx512
                             : name == "avx2" ? Capability::Avx2
                                              : Capability::Default;
    best = std::min(best, asked);
  }
  return best;
}

Capability capability() {
  static const Capability chosen = chosen_capability();
  return chosen;
}

// Rows per thread chunk of the cell: enough elements that a chunk outweighs the cost of waking a thread. A
// float32 element of the forward cell costs about 4 ns here (AVX-512; 6% of a one-thread forward at T = 100,
// B = 32, H = 256, profiled), so a chunk of 2048 is some 8 us. Measured at 2 threads, float32, each setting
// alternating with the other in one process (medians of 20-30 calls): chunks of 4096 against 16384 (the value
// before; two chunks a step against one at T = 100, B = 32, H = 256): forward 31.5 and 31.6 ms against 34.4
// and 32.9, training 98.5 and 103.3 against 103.5 and 110.5; 2048 against 16384 at B = 16, H = 256 (two
// chunks against one): forward 17.8 and 18.4 against 18.7 and 19.1; 2048 against 4096 at B = 32: even (35.1
// and 33.2 against 35.2 and 32.5); at B = 8, H = 128, chunks of 512 (two) were even with one.
int64_t row_grain(int64_t hidden) {
  constexpr int64_t kElementsPerChunk = 2048;
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, hidden));
}

template <typename Fn>
Fn pick(Fn default_loop, Fn avx2_loop, Fn avx512_loop) {
  switch (capability()) {
    case Capability::Avx512:
      return avx512_loop;
    case Capability::Avx2:
      return avx2_loop;
    default:
      return default_loop;
  }
}

// float and double run the chosen capability's loops; float16 and bfloat16 only have DEFAULT ones.
template <typename S>
constexpr bool kVectorized = std::is_same_v<S, float> || std::is_same_v<S, double>;

template <typename S>
auto forward_loop() {
  if constexpr (kVectorized<S>) {
    return pick(&DEFAULT::forward_rows<S>, &AVX2::forward_rows<S>, &AVX512::forward_rows<S>);
  } else {
    return &DEFAULT::forward_rows<S>;
  }
}

template <typename S>
auto backward_loop() {
  if constexpr (kVectorized<S>) {
    return pick(&DEFAULT::backward_rows<S>, &AVX2::backward_rows<S>, &AVX512::backward_rows<S>);
  } else {
    return &DEFAULT::backward_rows<S>;
  }
}

template <typename S>
auto small_gemm_loop() {
  return pick(&DEFAULT::small_gemm_rows<S>, &AVX2::small_gemm_rows<S>, &AVX512::small_gemm_rows<S>);
}

template <typename Pointers, typename Loop>
void parallel_rows(const Pointers& p, int64_t rows, Loop loop) {
  at::parallel_for(0, rows, row_grain(p.hidden), [&](int64_t begin, int64_t end) { loop(p, begin, end); });
}

template <typename S>
S* pointer_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<S>() : nullptr;
}

// The cell alone on per-step views, for the ATen steppers (float16, bfloat16).
struct CpuCell {
  static void forward_step(const CellForwardStep& s) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cpu_forward", [&] {
      const ForwardPointers<scalar_t> p{s.c_state.size(1),          s.gates.data_ptr<scalar_t>(),
                                        s.c_state.data_ptr<scalar_t>(), s.cells.data_ptr<scalar_t>(),
                                        s.hidden.data_ptr<scalar_t>(),  pointer_or_null<scalar_t>(s.h_state)};
      parallel_rows(p, s.gates.size(0), forward_loop<scalar_t>());
    });
  }

  static void backward_step(const CellBackwardStep& s) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(), "fused_lstm_cpu_backward", [&] {
      const BackwardPointers<scalar_t> p{s.cells.size(1),
                                         s.gates.const_data_ptr<scalar_t>(),
                                         s.cells.const_data_ptr<scalar_t>(),
                                         s.c_prev.const_data_ptr<scalar_t>(),
                                         s.d_hidden.const_data_ptr<scalar_t>(),
                                         s.d_c.data_ptr<scalar_t>(),
                                         s.d_gates.data_ptr<scalar_t>()};
      parallel_rows(p, s.gates.size(0), backward_loop<scalar_t>());
    });
  }
};

// Sizes of one layer call, read off its buffers.
struct Widths {
  int64_t hidden;  // H
  int64_t output;  // Hout
  explicit Widths(const at::Tensor& w_hh) : hidden(w_hh.size(0) / 4), output(w_hh.size(1)) {}
};

// The same batch size at every step (a dense sequence), or 0.
int64_t uniform_rows(const std::vector<Step>& schedule) {
  const int64_t rows = schedule.empty() ? 0 : schedule.front().rows;
  const bool uniform = std::all_of(schedule.begin(), schedule.end(), [&](const Step& s) { return s.rows == rows; });
  return uniform ? rows : 0;
}

// MKL threads its calls whatever their size. Below these sizes the fork costs more than the threads save, or
// saves little and leaves the other threads spinning beside the steps that follow on this one. Measured with
// 2 threads against 1: a transpose of 256 x 64 floats took 5.9 us against 6.4, but the T=50, B=1, H=64
// forward it starts took 5-7% longer; of 512 x 128, 14 us against 20. GEMMs of 0.8 M multiply-adds took
// 20 us against 16; of 6.5 M, 88 against 157.
// A GEMM of few multiply-adds over much memory (one step's, as LSTMCell's: a row times a weight, or the
// outer product that is its weight gradient) is bound by one core's bandwidth, and threads pay there too:
// [1, 2048] x [2048, 512] took 119 us on 2 threads against 297 on one, the [2048, 1] x [1, 512] outer
// product 308 against 525. The measurements cross at about 2^18 elements (1 MB of float), where this
// threshold sits: just above it, [1024, 1] x [1, 256] took 25 us against 39 but [1, 1024] x [1024, 256]
// 24 against 19; below it, [512, 1] x [1, 128] took 12 against 15.
// A GEMM with a long inner dimension keeps MKL's threads whatever its size: with m and n small against k (as
// in the weight gradients of a long sequence, sums over its N rows), they split the sum over k, which also
// halves its chain of roundings (single-threaded, a float32 weight gradient over 3503 rows moved by 6e-5
// relative). Its accuracy then depends on the thread count, as MKL's does.
constexpr int64_t kMinElementsToThreadTranspose = 1 << 16;
constexpr int64_t kMinMultiplyAddsToThreadGemm = 1 << 21;
constexpr int64_t kMinElementsToThreadGemm = 1 << 18;
constexpr int64_t kMinInnerToThreadGemm = 1024;

// Whether C[m, n] = A[m, k] B[k, n] is large enough in multiply-adds or in memory to share among threads.
bool worth_threads(int64_t m, int64_t n, int64_t k) {
  const double multiply_adds = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const double elements = static_cast<double>(m) * k + static_cast<double>(k) * n + static_cast<double>(m) * n;
  return multiply_adds >= kMinMultiplyAddsToThreadGemm || elements >= kMinElementsToThreadGemm;
}

// GEMMs whose results do not depend on the number of threads. MKL's own threading splits the sum over k
// when m and n are small against k (measured: outputs differed in the last bits between 1 and 2 threads, e.g.
// a [12, 1024] x [1024, 4096] step, or a [15, 300] x [300, 160] input projection). So we split C into tiles of
// a size fixed by the shape alone, each computed by one single-threaded BLAS call, and spread the tiles over
// threads: every element is then the same sum in the same order however many threads run.

// The whole-sequence GEMM goes in row blocks with all columns, so each call packs the weights once for many
// rows: eight blocks (an even load on 1, 2, 4 or 8 threads), of at least kMinRowTile rows. A call with fewer
// row blocks than that (as LSTMCell's one step) but worth threads also splits the columns, into
// kRowTiles / (row blocks) blocks of at least kMinColumnTile columns.
constexpr int64_t kRowTiles = 8;
constexpr int64_t kMinRowTile = 64;
constexpr int64_t kMinColumnTile = 64;

int64_t row_tile(int64_t rows) {
  return std::max(kMinRowTile, tile_count(rows, kRowTiles));
}

// The per-step GEMMs' column tiles: 64 to 256 columns, and at least two of them where n allows, so that the
// threads have tiles to share (four were measured slower in backward at Hout = 256: 64 columns is narrow).
int64_t column_tile(int64_t n) {
  constexpr int64_t kMin = 64, kMax = 256, kMinTiles = 2;
  return std::clamp(tile_count(tile_count(n, kMinTiles), kMin) * kMin, kMin, kMax);
}

// Runs tile(index) for index in [0, tiles), over threads, with the BLAS single-threaded inside.
template <typename Fn>
void for_each_tile(int64_t tiles, const Fn& tile) {
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const blas::SingleThreaded single;
    for (int64_t index = begin; index < end; ++index) {
      tile(index);
    }
  });
}

// c[i, :columns] = row[:columns] for i < rows; c with row stride ldc.
template <typename S>
void set_rows(int64_t rows, int64_t columns, const S* row, S* c, int64_t ldc) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(c + i * ldc, row, sizeof(S) * columns);
  }
}

// C[m, n] = A[m, k] op(B) (+ bias[n] on every row, if given) with blas::row_major_gemm, in tiles fixed by the
// shape (above). k must be positive (m = 0 makes no tiles). The thread that runs a tile's GEMM first sets it to
// the bias, which the GEMM adds to (beta 1): no separate pass of ATen ops broadcasting the bias over all of C.
template <typename S>
void tiled_gemm(int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb, bool trans_b,
                const S* bias, S* c, int64_t ldc) {
  const int64_t rows = row_tile(m), row_tiles = tile_count(m, rows);
  const int64_t wanted_column_tiles =
      row_tiles > 0 && row_tiles < kRowTiles && worth_threads(m, n, k) ? kRowTiles / row_tiles : 1;
  const int64_t columns = std::max(kMinColumnTile, tile_count(n, wanted_column_tiles));
  const int64_t column_tiles = tile_count(n, columns);
  for_each_tile(row_tiles * column_tiles, [&](int64_t index) {
    const int64_t i0 = index / column_tiles * rows, j0 = index % column_tiles * columns;
    const int64_t tile_rows = std::min(rows, m - i0), tile_columns = std::min(columns, n - j0);
    S* c_tile = c + i0 * ldc + j0;
    if (bias != nullptr) {
      set_rows(tile_rows, tile_columns, bias + j0, c_tile, ldc);
    }
    const S* b_tile = b + (trans_b ? j0 * ldb : j0);
    blas::row_major_gemm<S>(tile_rows, tile_columns, k, a + i0 * lda, lda, b_tile, ldb, bias ? S(1) : S(0), c_tile,
                            ldc, trans_b);
  });
}

// out[N, 4H] = x_rows[N, I] W_ih^T + bias[4H] (if given), in tiled_gemm's tiles; all contiguous, I > 0.
template <typename S>
void tiled_projection(const at::Tensor& x_rows, const at::Tensor& w_ih, const S* bias, at::Tensor& out) {
  const int64_t rows = x_rows.size(0), gates = w_ih.size(0), input = w_ih.size(1);
  tiled_gemm<S>(rows, gates, input, x_rows.const_data_ptr<S>(), input, w_ih.const_data_ptr<S>(), input,
                /*trans_b=*/true, bias, out.data_ptr<S>(), gates);
}

// x_rows: [N, I]; w_ih: [4H, I]; b_ih, b_hh: [4H] -> x W_ih^T + b_ih + b_hh: [N, 4H], in tiles (above).
template <typename S>
at::Tensor tiled_input_gates(const at::Tensor& x_rows, const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
                             const std::optional<at::Tensor>& b_hh) {
  const int64_t rows = x_rows.size(0), gates = w_ih.size(0), input = w_ih.size(1);
  if (rows == 0 || input == 0) {  // the BLAS refuses a leading dimension of 0; x W_ih^T is all zeros here
    return aten_input_gates(x_rows, w_ih, b_ih, b_hh);
  }
  const at::Tensor bias = combined_bias(b_ih, b_hh);
  at::Tensor out = at::empty({rows, gates}, x_rows.options());
  tiled_projection<S>(x_rows.contiguous(), w_ih.contiguous(), pointer_or_null<S>(bias), out);
  return out;
}

// One of a layer call's per-step GEMMs, C[rows, n] = A[rows, k] B[k, n] (+ C if accumulate), with B a weight
// block that is the same at every step (or, for an inference call's input projection, at every window).
// Chooses per step among:
//  * up to kMaxSmallRows rows: our own kernel on B packed into panels once per call (kernels.h SmallGemm),
//    since a BLAS call costs microseconds there (from 3 rows on, the tiled BLAS GEMM measured faster);
//  * float with the same rows at every step, from kMinRowsToPack: MKL's packed weights, packed once per call
//    (measured: no gain at B=8, 1.3x at B=32; the packing is valid only for the rows it was made for);
//  * otherwise the BLAS GEMM.
// Past the small batches, C's columns go in fixed tiles (column_tile), one single-threaded BLAS call each,
// spread over threads, so that results do not depend on the thread count (see tiled_gemm).
// columns() computes a block of C's columns on the calling thread alone, for callers that split the work.
// It prepares for the steps it is given (steps_to_prepare) and for what StepRows says those will use; given
// none, it prepares nothing and every step goes to the BLAS.
enum class StepRows { kAny, kSmallOnly, kLargeOnly };

// Preparing a weight (a transposed copy, panels, MKL's packing) costs passes over all of it, paid back a
// little at every step. Where it pays, measured on the op at 2 threads with and without (a fit to few, noisy
// points): from about sqrt(elements) / 8 steps at small batches (B = 1 and 32 broke even at T = 56..60 for
// W_hh of H = 256, T = 32..40 for H = 128, under 8 for H = 64), and from fewer steps with many rows (at
// T = 100, B = 64, H = 512 and at T = 50, B = 128, H = 1024, preparing was 2-25% faster). Preparing
// unconditionally made LSTMCell (T = 1) take 5.7 ms at B = 1, H = 512 against nn.LSTMCell's 0.46 ms, and
// 37 ms at B = 128, H = 1024 against 17 ms.
// The schedule where its steps are enough to prepare `weight` for, else no steps.
inline const std::vector<Step>& steps_to_prepare(const std::vector<Step>& schedule, const at::Tensor& weight) {
  static const std::vector<Step> kNone;
  constexpr int64_t kMinSteps = 8, kMinRows = 4096;
  const int64_t steps = static_cast<int64_t>(schedule.size());
  int64_t rows = 0;
  for (const Step& step : schedule) {
    rows += step.rows;
  }
  const double squared = static_cast<double>(steps) * static_cast<double>(steps);  // no int64 overflow
  const bool pays = 64 * squared >= static_cast<double>(weight.numel()) || (steps >= kMinSteps && rows >= kMinRows);
  return pays ? schedule : kNone;
}

// A weight W [r, c] as the B = W^T [c, r] of a StepGemm: W's transposed copy where one was made, else W as
// stored (B read transposed); a null B for an undefined W.
template <typename S>
struct StepWeight {
  const S* data;
  int64_t ld;
  bool transposed;
};

template <typename S>
StepWeight<S> step_weight(const at::Tensor& w, const at::Tensor& w_transposed) {
  if (w_transposed.defined()) {
    return {w_transposed.const_data_ptr<S>(), w_transposed.size(1), false};
  }
  return {pointer_or_null<S>(w), w.defined() ? w.size(1) : 0, true};
}

template <typename S>
class StepGemm {
 public:
  static constexpr int64_t kMaxSmallRows = 2;
  static constexpr int64_t kMinRowsToPack = 16;
  static constexpr int64_t kPanel = kSmallGemmPanel<S>;

  // b: B[k, n] with row stride ldb, or with b_transposed its transpose [n, k] with row stride ldb (a weight
  // as stored, which then needs no transposed copy); nullptr for a GEMM the layer does not have (the
  // projection, without one), never called then.
  StepGemm(const S* b, int64_t ldb, int64_t n, int64_t k, bool accumulate, const std::vector<Step>& prepare_for,
           StepRows used_for = StepRows::kAny, bool b_transposed = false)
      : b_(b), ldb_(ldb), n_(n), k_(k), tile_columns_(column_tile(n)), accumulate_(accumulate),
        b_transposed_(b_transposed), small_(small_gemm_loop<S>()) {
    if (b == nullptr) {
      return;
    }
    const bool any_small =
        std::any_of(prepare_for.begin(), prepare_for.end(), [](const Step& s) { return s.rows <= kMaxSmallRows; });
    if (any_small && used_for != StepRows::kLargeOnly) {
      pack_panels();
    }
    if constexpr (std::is_same_v<S, float>) {
      if (used_for != StepRows::kSmallOnly && packs(prepare_for)) {
        const int64_t rows = uniform_rows(prepare_for);
        const blas::SingleThreaded single;  // MKL asks for the same thread count to pack as to compute
        for (int64_t j0 = 0; j0 < n; j0 += tile_columns_) {
          packed_.push_back(std::make_unique<blas::PackedWeight>(rows, std::min(tile_columns_, n - j0), k,
                                                                 b + (b_transposed ? j0 * ldb : j0), ldb,
                                                                 b_transposed));
        }
      }
    }
  }

  // Whether steps past the small batches run on B packed by MKL, given these steps to prepare for.
  static bool packs(const std::vector<Step>& prepare_for) {
    return std::is_same_v<S, float> && uniform_rows(prepare_for) >= kMinRowsToPack && blas::PackedWeight::available();
  }

  StepGemm(const StepWeight<S>& b, int64_t n, int64_t k, bool accumulate, const std::vector<Step>& prepare_for,
           StepRows used_for = StepRows::kAny)
      : StepGemm(b.data, b.ld, n, k, accumulate, prepare_for, used_for, b.transposed) {}

  // C[rows, :] for all columns: small batches on this thread, larger ones in column tiles over threads.
  // last_panel_first: for small batches, visit the packed panels from the last to the first (AlternatingSweep).
  void operator()(int64_t rows, const S* a, S* c, int64_t ldc, bool last_panel_first = false) const {
    if (rows <= kMaxSmallRows && has_panels()) {
      columns(rows, 0, n_, a, c, ldc, last_panel_first);
      return;
    }
    for_each_tile(tiles(), [&](int64_t index) { tile(index, rows, a, c, ldc); });
  }

  // C[rows, j0 : j1], on this thread (inside a parallel region, or under blas::SingleThreaded); j0 must be a
  // multiple of kPanel.
  void columns(int64_t rows, int64_t j0, int64_t j1, const S* a, S* c, int64_t ldc,
               bool last_panel_first = false) const {
    if (rows <= kMaxSmallRows && has_panels()) {
      small_(SmallGemm<S>{j1 - j0, k_, a, panels_.data() + (j0 / kPanel) * k_ * kPanel, c + j0, ldc, accumulate_,
                          last_panel_first},
             0, rows);
    } else {
      blas::row_major_gemm<S>(rows, j1 - j0, k_, a, k_, b_ + (b_transposed_ ? j0 * ldb_ : j0), ldb_,
                              accumulate_ ? S(1) : S(0), c + j0, ldc, b_transposed_);
    }
  }

  // C[rows, :] = A B + bias[n] on every row (a StepGemm that accumulates), in operator()'s tiles past the
  // small batches: each tile's thread sets its block of C to the bias just before the GEMM adds to it.
  void with_bias(int64_t rows, const S* a, const S* bias, S* c, int64_t ldc) const {
    TORCH_INTERNAL_ASSERT(accumulate_, "fused_lstm: StepGemm::with_bias on a GEMM that does not accumulate");
    for_each_tile(tiles(), [&](int64_t index) {
      const int64_t j0 = index * tile_columns_;
      set_rows(rows, std::min(tile_columns_, n_ - j0), bias + j0, c + j0, ldc);
      tile(index, rows, a, c, ldc);
    });
  }

  // Whether small batches run our kernel (on panels packed for them); else they go to the BLAS too.
  bool has_panels() const { return !panels_.empty(); }

  // Past the small batches: C's column tiles, and one of them computed on this thread.
  int64_t tiles() const { return tile_count(n_, tile_columns_); }
  void tile(int64_t index, int64_t rows, const S* a, S* c, int64_t ldc) const {
    const int64_t j0 = index * tile_columns_;
    if constexpr (std::is_same_v<S, float>) {
      if (!packed_.empty() && packed_.front()->m() == rows) {
        packed_[index]->gemm(a, accumulate_ ? 1.0f : 0.0f, c + j0, ldc);
        return;
      }
    }
    columns(rows, j0, std::min(n_, j0 + tile_columns_), a, c, ldc);
  }

 private:
  void pack_panels() {
    const int64_t count = tile_count(n_, kPanel);
    panels_.assign(count * k_ * kPanel, S(0));
    for (int64_t p = 0; p < count; ++p) {
      const int64_t width = std::min(kPanel, n_ - p * kPanel);
      S* panel = panels_.data() + p * k_ * kPanel;
      if (!b_transposed_) {
        for (int64_t kk = 0; kk < k_; ++kk) {
          std::memcpy(panel + kk * kPanel, b_ + kk * ldb_ + p * kPanel, sizeof(S) * width);
        }
        continue;
      }
      // The panel's columns are rows of B^T: read as kPanel streams, written in order.
      const S* b_columns = b_ + p * kPanel * ldb_;
      for (int64_t kk = 0; kk < k_; ++kk) {
        for (int64_t column = 0; column < width; ++column) {
          panel[kk * kPanel + column] = b_columns[column * ldb_ + kk];
        }
      }
    }
  }

  const S* b_;
  int64_t ldb_, n_, k_, tile_columns_;
  bool accumulate_, b_transposed_;
  decltype(small_gemm_loop<S>()) small_;
  std::vector<S> panels_;
  std::vector<std::unique_ptr<blas::PackedWeight>> packed_;  // one per column tile, for rows = packed_[0]->m()
};

// The direction in which a stepper's small batches read the packed weights, reversed at every step. They are
// streamed from L2 each step (64 KB for H = 64 in float, against a 48 KB L1): read in the same order every
// step, each read evicts what the next needs soon; alternating, a step starts on the panels the previous one
// read last, still in L1. Measured on one [1, 64] x [64, 256] product: 1.7 us a step, 1.1 alternating; in the
// ops at T=500, B=1, H=64 on one thread, forward 6-14% and backward 8-10% faster; no change at H=32, 96, 128.
class AlternatingSweep {
 public:
  // True where this step visits the panels (and a stepper its GEMMs) from the last to the first.
  bool next() {
    last_first_ = !last_first_;
    return last_first_;
  }

 private:
  bool last_first_ = true;
};

// weight [r, c] -> its transpose [c, r], contiguous: MKL's transpose, else cache-sized tiles (ATen's strided
// copy took 87 us for a 512 x 128 float matrix here, which a small layer call cannot afford).
template <typename S>
at::Tensor transposed(const at::Tensor& weight) {
  constexpr int64_t kTile = 32;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  at::Tensor out = at::empty({cols, rows}, weight.options());
  const S* src = weight.const_data_ptr<S>();
  S* dst = out.data_ptr<S>();
  std::optional<blas::SingleThreaded> single;
  if (rows * cols < kMinElementsToThreadTranspose) {
    single.emplace();
  }
  if (blas::transpose<S>(rows, cols, src, dst)) {
    return out;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) {
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) {
          dst[c * rows + r] = src[r * cols + c];
        }
      }
    }
  }
  return out;
}

// The threads a layer call may use: its own alone inside a parallel region (where CpuBackend::concurrently
// runs each direction of a bidirectional layer), as ATen's parallel_for and MKL then run inline too.
int available_threads() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

// The rows of the schedule's widest step (the batch B), or 0 for no steps.
int64_t widest_step(const std::vector<Step>& schedule) {
  int64_t rows = 0;
  for (const Step& step : schedule) {
    rows = std::max(rows, step.rows);
  }
  return rows;
}

// Small batches split over threads by hidden units (the steppers' run_split): for a sequence of up to
// kMaxSmallRows rows a step, without projection, on weights packed into panels, with a panel of hidden units
// for every thread and this much work at its widest step. Less stays on one thread, where a step costs no
// barrier (measured on 2 threads, T = 50 forward: H = 64 and 96 at B = 1 ran 104 against 143 us and 226
// against 287 split; B = 2 at H = 64 was even; H = 128 gained 4%). All or nothing: a packed sequence with
// wider steps runs its narrow tail on one thread (steps_with_barriers, or run() alone).
template <typename S>
bool splits_over_threads(const std::vector<Step>& schedule, bool project, bool has_panels, const Widths& w,
                         int threads) {
  constexpr int64_t kMinMultiplyAddsToSplit = 1 << 16;
  const int64_t rows = widest_step(schedule);
  const bool small = rows <= StepGemm<S>::kMaxSmallRows;
  return !project && threads > 1 && small && has_panels && tile_count(w.hidden, StepGemm<S>::kPanel) >= threads &&
         rows * w.output * 4 * w.hidden >= kMinMultiplyAddsToSplit;
}

// Inside a parallel region: the hidden units [begin, end) of the calling thread, in whole panels (the small
// kernel computes each column alike whichever panels a call covers, so the split changes no result).
template <typename S>
std::pair<int64_t, int64_t> this_threads_units(int64_t hidden) {
  constexpr int64_t kAlign = StepGemm<S>::kPanel;
  const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  const int64_t blocks = tile_count(hidden, kAlign);
  return {std::min(hidden, t * blocks / threads * kAlign), std::min(hidden, (t + 1) * blocks / threads * kAlign)};
}

// Steps past the small batches in parallel regions, with barriers in place of the two fork-joins run() makes for a
// step's GEMM and for its cell (the steppers' run_with_barriers): where more than one thread runs the call and some
// step is wider than the small kernel's rows, without projection (whose per-step GEMM and copy only run() handles),
// and where the per-step GEMM has two column tiles or more: with one, run() forks for neither the GEMM nor a small
// cell, and barriers would only add.
//
// Measured on the inference op at 2 threads, float32, against the fork-joins, alternating in one process (medians
// of 8-10 rounds), at T = 100: 1.17-1.23x as fast at B = 8, H = 128; 1.16x at B = 16, H = 128; 1.15x and 1.26x at
// B = 8 and 16, H = 64; 1.10x at B = 3, H = 128; 1.04-1.06x at B = 32..64, H = 64..128; 1.01-1.03x at B = 4..64,
// H = 256..512, where a step's GEMM outweighs a fork-join. Modules against nn.LSTM at T = 100, B = 8, H = 128, in
// alternating processes (eight pairs): inference 1.05-1.15x before, 1.21-1.35x after; training 1.12-1.22x before,
// 1.21-1.30x after. Packed, lengths 100 down to 10, B = 8, H = 128 (four pairs): inference 2.05-2.60 ms before,
// 1.77-2.18 ms after; training 7.0-8.5 ms before, 5.9-6.8 ms after. Without the tile condition, modules at T = 50,
// B = 4, H = 16 took 1.8-2.1x as long in inference and 1.2-1.5x in training; at T = 100, B = 8, H = 64, where
// backward's d_gates W_hh is one tile, training took 1.1-1.2x as long though its forward gained.
template <typename S>
bool steps_with_barriers(const std::vector<Step>& schedule, bool project, int threads, const StepGemm<S>& step_gemm) {
  return threads > 1 && !project && widest_step(schedule) > StepGemm<S>::kMaxSmallRows && step_gemm.tiles() > 1;
}

// Runs the steps [first, last), in processing order: each run of consecutive steps wider than the small kernel's
// rows in one parallel region of `threads` threads, the BLAS single-threaded in each, where every thread calls
// wide(step) for each step in turn (which shares its work out, with barriers); the other steps as small(step), on
// this thread. A packed sequence's rows only shrink along it (or grow, in reverse), so its small steps make one
// run, at one end.
template <typename S, typename Steps, typename Wide, typename Small>
void in_regions_by_width(Steps first, Steps last, int threads, const Wide& wide, const Small& small) {
  const auto is_small = [](const Step& step) { return step.rows <= StepGemm<S>::kMaxSmallRows; };
  while (first != last) {
    if (is_small(*first)) {
      small(*first++);
      continue;
    }
    const Steps end = std::find_if(first, last, is_small);
#pragma omp parallel num_threads(threads)
    {
      const blas::SingleThreaded single;
      for (Steps step = first; step != end; ++step) {
        wide(*step);
      }
    }
    first = end;
  }
}

// Inside a parallel region: the calling thread's share [begin, end) of a step's rows.
std::pair<int64_t, int64_t> this_threads_rows(int64_t rows) {
  const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
  return {rows * t / threads, rows * (t + 1) / threads};
}

// Inside a parallel region: the calling thread's share of the column tiles of gemm's C[rows, :] = A B (the
// same tiles as gemm(rows, a, c, ldc) computes, past the small batches).
template <typename S>
void this_threads_tiles(const StepGemm<S>& gemm, int64_t rows, const S* a, S* c, int64_t ldc) {
  for (int64_t index = omp_get_thread_num(); index < gemm.tiles(); index += omp_get_num_threads()) {
    gemm.tile(index, rows, a, c, ldc);
  }
}

template <typename S>
class BlasForwardStepper final : public ForwardStepper {
 public:
  BlasForwardStepper(const ForwardBuffers& b, const std::vector<Step>& schedule)
      : w_(b.w_hh), project_(b.w_hr.defined()), prepare_for_(steps_to_prepare(schedule, b.w_hh)),
        w_hh_t_(widest_step(prepare_for_) > StepGemm<S>::kMaxSmallRows && !StepGemm<S>::packs(prepare_for_)
                    ? transposed<S>(b.w_hh)
                    : at::Tensor()),
        w_hr_t_(project_ && !prepare_for_.empty() ? transposed<S>(b.w_hr) : at::Tensor()),
        gates_(b.gates.data_ptr<S>()), cells_(b.cells.data_ptr<S>()), output_(b.output.data_ptr<S>()),
        h_state_(b.h_state.data_ptr<S>()), c_state_(b.c_state.data_ptr<S>()),
        unprojected_(pointer_or_null<S>(b.unprojected)), loop_(forward_loop<S>()),
        projection_(step_weight<S>(b.w_hr, w_hr_t_), w_.output, w_.hidden, /*accumulate=*/false, prepare_for_),
        all_gates_(step_weight<S>(b.w_hh, w_hh_t_), 4 * w_.hidden, w_.output, /*accumulate=*/true, prepare_for_,
                   StepRows::kLargeOnly) {
    // For batches of up to kMaxSmallRows rows, one GEMM per gate (columns [g H, (g + 1) H) of W_hh^T, packed
    // from rows [g H, (g + 1) H) of W_hh as stored), so that threads can split the hidden units; larger
    // batches use all_gates_.
    for (int64_t gate = 0; gate < 4; ++gate) {
      recurrent_.emplace_back(b.w_hh.const_data_ptr<S>() + gate * w_.hidden * w_.output, w_.output, w_.hidden,
                              w_.output, /*accumulate=*/true, prepare_for_, StepRows::kSmallOnly,
                              /*b_transposed=*/true);
    }
  }

  void run_all(const std::vector<Step>& schedule) override {
    if (splits_over_threads<S>(schedule, project_, recurrent_.front().has_panels(), w_, threads_)) {
      run_split(schedule);
      return;
    }
    if (steps_with_barriers(schedule, project_, threads_, all_gates_)) {
      run_with_barriers(schedule);
      return;
    }
    ForwardStepper::run_all(schedule);
  }

  void run(const Step& step) override {
    const int64_t Hout = w_.output, rows = step.rows;
    const ForwardPointers<S> p = cell(step);
    add_recurrent(rows, p.gates);
    parallel_rows(p, rows, loop_);
    if (project_) {
      S* output = output_ + step.offset * Hout;
      projection_(rows, unprojected_, output, Hout);
      std::memcpy(h_state_, output, sizeof(S) * rows * Hout);
    }
  }

 private:
  // The cell's arrays at a step: its gates and cells, the state, and where h_t goes (the projection's scratch,
  // or the output and h_state).
  ForwardPointers<S> cell(const Step& step) const {
    const int64_t H = w_.hidden;
    return {H,
            gates_ + step.window_offset * 4 * H,
            c_state_,
            cells_ + step.window_offset * H,
            project_ ? unprojected_ : output_ + step.offset * H,
            project_ ? nullptr : h_state_};
  }

  // gates[rows, 4H] += h_{t-1} W_hh^T. Past the smallest batches, one tiled BLAS GEMM over all four gates
  // (measured: 1.3x the per-gate small kernel split over threads at B=8, H=128, and 1.15x per-gate tiles at
  // B=32, H=256).
  void add_recurrent(int64_t rows, S* gates) {
    const int64_t H = w_.hidden;
    if (rows <= StepGemm<S>::kMaxSmallRows && recurrent_.front().has_panels()) {
      const bool last_first = sweep_.next();
      for (int64_t visit = 0; visit < 4; ++visit) {
        const int64_t gate = last_first ? 3 - visit : visit;
        recurrent_[gate](rows, h_state_, gates + gate * H, 4 * H, last_first);
      }
      return;
    }
    all_gates_(rows, h_state_, gates, 4 * H);
  }

  // The schedule (steps_with_barriers): each run of steps past the small batches in one parallel region where,
  // at every step, the threads share all_gates_'s column tiles and then the cell's rows, with a barrier after
  // each; the other steps run() on this thread. The GEMM tiles and the cell are run()'s, so the results are
  // the same.
  void run_with_barriers(const std::vector<Step>& schedule) {
    const int64_t H = w_.hidden;
    const auto wide = [&](const Step& step) {
      const ForwardPointers<S> p = cell(step);
      this_threads_tiles(all_gates_, step.rows, h_state_, p.gates, 4 * H);
#pragma omp barrier
      const auto [row_begin, row_end] = this_threads_rows(step.rows);
      loop_(p, row_begin, row_end);
#pragma omp barrier
    };
    in_regions_by_width<S>(schedule.begin(), schedule.end(), threads_, wide, [&](const Step& step) { run(step); });
  }

  // The schedule (the whole sequence, or a window of it) in one parallel region. Each thread takes a block
  // of hidden units and, at every step, computes those columns of all four gates' GEMM and runs the cell on
  // them, writing its part of h_t and c_t; then all wait at a barrier, since the next step reads all of h_t.
  // The threads keep reading the same slices of the weights, which stay in their cores' caches (at H = 256 a
  // thread's half of W_hh is 512 KB, within its core's L2), and a step costs one barrier, not a fork-join.
  // Each thread reads h_{t-1} into a buffer of its own (h_state is being written meanwhile): from the
  // previous step's output rows, or from h_state as the schedule found it (h0, or the state a previous
  // window left) at its first step and where a sequence starts. Without projection every buffer's rows are H
  // wide.
  void run_split(const std::vector<Step>& schedule) {
    const int64_t H = w_.hidden, batch = widest_step(schedule);
    const std::vector<S> state(h_state_, h_state_ + batch * H);
    std::vector<S> h_prev(threads_ * batch * H);  // each thread's, allocated outside the parallel region
#pragma omp parallel num_threads(threads_)
    {
      const auto [j0, j1] = this_threads_units<S>(H);
      S* a = h_prev.data() + omp_get_thread_num() * batch * H;
      const Step* before = nullptr;
      for (const Step& step : schedule) {
        ForwardPointers<S> p = cell(step);
        const int64_t from_state = before == nullptr ? 0 : step.carried;
        if (before != nullptr) {
          std::copy_n(output_ + before->offset * H, step.carried * H, a);
        }
        std::copy(state.begin() + from_state * H, state.begin() + step.rows * H, a + from_state * H);
        if (j0 < j1) {
          for (int64_t gate = 0; gate < 4; ++gate) {
            recurrent_[gate].columns(step.rows, j0, j1, a, p.gates + gate * H, 4 * H);
          }
          p.col_begin = j0;
          p.col_end = j1;
          loop_(p, 0, step.rows);
        }
#pragma omp barrier
        before = &step;
      }
    }
  }

  Widths w_;
  bool project_;
  const std::vector<Step>& prepare_for_;  // steps_to_prepare: the schedule, or no steps
  at::Tensor w_hh_t_;  // [Hout, 4H], where some step to prepare for has more rows than the small kernel takes
                       // and MKL does not pack W_hh (it packs W_hh as stored)
  at::Tensor w_hr_t_;  // [H, Hout], where projecting and preparing
  S* gates_;
  S* cells_;
  S* output_;
  S* h_state_;
  S* c_state_;
  S* unprojected_;
  decltype(forward_loop<S>()) loop_;
  std::vector<StepGemm<S>> recurrent_;  // gates[:, g] += h W_hh^T[:, g], per gate g (small batches)
  StepGemm<S> projection_;              // output = h W_hr^T
  StepGemm<S> all_gates_;               // gates += h W_hh^T, past the small batches (all steps unprepared)
  AlternatingSweep sweep_;              // recurrent_'s order, small batches on one thread
  int threads_ = available_threads();
};

template <typename S>
class BlasBackwardStepper final : public BackwardStepper {
 public:
  BlasBackwardStepper(const BackwardBuffers& b, const std::vector<Step>& schedule)
      : w_(b.w_hh), project_(b.w_hr.defined()), gates_(b.gates.const_data_ptr<S>()),
        cells_(b.cells.const_data_ptr<S>()), c_prev_(b.c_prev.const_data_ptr<S>()),
        grad_output_(b.grad_output.const_data_ptr<S>()), d_gates_(b.d_gates.data_ptr<S>()),
        d_h_state_(b.d_h_state.data_ptr<S>()), d_c_state_(b.d_c_state.data_ptr<S>()),
        d_output_all_(pointer_or_null<S>(b.d_output_all)), d_unprojected_(pointer_or_null<S>(b.d_unprojected)),
        loop_(backward_loop<S>()),
        prepare_for_(steps_to_prepare(schedule, b.w_hh)),
        recurrent_(b.w_hh.const_data_ptr<S>(), w_.output, w_.output, 4 * w_.hidden, /*accumulate=*/false,
                   prepare_for_),
        projection_(pointer_or_null<S>(b.w_hr), w_.hidden, w_.hidden, w_.output, /*accumulate=*/false,
                    prepare_for_) {}

  void run_all(const std::vector<Step>& schedule) override {
    if (splits_over_threads<S>(schedule, project_, recurrent_.has_panels(), w_, threads_)) {
      run_split(schedule);
      return;
    }
    if (steps_with_barriers(schedule, project_, threads_, recurrent_)) {
      run_with_barriers(schedule);
      return;
    }
    BackwardStepper::run_all(schedule);
  }

  void run(const Step& step) override {
    const int64_t H = w_.hidden, Hout = w_.output, rows = step.rows;
    add_grad_output(step, 0, rows, 0, Hout);
    const S* d_hidden = d_h_state_;
    if (project_) {
      std::memcpy(d_output_all_ + step.offset * Hout, d_h_state_, sizeof(S) * rows * Hout);
      projection_(rows, d_h_state_, d_unprojected_, H);
      d_hidden = d_unprojected_;
    }
    const BackwardPointers<S> p = cell(step, d_hidden);
    parallel_rows(p, rows, loop_);
    const bool last_first = rows <= StepGemm<S>::kMaxSmallRows && sweep_.next();
    recurrent_(rows, p.d_gates, d_h_state_, Hout, last_first);
  }

 private:
  // The cell backward's arrays at a step, reading dL/dh_t from d_hidden.
  BackwardPointers<S> cell(const Step& step, const S* d_hidden) const {
    const int64_t H = w_.hidden;
    return {H,        gates_ + step.offset * 4 * H, cells_ + step.offset * H, c_prev_ + step.offset * H,
            d_hidden, d_c_state_,                   d_gates_ + step.offset * 4 * H};
  }

  // d_h_state[r0 : r1, j0 : j1] += grad_output[t][r0 : r1, j0 : j1]: dL/dh_t, from the output at t and from
  // step t + 1.
  void add_grad_output(const Step& step, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const int64_t Hout = w_.output;
    for (int64_t row = r0; row < r1; ++row) {
      const S* grad_output = grad_output_ + (step.offset + row) * Hout;
      for (int64_t j = j0; j < j1; ++j) {
        d_h_state_[row * Hout + j] += grad_output[j];
      }
    }
  }

  // The whole sequence (steps_with_barriers), from its last step to its first, as the forward stepper's
  // run_with_barriers: in each run of steps past the small batches, at every step each thread adds grad_output
  // to its rows' dL/dh_t and runs the cell backward on them; after a barrier, the threads share recurrent_'s
  // column tiles, then wait at another.
  void run_with_barriers(const std::vector<Step>& schedule) {
    const int64_t H = w_.hidden;
    const auto wide = [&](const Step& step) {
      const auto [row_begin, row_end] = this_threads_rows(step.rows);
      add_grad_output(step, row_begin, row_end, 0, H);
      const BackwardPointers<S> p = cell(step, d_h_state_);
      loop_(p, row_begin, row_end);
#pragma omp barrier
      this_threads_tiles(recurrent_, step.rows, p.d_gates, d_h_state_, H);
#pragma omp barrier
    };
    in_regions_by_width<S>(schedule.rbegin(), schedule.rend(), threads_, wide, [&](const Step& step) { run(step); });
  }

  // The whole sequence in one parallel region, as the forward stepper's run_split: each thread takes a block
  // of hidden units and, at every step, adds grad_output to their dL/dh_t, runs the cell backward on them
  // and, once all threads are past that (a barrier: the GEMM reads every unit's d_gates), computes their
  // columns of dL/dh_{t-1} = d_gates W_hh. The next step's cell reads only the thread's own units of it, so
  // a step costs that one barrier. Without projection every buffer's rows are H wide.
  void run_split(const std::vector<Step>& schedule) {
    const int64_t H = w_.hidden;
#pragma omp parallel num_threads(threads_)
    {
      const auto [j0, j1] = this_threads_units<S>(H);
      for (auto step = schedule.rbegin(); step != schedule.rend(); ++step) {
        add_grad_output(*step, 0, step->rows, j0, j1);
        BackwardPointers<S> p = cell(*step, d_h_state_);
        p.col_begin = j0;
        p.col_end = j1;
        loop_(p, 0, step->rows);
#pragma omp barrier
        if (j0 < j1) {
          recurrent_.columns(step->rows, j0, j1, p.d_gates, d_h_state_, H);
        }
      }
    }
  }

  Widths w_;
  bool project_;
  const S* gates_;
  const S* cells_;
  const S* c_prev_;
  const S* grad_output_;
  S* d_gates_;
  S* d_h_state_;
  S* d_c_state_;
  S* d_output_all_;
  S* d_unprojected_;
  decltype(backward_loop<S>()) loop_;
  const std::vector<Step>& prepare_for_;  // steps_to_prepare: the schedule, or no steps
  StepGemm<S> recurrent_;   // dL/dh_{t-1} = d_gates W_hh
  StepGemm<S> projection_;  // dL/d(unprojected h) = dL/dh W_hr
  AlternatingSweep sweep_;  // recurrent_'s panel order, small batches on one thread
  int threads_ = available_threads();
};

// An inference call's input projection for float and double (layer.h lstm_layer_inference). A call of one
// window (every double one: CpuBackend::window_rows) projects it as lstm_layer_forward does
// (tiled_projection, to the same values). With more, each window's GEMM is a StepGemm with B = W_ih^T (W_ih as
// stored, read transposed), prepared once per call as the recurrent weights are: packed by MKL for the first
// window's rows, which all windows of a dense sequence but its last have (a packed sequence's windows mostly
// differ in rows, and run MKL's GEMM on W_ih as stored). Either way the tiles are fixed by the shape, so
// results do not depend on the thread count.
template <typename S>
class BlasInputProjection final : public InputProjection {
 public:
  // w_ih: [4H, I] with I > 0 (the BLAS refuses a leading dimension of 0); b_ih, b_hh: [4H], both or neither.
  BlasInputProjection(const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
                      const std::optional<at::Tensor>& b_hh, const std::vector<Window>& windows)
      : w_ih_(w_ih.contiguous()), bias_(combined_bias(b_ih, b_hh)),
        one_window_(windows.size() <= 1),
        gemm_(one_window_ ? nullptr : w_ih_.const_data_ptr<S>(), w_ih_.size(1), w_ih_.size(0), w_ih_.size(1),
              /*accumulate=*/bias_.defined(), /*prepare_for=*/{Step{0, one_window_ ? 0 : windows.front().rows, 0, 0}},
              StepRows::kLargeOnly, /*b_transposed=*/true) {}

  void operator()(const at::Tensor& x_rows, at::Tensor& gates) override {
    const at::Tensor x = x_rows.contiguous();
    const int64_t rows = x.size(0), n = w_ih_.size(0);
    const S* bias = pointer_or_null<S>(bias_);
    if (one_window_) {
      tiled_projection<S>(x, w_ih_, bias, gates);
    } else if (bias != nullptr) {
      gemm_.with_bias(rows, x.const_data_ptr<S>(), bias, gates.data_ptr<S>(), n);
    } else {
      gemm_(rows, x.const_data_ptr<S>(), gates.data_ptr<S>(), n);
    }
  }

 private:
  at::Tensor w_ih_;  // [4H, I]
  at::Tensor bias_;  // [4H]: b_ih + b_hh, or undefined
  bool one_window_;
  StepGemm<S> gemm_;  // for more than one window
};

// The largest GEMM dimension of a layer call's steps, for blas::available.
int64_t largest_step_dimension(const at::Tensor& w_hh, const at::Tensor& state) {
  return std::max({w_hh.size(0), w_hh.size(1), state.size(0)});
}

// blas_path(S{}) for float and double where the BLAS takes GEMMs of dimensions up to `largest`; fallback()
// otherwise (float16, bfloat16, or no BLAS).
template <typename BlasPath, typename Fallback>
auto with_blas(at::ScalarType dtype, int64_t largest, const BlasPath& blas_path, const Fallback& fallback) {
  if (dtype == at::kFloat && blas::available<float>(largest)) {
    return blas_path(float{});
  }
  if (dtype == at::kDouble && blas::available<double>(largest)) {
    return blas_path(double{});
  }
  return fallback();
}

// The Backend policy of layer.h for the CPU.
struct CpuBackend {
  // float and double in fixed tiles, so that outputs do not depend on the thread count; ATen otherwise.
  static at::Tensor input_gates(const at::Tensor& x_rows, const at::Tensor& w_ih,
                                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
    const int64_t largest = std::max({w_ih.size(0), w_ih.size(1), row_tile(x_rows.size(0))});
    return with_blas(
        x_rows.scalar_type(), largest,
        [&](auto s) { return tiled_input_gates<decltype(s)>(x_rows, w_ih, b_ih, b_hh); },
        [&] { return aten_input_gates(x_rows, w_ih, b_ih, b_hh); });
  }

  // The rows of an inference call's windows (layer.h lstm_layer_inference). Windows pay where MKL packs W_ih
  // once for all of them (float): then at least 256 rows, so that each window's GEMM reads W_ih for many rows,
  // and 1 MB of gates, which stay in L2 with the weights the steps read. Measured against the forward op (2
  // threads, float32, no_grad, the two alternating in one process, three runs; /tmp/s17/win.sh): windows of
  // 1 MB were 1.19-1.27x as fast at T=100, B=32, H=256, 1.08-1.13x at T=100, B=64, H=512, 0.96-1.03x at
  // T=50, B=128, H=1024 (256 rows, 4 MB); of 0.5 MB 0.86-1.18x, 0.97-1.13x; of 2 MB 1.05-1.08x, 1.07-1.09x.
  // The gain is mostly the page faults of a fresh [N, 4H] buffer at every call (about 1.5 us each here).
  // Packing W_ih has page faults of its own (MKL's buffers, fresh at every call): with gates of less than
  // four windows, one window (the forward op's projection, without the [N, 4H] gates kept), as at T=100,
  // B=8, H=128, where two windows measured 6% slower than the forward op (1.6 MB of gates). Elsewhere one
  // window too.
  static int64_t window_rows(const at::Tensor& x, const LayerDims& dims) {
    constexpr int64_t kMinWindowRows = 256, kWindowBytes = int64_t{1} << 20, kMinWindows = 4;
    const int64_t rows = std::max(kMinWindowRows, kWindowBytes / (4 * dims.hidden * int64_t{sizeof(float)}));
    const bool windows_pay = x.scalar_type() == at::kFloat && blas::PackedWeight::available() &&
                             dims.rows / kMinWindows >= rows;
    return windows_pay ? rows : dims.rows;
  }

  static std::unique_ptr<InputProjection> make_input_projection(const at::Tensor& w_ih,
                                                                const std::optional<at::Tensor>& b_ih,
                                                                const std::optional<at::Tensor>& b_hh,
                                                                const std::vector<Window>& windows) {
    const auto aten = [&]() -> std::unique_ptr<InputProjection> {
      return std::make_unique<AtenInputProjection>(w_ih, b_ih, b_hh);
    };
    if (w_ih.size(1) == 0) {  // the BLAS refuses a leading dimension of 0; x W_ih^T is all zeros here
      return aten();
    }
    int64_t largest = std::max(w_ih.size(0), w_ih.size(1));
    for (const Window& window : windows) {  // one window's GEMMs are tiled_projection's
      largest = std::max(largest, windows.size() == 1 ? row_tile(window.rows) : window.rows);
    }
    return with_blas(
        w_ih.scalar_type(), largest,
        [&](auto s) -> std::unique_ptr<InputProjection> {
          return std::make_unique<BlasInputProjection<decltype(s)>>(w_ih, b_ih, b_hh, windows);
        },
        aten);
  }

  // a [m, k] b [k, n] -> [m, n], with MKL on this thread alone where the GEMM is small (worth_threads) and
  // its sums short (kMinInnerToThreadGemm). GEMMs that ATen sends to other kernels than MKL's (float16 and
  // bfloat16 ones, to oneDNN) keep their threads.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    const int64_t inner = a.size(1);
    std::optional<blas::SingleThreaded> single;
    if (!worth_threads(a.size(0), b.size(1), inner) && inner < kMinInnerToThreadGemm) {
      single.emplace();
    }
    return a.mm(b);
  }

  // first() and second() at once, each on a thread of its own, where the call has two threads (otherwise one
  // after the other: with more, each task on one thread would leave the others idle, as ATen's parallel_for
  // and MKL run inline in a parallel region); the exception of the first to throw in that order is rethrown.
  // Each runs with the caller's thread-local state (grad mode, excluded dispatch keys) and on one thread
  // (available_threads). For the two directions of a bidirectional layer: each direction's recurrence then
  // keeps a core to itself, with no barrier per step. Measured by benchmarks/bidirectional_at_once.py (2
  // threads, float32, one layer, the module against itself running one direction after the other; two runs):
  // T = 50, B = 1, H = 64: inference 1.38-1.69x, training 1.25-1.38x; T = 100, B = 16, I = 128, H = 256:
  // 1.19-1.26x and 1.16-1.25x; T = 50, B = 64, H = 256: 1.14-1.16x and 1.07-1.11x.
  template <typename First, typename Second>
  static void concurrently(const First& first, const Second& second) {
    if (available_threads() != 2) {
      first();
      second();
      return;
    }
    const at::ThreadLocalState caller_state;
    std::array<std::exception_ptr, 2> errors;
#pragma omp parallel num_threads(2)
    {
      // A team of one (OMP_DYNAMIC, a thread limit) runs both.
      for (int task = omp_get_thread_num(); task < 2; task += omp_get_num_threads()) {
        try {
          const at::ThreadLocalStateGuard state(caller_state);
          task == 0 ? first() : second();
        } catch (...) {
          errors[task] = std::current_exception();
        }
      }
    }
    for (const std::exception_ptr& error : errors) {
      if (error) {
        std::rethrow_exception(error);
      }
    }
  }

  // Whether both directions' forwards run at once: where each direction's W_hh fits one core's L2 (2 MB
  // here). A larger one, streamed from L3 at every step by the one core running its direction, made the
  // forward slower than both cores sharing each direction in turn (T = 50, H = 512, W_hh 4 MB: 0.92x at
  // B = 32, 0.95-0.97x at B = 64); backward, with its whole-sequence GEMMs, still gained there (above).
  static bool forwards_at_once(const at::Tensor& w_hh, const at::Tensor& w_hh_reverse) {
    constexpr int64_t kMaxRecurrentWeightBytes = int64_t{2} << 20;
    const auto bytes = [](const at::Tensor& w) { return w.numel() * static_cast<int64_t>(w.element_size()); };
    return std::max(bytes(w_hh), bytes(w_hh_reverse)) <= kMaxRecurrentWeightBytes;
  }

  static std::unique_ptr<ForwardStepper> make_forward_stepper(const ForwardBuffers& b,
                                                              const std::vector<Step>& schedule) {
    return make<ForwardStepper, BlasForwardStepper, AtenForwardStepper<CpuCell>>(b, b.h_state, schedule);
  }

  static std::unique_ptr<BackwardStepper> make_backward_stepper(const BackwardBuffers& b,
                                                                const std::vector<Step>& schedule) {
    return make<BackwardStepper, BlasBackwardStepper, AtenBackwardStepper<CpuCell>>(b, b.d_h_state, schedule);
  }

 private:
  template <class Base, template <typename> class Blas, class Aten, class Buffers>
  static std::unique_ptr<Base> make(const Buffers& b, const at::Tensor& state, const std::vector<Step>& schedule) {
    return with_blas(
        b.gates.scalar_type(), largest_step_dimension(b.w_hh, state),
        [&](auto s) -> std::unique_ptr<Base> { return std::make_unique<Blas<decltype(s)>>(b, schedule); },
        [&]() -> std::unique_ptr<Base> { return std::make_unique<Aten>(b); });
  }
};

// Which build of the CPU loops runs float and double here: "avx512", "avx2" or "default".
std::string cpu_capability_name() {
  switch (capability()) {
    case Capability::Avx512:
      return "avx512";
    case Capability::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

// How the CPU steps run their GEMMs: "mkl-packed" (MKL's GEMM and its packed-weight API found in libtorch),
// "mkl" (GEMM only), or "aten" (neither: every step goes through ATen).
std::string cpu_gemm_name() {
  if (!blas::available<float>(0) || !blas::available<double>(0)) {
    return "aten";
  }
  return blas::PackedWeight::available() ? "mkl-packed" : "mkl";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_lstm, m) {
  m.def("cpu_capability() -> str", &cpu_capability_name);
  m.def("cpu_gemm() -> str", &cpu_gemm_name);
}

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward<CpuBackend>);
  m.impl("lstm_layer_backward", &lstm_layer_backward<CpuBackend>);
  m.impl("lstm_bidirectional_layer_forward", lstm_bidirectional_layer_forward<CpuBackend>);
  m.impl("lstm_layer_inference", &lstm_layer_inference<CpuBackend>);
  m.impl("lstm_bidirectional_layer_inference", lstm_bidirectional_layer_inference<CpuBackend>);
  m.impl("lstm_bidirectional_layer_backward", &lstm_bidirectional_layer_backward<CpuBackend>);
}

}  // namespace fused_lstm::cpu
