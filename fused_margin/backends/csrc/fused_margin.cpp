// The fused_margin C++ extension: the row ops of the fused margin loss (the contract of
// fused_margin/paths/fused.py, stated eagerly in tests/helpers/row_torch.py), their schema, and their CPU
// implementation. The CUDA implementation is in fused_margin_cuda.cu (built when CUDA is present);
// the fake (meta) kernels that torch.compile traces are registered in Python by fused_margin/backends/extension.py.
//
//   row_forward  -> (loss_rows, lse, pred, hard, nll, target_grad)
//   row_backward -> G = dL/dz' (fp32), or dL/draw in raw's dtype with scale_grad
//
// The loss is docs/loss.md's: DBM (AAAI'25) instance margins, LDAM (Cao et al. 2019), ELM (Kato & Hotta),
// ArcFace/CosFace margins, logit offsets (balanced softmax, logit adjustment), MetaLAD pair
// perturbations, class weights and label smoothing as F.cross_entropy.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "class_block.h"
#include "ops_common.h"
#include "row_kernel.h"

namespace fused_margin {
namespace {

using at::Tensor;

// Labels of kept rows must index a class: an out-of-range label would read outside the row.
void check_labels(const Tensor& target, int64_t cols, int64_t ignore_index) {
  const int64_t* labels = target.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    const int64_t y = labels[i];
    // a ValueError with the message of the Python check (fused_margin/functional.py _check_labels), which
    // the cpu backend leaves to this one
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < cols), "target[", i, "] = ", y,
                      " is out of range: labels must be in [0, ", cols, ") or equal ignore_index (",
                      ignore_index, ")");
  }
}

// ---------------------------------------------------------------------------------------------
// CPU: pick the kernels of the widest instruction set torch itself uses on this machine
// (torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it).

struct CpuKernels {
  cpu::RowForwardFn forward;
  cpu::RowBackwardFn backward;
  cpu::RowForwardBackwardFn forward_backward;
  cpu::RowNormsFn norms;
  cpu::ProjectFn project;
  const char* name;
};

CpuKernels select_cpu_kernels() {
#if defined(FUSED_MARGIN_HAVE_ISA_KERNELS)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512" && cpu::AVX512::vector_width() > 0) {
    return {cpu::AVX512::row_forward, cpu::AVX512::row_backward, cpu::AVX512::row_forward_backward,
            cpu::AVX512::row_norms, cpu::AVX512::project_rows, "AVX512"};
  }
  if ((capability == "AVX512" || capability == "AVX2") && cpu::AVX2::vector_width() > 0) {
    return {cpu::AVX2::row_forward, cpu::AVX2::row_backward, cpu::AVX2::row_forward_backward,
            cpu::AVX2::row_norms, cpu::AVX2::project_rows, "AVX2"};
  }
#endif
  return {cpu::DEFAULT::row_forward, cpu::DEFAULT::row_backward, cpu::DEFAULT::row_forward_backward,
          cpu::DEFAULT::row_norms, cpu::DEFAULT::project_rows, "DEFAULT"};
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels kernels = select_cpu_kernels();
  return kernels;
}

// Rows per task so that a task touches at least ~32K elements (small problems stay on one thread).
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// The op's loss from the rows' (call.loss): their sum, or their mean over the kept rows' weights (their count
// without class weights; 0 / 0 = NaN as F.cross_entropy), summed in double in row order; and that
// denominator (written for every reduction).
// The mean's denominator: the kept rows' weights (their count without class weights), summed in double in
// row order. The labels must have been checked.
float loss_denominator(const RowForwardArgs& a) {
  double denom = 0.0;
  for (int64_t i = 0; i < a.rows; ++i) {
    const int64_t y = a.target[i];
    if (y != a.ignore_index) denom += a.class_weight ? a.class_weight[y] : 1.f;
  }
  return static_cast<float>(denom);
}

