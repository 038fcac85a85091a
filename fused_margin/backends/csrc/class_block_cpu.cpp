// The CPU implementation of the class-block ops of the memory-lean loss (block_partials_, block_grad;
// the contract and the shared math in class_block.h). Rows are split over at::parallel_for; each row of
// the chunk is worked in a few passes over L1-resident buffers of its scores and logits, loops simple
// enough for the compiler to vectorise (the row maxima as lane maxima, then the first index reaching
// them, as torch.argmax; NaN rows rescanned), and the exponentials of fp32 rows by exp_lanes below.
// All math in fp32 (raw in fp32, bf16, fp16) or fp64 (raw in fp64).
//
// GCC keeps a loop with a floating-point select (the clamps, the lane maxima) scalar under its default
// -ftrapping-math (a compare may raise an FP exception flag); nothing here reads those flags, so this
// file is compiled without it. The values are unchanged: no contraction (-ffp-contract=off), no
// reassociation; the lane sums are written out as such.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/Version.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "class_block.h"

namespace fused_margin {
namespace block {
namespace {

constexpr int kLanes = 8;

// The row loops are compiled once per instruction set (RowLoops below: the same loops under GCC target
// attributes, in namespaces named after the instruction set), and the widest one torch itself uses on
// this machine is called (at::get_cpu_capability(): ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides
// it, as for the row kernels). Every other function of this file stays baseline x86-64: the helpers
// the loops call are forced inline, so each variant holds its own copy of them and no out-of-line
// helper is compiled wide (tests/test_cpu_isa.py checks the built library).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FM_BLOCK_HAVE_ISA 1
#define FM_TARGET_AVX512 __attribute__((target("avx512f")))
#define FM_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define FM_BLOCK_HAVE_ISA 0
#endif
#define FM_HOT inline __attribute__((always_inline))

// exp(x) in fp32 for the CPU loops, branch-free so that the loops over a row vectorise: x = n ln2 + r
// (n the nearest integer to x / ln2, ln2 split in two so n ln2 is exact, |r| <= ln2 / 2), e^r by its
// degree-7 Taylor polynomial (truncation below 6e-9 relative), 2^n applied as two powers of two so
// subnormal results are exact. Within 2 ulp of exp; exp(-inf) = 0, exp(+inf) = inf, exp(NaN) = NaN.
FM_HOT float exp_lanes(float x) {
  float xc = x < -105.f ? -105.f : x;  // NaN passes both clamps
  xc = xc > 89.f ? 89.f : xc;
  const float t = xc * 1.44269504088896341f;
  float n = (t + 12582912.f) - 12582912.f;  // round to nearest (|t| < 2^22)
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  n = n == n ? n : 0.f;  // NaN x: p is NaN already; keep the integer conversion defined
  const int32_t k = static_cast<int32_t>(n);
  const int32_t k1 = k >> 1, k2 = k - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  return p * s1 * s2;
}

FM_HOT double exp_lanes(double x) { return std::exp(x); }

// out[j] = exp(in[j] - shift)
template <typename A>
FM_HOT void exp_shifted(const A* __restrict__ in, A shift, A* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = exp_lanes(in[j] - shift);
}

// sum_j exp(in[j] - shift), in kLanes partial sums
template <typename A>
FM_HOT A exp_shifted_sum(const A* __restrict__ in, A shift, int64_t n) {
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) lanes[u] = lanes[u] + exp_lanes(in[j + u] - shift);
  }
  A sum = A(0);
  for (int u = 0; u < kLanes; ++u) sum = sum + lanes[u];
  for (; j < n; ++j) sum = sum + exp_lanes(in[j] - shift);
  return sum;
}

// Whether v[0, n) holds a NaN (the rare path: a lane loop below saw a NaN or an infinity).
template <typename A>
FM_HOT bool has_nan(const A* v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (nan(v[j])) return true;
  }
  return false;
}

// The end of a lane max over v[0, n): the lanes merged, the tail [j, n) added; any_nan from a rescan
// only where a lane's poison (or the tail) saw a NaN or an infinity. Lanes, Poison: arrays or vectors of
// `count` lanes.
template <typename A, typename Lanes, typename Poison>
FM_HOT A finish_max(const A* v, int64_t n, int64_t j, const Lanes& lanes, const Poison& poison, int count,
                    bool& any_nan) {
  A best = -infinity<A>();
  bool suspect = false;
  for (int u = 0; u < count; ++u) {
    best = lanes[u] > best ? lanes[u] : best;
    suspect = suspect || nan(poison[u]);
  }
  for (int64_t k = j; k < n; ++k) {
    best = v[k] > best ? v[k] : best;
    suspect = suspect || nan(v[k]);
  }
  any_nan = suspect && has_nan(v, n);
  return best;
}

