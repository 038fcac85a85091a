// CUDA implementation of the fused_margin row ops (schema in fused_margin.cpp; contract in
// fused_margin/paths/fused.py, stated eagerly in tests/helpers/row_torch.py; the loss of docs/loss.md).
//
// forward: one block per row. Each thread reads its share of the row with 16-byte vector loads
// (after a scalar head up to the first aligned element), computes z'_j = raw_j row_scale col_scale_j
// + col_shift_j in fp32, and keeps the argmax of z' (torch.argmax's order), ELM's strongest wrong
// class, and an online logsumexp of the non-target logits l_j = s z'_j + a_j + P_j with the
// label-smoothing sum (row_math.h LseState). Warp shuffles, then shared memory, combine the threads;
// thread 0 applies the target margin, forms nll = lse - t relative to the row maximum (row_math.h) and
// writes the row's outputs. The full-mask shuffles need whole warps: the block size is a multiple of 32
// (checked at compile time for every size forward_threads picks, and at launch).
//
// backward: a 2-D grid (column tiles x blocks of rows), elementwise from the saved row statistics:
// p_j = exp(l_j - lse), dl_j = g ((1 - eps) w_y p_j + eps / C (sum(w) p_j - w_j)) off the target,
// dl_y = g ((1 - eps) w_y expm1(-nll) + eps / C ((sum(w) - w_y) + sum(w) expm1(-nll))) on it,
// G_j = s dl_j off the target, G_y = (dt/dz'_y) dl_y, times row_scale col_scale_j with scale_grad;
// the row and column sums of the contract as per-block partials (no float atomics), finished by
// backward_sums_kernel. The forward's reduction and the norms of the cosine head: one small kernel each.
//
// All math is fp32 (docs/loss.md section 5). No contraction into FMAs, as the other backends: setup.py
// compiles this file with --fmad=false, and the products and sums that form z' and the logits use the
// _rn intrinsics besides, so they round as torch's eager ops whatever the flags.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <limits>
#include <tuple>
#include <type_traits>

#include "class_block.h"
#include "ops_common.h"
#include "row_kernel.h"
#include "row_math.h"

namespace fused_margin {
namespace cuda_kernels {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;
constexpr int kBackwardThreads = 256;
// the forward's block sizes (forward_threads): whole warps (the full-mask shuffles), at most kMaxWarps
constexpr int kForwardThreadsSmall = 128, kForwardThreadsMedium = 256, kForwardThreadsLarge = 512;

constexpr bool whole_warps(int threads) {
  return threads % kWarpSize == 0 && threads > 0 && threads <= kWarpSize * kMaxWarps;
}
static_assert(whole_warps(kForwardThreadsSmall) && whole_warps(kForwardThreadsMedium) &&
                  whole_warps(kForwardThreadsLarge),
              "the forward kernel's warp shuffles (mask 0xffffffff) need a block of whole warps");

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// Elements of a row before its first 16-byte aligned element.
template <typename T>
__device__ __forceinline__ int64_t row_head(const T* row, int64_t cols) {
  constexpr int64_t kPack = Pack<T>::kSize;
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % kPack);
  const int64_t head = misaligned == 0 ? 0 : kPack - misaligned;
  return head < cols ? head : cols;
}

// Calls visit(j, raw_j as float) for this thread's share of a row: a scalar head, 16-byte packs,
// a scalar tail (threads of the block stride over each part).
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_in_row(const T* __restrict__ row, int64_t cols, Visit&& visit) {
  constexpr int kPack = Pack<T>::kSize;
  const int64_t head = row_head(row, cols);
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) visit(j, to_float(row[j]));
  const int64_t packs = (cols - head) / kPack;
  const Pack<T>* __restrict__ packed = reinterpret_cast<const Pack<T>*>(row + head);
  // kInFlight packs per thread are loaded before any is used, to keep several loads in flight
  constexpr int kInFlight = 4;
  for (int64_t p0 = threadIdx.x; p0 < packs; p0 += kInFlight * static_cast<int64_t>(blockDim.x)) {
    Pack<T> loaded[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t p = p0 + u * static_cast<int64_t>(blockDim.x);
      if (p < packs) loaded[u] = packed[p];
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int64_t p = p0 + u * static_cast<int64_t>(blockDim.x);
      if (p < packs) {
#pragma unroll
        for (int k = 0; k < kPack; ++k) visit(head + p * kPack + k, to_float(loaded[u].v[k]));
      }
    }
  }
  for (int64_t j = head + packs * kPack + threadIdx.x; j < cols; j += blockDim.x) visit(j, to_float(row[j]));
}

struct Argmax {
  float value;
  int64_t index;  // -1 until an element beats -inf (torch.argmax of an all -inf row is 0)
};