void reduce_loss_cpu(ForwardCall& call) {
  const RowForwardArgs& a = call.args;
  double total = 0.0;
  for (int64_t i = 0; i < a.rows; ++i) total += a.loss[i];
  const float d = loss_denominator(a);
  *call.denom.mutable_data_ptr<float>() = d;
  const float sum = static_cast<float>(total);
  *call.reduced.mutable_data_ptr<float>() =
      call.reduction == Reduction::Mean ? (d != 0.f ? sum / d : std::nanf("")) : sum;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> row_forward_cpu(
    const Tensor& raw_in, const Tensor& target_in, const TableList& tables, at::ArrayRef<double> floats,
    at::ArrayRef<int64_t> ints) {
  ForwardCall call = prepare_forward(raw_in, target_in, tables, floats, ints);
  const RowForwardArgs& args = call.args;
  check_labels(call.target, args.cols, args.ignore_index);
  if (args.rows > 0) {
    const cpu::RowForwardFn forward = cpu_kernels().forward;
    at::parallel_for(0, args.rows, row_grain(args.cols),
                     [&](int64_t begin, int64_t end) { forward(args, begin, end); });
  }
  reduce_loss_cpu(call);
  return call.outputs();
}

// Columns per backward task: rows are split too so that a few long rows still use every thread.
constexpr int64_t kBackwardColumnBlock = 4096;
// Rows per row block of the backward's column partials (their memory: kNumColumnStats x C floats a block).
constexpr int64_t kBackwardRowBlock = 32;

// sum(w) as row_torch: torch's fp32 sum of the weights (C without weights, prepare_backward's default);
// only label smoothing uses it
void set_weight_sum_cpu(BackwardCall& call) {
  if (call.class_weight.defined() && call.args.label_smoothing != 0.f) {
    call.args.weight_sum = call.class_weight.sum().item<float>();
  }
}

// row_coef_i = -row_proj_i row_scale_i sum_j G_ij col_scale_j raw_ij from the kernels' row dots, and the
// column sums over the row blocks' partials (col_coef, stats), in a fixed order.
void finish_backward_sums(BackwardCall& call, int64_t row_blocks, bool col_stats) {
  const RowBackwardArgs& args = call.args;
  if (call.row_proj.defined() && args.rows > 0) {
    const float* proj = call.row_proj.const_data_ptr<float>();
    float* coef = call.row_coef.mutable_data_ptr<float>();
    for (int64_t i = 0; i < args.rows; ++i) coef[i] = finish_row_coef(args, i, proj);
  }
  if (call.col_sums) {
    const float* proj = call.col_proj.defined() ? call.col_proj.const_data_ptr<float>() : nullptr;
    float* coef = proj ? call.col_coef.mutable_data_ptr<float>() : nullptr;
    float* stats = col_stats ? call.stats.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, args.cols, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) finish_column(args, j, row_blocks, proj, coef, stats);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> row_backward_cpu(
    const Tensor& raw_in, const Tensor& target_in, const TableList& tables, const Tensor& lse, const Tensor& nll,
    const Tensor& target_grad, const Tensor& grad_rows, const OptTensor& denom, at::ArrayRef<double> floats,
    at::ArrayRef<int64_t> ints, bool scale_grad, const OptTensor& row_proj, const OptTensor& col_proj,
    bool col_stats) {
  BackwardCall call = prepare_backward(raw_in, target_in, tables, lse, nll, target_grad, grad_rows, denom, floats,
                                       ints, scale_grad, row_proj, col_proj, col_stats);
  RowBackwardArgs& args = call.args;
  const int64_t rows = args.rows, cols = args.cols;
  check_labels(call.target, cols, args.ignore_index);
  set_weight_sum_cpu(call);
  const bool col_sums = call.col_sums;
  const int64_t blocks = std::max<int64_t>(1, (cols + kBackwardColumnBlock - 1) / kBackwardColumnBlock);
  const int64_t block_cols = std::min(cols, kBackwardColumnBlock);
  // one row a task, or kBackwardRowBlock when the column sums are formed (each row block's partials are
  // summed in a fixed order below: the result does not depend on the thread count)
  const int64_t task_rows = col_sums ? kBackwardRowBlock : 1;
  const int64_t row_blocks = (rows + task_rows - 1) / task_rows;
  call.allocate_partials(blocks, row_blocks, /*zeroed=*/true);  // ignored rows and blocks add nothing
  args.col_block_width = kBackwardColumnBlock;
  args.row_block = task_rows;

  if (call.grad.numel() > 0) {
    const cpu::RowBackwardFn backward = cpu_kernels().backward;
    const int64_t grain = std::max<int64_t>(1, 32768 / (block_cols * task_rows));
    at::parallel_for(0, row_blocks * blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / blocks, block = task % blocks;
        const int64_t r0 = rb * task_rows, c0 = block * kBackwardColumnBlock;
        backward(args, r0, std::min(rows, r0 + task_rows), c0, std::min(cols, c0 + kBackwardColumnBlock));
      }
    });
  }
  finish_backward_sums(call, row_blocks, col_stats);
  return call.outputs();
}