// (max, any NaN) of v[0, n): lane maxima ((a > b) ? a : b is the vector max instruction). NaNs are
// found through poison[u] += x * 0, NaN once a lane saw a NaN or an infinity (a float add, so the loop
// vectorises, where a per-lane flag would not); only then is the row rescanned for a NaN.
template <typename A>
FM_HOT A lane_max(const A* __restrict__ v, int64_t n, bool& any_nan) {
  A lanes[kLanes], poison[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    lanes[u] = -infinity<A>();
    poison[u] = A(0);
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const A x = v[j + u];
      lanes[u] = x > lanes[u] ? x : lanes[u];
      poison[u] = poison[u] + x * A(0);
    }
  }
  return finish_max<A>(v, n, j, lanes, poison, kLanes, any_nan);
}

// The end of a lane argmax over v[0, n): the lanes' (value, first index) merged, ties to the lower
// index; the tail [j, n) added; where a lane's poison (or the tail) saw a NaN or an infinity, the row
// rescanned for its first NaN. Lanes, Index, Poison: arrays or vectors of `count` lanes.
template <typename A, typename Lanes, typename Index, typename Poison>
FM_HOT Argmax<A> finish_argmax(const A* v, int64_t n, int64_t j, const Lanes& lanes, const Index& index,
                               const Poison& poison, int count) {
  A best = -infinity<A>();
  int64_t best_index = -1;
  bool suspect = false;
  for (int u = 0; u < count; ++u) {
    suspect = suspect || nan(poison[u]);
    if (index[u] >= 0 && (lanes[u] > best || (lanes[u] == best && (best_index < 0 || index[u] < best_index)))) {
      best = lanes[u];
      best_index = index[u];
    }
  }
  for (int64_t k = j; k < n; ++k) {
    suspect = suspect || nan(v[k]);
    if (v[k] > best) {
      best = v[k];
      best_index = k;
    }
  }
  if (suspect) {
    for (int64_t k = 0; k < n; ++k) {
      if (nan(v[k])) return {v[k], k};
    }
  }
  if (best_index < 0) return {v[0], 0};  // every value -inf
  return {best, best_index};
}

// torch.argmax of v[0, n) (n >= 1, n < 2^31): the first NaN, else the first index of the max. One pass
// of lane maxima that keep their first index (a strict > per lane), then the lanes merged, ties to the
// lower index; a row holding a NaN (poison as in lane_max) is rescanned for its first NaN.
template <typename A>
FM_HOT Argmax<A> first_argmax(const A* __restrict__ v, int64_t n) {
  A lanes[kLanes], poison[kLanes];
  int32_t index[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    lanes[u] = -infinity<A>();
    poison[u] = A(0);
    index[u] = -1;
  }
  int32_t j = 0;
  const int32_t m = static_cast<int32_t>(n);
  for (; j + kLanes <= m; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const A x = v[j + u];
      const bool better = x > lanes[u];
      lanes[u] = better ? x : lanes[u];
      index[u] = better ? j + u : index[u];
      poison[u] = poison[u] + x * A(0);
    }
  }
  return finish_argmax<A>(v, n, j, lanes, index, poison, kLanes);
}

// ---- fp32 rows in explicit 16-lane vectors (GCC vector extensions). The generic loops above stay
// for fp64 and serve the tails; GCC vectorises a select that carries state across iterations (the lane
// maxima, their indices) only when written this way, and a 64-byte vector type is one AVX-512
// register in the avx512f clone, two in the avx2 one, four SSE registers in the default one. Every
// lane computes what exp_lanes / the scalar loops compute (same operations, same order): only the
// order of the final lane sums differs.
typedef float VecF __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
constexpr int kVec = 16;

FM_HOT VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FM_HOT void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
FM_HOT VecF splat(float x) { return VecF{} + x; }

