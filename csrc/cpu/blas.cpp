#include "blas.h"

#include <dlfcn.h>

#include <limits>

namespace fused_lstm::cpu::blas {
namespace {

template <typename T>
Gemm<T> lookup(const char* name) {
  Gemm<T> g;
  g.fn = reinterpret_cast<typename Gemm<T>::Fn>(dlsym(RTLD_DEFAULT, name));
  return g;
}

}  // namespace

template <>
const Gemm<float>& gemm<float>() {
  static const Gemm<float> g = lookup<float>("sgemm_");
  return g;
}

template <>
const Gemm<double>& gemm<double>() {
  static const Gemm<double> g = lookup<double>("dgemm_");
  return g;
}

template <typename T>
bool available(int64_t largest_dimension) {
  return gemm<T>().fn != nullptr && largest_dimension <= std::numeric_limits<int>::max();
}

template <typename T>
void row_major_gemm(int64_t m, int64_t n, int64_t k, const T* a, const T* b, bool transpose_b, T beta, T* c) {
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T: swap the operands, and the row-major B
  // [n, k] read as column-major is already B^T, so "transposed B" becomes no transpose there and vice versa.
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int ldb = static_cast<int>(transpose_b ? k : n);
  const int lda = K;
  const int ldc = M;
  const T alpha(1);
  const char trans_b = transpose_b ? 'T' : 'N';
  const char no_trans = 'N';
  gemm<T>().fn(&trans_b, &no_trans, &M, &N, &K, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

template bool available<float>(int64_t);
template bool available<double>(int64_t);
template void row_major_gemm<float>(int64_t, int64_t, int64_t, const float*, const float*, bool, float, float*);
template void row_major_gemm<double>(int64_t, int64_t, int64_t, const double*, const double*, bool, double, double*);

}  // namespace fused_lstm::cpu::blas