__device__ __forceinline__ void argmax_merge(Argmax& best, float value, int64_t index) {
  if (argmax_better(value, index, best.value, best.index)) best = {value, index};
}

__device__ __forceinline__ Argmax shuffle_xor(const Argmax& a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.value, lane_mask),
          static_cast<int64_t>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(a.index), lane_mask))};
}

__device__ __forceinline__ LseState shuffle_xor(const LseState& s, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, s.max, lane_mask), __shfl_xor_sync(0xffffffffu, s.sum, lane_mask),
          __shfl_xor_sync(0xffffffffu, s.dev, lane_mask), __shfl_xor_sync(0xffffffffu, s.weight, lane_mask)};
}

// Adds one non-target logit l (class weight w) to an online logsumexp state.
__device__ __forceinline__ void lse_add(LseState& s, float l, float w, bool smoothing) {
  const float m = nan_max(s.max, l);
  if (!(m == s.max)) {  // a new max (or NaN): move the shift
    const float old_shift = lse_shift(s.max), new_shift = lse_shift(m);
    if (s.sum != 0.f) s.sum = s.sum * expf(old_shift - new_shift);
    if (s.weight != 0.f) s.dev = s.dev + s.weight * (new_shift - old_shift);
    s.max = m;
  }
  const float shift = lse_shift(s.max);
  s.sum = s.sum + expf(l - shift);
  if (smoothing) {
    s.dev = s.dev + w * (shift - l);
    s.weight = s.weight + w;
  }
}

template <typename T>
__global__ void row_forward_kernel(const RowForwardArgs a) {
  CUDA_KERNEL_ASSERT(blockDim.x % kWarpSize == 0);  // the full-mask shuffles below
  __shared__ Argmax warp_best[kMaxWarps], warp_wrong[kMaxWarps];
  __shared__ LseState warp_lse[kMaxWarps];
  __shared__ float target_score;

  const int64_t i = blockIdx.x;
  const int64_t cols = a.cols;
  const T* __restrict__ row = static_cast<const T*>(a.raw) + i * a.raw_stride;
  const float* __restrict__ col_scale = a.col_scale;
  const float* __restrict__ col_shift = a.col_shift;
  const float* __restrict__ offset = a.logit_offset;
  const float* __restrict__ weight = a.class_weight;
  const float* __restrict__ pair = a.pair_perturbation ? a.pair_perturbation + i * cols : nullptr;
  const int64_t label = a.target[i];
  const bool kept = label != a.ignore_index;
  CUDA_KERNEL_ASSERT(!kept || (label >= 0 && label < cols));
  const int64_t y = kept ? label : 0;
  const int64_t special = kept ? y : -1;  // the column whose logit is the margined target
  const bool track_wrong = kept && a.class_margins != nullptr && a.lambda_elm != 0.f;
  const bool smoothing = kept && a.label_smoothing != 0.f;
  const bool has_row_scale = a.row_scale != nullptr;
  const float row_scale = has_row_scale ? a.row_scale[i] : 1.f;
  const float scale = a.scale;

  Argmax best{-INFINITY, -1}, wrong{-INFINITY, -1};
  LseState state = lse_empty();
  for_each_in_row(row, cols, [&](int64_t j, float r) {
    float z = r;
    if (has_row_scale) z = __fmul_rn(z, row_scale);
    if (col_scale) z = __fmul_rn(z, col_scale[j]);
    if (col_shift) z = __fadd_rn(z, col_shift[j]);
    argmax_merge(best, z, j);
    if (j == special) {
      target_score = z;
      return;
    }
    if (track_wrong) argmax_merge(wrong, z, j);
    float l = __fmul_rn(z, scale);
    if (offset) l = __fadd_rn(l, offset[j]);
    if (pair) l = __fadd_rn(l, pair[j]);
    lse_add(state, l, weight ? weight[j] : 1.f, smoothing);
  });

  // combine the threads: within each warp, then across warps
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) {
    const Argmax other_best = shuffle_xor(best, mask);
    argmax_merge(best, other_best.value, other_best.index);
    const Argmax other_wrong = shuffle_xor(wrong, mask);
    argmax_merge(wrong, other_wrong.value, other_wrong.index);
    state = lse_merge(state, shuffle_xor(state, mask));
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  if (lane == 0) {
    warp_best[warp] = best;
    warp_wrong[warp] = wrong;
    warp_lse[warp] = state;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < warps; ++w) {
    argmax_merge(best, warp_best[w].value, warp_best[w].index);
    argmax_merge(wrong, warp_wrong[w].value, warp_wrong[w].index);
    state = lse_merge(state, warp_lse[w]);
  }

  finish_forward_row(a, i, kept, y, target_score, best.index, wrong.index, track_wrong, state, smoothing);
}

