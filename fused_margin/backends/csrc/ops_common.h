// Argument checks and table conversions shared by the CPU (fused_margin.cpp) and CUDA
// (fused_margin_cuda.cu) implementations of the fused_margin row ops.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <optional>
#include <string>
#include <tuple>

#include "row_kernel.h"

namespace fused_margin {

using OptTensor = std::optional<at::Tensor>;
// The row ops' tables, in the order of the RowTable slots (options.h): absent ones are None.
using TableList = c10::List<std::optional<at::Tensor>>;

// The class stride of padded B x C buffers: a multiple of 16 elements (fused.py CLASS_ALIGN).
constexpr int64_t kClassAlign = 16;

inline RawType raw_type_of(const at::Tensor& raw) {
  switch (raw.scalar_type()) {
    case at::kFloat: return RawType::Float;
    case at::kBFloat16: return RawType::BFloat16;
    case at::kHalf: return RawType::Half;
    default:
      TORCH_CHECK(false, "fused_margin row kernels: raw must be float32, bfloat16 or float16, got ",
                  raw.scalar_type());
  }
  return RawType::Float;
}

inline void check_raw_and_target(const at::Tensor& raw, const at::Tensor& target) {
  TORCH_CHECK(raw.dim() == 2, "fused_margin row kernels: raw must be 2-D (B x C), got ", raw.dim(), "-D");
  raw_type_of(raw);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == raw.size(0),
              "fused_margin row kernels: target must be 1-D with B = ", raw.size(0), " labels, got shape ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fused_margin row kernels: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == raw.device(), "fused_margin row kernels: target is on ", target.device(),
              " but raw is on ", raw.device());
}

// Whether `code` is one of `table`'s codes.
template <size_t N>
bool known_code(const NamedCode (&table)[N], int64_t code) {
  for (size_t k = 0; k < N; ++k) {
    if (table[k].code == code) return true;
  }
  return false;
}

// `table`'s codes as "0 (name), 1 (name) or 2 (name)", for an error message.
template <size_t N>
std::string list_codes(const NamedCode (&table)[N]) {
  std::string out;
  for (size_t k = 0; k < N; ++k) {
    out += (k == 0 ? "" : (k + 1 == N ? " or " : ", "));
    out += std::to_string(table[k].code) + " (" + (table[k].name ? table[k].name : "None") + ")";
  }
  return out;
}

// The row ops' option vectors (fused_margin/core/options.py), checked (their lengths and codes) and
// unpacked into `o`.
inline void unpack_checked(at::ArrayRef<double> floats, at::ArrayRef<int64_t> ints, KernelOptions& o) {
  TORCH_CHECK(floats.size() == kNumFloatOptions && ints.size() == kNumIntOptions,
              "fused_margin row kernels: the option vectors must hold ", static_cast<int>(kNumFloatOptions),
              " floats and ", static_cast<int>(kNumIntOptions), " ints (options.h), got ", floats.size(), " and ",
              ints.size());
  TORCH_CHECK(known_code(kReductionNames, ints[kReduction]), "fused_margin row kernels: reduction must be ",
              list_codes(kReductionNames), ", got ", ints[kReduction]);
  TORCH_CHECK(known_code(kMarginTypeNames, ints[kMarginType]), "fused_margin row kernels: margin_type must be ",
              list_codes(kMarginTypeNames), ", got ", ints[kMarginType]);
  TORCH_CHECK(known_code(kAngularFoldNames, ints[kFold]), "fused_margin row kernels: fold must be ",
              list_codes(kAngularFoldNames), ", got ", ints[kFold]);
  unpack_options(floats, ints, o);
}

// One table of the row ops' list (the RowTable slot), checked for the list's length.
inline OptTensor table_at(const TableList& tables, int slot) {
  TORCH_CHECK(tables.size() == kNumRowTables, "fused_margin row kernels: tables must list ",
              static_cast<int>(kNumRowTables), " entries (options.h RowTable), got ", tables.size());
  return tables.get(slot);
}