// exp_lanes of each lane
FM_HOT VecF exp_vec(VecF x) {
  VecF xc = x < splat(-105.f) ? splat(-105.f) : x;  // NaN passes both clamps
  xc = xc > splat(89.f) ? splat(89.f) : xc;
  const VecF t = xc * 1.44269504088896341f;
  VecF n = (t + 12582912.f) - 12582912.f;
  VecF r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  VecF q = splat(1.f / 5040.f);
  q = q * r + 1.f / 720.f;
  q = q * r + 1.f / 120.f;
  q = q * r + 1.f / 24.f;
  q = q * r + 1.f / 6.f;
  q = q * r + 0.5f;
  q = q * r + 1.f;
  q = q * r + 1.f;
  n = n == n ? n : splat(0.f);
  const VecI k = __builtin_convertvector(n, VecI);
  const VecI k1 = k >> 1, k2 = k - k1;
  const VecI b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  VecF s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  return q * s1 * s2;
}

FM_HOT void exp_shifted(const float* __restrict__ in, float shift, float* __restrict__ out, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) store_vec(out + j, exp_vec(load_vec(in + j) - shift));
  for (; j < n; ++j) out[j] = exp_lanes(in[j] - shift);
}

FM_HOT float exp_shifted_sum(const float* __restrict__ in, float shift, int64_t n) {
  VecF acc = splat(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = acc + exp_vec(load_vec(in + j) - shift);
  float sum = 0.f;
  for (int u = 0; u < kVec; ++u) sum = sum + acc[u];
  for (; j < n; ++j) sum = sum + exp_lanes(in[j] - shift);
  return sum;
}

FM_HOT float lane_max(const float* __restrict__ v, int64_t n, bool& any_nan) {
  VecF lanes = splat(-infinity<float>()), poison = splat(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const VecF x = load_vec(v + j);
    lanes = x > lanes ? x : lanes;
    poison = poison + x * 0.f;
  }
  return finish_max<float>(v, n, j, lanes, poison, kVec, any_nan);
}

FM_HOT Argmax<float> first_argmax(const float* __restrict__ v, int64_t n) {
  VecF lanes = splat(-infinity<float>()), poison = splat(0.f);
  VecI index = VecI{} - 1, at = VecI{};
  for (int u = 0; u < kVec; ++u) at[u] = u;
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const VecF x = load_vec(v + j);
    const VecI better = x > lanes;
    lanes = better ? x : lanes;
    index = better ? at : index;
    poison = poison + x * 0.f;
    at = at + kVec;
  }
  return finish_argmax<float>(v, n, j, lanes, index, poison, kVec);
}

template <typename T, typename A>
FM_HOT A load(const T* p, int64_t j) {
  return static_cast<A>(static_cast<float>(p[j]));
}
template <>
FM_HOT double load<double, double>(const double* p, int64_t j) {
  return p[j];
}

// z[j] = z'_ij and l[j] = l_ij of row i, columns [0, n)
template <typename T, typename A>
FM_HOT void row_scores(const ChunkTables<A>& t, const T* __restrict__ raw, A row_scale, int64_t i, A* __restrict__ z,
                A* __restrict__ l) {
  const int64_t n = t.width;
  for (int64_t j = 0; j < n; ++j) z[j] = base_score(t, load<T, A>(raw, j), row_scale, j);
  for (int64_t j = 0; j < n; ++j) l[j] = logit(t, z[j], i, j);
}

// Rows [begin, end) of block_partials_.
template <typename T, typename A>
FM_HOT void partials_rows(const PartialsArgs<A>& a, int64_t begin, int64_t end) {
  const ChunkTables<A>& t = a.t;
  const int64_t n = t.width;
  std::vector<A> z_buf(n), l_buf(n);
  A* z = z_buf.data();
  A* l = l_buf.data();
  for (int64_t i = begin; i < end; ++i) {
    const T* raw = static_cast<const T*>(t.raw) + i * t.raw_stride;
    const RowLabel y = row_label(t, i);
    const bool has_y = y.local_y >= 0 && y.local_y < n;
    const A row_scale = t.row_scale ? t.row_scale[i] : A(1);
    row_scores<T, A>(t, raw, row_scale, i, z, l);

    RowPartial<A> p = row_partial_empty<A>();
    p.best = first_argmax(z, n);
    if (has_y) {
      p.z_y = z[y.local_y];
      p.holds_y = true;
    }
    if (a.track_wrong) {
      if (!has_y || p.best.index != y.local_y) {
        p.wrong = p.best;  // the first argmax is off the label: it is the argmax off the label too
      } else {
        const A saved = z[y.local_y];
        z[y.local_y] = -infinity<A>();
        p.wrong = first_argmax(z, n);
        z[y.local_y] = saved;
      }
    }

    // the online logsumexp of the non-target logits: the max, then one sum
    const int64_t skip = (has_y && y.kept) ? y.local_y : -1;
    if (skip >= 0) l[skip] = -infinity<A>();
    bool any_nan = false;
    A l_max = lane_max(l, n, any_nan);
    if (any_nan) l_max = std::numeric_limits<A>::quiet_NaN();
    const A shift = lse_shift(l_max);
    Lse<A> s{l_max, any_nan ? l_max : exp_shifted_sum(l, shift, n), A(0), A(0)};
    if (a.smoothing) {
      A dev = A(0), weight = A(0);
      for (int64_t j = 0; j < n; ++j) {
        if (j == skip) continue;
        const A w = t.class_weight ? t.class_weight[j] : A(1);
        if (!nan(l[j])) dev = dev + w * (shift - l[j]);
        weight = weight + w;
      }
      s.dev = dev;
      s.weight = weight;
    }
    p.lse = s;
    merge_row(a, i, y, p);
  }
}