// The block-wide sum of one value per thread (float or double; blockDim.x a multiple of the warp size), in a
// fixed order: the result, in every thread, does not depend on the timing.
template <typename S>
__device__ __forceinline__ S block_sum(S v, S* shared) {
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  __syncthreads();  // shared is free (an earlier call's readers are done)
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  S total = 0;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// grid: (column tiles of kBackwardThreads packs, blocks of rows): block y takes rows
// [y rows_per_block, (y + 1) rows_per_block). With the sums of RowBackwardArgs, each block writes its
// rows' row_dot over its column tile (row_dot[i * gridDim.x + blockIdx.x]) and each thread its columns'
// partials over the block's rows (col_partials[blockIdx.y]); backward_sums_kernel finishes both.
template <typename T, typename Out, bool kSums>
__global__ void row_backward_kernel(const RowBackwardArgs a, int64_t rows_per_block) {
  constexpr int kPack = Pack<T>::kSize;
  __shared__ float reduce_buffer[kMaxWarps];
  const int64_t cols = a.cols;
  const float* __restrict__ col_scale = a.col_scale;
  const float* __restrict__ col_shift = a.col_shift;
  const float* __restrict__ offset = a.logit_offset;
  const float* __restrict__ weight = a.class_weight;
  const float eps = a.label_smoothing;
  const float eps_per_class = eps / static_cast<float>(cols);
  const float weight_sum = a.weight_sum_device ? *a.weight_sum_device : static_cast<float>(cols);
  const bool scale_cols = a.scale_grad && col_scale != nullptr;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // the partial sums of this thread's columns (with kSums): slots 0..kPack-1 its pack, slot kPack one scalar
  // column of the rows' head or tail (vector layout only)
  float sum_g[kPack + 1], sum_graw[kPack + 1], sum_dl[kPack + 1];
#pragma unroll
  for (int k = 0; k <= kPack; ++k) sum_g[k] = sum_graw[k] = sum_dl[k] = 0.f;
  // Every row has the same alignment when the row stride is a multiple of the pack (the fused path pads the
  // class stride to 16 elements): then the vector layout maps a thread's slots to the same columns in every
  // row and serves the column sums too; otherwise the sums take a scalar layout (p kPack + k).
  const bool vector_layout = !kSums || a.raw_stride % kPack == 0;

  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < a.rows ? r0 + rows_per_block : a.rows;
  for (int64_t i = r0; i < r1; ++i) {
    const T* __restrict__ row = static_cast<const T*>(a.raw) + i * a.raw_stride;
    Out* __restrict__ out = static_cast<Out*>(a.grad) + i * a.grad_stride;
    const int64_t label = a.target[i];
    const bool kept = label != a.ignore_index;
    CUDA_KERNEL_ASSERT(!kept || (label >= 0 && label < cols));
    const float* __restrict__ pair = a.pair_perturbation ? a.pair_perturbation + i * cols : nullptr;
    const bool has_row_scale = a.row_scale != nullptr;
    const float row_scale = has_row_scale ? a.row_scale[i] : 1.f;
    const float g = kept ? row_upstream_grad(a, i) : 0.f;
    const float lse = a.lse[i];
    const float w_y = (kept && weight) ? weight[label] : 1.f;
    const float p_coef = g * ((1.f - eps) * w_y + eps_per_class * weight_sum) * a.scale;
    const float w_coef = g * eps_per_class * a.scale;
    const float dl_y = kept ? target_column_grad(a.nll[i], w_y, weight_sum, eps, eps_per_class) * g : 0.f;
    const float g_y = kept ? dl_y * a.target_grad[i] : 0.f;
    float dot = 0.f;

    // G_j (unscaled; p_y - 1 = expm1(-nll) and dt/dz'_y = target_grad on the target), the output
    // (G row_scale col_scale_j with scale_grad), and the thread's sums for column slot k
    auto element = [&](int64_t j, float r, int k) -> Out {
      // an ignored row: exact zeros, and no part in the sums (as the CPU kernel: 0 * r would be NaN for a
      // masked -inf or NaN logit of that row, and 0 * row_scale for a NaN row scale)
      if (!kept) return static_cast<Out>(0.f);
      float grad;
      if (j == label) {
        grad = g_y;
      } else {
        float z = r;
        if (has_row_scale) z = __fmul_rn(z, row_scale);
        if (col_scale) z = __fmul_rn(z, col_scale[j]);
        if (col_shift) z = __fadd_rn(z, col_shift[j]);
        float l = __fmul_rn(z, a.scale);
        if (offset) l = __fadd_rn(l, offset[j]);
        if (pair) l = __fadd_rn(l, pair[j]);
        grad = p_coef * expf(l - lse);
        if (w_coef != 0.f) grad = grad - w_coef * (weight ? weight[j] : 1.f);
      }
      float o = grad;
      if (a.scale_grad && has_row_scale) o = o * row_scale;
      if (scale_cols) o = o * col_scale[j];
      if constexpr (kSums) {
        dot += (col_scale ? grad * col_scale[j] : grad) * r;
        sum_g[k] += grad;
        sum_graw[k] += (has_row_scale ? grad * row_scale : grad) * r;
        if (j == label) sum_dl[k] += dl_y - g_y / a.scale;
      }
      return static_cast<Out>(o);
    };

    if (!vector_layout) {
      // thread p's columns are [p kPack, (p + 1) kPack) in every row (scalar loads: the vector layout
      // follows each row's alignment, which varies between rows here)
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        const int64_t j = p * kPack + k;
        if (j < cols) out[j] = element(j, to_float(row[j]), k);
      }
    } else {
      const int64_t head = row_head(row, cols);
      const int64_t packs = (cols - head) / kPack;
      if (p < packs) {
        const Pack<T> pack = reinterpret_cast<const Pack<T>*>(row + head)[p];
        const int64_t j0 = head + p * kPack;
        if constexpr (std::is_same<T, Out>::value) {
          if (row_head(out, cols) == head) {
            Pack<Out> result;
#pragma unroll
            for (int k = 0; k < kPack; ++k) result.v[k] = element(j0 + k, to_float(pack.v[k]), k);
            reinterpret_cast<Pack<Out>*>(out + head)[p] = result;
          } else {
#pragma unroll
            for (int k = 0; k < kPack; ++k) out[j0 + k] = element(j0 + k, to_float(pack.v[k]), k);
          }
        } else {
#pragma unroll
          for (int k = 0; k < kPack; ++k) out[j0 + k] = element(j0 + k, to_float(pack.v[k]), k);
        }
      }
      if (blockIdx.x == 0) {  // the scalar head and tail of the row (fewer than 2 kPack <= blockDim.x columns)
        const int64_t tail = head + packs * kPack;
        const int64_t extra = head + (cols - tail);
        if (threadIdx.x < extra) {
          const int64_t e = threadIdx.x;
          const int64_t j = e < head ? e : tail + (e - head);
          out[j] = element(j, to_float(row[j]), kPack);
        }
      }
    }
    if (kSums && a.row_dot != nullptr) {
      const float total = block_sum(dot, reduce_buffer);
      if (threadIdx.x == 0) a.row_dot[i * gridDim.x + blockIdx.x] = total;
    }
  }

  if (kSums && a.col_partials != nullptr && r0 < r1) {
    float* partial = a.col_partials + static_cast<int64_t>(blockIdx.y) * kNumColumnStats * cols;
    auto write = [&](int64_t j, int k) {
      partial[kSumG * cols + j] = sum_g[k];
      partial[kSumGRaw * cols + j] = sum_graw[k];
      partial[kSumLogitGrad * cols + j] = sum_dl[k];
    };
    if (!vector_layout) {
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        if (p * kPack + k < cols) write(p * kPack + k, k);
      }
    } else {  // the layout of the loop above (the same in every row)
      const T* row = static_cast<const T*>(a.raw) + r0 * a.raw_stride;
      const int64_t head = row_head(row, cols);
      const int64_t packs = (cols - head) / kPack;
      if (p < packs) {
#pragma unroll
        for (int k = 0; k < kPack; ++k) write(head + p * kPack + k, k);
      }
      if (blockIdx.x == 0) {
        const int64_t tail = head + packs * kPack;
        const int64_t extra = head + (cols - tail);
        if (threadIdx.x < extra) {
          const int64_t e = threadIdx.x;
          write(e < head ? e : tail + (e - head), kPack);
        }
      }
    }
  }
}

