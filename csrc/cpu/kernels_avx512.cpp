// The AVX-512 build of the CPU loops (setup.py compiles this file with -mavx512f -mavx512dq -mavx512vl
// -mavx512bw -mfma); backend.cpp calls it only on CPUs with those instructions.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
