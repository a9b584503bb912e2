// Direct calls to the BLAS inside libtorch (MKL's Fortran sgemm_ / dgemm_), found at run time.
//
// A per-step GEMM through ATen costs several microseconds of dispatch and view bookkeeping, which is most of
// a step at small sizes. libtorch_cpu exports MKL's entry points, but as internal symbols rather than API, so
// they are looked up with dlsym; where they are absent, available() is false and callers use ATen instead.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fused_lstm::cpu::blas {

// Column-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, as Fortran BLAS defines it.
template <typename T>
struct Gemm {
  using Fn = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                      const T* alpha, const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c,
                      const int* ldc);
  Fn fn = nullptr;
};

template <typename T>
const Gemm<T>& gemm();  // defined for float and double

// Whether a GEMM with these sizes can go to the BLAS: the symbol exists and sizes fit its 32-bit ints.
template <typename T>
bool available(int64_t largest_dimension);

// Row-major convenience over the column-major routine: C[m, n] = A[m, k] op(B) + beta * C, with row strides
// lda, ldb, ldc (so that A, B and C may be blocks of larger matrices); op(B) is B[k, n], or with trans_b the
// transpose of B[n, k].
template <typename T>
void row_major_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc, bool trans_b = false);

// While alive, the BLAS runs on the calling thread alone (MKL's thread-local mkl_set_num_threads_local(1));
// nothing where libtorch has no such symbol. For GEMMs whose threading we do ourselves, in fixed tiles.
class SingleThreaded {
 public:
  SingleThreaded();
  ~SingleThreaded();
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;

 private:
  int previous_ = 0;
};

// dst[cols, rows] = src[rows, cols]^T, both row-major and contiguous, with MKL's out-of-place transpose
// (MKL_?omatcopy, the C interface) where libtorch has it; false where it does not, and the caller transposes itself.
template <typename T>
bool transpose(int64_t rows, int64_t cols, const T* src, T* dst);

// MKL's packed-GEMM API (cblas_sgemm_pack / cblas_sgemm_compute), float only: op(B) is packed once into
// the layout MKL's kernels read, then multiplied many times (W_ih at every window of an inference call, too).
// The recurrent weights meet the same GEMM at every step of a dense sequence, where this was measured 1.3x
// (B=32, H=256) to 1.5x (B=64, H=512) faster than sgemm, with identical results. The packing depends on m, so
// a PackedWeight serves only GEMMs of its m.
class PackedWeight {
 public:
  static bool available();
  // Packs B for C[m, n] = A[m, k] B[k, n], B row-major with row stride ldb; with b_transposed, B's transpose
  // [n, k] with row stride ldb (a weight as stored).
  PackedWeight(int64_t m, int64_t n, int64_t k, const float* b, int64_t ldb, bool b_transposed = false);
  ~PackedWeight();
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;

  // C[m, n] = A[m, k] B + beta * C, row-major; A contiguous, C with row stride ldc.
  void gemm(const float* a, float beta, float* c, int64_t ldc) const;
  int64_t m() const { return m_; }

 private:
  int m_, n_, k_;
  size_t bytes_;
  float* packed_;
};

}  // namespace fused_lstm::cpu::blas