// Threads [0, rows): row_coef_i = -row_proj_i row_scale_i sum_b row_dot[i, b]; threads [rows, rows + cols):
// the column sums over the row blocks, in order (col_coef, stats).
__global__ void backward_sums_kernel(const RowBackwardArgs a, const float* row_proj, const float* col_proj,
                                     float* row_coef, float* col_coef, float* stats, int64_t row_blocks) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < a.rows) {
    if (row_coef != nullptr) row_coef[t] = finish_row_coef(a, t, row_proj);
    return;
  }
  const int64_t j = t - a.rows;
  if (j < a.cols && a.col_partials != nullptr) finish_column(a, j, row_blocks, col_proj, col_coef, stats);
}

// One block: the loss rows' sum (over the denominator for the mean; NaN where it is 0) and the
// denominator (the kept rows' w_y, or their count), each summed in double in a fixed order and rounded once
// to float, as the CPU kernel's (which sums in row order; fp32 partial sums would drift from it).
__global__ void reduce_rows_kernel(const RowForwardArgs a, float* out, float* denom_out, bool mean) {
  __shared__ double buffer[kMaxWarps];
  double total = 0.0, denom = 0.0;
  for (int64_t i = threadIdx.x; i < a.rows; i += blockDim.x) {
    total += a.loss[i];
    const int64_t y = a.target[i];
    if (y != a.ignore_index) denom += a.class_weight ? a.class_weight[y] : 1.f;
  }
  const float sum = static_cast<float>(block_sum(total, buffer));
  const float d = static_cast<float>(block_sum(denom, buffer));
  if (threadIdx.x == 0) {
    *denom_out = d;
    *out = mean ? (d != 0.f ? sum / d : NAN) : sum;
  }
}