// The forward and, on each row right after its forward (the row still in cache), dL/draw written over raw in
// place and the sums of row_backward, for the upstream gradient 1 of the reduced loss (``mean``: 1 / denom
// a row): what a training step's backward needs, formed in one pass over the rows (fused.py multiplies by
// the actual upstream gradient when it is not 1). reduction must be mean or sum, raw row-major. Without
// sums (no row_proj/col_proj) each row's p_j reuses the logsumexp's exp(l_j - m_c) (m_c: the max of j's
// chunk) times exp(m_c - lse): one exponential a chunk, and no second read of raw.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> row_forward_backward_cpu(
    const Tensor& raw_in, const Tensor& target_in, const TableList& tables, at::ArrayRef<double> floats,
    at::ArrayRef<int64_t> ints, const OptTensor& row_proj, const OptTensor& col_proj) {
  TORCH_CHECK(raw_in.dim() == 2 && raw_in.stride(1) == 1 && raw_in.stride(0) >= raw_in.size(1),
              "fused_margin row_forward_backward: raw must be a row-major 2-D tensor (the gradient overwrites "
              "it), got strides ", raw_in.strides());
  ForwardCall fwd = prepare_forward(raw_in, target_in, tables, floats, ints);
  const RowForwardArgs& fargs = fwd.args;
  TORCH_CHECK(fwd.reduction == Reduction::Mean || fwd.reduction == Reduction::Sum,
              "fused_margin row_forward_backward: reduction must be mean or sum (the gradient of one loss), got ",
              static_cast<int>(fwd.reduction));
  check_labels(fwd.target, fargs.cols, fargs.ignore_index);
  const auto f32 = raw_in.options().dtype(at::kFloat);
  const Tensor upstream = at::ones({}, f32);
  OptTensor denom;
  if (fwd.reduction == Reduction::Mean) denom = at::full({}, loss_denominator(fargs), f32);
  // the forward's checked and converted inputs (raw: the caller's own tensor, row-major as checked above)
  TORCH_INTERNAL_ASSERT(fwd.raw.is_same(raw_in), "fused_margin row_forward_backward: raw was copied");
  BackwardCall bwd = prepare_backward(fwd, fwd.lse, fwd.nll, fwd.target_grad, upstream, denom, floats, ints,
                                      /*scale_grad=*/true, row_proj, col_proj, /*col_stats=*/false,
                                      /*in_place=*/true);
  RowBackwardArgs& bargs = bwd.args;
  const int64_t rows = bargs.rows, cols = bargs.cols;
  set_weight_sum_cpu(bwd);
  // whole rows, in row blocks of kBackwardRowBlock when the column sums are formed, each row's backward in
  // the column blocks of row_backward_cpu (the same partial sums in the same order); without sums, from the
  // forward's exponentials where the row allows it (row_kernel_cpu.h row_forward_backward_typed)
  const int64_t task_rows = bwd.col_sums ? kBackwardRowBlock : 1;
  const int64_t row_blocks = (rows + task_rows - 1) / task_rows;
  const int64_t blocks = std::max<int64_t>(1, (cols + kBackwardColumnBlock - 1) / kBackwardColumnBlock);
  bwd.allocate_partials(blocks, row_blocks, /*zeroed=*/true);
  bargs.col_block_width = kBackwardColumnBlock;
  bargs.row_block = task_rows;
  if (rows > 0 && cols > 0) {
    const cpu::RowForwardBackwardFn kernel = cpu_kernels().forward_backward;
    const int64_t grain = std::max<int64_t>(1, row_grain(cols) / task_rows);
    at::parallel_for(0, row_blocks, grain, [&](int64_t begin, int64_t end) {
      kernel(fargs, bargs, begin * task_rows, std::min(rows, end * task_rows));
    });
  }
  reduce_loss_cpu(fwd);
  finish_backward_sums(bwd, row_blocks, /*col_stats=*/false);
  const auto out = fwd.outputs();
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out),
          std::get<5>(out), std::get<6>(out), bwd.row_coef, bwd.col_coef};
}

