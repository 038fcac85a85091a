// The CPU row kernels for any CPU (CPU_CAPABILITY DEFAULT): see row_kernel_cpu.h.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "row_kernel_cpu.h"