// Row norms (the cosine head): one warp a row; squares and sums in fp32, as torch.linalg.vector_norm.
template <typename T>
__global__ void row_norms_kernel(const T* x, int64_t rows, int64_t cols, float eps, float* norm, float* inv,
                                 float* proj) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= rows) return;  // whole warps leave together (i is the same for a warp)
  float sum = 0.f;
  for (int64_t j = lane; j < cols; j += kWarpSize) {
    const float v = static_cast<float>(x[i * cols + j]);
    sum += v * v;
  }
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  if (lane == 0) {
    const float n = sqrtf(sum);
    const float r = 1.f / (n < eps ? eps : n);  // NaN stays NaN
    norm[i] = n;
    inv[i] = r;
    proj[i] = n >= eps ? r * r : 0.f;
  }
}

// grad_i = scale (grad_i - proj_i (grad_i . v_i) v_i) in place: the cosine head's projection on a GEMM output
// (docs/loss.md section 5) with its coefficient formed from the output itself (the fp32 dot of its rounded
// values: lane partial sums merged by a fixed xor-shuffle tree, the same sum on every lane), fp32 update
// and one rounding (to nearest even), so the radial part cancels to the output's rounding. One warp a
// row, as row_norms_kernel; proj_i = 0 (a norm below eps) only scales. scale: one fp32 value on the
// device (an upstream gradient applied in this pass), or null for 1.
template <typename T>
__global__ void project_out_rows_kernel(T* grad, const T* v, int64_t rows, int64_t cols, const float* proj,
                                        const float* scale) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (i >= rows) return;  // whole warps leave together (i is the same for a warp)
  T* g = grad + i * cols;
  const T* w = v + i * cols;
  float dot = 0.f;
  for (int64_t j = lane; j < cols; j += kWarpSize) dot += static_cast<float>(g[j]) * static_cast<float>(w[j]);
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, mask);
  const float p = proj[i];
  const float c = p == 0.f ? 0.f : -p * dot;
  const float s = scale == nullptr ? 1.f : *scale;
  for (int64_t j = lane; j < cols; j += kWarpSize) {
    g[j] = static_cast<T>((static_cast<float>(g[j]) + c * static_cast<float>(w[j])) * s);
  }
}

int forward_threads(int64_t cols) {
  if (cols >= 16384) return kForwardThreadsLarge;
  if (cols >= 2048) return kForwardThreadsMedium;
  return kForwardThreadsSmall;
}

template <typename T>
void launch_forward(const RowForwardArgs& args, cudaStream_t stream) {
  const int threads = forward_threads(args.cols);
  TORCH_CHECK(whole_warps(threads), "fused_margin row_forward (CUDA): block of ", threads,
              " threads is not a whole number of warps (at most ", kMaxWarps, ")");
  row_forward_kernel<T><<<static_cast<unsigned>(args.rows), threads, 0, stream>>>(args);
}

// Column tiles of the backward's grid (the x dimension).
template <typename T>
int64_t backward_col_tiles(int64_t cols) {
  const int64_t packs = cols / Pack<T>::kSize + 1;
  return (packs + kBackwardThreads - 1) / kBackwardThreads;
}

