// The CPU row kernels for AVX2 + FMA machines (torch's CPU capability "AVX2"): see row_kernel_cpu.h.
//
// The instruction set comes from a target pragma, not a command-line flag, so the other translation
// units stay baseline x86-64. The pragma applies to every function this unit compiles, so none of
// them may be shared with the baseline units: fused_margin's own (row_kernel_cpu.h, row_math.h) and
// at::vec's live in namespaces named after CPU_CAPABILITY. What remains shared is third-party inline
// code of the headers (c10, the standard library); setup.py links this object after the baseline ones,
// so GNU ld keeps their baseline copies, and tests/backends/test_contract.py checks that no function outside
// the ISA namespaces of the built extension holds an AVX instruction. GCC's C++ front end does not
// define the feature macros for a target pragma; sleef.h and c10 select their AVX declarations from
// them, so they are defined here.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "row_kernel_cpu.h"
