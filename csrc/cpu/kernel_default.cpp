// The CPU row kernels compiled for one instruction set (see kernel_impl.h; flags in fused_ls/build.py).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernel_impl.h"