template <typename T, typename Out>
void launch_backward(const RowBackwardArgs& args, int64_t rows_per_block, cudaStream_t stream) {
  const int64_t row_blocks = (args.rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(backward_col_tiles<T>(args.cols)), static_cast<unsigned>(row_blocks));
  if (args.row_dot != nullptr || args.col_partials != nullptr) {
    row_backward_kernel<T, Out, true><<<grid, kBackwardThreads, 0, stream>>>(args, rows_per_block);
  } else {
    row_backward_kernel<T, Out, false><<<grid, kBackwardThreads, 0, stream>>>(args, rows_per_block);
  }
}

}  // namespace cuda_kernels

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> row_forward_cuda(
    const Tensor& raw_in, const Tensor& target_in, const TableList& tables, at::ArrayRef<double> floats,
    at::ArrayRef<int64_t> ints) {
  const c10::cuda::CUDAGuard guard(raw_in.device());
  ForwardCall call = prepare_forward(raw_in, target_in, tables, floats, ints);
  const RowForwardArgs& args = call.args;
  TORCH_CHECK(args.rows <= std::numeric_limits<int32_t>::max(), "fused_margin row_forward: too many rows (",
              args.rows, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (args.rows > 0) {
    switch (args.raw_type) {
      case RawType::Float: cuda_kernels::launch_forward<float>(args, stream); break;
      case RawType::BFloat16: cuda_kernels::launch_forward<c10::BFloat16>(args, stream); break;
      case RawType::Half: cuda_kernels::launch_forward<c10::Half>(args, stream); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  cuda_kernels::reduce_rows_kernel<<<1, 1024, 0, stream>>>(args, call.reduced.mutable_data_ptr<float>(),
                                                           call.denom.mutable_data_ptr<float>(),
                                                           call.reduction == Reduction::Mean);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.outputs();
}

// Rows per block of the backward's grid when the column sums are formed (their partials: kNumColumnStats x C
// floats a block of rows), as the CPU kernels' row blocks.
constexpr int64_t kBackwardRowBlock = 32;

template <typename T>
void launch_backward_typed(const RowBackwardArgs& args, int64_t rows_per_block, cudaStream_t stream) {
  if (args.scale_grad) {
    cuda_kernels::launch_backward<T, T>(args, rows_per_block, stream);
  } else {
    cuda_kernels::launch_backward<T, float>(args, rows_per_block, stream);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> row_backward_cuda(
    const Tensor& raw_in, const Tensor& target_in, const TableList& tables, const Tensor& lse, const Tensor& nll,
    const Tensor& target_grad, const Tensor& grad_rows, const OptTensor& denom, at::ArrayRef<double> floats,
    at::ArrayRef<int64_t> ints, bool scale_grad, const OptTensor& row_proj, const OptTensor& col_proj,
    bool col_stats) {
  const c10::cuda::CUDAGuard guard(raw_in.device());
  BackwardCall call = prepare_backward(raw_in, target_in, tables, lse, nll, target_grad, grad_rows, denom, floats,
                                       ints, scale_grad, row_proj, col_proj, col_stats);
  RowBackwardArgs& args = call.args;
  const int64_t rows = args.rows, cols = args.cols;
  const bool col_sums = call.col_sums;
  if (rows == 0) {
    call.col_coef.zero_();
    call.stats.zero_();
    return call.outputs();
  }
  // sum(w) stays on the device: no host sync; only label smoothing uses it
  if (call.class_weight.defined() && args.label_smoothing != 0.f) {
    call.weight_sum = call.class_weight.sum();
    args.weight_sum_device = call.weight_sum.const_data_ptr<float>();
  }
  // one row a block of the grid, or kBackwardRowBlock with the column sums; more where the grid's y limit
  // (65535 blocks) needs it, so any row count fits
  const int64_t fewest = (rows + 65534) / 65535;
  const int64_t rows_per_block = col_sums ? std::max(kBackwardRowBlock, fewest) : fewest;
  const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;
  int64_t tiles = 0;
  switch (args.raw_type) {
    case RawType::Float: tiles = cuda_kernels::backward_col_tiles<float>(cols); break;
    case RawType::BFloat16: tiles = cuda_kernels::backward_col_tiles<c10::BFloat16>(cols); break;
    case RawType::Half: tiles = cuda_kernels::backward_col_tiles<c10::Half>(cols); break;
  }
  call.allocate_partials(tiles, row_blocks, /*zeroed=*/false);  // every block writes all of its partials

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (args.raw_type) {
    case RawType::Float: launch_backward_typed<float>(args, rows_per_block, stream); break;
    case RawType::BFloat16: launch_backward_typed<c10::BFloat16>(args, rows_per_block, stream); break;
    case RawType::Half: launch_backward_typed<c10::Half>(args, rows_per_block, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (args.row_dot != nullptr || col_sums) {
    const int64_t threads = 256, total = rows + cols;
    cuda_kernels::backward_sums_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0,
                                         stream>>>(
        args, call.row_proj.defined() ? call.row_proj.const_data_ptr<float>() : nullptr,
        call.col_proj.defined() ? call.col_proj.const_data_ptr<float>() : nullptr,
        call.row_proj.defined() ? call.row_coef.mutable_data_ptr<float>() : nullptr,
        call.col_proj.defined() ? call.col_coef.mutable_data_ptr<float>() : nullptr,
        col_stats ? call.stats.mutable_data_ptr<float>() : nullptr, row_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return call.outputs();
}

std::tuple<Tensor, Tensor, Tensor> row_norms_cuda(const Tensor& x_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "fused_margin row_norms: x must be 2-D, got ", x_in.dim(), "-D");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor norm = at::empty({rows}, f32), inv = at::empty({rows}, f32), proj = at::empty({rows}, f32);
  if (rows == 0) return {norm, inv, proj};
  constexpr int kThreads = 256;
  const int64_t warps_per_block = kThreads / cuda_kernels::kWarpSize;
  const unsigned blocks = static_cast<unsigned>((rows + warps_per_block - 1) / warps_per_block);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    cuda_kernels::row_norms_kernel<T><<<blocks, kThreads, 0, stream>>>(
        data, rows, cols, static_cast<float>(eps), norm.mutable_data_ptr<float>(), inv.mutable_data_ptr<float>(),
        proj.mutable_data_ptr<float>());
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(x.const_data_ptr<float>()); break;
    case at::kBFloat16: launch(x.const_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: launch(x.const_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "fused_margin row_norms: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm, inv, proj};
}

void project_out_rows_cuda(const Tensor& grad, const Tensor& v_in, const Tensor& proj_in,
                           const std::optional<Tensor>& scale_in) {
  check_project_out_args(grad, v_in, proj_in, scale_in);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t rows = grad.size(0), cols = grad.size(1);
  if (rows == 0 || cols == 0) return;
  const auto f32 = grad.options().dtype(at::kFloat);
  const Tensor v = v_in.contiguous();
  const Tensor proj = proj_in.to(f32).contiguous();
  const Tensor scale = scale_in.has_value() ? scale_in->to(f32).reshape({}) : Tensor();  // on the device: no sync
  constexpr int kThreads = 256;
  const int64_t warps_per_block = kThreads / cuda_kernels::kWarpSize;
  const unsigned blocks = static_cast<unsigned>((rows + warps_per_block - 1) / warps_per_block);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* data) {
    using T = std::remove_pointer_t<decltype(data)>;
    cuda_kernels::project_out_rows_kernel<T><<<blocks, kThreads, 0, stream>>>(
        data, v.const_data_ptr<T>(), rows, cols, proj.const_data_ptr<float>(),
        scale.defined() ? scale.const_data_ptr<float>() : nullptr);
  };
  switch (grad.scalar_type()) {
    case at::kFloat: launch(grad.mutable_data_ptr<float>()); break;
    case at::kBFloat16: launch(grad.mutable_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: launch(grad.mutable_data_ptr<c10::Half>()); break;
    default:
      TORCH_CHECK(false, "fused_margin project_out_rows_: grad must be float32, bfloat16 or float16, got ",
                  grad.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The memory-lean loss's class-block ops (contract and shared math in class_block.h).
//
// block_partials_: one block of kBlockThreads threads per row. Each thread walks its strided share of the
// chunk's columns with the one-pass forms of class_block.h (argmax adds, the online logsumexp lse_add),
// the block merges the threads' RowPartials in shared memory by a tree of row_partial_merge (the argmax
// rule is order-free: NaN first, larger, then the lower index; the logsumexp merge is class_split.combine's)
// and thread 0 merges the row into the running buffers (merge_row). block_grad: one thread per element,
// grad_element of class_block.h, stored in raw's dtype.
namespace block_kernels {

using block::ChunkTables;
using block::GradArgs;
using block::PartialsArgs;
using block::RowLabel;
using block::RowPartial;

constexpr int kBlockThreads = 256;

template <typename T, typename A>
__device__ __forceinline__ A load_raw(const T* p, int64_t j) {
  return static_cast<A>(static_cast<float>(p[j]));
}
template <>
__device__ __forceinline__ double load_raw<double, double>(const double* p, int64_t j) {
  return p[j];
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads) block_partials_kernel(PartialsArgs<A> a) {
  const ChunkTables<A>& t = a.t;
  const int64_t i = blockIdx.x;
  const RowLabel y = block::row_label(t, i);
  const A row_scale = t.row_scale ? t.row_scale[i] : A(1);
  const T* raw = static_cast<const T*>(t.raw) + i * t.raw_stride;
  RowPartial<A> p = block::row_partial_empty<A>();
  for (int64_t j = threadIdx.x; j < t.width; j += kBlockThreads) {
    const A z = block::base_score(t, load_raw<T, A>(raw, j), row_scale, j);
    block::partial_scores(p, z, j, y, a.track_wrong);
    if (block::non_target(j, y)) {
      block::lse_add(p.lse, block::logit(t, z, i, j), t.class_weight ? t.class_weight[j] : A(1), a.smoothing);
    }
  }
  __shared__ RowPartial<A> parts[kBlockThreads];
  parts[threadIdx.x] = p;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) block::row_partial_merge(parts[threadIdx.x], parts[threadIdx.x + half]);
    __syncthreads();
  }
  if (threadIdx.x == 0) block::merge_row(a, i, y, parts[0]);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlockThreads) block_grad_kernel(GradArgs<A> a) {
  const int64_t i = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kBlockThreads + threadIdx.x;
  if (j >= a.t.width) return;
  const T* raw = static_cast<const T*>(a.t.raw) + i * a.t.raw_stride;
  T* out = static_cast<T*>(a.out) + i * a.out_stride;
  const block::GradRow<A> row = block::grad_row(a, i);
  const A g = block::grad_element(a, row, i, j, load_raw<T, A>(raw, j));
  if constexpr (std::is_same<T, double>::value) {
    out[j] = g;
  } else {
    out[j] = static_cast<T>(static_cast<float>(g));
  }
}

}  // namespace block_kernels

namespace {

void block_partials_cuda(const Tensor& raw_in, int64_t c0, const Tensor& target_in, const Tensor& z_max,
                         const Tensor& z_arg, const Tensor& wrong_max, const Tensor& wrong_arg, const Tensor& z_y,
                         const Tensor& has_y, const Tensor& l_max, const Tensor& l_sum, const Tensor& dev,
                         const Tensor& weight, bool first, double scale, int64_t ignore_index, int64_t col0,
                         const OptTensor& row_scale, const OptTensor& col_scale, const OptTensor& col_shift,
                         const OptTensor& offset, const OptTensor& pair, const OptTensor& class_weight,
                         bool track_wrong, bool smoothing) {
  const c10::cuda::CUDAGuard guard(raw_in.device());
  block::ChunkInputs in(raw_in, target_in, "block_partials_");
  block::dispatch_raw(in.raw, [&](auto raw_tag, auto acc_tag) {
    using T = decltype(raw_tag);
    using A = decltype(acc_tag);
    const block::PartialsArgs<A> a = block::partials_args<A>(
        in, c0, z_max, z_arg, wrong_max, wrong_arg, z_y, has_y, l_max, l_sum, dev, weight, first, scale,
        ignore_index, col0, row_scale, col_scale, col_shift, offset, pair, class_weight, track_wrong, smoothing);
    if (a.t.rows == 0) return;
    TORCH_CHECK(a.t.width > 0, "fused_margin block_partials_: raw must have at least one column");
    TORCH_CHECK(a.t.rows <= std::numeric_limits<int32_t>::max(), "fused_margin block_partials_: too many rows (",
                a.t.rows, ")");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    block_kernels::block_partials_kernel<T, A>
        <<<static_cast<unsigned>(a.t.rows), block_kernels::kBlockThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void block_grad_cuda(const Tensor& raw_in, int64_t c0, const Tensor& target_in, const Tensor& lse,
                     const Tensor& coef, const OptTensor& smooth, const Tensor& target_value, const Tensor& out,
                     double scale, int64_t ignore_index, int64_t col0, const OptTensor& row_scale,
                     const OptTensor& col_scale, const OptTensor& col_shift, const OptTensor& offset,
                     const OptTensor& pair, const OptTensor& class_weight) {
  const c10::cuda::CUDAGuard guard(raw_in.device());
  block::ChunkInputs in(raw_in, target_in, "block_grad");
  block::dispatch_raw(in.raw, [&](auto raw_tag, auto acc_tag) {
    using T = decltype(raw_tag);
    using A = decltype(acc_tag);
    const block::GradArgs<A> a = block::grad_args<A>(in, c0, lse, coef, smooth, target_value, out, scale,
                                                     ignore_index, col0, row_scale, col_scale, col_shift, offset,
                                                     pair, class_weight);
    if (a.t.rows == 0 || a.t.width == 0) return;
    // rows on the grid's x dimension (up to 2^31 - 1), column blocks on y (up to 65535: 16.7M columns a chunk)
    TORCH_CHECK(a.t.rows <= std::numeric_limits<int32_t>::max(), "fused_margin block_grad: too many rows (",
                a.t.rows, ")");
    const int64_t col_blocks = (a.t.width + block_kernels::kBlockThreads - 1) / block_kernels::kBlockThreads;
    TORCH_CHECK(col_blocks <= 65535, "fused_margin block_grad: at most ", 65535 * block_kernels::kBlockThreads,
                " columns a chunk on CUDA, got ", a.t.width);
    const dim3 grid(static_cast<unsigned>(a.t.rows), static_cast<unsigned>(col_blocks));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    block_kernels::block_grad_kernel<T, A><<<grid, block_kernels::kBlockThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace fused_margin

TORCH_LIBRARY_IMPL(fused_margin, CUDA, m) {
  m.impl("row_forward", &fused_margin::row_forward_cuda);
  m.impl("row_backward", &fused_margin::row_backward_cuda);
  m.impl("row_norms", &fused_margin::row_norms_cuda);
  m.impl("project_out_rows_", &fused_margin::project_out_rows_cuda);
  m.impl("block_partials_", &fused_margin::block_partials_cuda);
  m.impl("block_grad", &fused_margin::block_grad_cuda);
}
