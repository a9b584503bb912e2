// Direct calls to the BLAS inside libtorch (MKL's Fortran sgemm_ / dgemm_), found at run time.
//
// A per-step GEMM through ATen costs several microseconds of dispatch and view bookkeeping, which is most of
// a step at small sizes. libtorch_cpu exports MKL's entry points, but as internal symbols rather than API, so
// they are looked up with dlsym; where they are absent, available() is false and callers use ATen instead.
#pragma once

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

// Row-major convenience over the column-major routine: C[m, n] = A[m, k] * op(B) + beta * C, where
// op(B) = B^T with B stored [n, k] row-major (transpose_b) or B stored [k, n] row-major. All contiguous.
template <typename T>
void row_major_gemm(int64_t m, int64_t n, int64_t k, const T* a, const T* b, bool transpose_b, T beta, T* c);

}  // namespace fused_lstm::cpu::blas