// Row norms for the cosine head: ||x_i|| (squares in fp32 as torch.linalg.vector_norm, so over- and
// underflow as torch's; summed in double), 1 / max(||x_i||, eps) and the projection factor
// 1 / ||x_i||^2 where ||x_i|| >= eps, else 0 (F.normalize's Jacobian is the identity over eps there).
std::tuple<Tensor, Tensor, Tensor> row_norms_cpu(const Tensor& x_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "fused_margin row_norms: x must be 2-D, got ", x_in.dim(), "-D");
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor norm = at::empty({rows}, f32), inv = at::empty({rows}, f32), proj = at::empty({rows}, f32);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "fused_margin row_norms: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const cpu::RowNormsArgs args{x.const_data_ptr(), raw_type_of(x), cols, static_cast<float>(eps),
                               norm.mutable_data_ptr<float>(), inv.mutable_data_ptr<float>(),
                               proj.mutable_data_ptr<float>()};
  const cpu::RowNormsFn kernel = cpu_kernels().norms;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  return {norm, inv, proj};
}

// grad_i -= proj_i (grad_i . v_i) v_i in place: the normalisation's projection on a GEMM output
// (docs/loss.md section 5) with its coefficient formed from the output itself (fp32 dot of its rounded
// values, fp32 update, one rounding), so the radial part cancels to the output's rounding whatever the
// rounding of dL/draw and of the GEMM. No fp32 copies of bf16 operands (as torch's CPU addcmul_ makes).
// With scale (0-d), the result is multiplied by it before that rounding: an upstream gradient applied
// in this pass (the projection is linear in grad) rather than in a pass of its own.
void project_out_rows_cpu(const Tensor& grad, const Tensor& v, const Tensor& proj,
                          const std::optional<Tensor>& scale) {
  check_project_out_args(grad, v, proj, scale);
  const Tensor v_c = v.contiguous();
  const Tensor proj_c = proj.to(at::kFloat).contiguous();
  const float factor = scale.has_value() ? scale->item<float>() : 1.f;  // a CPU tensor: no sync
  const cpu::ProjectArgs args{grad.mutable_data_ptr(), v_c.const_data_ptr(), raw_type_of(grad), grad.size(1),
                              proj_c.const_data_ptr<float>(), factor};
  const cpu::ProjectFn kernel = cpu_kernels().project;
  at::parallel_for(0, grad.size(0), std::max<int64_t>(1, 16384 / std::max<int64_t>(grad.size(1), 1)),
                   [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

}  // namespace
}  // namespace fused_margin

TORCH_LIBRARY(fused_margin, m) {
  // the fake kernels that torch.compile needs live in this Python module
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("fused_margin.backends.extension");
#else
  m.impl_abstract_pystub("fused_margin.backends.extension");
#endif
  // the loss's tables in the RowTable order and its options as the two vectors of options.h (fused_margin/core/
  // options.py): a new option or table changes no schema
  m.def(
      "row_forward(Tensor raw, Tensor target, Tensor?[] tables, float[] floats, int[] ints) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "row_backward(Tensor raw, Tensor target, Tensor?[] tables, Tensor lse, Tensor nll, Tensor target_grad, "
      "Tensor grad_rows, Tensor? denom, float[] floats, int[] ints, bool scale_grad, Tensor? row_proj, "
      "Tensor? col_proj, bool col_stats) -> (Tensor, Tensor, Tensor, Tensor)");
  // row_forward, then on each row dL/draw over raw in place and the sums (upstream gradient 1; CPU only)
  m.def(
      "row_forward_backward(Tensor(a!) raw, Tensor target, Tensor?[] tables, float[] floats, int[] ints, "
      "Tensor? row_proj, Tensor? col_proj) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ||x_i||, 1 / max(||x_i||, eps) and the projection factor of the cosine head (fp32)
  m.def("row_norms(Tensor x, float eps) -> (Tensor, Tensor, Tensor)");
  // grad -= proj[:, None] * (grad . v) v per row in place, the dot from grad itself (fp32 math, one rounding):
  // the cosine head's projection
  m.def("project_out_rows_(Tensor(a!) grad, Tensor v, Tensor proj, Tensor? scale=None) -> ()");
  // the memory-lean loss's class-block kernels (class_block.h): one chunk's partials merged into the
  // running per-row buffers in place, and one chunk's dL/draw written into `out`
  m.def(
      "block_partials_(Tensor raw, int c0, Tensor target, Tensor(a!) z_max, Tensor(b!) z_arg, "
      "Tensor(c!) wrong_max, Tensor(d!) wrong_arg, Tensor(e!) z_y, Tensor(f!) has_y, Tensor(g!) l_max, "
      "Tensor(h!) l_sum, Tensor(i!) dev, Tensor(j!) weight, bool first, float scale, int ignore_index, "
      "int col0, Tensor? row_scale, Tensor? col_scale, Tensor? col_shift, Tensor? offset, Tensor? pair, "
      "Tensor? class_weight, bool track_wrong, bool smoothing) -> ()");
  m.def(
      "block_grad(Tensor raw, int c0, Tensor target, Tensor lse, Tensor coef, Tensor? smooth, "
      "Tensor target_value, Tensor(a!) out, float scale, int ignore_index, int col0, Tensor? row_scale, "
      "Tensor? col_scale, Tensor? col_shift, Tensor? offset, Tensor? pair, Tensor? class_weight) -> ()");
}

TORCH_LIBRARY_IMPL(fused_margin, CPU, m) {
  m.impl("row_forward", &fused_margin::row_forward_cpu);
  m.impl("row_backward", &fused_margin::row_backward_cpu);
  m.impl("row_forward_backward", &fused_margin::row_forward_backward_cpu);
  m.impl("row_norms", &fused_margin::row_norms_cpu);
  m.impl("project_out_rows_", &fused_margin::project_out_rows_cpu);
  m.impl("block_partials_", &fused_margin::block::block_partials_cpu);
  m.impl("block_grad", &fused_margin::block::block_grad_cpu);
}

// ---------------------------------------------------------------------------------------------
// The Python module fused_margin._C: importing it registers the ops above; its attributes say what
// was built (fused_margin/backends/extension.py reads them).

#ifdef FUSED_MARGIN_WITH_CUDA
#define FUSED_MARGIN_CUDA_BUILT 1
#else
#define FUSED_MARGIN_CUDA_BUILT 0
#endif

namespace {

PyObject* cpu_kernel_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_margin::cpu_kernels().name);
}

PyObject* class_block_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_margin::block::class_block_isa());
}

