// The AVX2 + FMA build of the CPU loops (setup.py compiles this file with -mavx2 -mfma -mf16c); backend.cpp
// calls it only on CPUs that have those instructions.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
