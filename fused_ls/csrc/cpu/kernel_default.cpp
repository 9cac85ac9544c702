// The CPU row kernels compiled for the DEFAULT instruction set (see kernel_impl.h and setup.py).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernel_impl.h"
