// The CPU row kernels compiled for the AVX2 instruction set (see kernel_impl.h and setup.py).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel_impl.h"
