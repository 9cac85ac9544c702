// The CPU row kernels compiled for the AVX512 instruction set (see kernel_impl.h and setup.py).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernel_impl.h"