template <typename T>
inline void store(T* p, int64_t j, float v) {
  p[j] = static_cast<T>(v);
}
inline void store(double* p, int64_t j, double v) { p[j] = v; }

// Rows [begin, end) of block_grad.
template <typename T, typename A>
FM_HOT void grad_rows(const GradArgs<A>& a, int64_t begin, int64_t end) {
  const ChunkTables<A>& t = a.t;
  const int64_t n = t.width;
  std::vector<A> z_buf(n), l_buf(n);
  A* z = z_buf.data();
  A* l = l_buf.data();
  for (int64_t i = begin; i < end; ++i) {
    const T* raw = static_cast<const T*>(t.raw) + i * t.raw_stride;
    T* out = static_cast<T*>(a.out) + i * a.out_stride;
    const GradRow<A> row = grad_row(a, i);
    row_scores<T, A>(t, raw, row.row_scale, i, z, l);
    exp_shifted(l, row.lse, z, n);  // z now holds p = exp(l - lse)
    for (int64_t j = 0; j < n; ++j) l[j] = grad_raw(a, row, j, grad_off_target(a, row, j, z[j]));
    if (row.y.kept && row.y.local_y >= 0 && row.y.local_y < n) {
      l[row.y.local_y] = grad_raw(a, row, row.y.local_y, row.target_value);
    }
    for (int64_t j = 0; j < n; ++j) store(out, j, l[j]);
  }
}

// The row loops of each (raw, accumulation) type pair, once per instruction set.
enum class BlockIsa { Default, Avx2, Avx512 };

BlockIsa block_isa() {
  static const BlockIsa isa = [] {
#if FM_BLOCK_HAVE_ISA
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f")) return BlockIsa::Avx512;
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2")) return BlockIsa::Avx2;
#endif
    return BlockIsa::Default;
  }();
  return isa;
}

#define FM_BLOCK_LOOP_PAIR(ATTR, T, A, SUFFIX)                                                        \
  ATTR void partials_rows_##SUFFIX(const PartialsArgs<A>& a, int64_t begin, int64_t end) {             \
    partials_rows<T, A>(a, begin, end);                                                              \
  }                                                                                                  \
  ATTR void grad_rows_##SUFFIX(const GradArgs<A>& a, int64_t begin, int64_t end) { grad_rows<T, A>(a, begin, end); }

#define FM_BLOCK_LOOPS_OF_ISA(ATTR)                    \
  FM_BLOCK_LOOP_PAIR(ATTR, float, float, f32)          \
  FM_BLOCK_LOOP_PAIR(ATTR, double, double, f64)        \
  FM_BLOCK_LOOP_PAIR(ATTR, c10::BFloat16, float, bf16) \
  FM_BLOCK_LOOP_PAIR(ATTR, c10::Half, float, f16)

namespace DEFAULT {
FM_BLOCK_LOOPS_OF_ISA()
}  // namespace DEFAULT
#if FM_BLOCK_HAVE_ISA
namespace AVX2 {
FM_BLOCK_LOOPS_OF_ISA(FM_TARGET_AVX2)
}  // namespace AVX2
namespace AVX512 {
FM_BLOCK_LOOPS_OF_ISA(FM_TARGET_AVX512)
}  // namespace AVX512
#define FM_BLOCK_PICK(NAME, ...)                                   \
  switch (block_isa()) {                                           \
    case BlockIsa::Avx512: return AVX512::NAME(__VA_ARGS__);       \
    case BlockIsa::Avx2: return AVX2::NAME(__VA_ARGS__);           \
    default: return DEFAULT::NAME(__VA_ARGS__);                    \
  }
