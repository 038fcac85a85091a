// Arguments of the row kernels (the contract of fused_margin/paths/fused.py), as plain pointers so the
// ISA-specific CPU translation units (row_kernel_cpu*.cpp) and the CUDA kernels need no torch types.
#pragma once

#include <cstdint>

#include "options.h"

namespace fused_margin {

enum class RawType : int { Float = 0, BFloat16 = 1, Half = 2 };

// The loss's options the kernels read (KernelOptions: scale, margins' settings, label smoothing,
// ignore_index, reduction), the codes of the choice options and the slots of the op's option vectors are
// generated from the Python registry (fused_margin/core/options.py) into options.h.

// The column statistics of the backward (rows of its `stats` output, and of the per-row-block partials):
// sum_i G_ij, sum_i G_ij row_scale_i raw_ij (row_scale 1 when absent) and sum_i dL/dl_ij (the logit
// offset's gradient; a partial holds sum_{i: y_i = j} (dl_iy - G_iy / s) there, see row_backward_cpu).
enum ColumnStat : int { kSumG = 0, kSumGRaw = 1, kSumLogitGrad = 2, kNumColumnStats = 3 };

// z'_ij = raw_ij * row_scale_i * col_scale_j + col_shift_j (fp32); a null table is absent.
struct RowForwardArgs : KernelOptions {
  const void* raw;     // rows x cols, row-major: row i at raw + i * raw_stride (the class stride may be padded)
  RawType raw_type;
  int64_t rows, cols;
  int64_t raw_stride;
  const int64_t* target;
  const float* row_scale;          // rows
  const float* col_scale;          // cols
  const float* col_shift;          // cols
  const float* class_margins;      // cols
  const float* logit_offset;       // cols
  const float* pair_perturbation;  // rows x cols
  const float* class_weight;       // cols
  // outputs, one per row
  float* loss;
  float* lse;
  int64_t* pred;
  bool* hard;
  float* nll;          // lse - t, formed relative to the row maximum (row_math.h finish_forward_row)
  float* target_grad;  // dt/dz'_y
};

struct RowBackwardArgs : KernelOptions {
  const void* raw;
  RawType raw_type;
  int64_t rows, cols;
  int64_t raw_stride;
  const int64_t* target;
  const float* row_scale;
  const float* col_scale;
  const float* col_shift;
  const float* logit_offset;
  const float* pair_perturbation;
  const float* class_weight;
  const float* lse;
  const float* nll;  // lse - t from the forward (the target column's p_y - 1 = expm1(-nll))
  const float* target_grad;
  const float* grad_rows;  // rows entries, or one shared by every row (grad_rows_shared)
  bool grad_rows_shared;
  const float* denom;      // null, or the mean's denominator: g_i = grad_rows / denom (NaN where denom == 0)
  float weight_sum;                // sum_j w_j (C without class weights; label smoothing only); CPU kernels
  const float* weight_sum_device;  // the same on the device (CUDA kernels; null without weights or smoothing)
  bool scale_grad;
  void* grad;  // rows x cols: raw's dtype when scale_grad, else float; row i at grad + i * grad_stride
  int64_t grad_stride;
  // Optional sums over the gradient (null when not asked for), per block of the CPU task grid:
  // row_dot[i * col_blocks + b] = sum_{j in block b} G_ij col_scale_j raw_ij;
  // col_partials[(rb * kNumColumnStats + k) * cols + j]: ColumnStat k over the rows of row block rb.
  float* row_dot;
  int64_t col_blocks, col_block_width;
  float* col_partials;
  int64_t row_block;  // rows per row block of col_partials
  bool col_sum_grad;  // col_partials gets kSumG and kSumLogitGrad too (else kSumGRaw alone: the projection)
};

// Finishing the backward's sums from the kernels' partials (RowBackwardArgs::row_dot, col_partials): one
// definition for the CPU op (fused_margin.cpp, baseline instruction set) and the CUDA sums kernel.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FM_SUMS_HD __host__ __device__ inline
#else
#define FM_SUMS_HD inline
#endif

// row_coef_i = -row_proj_i row_scale_i sum_b row_dot[i, b] (the column blocks in order)
FM_SUMS_HD float finish_row_coef(const RowBackwardArgs& a, int64_t i, const float* row_proj) {
  float r = 0.f;
  for (int64_t b = 0; b < a.col_blocks; ++b) r += a.row_dot[i * a.col_blocks + b];
  if (a.row_scale) r = r * a.row_scale[i];
  return -(row_proj[i] * r);
}

// Column j's sums over the row blocks, in order: col_coef_j = -col_proj_j col_scale_j sum_i G_ij rs_i raw_ij
// (when col_coef is given) and the stats rows (when stats is given; the logit-offset row is
// sum_i G_ij / s plus the partials' target corrections).
FM_SUMS_HD void finish_column(const RowBackwardArgs& a, int64_t j, int64_t row_blocks, const float* col_proj,
                              float* col_coef, float* stats) {
  const int64_t cols = a.cols;
  float sum_g = 0.f, sum_graw = 0.f, sum_dl = 0.f;
  for (int64_t rb = 0; rb < row_blocks; ++rb) {
    const float* partial = a.col_partials + rb * kNumColumnStats * cols;
    sum_g += partial[kSumG * cols + j];
    sum_graw += partial[kSumGRaw * cols + j];
    sum_dl += partial[kSumLogitGrad * cols + j];
  }
  if (col_coef) col_coef[j] = -(col_proj[j] * ((a.col_scale ? a.col_scale[j] : 1.f) * sum_graw));
  if (stats) {
    stats[kSumG * cols + j] = sum_g;
    stats[kSumGRaw * cols + j] = sum_graw;
    stats[kSumLogitGrad * cols + j] = sum_g / a.scale + sum_dl;
  }
}
#undef FM_SUMS_HD

namespace cpu {

// Rows [begin, end) of the forward; columns [col_begin, col_end) of rows [begin, end) of the backward.
using RowForwardFn = void (*)(const RowForwardArgs&, int64_t begin, int64_t end);
// Row norms of the cosine head (the row_norms op) for rows [begin, end) of x (rows x cols, contiguous):
// ||x_i||, 1 / max(||x_i||, eps) and the projection factor 1 / ||x_i||^2 (0 below eps).
struct RowNormsArgs {
  const void* x;
  RawType x_type;
  int64_t cols;
  float eps;
  float *norm, *inv, *proj;
};
using RowNormsFn = void (*)(const RowNormsArgs&, int64_t begin, int64_t end);

// The cosine head's projection on a GEMM output, in place, rows [begin, end): with c_i = -proj_i (grad_i . v_i)
// (the dot of grad's own rounded values, in fp32; 0 where proj_i is 0),
// grad_ij = round(float(grad_ij) + c_i * float(v_ij)), in fp32 with one rounding to grad's dtype
// (grad and v: contiguous, of one dtype).
struct ProjectArgs {
  void* grad;
  const void* v;
  RawType type;
  int64_t cols;
  const float* proj;
  float scale;  // the result times this (an upstream gradient folded into the pass; 1 is exact)
};
using ProjectFn = void (*)(const ProjectArgs&, int64_t begin, int64_t end);
using RowBackwardFn = void (*)(const RowBackwardArgs&, int64_t row_begin, int64_t row_end,
                               int64_t col_begin, int64_t col_end);
// Rows [begin, end): each row's forward, then its backward (scale_grad) over all columns in column blocks
// of col_block_width, from the forward's exps where the row allows it (no sums asked for, finite chunks).
using RowForwardBackwardFn = void (*)(const RowForwardArgs&, const RowBackwardArgs&, int64_t begin, int64_t end);

// One definition per instruction set, each in its own translation unit (see setup.py).
#define FUSED_MARGIN_DECLARE_CPU_KERNELS(ISA)                                                     \
  namespace ISA {                                                                                 \
  void row_forward(const RowForwardArgs& args, int64_t begin, int64_t end);                       \
  void row_backward(const RowBackwardArgs& args, int64_t row_begin, int64_t row_end,              \
                    int64_t col_begin, int64_t col_end);                                          \
  void row_forward_backward(const RowForwardArgs& fargs, const RowBackwardArgs& bargs, int64_t begin, \
                            int64_t end);                                                         \
  void row_norms(const RowNormsArgs& args, int64_t begin, int64_t end);                           \
  void project_rows(const ProjectArgs& args, int64_t begin, int64_t end);                         \
  int vector_width();                                                                             \
  }

FUSED_MARGIN_DECLARE_CPU_KERNELS(DEFAULT)
FUSED_MARGIN_DECLARE_CPU_KERNELS(AVX2)
FUSED_MARGIN_DECLARE_CPU_KERNELS(AVX512)
#undef FUSED_MARGIN_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace fused_margin
