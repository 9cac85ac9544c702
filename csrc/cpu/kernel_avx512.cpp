// The CPU row kernels compiled for one instruction set (see kernel_impl.h; flags in fused_ls/build.py).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernel_impl.h"
