// The CPU row kernels for AVX-512 machines (torch's CPU capability "AVX512": F, BW, VL, DQ): see
// row_kernel_cpu.h and the note in row_kernel_cpu_avx2.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FUSED_MARGIN_ISA_ENABLED 1
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "row_kernel_cpu.h"
