// The CPU row kernels compiled for one instruction set (see kernel_impl.h; flags in fused_ls/build.py).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel_impl.h"
