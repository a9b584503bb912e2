#include "blas.h"

#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cstdlib>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

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
void row_major_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc, bool trans_b) {
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T, and a row-major matrix read as column-major is its
  // transpose: so call the column-major routine with the operands swapped, B transposed where op(B) is not B.
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
  const T alpha(1);
  const char no_trans = 'N', trans = 'T';
  gemm<T>().fn(trans_b ? &trans : &no_trans, &no_trans, &M, &N, &K, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
}

namespace {

using SetLocalThreads = int (*)(int);

SetLocalThreads set_local_threads() {
  static const auto fn = reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}

}  // namespace

SingleThreaded::SingleThreaded() {
  if (const SetLocalThreads fn = set_local_threads()) {
    previous_ = fn(1);
  }
}

SingleThreaded::~SingleThreaded() {
  if (const SetLocalThreads fn = set_local_threads()) {
    fn(previous_);  // 0, the usual previous value, returns the thread to MKL's global setting
  }
}

namespace {

// MKL's CBLAS enumerations (mkl_cblas.h).
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

struct PackApi {
  size_t (*get_size)(int identifier, int m, int n, int k) = nullptr;
  void (*pack)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
               float* dest) = nullptr;
  void (*compute)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda, const float* b,
                  int ldb, float beta, float* c, int ldc) = nullptr;
};

const PackApi& pack_api() {
  static const PackApi api = [] {
    PackApi a;
    a.get_size = reinterpret_cast<decltype(a.get_size)>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size"));
    a.pack = reinterpret_cast<decltype(a.pack)>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack"));
    a.compute = reinterpret_cast<decltype(a.compute)>(dlsym(RTLD_DEFAULT, "cblas_sgemm_compute"));
    return a;
  }();
  return api;
}

// MKL's packed buffers, kept for the next call on the thread that freed them. Fresh memory costs a page
// fault for every 4 KB the packing writes (about 1.5 us each here), at every call: a buffer is reserved per
// column tile, and the allocator gives such large blocks back to the system when they are freed.
class SpareBuffers {
 public:
  ~SpareBuffers() {
    for (const auto& [bytes, buffer] : spare_) {
      std::free(buffer);
    }
  }

  float* take(size_t bytes) {
    for (auto it = spare_.begin(); it != spare_.end(); ++it) {
      if (it->first == bytes) {
        float* buffer = it->second;
        spare_.erase(it);
        kept_ -= bytes;
        return buffer;
      }
    }
    return static_cast<float*>(std::malloc(bytes));
  }

  void give(float* buffer, size_t bytes) {
    if (kept_ + bytes > kMaxKeptBytes) {
      std::free(buffer);
      return;
    }
    spare_.emplace_back(bytes, buffer);
    kept_ += bytes;
  }

 private:
  static constexpr size_t kMaxKeptBytes = size_t{256} << 20;
  std::vector<std::pair<size_t, float*>> spare_;
  size_t kept_ = 0;
};

thread_local SpareBuffers spare_buffers;

}  // namespace

bool PackedWeight::available() {
  const PackApi& api = pack_api();
  return api.get_size && api.pack && api.compute;
}

PackedWeight::PackedWeight(int64_t m, int64_t n, int64_t k, const float* b, int64_t ldb, bool b_transposed)
    : m_(static_cast<int>(m)), n_(static_cast<int>(n)), k_(static_cast<int>(k)) {
  const PackApi& api = pack_api();
  bytes_ = api.get_size(kBMatrix, m_, n_, k_);
  packed_ = spare_buffers.take(bytes_);
  TORCH_CHECK(packed_ != nullptr, "fused_lstm: out of memory packing a weight for MKL");
  api.pack(kRowMajor, kBMatrix, b_transposed ? kTrans : kNoTrans, m_, n_, k_, 1.0f, b, static_cast<int>(ldb), packed_);
}

PackedWeight::~PackedWeight() {
  spare_buffers.give(packed_, bytes_);
}

void PackedWeight::gemm(const float* a, float beta, float* c, int64_t ldc) const {
  pack_api().compute(kRowMajor, kNoTrans, kPacked, m_, n_, k_, a, k_, packed_, n_, beta, c, static_cast<int>(ldc));
}

namespace {

template <typename T>
using Omatcopy = void (*)(char ordering, char trans, size_t rows, size_t cols, T alpha, const T* a, size_t lda, T* b,
                          size_t ldb);

template <typename T>
Omatcopy<T> omatcopy() {
  static const Omatcopy<T> fn = reinterpret_cast<Omatcopy<T>>(
      dlsym(RTLD_DEFAULT, std::is_same_v<T, float> ? "MKL_Somatcopy" : "MKL_Domatcopy"));
  return fn;
}

}  // namespace

template <typename T>
bool transpose(int64_t rows, int64_t cols, const T* src, T* dst) {
  const Omatcopy<T> fn = omatcopy<T>();
  if (fn == nullptr) {
    return false;
  }
  fn('R', 'T', static_cast<size_t>(rows), static_cast<size_t>(cols), T(1), src, static_cast<size_t>(cols), dst,
     static_cast<size_t>(rows));
  return true;
}

template bool transpose<float>(int64_t, int64_t, const float*, float*);
template bool transpose<double>(int64_t, int64_t, const double*, double*);
template bool available<float>(int64_t);
template bool available<double>(int64_t);
template void row_major_gemm<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float,
                                    float*, int64_t, bool);
template void row_major_gemm<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t, double,
                                     double*, int64_t, bool);

}  // namespace fused_lstm::cpu::blas