// The float32 contiguous form (the tensor itself when it already is) of an optional table; an
// undefined tensor when absent.
inline at::Tensor float_table(const OptTensor& table, const char* name, at::IntArrayRef shape,
                              const at::Tensor& raw) {
  if (!table.has_value() || !table->defined()) return at::Tensor();
  const at::Tensor& t = *table;
  TORCH_CHECK(t.sizes() == shape, "fused_margin row kernels: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == raw.device(), "fused_margin row kernels: ", name, " is on ", t.device(),
              " but raw is on ", raw.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_margin row kernels: ", name,
              " must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

// What both row ops take, checked: raw and target made contiguous, the optional tables as contiguous
// fp32 (undefined when absent). Shared by the CPU and CUDA implementations.
struct RowInputs {
  at::Tensor raw, target, row_scale, col_scale, col_shift, logit_offset, pair_perturbation, class_weight;
};

inline RowInputs prepare_inputs(const at::Tensor& raw_in, const at::Tensor& target_in, const TableList& tables) {
  check_raw_and_target(raw_in, target_in);
  RowInputs in;
  // row-major with a padded class stride (the fused path's GEMM output) is read in place
  const bool row_major = raw_in.stride(1) == 1 && raw_in.stride(0) >= raw_in.size(1);
  in.raw = row_major ? raw_in : raw_in.contiguous();
  in.target = target_in.contiguous();
  const int64_t rows = in.raw.size(0), cols = in.raw.size(1);
  in.row_scale = float_table(table_at(tables, kRowScaleTable), "row_scale", {rows}, in.raw);
  in.col_scale = float_table(table_at(tables, kColScaleTable), "col_scale", {cols}, in.raw);
  in.col_shift = float_table(table_at(tables, kColShiftTable), "col_shift", {cols}, in.raw);
  in.logit_offset = float_table(table_at(tables, kLogitOffsetTable), "logit_offset", {cols}, in.raw);
  in.pair_perturbation = float_table(table_at(tables, kPairPerturbationTable), "pair_perturbation", {rows, cols},
                                     in.raw);
  in.class_weight = float_table(table_at(tables, kClassWeightTable), "class_weight", {cols}, in.raw);
  return in;
}

// Point the fields RowForwardArgs and RowBackwardArgs share at `in`.
template <typename Args>
void point_at_inputs(const RowInputs& in, Args& args) {
  args.raw = in.raw.const_data_ptr();
  args.raw_type = raw_type_of(in.raw);
  args.rows = in.raw.size(0);
  args.cols = in.raw.size(1);
  args.raw_stride = in.raw.stride(0);
  args.target = in.target.const_data_ptr<int64_t>();
  args.row_scale = ptr_or_null(in.row_scale);
  args.col_scale = ptr_or_null(in.col_scale);
  args.col_shift = ptr_or_null(in.col_shift);
  args.logit_offset = ptr_or_null(in.logit_offset);
  args.pair_perturbation = ptr_or_null(in.pair_perturbation);
  args.class_weight = ptr_or_null(in.class_weight);
}

// One row_forward call: its inputs, the class margins and the outputs, kept alive here while `args`
// points at them.
struct ForwardCall : RowInputs {
  at::Tensor class_margins;
  at::Tensor loss, lse, pred, hard, nll, target_grad;  // loss: per row (the kernels' output)
  at::Tensor reduced, denom;                           // the op's loss (0-d, or `loss` for "none") and denominator
  Reduction reduction = Reduction::None;
  RowForwardArgs args{};

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {reduction == Reduction::None ? loss : reduced, lse, pred, hard, nll, target_grad, denom};
  }
};

inline ForwardCall prepare_forward(const at::Tensor& raw_in, const at::Tensor& target_in, const TableList& tables,
                                   at::ArrayRef<double> floats, at::ArrayRef<int64_t> ints) {
  ForwardCall call;
  static_cast<RowInputs&>(call) = prepare_inputs(raw_in, target_in, tables);
  RowForwardArgs& args = call.args;
  unpack_checked(floats, ints, args);
  call.reduction = args.reduction;
  const at::Tensor& raw = call.raw;
  const int64_t rows = raw.size(0), cols = raw.size(1);
  call.class_margins = float_table(table_at(tables, kClassMarginsTable), "class_margins", {cols}, raw);

  const auto f32 = raw.options().dtype(at::kFloat);
  call.loss = at::empty({rows}, f32);
  call.lse = at::empty({rows}, f32);
  call.pred = at::empty({rows}, raw.options().dtype(at::kLong));
  call.hard = at::empty({rows}, raw.options().dtype(at::kBool));
  call.nll = at::empty({rows}, f32);
  call.target_grad = at::empty({rows}, f32);
  call.reduced = at::empty({}, f32);
  call.denom = at::empty({}, f32);
  TORCH_CHECK(rows == 0 || cols > 0, "fused_margin row_forward: raw must have at least one column");

  point_at_inputs(call, args);
  args.class_margins = ptr_or_null(call.class_margins);
  args.loss = call.loss.mutable_data_ptr<float>();
  args.lse = call.lse.mutable_data_ptr<float>();
  args.pred = call.pred.mutable_data_ptr<int64_t>();
  args.hard = call.hard.mutable_data_ptr<bool>();
  args.nll = call.nll.mutable_data_ptr<float>();
  args.target_grad = call.target_grad.mutable_data_ptr<float>();
  return call;
}

// One row_backward call (see ForwardCall). `args.weight_sum` is C; with class weights and label smoothing
// (the only use of it) the CPU caller sets it to their sum, the CUDA caller points
// `args.weight_sum_device` at it.
struct BackwardCall : RowInputs {
  at::Tensor lse, nll, target_grad, grad_rows, denom, weight_sum, row_proj, col_proj;
  at::Tensor grad, row_coef, col_coef, stats;  // stats: kNumColumnStats x cols when asked for, else empty
  at::Tensor row_dot, col_partials;            // the kernels' partial sums (allocate_partials)
  bool col_sums = false;                       // col_proj or col_stats: the column partials are formed
  RowBackwardArgs args{};

  // The partial-sum buffers of a grid of col_blocks x row_blocks (row_dot when row_proj is given,
  // col_partials when col_sums), zeroed or not, with args pointing at them.
  void allocate_partials(int64_t col_blocks, int64_t row_blocks, bool zeroed) {
    const auto f32 = raw.options().dtype(at::kFloat);
    if (row_proj.defined() && args.rows > 0) {
      row_dot = at::empty({args.rows, col_blocks}, f32);
      args.row_dot = row_dot.mutable_data_ptr<float>();
    }
    if (col_sums) {
      col_partials = zeroed ? at::zeros({row_blocks, kNumColumnStats, args.cols}, f32)
                            : at::empty({row_blocks, kNumColumnStats, args.cols}, f32);
      args.col_partials = col_partials.mutable_data_ptr<float>();
    }
    args.col_blocks = col_blocks;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {grad, row_coef, col_coef, stats};
  }
};

// From inputs already prepared (prepare_inputs, or a ForwardCall's: row_forward_backward's backward reads
// the forward's converted tables instead of converting them again). With in_place (row_forward_backward),
// dL/draw overwrites raw itself, each element after its last read: raw must be the caller's own tensor
// (row-major, so prepare_inputs kept it) and scale_grad set.
inline BackwardCall prepare_backward(const RowInputs& inputs, const at::Tensor& lse, const at::Tensor& nll,
                                     const at::Tensor& target_grad, const at::Tensor& grad_rows,
                                     const OptTensor& denom, at::ArrayRef<double> floats,
                                     at::ArrayRef<int64_t> ints, bool scale_grad, const OptTensor& row_proj,
                                     const OptTensor& col_proj, bool col_stats, bool in_place) {
  BackwardCall call;
  static_cast<RowInputs&>(call) = inputs;
  unpack_checked(floats, ints, call.args);
  const at::Tensor& raw = call.raw;
  const int64_t rows = raw.size(0), cols = raw.size(1);
  call.lse = float_table(lse, "lse", {rows}, raw);
  call.nll = float_table(nll, "nll", {rows}, raw);
  call.target_grad = float_table(target_grad, "target_grad", {rows}, raw);
  const bool shared = grad_rows.dim() == 0;
  call.grad_rows = shared ? float_table(grad_rows, "grad_rows", {}, raw) : float_table(grad_rows, "grad_rows", {rows}, raw);
  call.denom = float_table(denom, "denom", {}, raw);
  call.row_proj = float_table(row_proj, "row_proj", {rows}, raw);
  call.col_proj = float_table(col_proj, "col_proj", {cols}, raw);
  // a padded raw (the fused path's GEMM output) gets a padded gradient: its rows stay aligned for the
  // backward GEMMs and vector stores (fused.py grad_row_stride says the same for the fake kernels)
  int64_t grad_stride = (raw.stride(0) == cols || cols % kClassAlign == 0)
                            ? cols
                            : (cols + kClassAlign - 1) / kClassAlign * kClassAlign;
  if (in_place) {
    TORCH_CHECK(scale_grad, "fused_margin row kernels: an in-place gradient needs scale_grad");
    call.grad = raw;
    grad_stride = raw.stride(0);
  } else {
    call.grad = at::empty({rows, grad_stride}, raw.options().dtype(scale_grad ? raw.scalar_type() : at::kFloat))
                    .narrow(1, 0, cols);
  }
  const auto f32 = raw.options().dtype(at::kFloat);
  call.row_coef = at::empty({call.row_proj.defined() ? rows : 0}, f32);
  call.col_coef = at::empty({call.col_proj.defined() ? cols : 0}, f32);
  call.stats = col_stats ? at::empty({kNumColumnStats, cols}, f32) : at::empty({0}, f32);
  call.col_sums = (call.col_proj.defined() || col_stats) && cols > 0;

  RowBackwardArgs& args = call.args;
  point_at_inputs(call, args);
  args.lse = call.lse.const_data_ptr<float>();
  args.nll = call.nll.const_data_ptr<float>();
  args.target_grad = call.target_grad.const_data_ptr<float>();
  args.grad_rows = call.grad_rows.const_data_ptr<float>();
  args.grad_rows_shared = shared;
  args.denom = ptr_or_null(call.denom);
  args.weight_sum = static_cast<float>(cols);
  args.weight_sum_device = nullptr;
  args.scale_grad = scale_grad;
  args.grad = call.grad.mutable_data_ptr();
  args.grad_stride = grad_stride;
  args.row_dot = nullptr;
  args.col_partials = nullptr;
  args.col_blocks = args.col_block_width = args.row_block = 1;
  args.col_sum_grad = col_stats;
  return call;
}

inline BackwardCall prepare_backward(const at::Tensor& raw_in, const at::Tensor& target_in, const TableList& tables,
                                     const at::Tensor& lse, const at::Tensor& nll, const at::Tensor& target_grad,
                                     const at::Tensor& grad_rows, const OptTensor& denom, at::ArrayRef<double> floats,
                                     at::ArrayRef<int64_t> ints, bool scale_grad, const OptTensor& row_proj,
                                     const OptTensor& col_proj, bool col_stats) {
  return prepare_backward(prepare_inputs(raw_in, target_in, tables), lse, nll, target_grad, grad_rows, denom, floats,
                          ints, scale_grad, row_proj, col_proj, col_stats, /*in_place=*/false);
}

// project_out_rows_(grad, v, proj, scale): grad 2-D and contiguous (written in place), v of its shape and
// dtype, proj one value a row, scale absent or one value.
inline void check_project_out_args(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& proj,
                                   const OptTensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && v.sizes() == grad.sizes(), "fused_margin project_out_rows_: grad and v must be "
              "2-D of one shape, got ", grad.sizes(), " and ", v.sizes());
  TORCH_CHECK(v.scalar_type() == grad.scalar_type(), "fused_margin project_out_rows_: v must have grad's dtype ",
              grad.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "fused_margin project_out_rows_: grad must be contiguous");
  TORCH_CHECK(proj.dim() == 1 && proj.size(0) == grad.size(0), "fused_margin project_out_rows_: proj must have ",
              grad.size(0), " entries, got shape ", proj.sizes());
  TORCH_CHECK(!scale.has_value() || scale->numel() == 1, "fused_margin project_out_rows_: scale must hold one ",
              "value, got shape ", scale.has_value() ? scale->sizes() : at::IntArrayRef{});
  // on grad's device, as the row ops' tables (on the CPU, v would be read through a host pointer and proj and
  // scale copied over with a host sync)
  TORCH_CHECK(v.device() == grad.device(), "fused_margin project_out_rows_: v is on ", v.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(proj.device() == grad.device(), "fused_margin project_out_rows_: proj is on ", proj.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(!scale.has_value() || scale->device() == grad.device(), "fused_margin project_out_rows_: scale is on ",
              scale.has_value() ? scale->device() : grad.device(), " but grad is on ", grad.device());
}

}  // namespace fused_margin