// {name: code} of one of row_kernel.h's code tables (a nullptr name is None).
template <size_t N>
PyObject* code_dict(const fused_margin::NamedCode (&table)[N]) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (size_t k = 0; k < N; ++k) {
    PyObject* key = table[k].name ? PyUnicode_FromString(table[k].name) : (Py_INCREF(Py_None), Py_None);
    PyObject* value = PyLong_FromLong(table[k].code);
    const int failed = key == nullptr || value == nullptr || PyDict_SetItem(dict, key, value) != 0;
    Py_XDECREF(key);
    Py_XDECREF(value);
    if (failed) {
      Py_DECREF(dict);
      return nullptr;
    }
  }
  return dict;
}

// The C++ side of the row-op contract: {"margin_type": {...}, "fold": {...}, "reduction": {...}}, the codes the kernels
// read (row_kernel.h), for tests/backends/test_contract.py to compare with fused_margin/core/spec.py.
PyObject* contract(PyObject*, PyObject*) {
  PyObject* margin_types = code_dict(fused_margin::kMarginTypeNames);
  PyObject* folds = code_dict(fused_margin::kAngularFoldNames);
  PyObject* reductions = code_dict(fused_margin::kReductionNames);
  PyObject* out = (margin_types && folds && reductions)
                      ? Py_BuildValue("{s:O,s:O,s:O}", "margin_type", margin_types, "fold", folds, "reduction",
                                      reductions)
                      : nullptr;
  Py_XDECREF(margin_types);
  Py_XDECREF(folds);
  Py_XDECREF(reductions);
  return out;
}

PyMethodDef module_methods[] = {
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS,
     "The instruction set of the CPU row kernels in use: AVX512, AVX2 or DEFAULT."},
    {"class_block_isa", class_block_isa, METH_NOARGS,
     "The instruction set of the CPU class-block loops (the memory-lean path) in use: AVX512, AVX2 or DEFAULT."},
    {"contract", contract, METH_NOARGS,
     "The integer codes the row kernels read: {'margin_type', 'fold', 'reduction': {name: code}}."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "fused_margin's C++/CUDA row kernels, registered as torch.ops.fused_margin.*", -1,
                          module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", FUSED_MARGIN_CUDA_BUILT) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
