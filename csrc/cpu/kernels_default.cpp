// The baseline build of the CPU loops (any x86-64 or other CPU), and the only one for float16 / bfloat16.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace fused_lstm::cpu::DEFAULT {
template void forward_rows<c10::Half>(const ForwardPointers<c10::Half>&, int64_t, int64_t);
template void forward_rows<c10::BFloat16>(const ForwardPointers<c10::BFloat16>&, int64_t, int64_t);
template void backward_rows<c10::Half>(const BackwardPointers<c10::Half>&, int64_t, int64_t);
template void backward_rows<c10::BFloat16>(const BackwardPointers<c10::BFloat16>&, int64_t, int64_t);
}  // namespace fused_lstm::cpu::DEFAULT