#else
#define FM_BLOCK_PICK(NAME, ...) return DEFAULT::NAME(__VA_ARGS__);
#endif

template <typename T, typename A>
struct RowLoops;

#define FM_BLOCK_ROW_LOOPS(T, A, SUFFIX)                                                       \
  template <>                                                                                  \
  struct RowLoops<T, A> {                                                                      \
    static void partials(const PartialsArgs<A>& a, int64_t b, int64_t e) {                     \
      FM_BLOCK_PICK(partials_rows_##SUFFIX, a, b, e)                                           \
    }                                                                                          \
    static void grad(const GradArgs<A>& a, int64_t b, int64_t e) { FM_BLOCK_PICK(grad_rows_##SUFFIX, a, b, e) } \
  };

FM_BLOCK_ROW_LOOPS(float, float, f32)
FM_BLOCK_ROW_LOOPS(double, double, f64)
FM_BLOCK_ROW_LOOPS(c10::BFloat16, float, bf16)
FM_BLOCK_ROW_LOOPS(c10::Half, float, f16)

// Rows per task so that a task covers at least ~32K elements.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

}  // namespace

const char* class_block_isa() {
  switch (block_isa()) {
    case BlockIsa::Avx512: return "AVX512";
    case BlockIsa::Avx2: return "AVX2";
    default: return "DEFAULT";
  }
}

void block_partials_cpu(const at::Tensor& raw_in, int64_t c0, const at::Tensor& target_in, const at::Tensor& z_max,
                        const at::Tensor& z_arg, const at::Tensor& wrong_max, const at::Tensor& wrong_arg,
                        const at::Tensor& z_y, const at::Tensor& has_y, const at::Tensor& l_max,
                        const at::Tensor& l_sum, const at::Tensor& dev, const at::Tensor& weight, bool first,
                        double scale, int64_t ignore_index, int64_t col0, const OptionalTensor& row_scale,
                        const OptionalTensor& col_scale, const OptionalTensor& col_shift,
                        const OptionalTensor& offset, const OptionalTensor& pair,
                        const OptionalTensor& class_weight, bool track_wrong, bool smoothing) {
  ChunkInputs in(raw_in, target_in, "block_partials_");
  dispatch_raw(in.raw, [&](auto raw_tag, auto acc_tag) {
    using T = decltype(raw_tag);
    using A = decltype(acc_tag);
    const PartialsArgs<A> a = partials_args<A>(in, c0, z_max, z_arg, wrong_max, wrong_arg, z_y, has_y, l_max, l_sum,
                                               dev, weight, first, scale, ignore_index, col0, row_scale, col_scale,
                                               col_shift, offset, pair, class_weight, track_wrong, smoothing);
    if (a.t.rows == 0) return;
    TORCH_CHECK(a.t.width > 0, "fused_margin block_partials_: raw must have at least one column");
    TORCH_CHECK(a.t.width < (int64_t(1) << 31), "fused_margin block_partials_: at most 2^31 - 1 columns a chunk, got ", a.t.width);
    at::parallel_for(0, a.t.rows, grain(a.t.width),
                     [&](int64_t begin, int64_t end) { RowLoops<T, A>::partials(a, begin, end); });
  });
}

void block_grad_cpu(const at::Tensor& raw_in, int64_t c0, const at::Tensor& target_in, const at::Tensor& lse,
                    const at::Tensor& coef, const OptionalTensor& smooth, const at::Tensor& target_value,
                    const at::Tensor& out, double scale, int64_t ignore_index, int64_t col0,
                    const OptionalTensor& row_scale, const OptionalTensor& col_scale,
                    const OptionalTensor& col_shift, const OptionalTensor& offset, const OptionalTensor& pair,
                    const OptionalTensor& class_weight) {
  ChunkInputs in(raw_in, target_in, "block_grad");
  dispatch_raw(in.raw, [&](auto raw_tag, auto acc_tag) {
    using T = decltype(raw_tag);
    using A = decltype(acc_tag);
    const GradArgs<A> a = grad_args<A>(in, c0, lse, coef, smooth, target_value, out, scale, ignore_index, col0,
                                       row_scale, col_scale, col_shift, offset, pair, class_weight);
    if (a.t.rows == 0 || a.t.width == 0) return;
    at::parallel_for(0, a.t.rows, grain(a.t.width),
                     [&](int64_t begin, int64_t end) { RowLoops<T, A>::grad(a, begin, end); });
  });
}

}  // namespace block
}  // namespace fused_margin
