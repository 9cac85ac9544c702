// The host side of the kernel-level ops, shared by the CPU (cpu/ops.cpp) and CUDA
// (cuda/kernels.cu) implementations:
//
//   fused_ls::ext_forward(x, P)                         -> (loss, pack)     statistics + finalisation
//   fused_ls::ext_backward(grad_loss, x, out!, pack, P)                    gradient into out
//   fused_ls::ext_forward_backward(x, out!, grad_loss, P) -> (loss, pack)  both in one pass
//   fused_ls::ext_rescale(grad_loss, x, out!, pack, P)                    unit upstream → grad_loss
//   fused_ls::ext_row_stats(x, P)                       -> stats           (vocabulary sharding)
//   fused_ls::ext_finalize(stats, P)                    -> (loss, pack)
//
// with P the Problem of fused_ls/_problem.py (FLS_PROBLEM_SCHEMA below, in the same order; the
// three FLS_PROBLEM_* macros are checked against fused_ls._problem.Problem by tests/test_schema.py,
// so a field added there must be added here, in the same place). Each
// op checks its arguments, makes the O(N) per-row tensors contiguous in the accumulation dtype
// (only when they are not already: a device copy on CUDA, never a host sync), fills one RowArgs
// (args.h) and hands it to the Device:
//
//   static void check(const at::Tensor& x);            the tensors' device is served
//   static void validate(const RowArgs& a, acc dtype);  target / per-sample ranges (CPU: raises;
//                                                      CUDA: device-side asserts in the kernels)
//   static void run(const RowArgs& a, int phases, const at::Tensor& x);  the row kernels (x: the
//                                                      logits, or the stats for ext_finalize)
//   static void reduce(const RowArgs& a, const at::Tensor& pack, const at::Tensor& loss);
//                                                      totals row + the reduced loss
//   static void weights(const RowArgs& a, const at::Tensor& pack);  Σ W_i from the targets into
//                                                      the totals row, as reduce sums them
//
// The N×C logits are never copied.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "args.h"

namespace fused_ls {

#define FLS_PROBLEM_SCHEMA                                                                      \
  "Tensor target, Tensor? weight, Tensor? R, Tensor mass, Tensor? sp_idx, Tensor? sp_val, "    \
  "Tensor? eps_rows, Tensor? mix_target, Tensor? mix_rows, float r0, float smoothing, "        \
  "int ignore_index, float adaptive_threshold, float adaptive_factor, int adaptive_mode, "     \
  "float z_loss, float softcap, float confidence_penalty, float mix_lambda, int reduction, "   \
  "int col_offset, int num_classes, bool need_stats"

using OptT = c10::optional<at::Tensor>;

#define FLS_PROBLEM_PARAMS                                                                      \
  const at::Tensor &target, const OptT &weight, const OptT &R, const at::Tensor &mass,         \
      const OptT &sp_idx, const OptT &sp_val, const OptT &eps_rows, const OptT &mix_target,     \
      const OptT &mix_rows, double r0, double smoothing, int64_t ignore_index,                  \
      double adaptive_threshold, double adaptive_factor, int64_t adaptive_mode, double z_loss, \
      double softcap, double confidence_penalty, double mix_lambda, int64_t reduction,          \
      int64_t col_offset, int64_t num_classes, bool need_stats

#define FLS_PROBLEM_ARGS                                                                        \
  target, weight, R, mass, sp_idx, sp_val, eps_rows, mix_target, mix_rows, r0, smoothing,      \
      ignore_index, adaptive_threshold, adaptive_factor, adaptive_mode, z_loss, softcap,       \
      confidence_penalty, mix_lambda, reduction, col_offset, num_classes, need_stats

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "fused_ls: ", name, " must be 2-D [N, C], got ", x.dim(), "-D");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "fused_ls: ", name, " must be fp32, fp64, bf16 or fp16, got ", t);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fused_ls: ", name,
              " must have unit stride on the class dim");
}

// The arguments of one op call: the RowArgs and the (converted) tensors it points into.
struct Call {
  RowArgs a{};
  std::vector<at::Tensor> keep;  // conversions made here, alive until the kernels have run
  at::ScalarType acc;
  at::Device device;

  // t in dtype `dt`, contiguous, on the logits' device; no dispatch when it already is.
  const void* prep(const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.device() == device, "fused_ls: ", name, " is on ", t.device(),
                " but the logits are on ", device);
    if (t.scalar_type() == dt && t.is_contiguous()) return t.const_data_ptr();
    keep.push_back(t.to(dt).contiguous());
    return keep.back().const_data_ptr();
  }
  const void* prep(const OptT& t, at::ScalarType dt, const char* name) {
    return t.has_value() && t->defined() ? prep(*t, dt, name) : nullptr;
  }
  const int64_t* index(const at::Tensor& t, const char* name) {
    return static_cast<const int64_t*>(prep(t, at::kLong, name));
  }
  const int64_t* index(const OptT& t, const char* name) {
    return static_cast<const int64_t*>(prep(t, at::kLong, name));
  }
  static void rows(const OptT& t, int64_t n, const char* name) {
    if (t.has_value() && t->defined()) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fused_ls: ", name, " must be [", n, "]");
    }
  }

  // N rows of C columns of logits of dtype x_dtype (x may be null: ext_finalize).
  Call(const at::Tensor& rows_like, int64_t N, int64_t C, at::ScalarType x_dtype,
       FLS_PROBLEM_PARAMS)
      : acc(acc_type(x_dtype)), device(rows_like.device()) {
    TORCH_CHECK(num_classes >= 1, "fused_ls: num_classes must be >= 1");
    TORCH_CHECK(col_offset >= 0 && col_offset + C <= num_classes,
                "fused_ls: columns [", col_offset, ", ", col_offset + C, ") are not within [0, ",
                num_classes, ")");
    TORCH_CHECK(target.dim() == 1 && target.size(0) == N, "fused_ls: target must be [", N, "]");
    rows(mix_target, N, "mix_target");
    rows(eps_rows, N, "eps_rows");
    rows(mix_rows, N, "mix_rows");
    const bool dense = R.has_value() && R->defined();
    if (weight.has_value() && weight->defined()) {
      TORCH_CHECK(weight->dim() == 1 && weight->size(0) == num_classes,
                  "fused_ls: weight must be [", num_classes, "]");
    }
    if (dense) {
      TORCH_CHECK(R->dim() == 2 && R->size(0) == num_classes && R->size(1) == num_classes,
                  "fused_ls: R must be [", num_classes, ", ", num_classes, "]");
    }
    TORCH_CHECK(mass.dim() == 1 && mass.size(0) == (dense ? num_classes : 1),
                "fused_ls: mass must be [", dense ? num_classes : 1, "]");
    const bool sparse = sp_idx.has_value() && sp_idx->defined();
    TORCH_CHECK(sparse == (sp_val.has_value() && sp_val->defined()),
                "fused_ls: sp_idx and sp_val go together");
    if (sparse) {
      TORCH_CHECK(sp_idx->dim() == 2 && sp_idx->size(0) == num_classes &&
                      sp_val->sizes() == sp_idx->sizes(),
                  "fused_ls: sp_idx / sp_val must be [", num_classes, ", K]");
    }
    TORCH_CHECK(reduction >= RED_NONE && reduction <= RED_SUM, "fused_ls: bad reduction");
    a.N = N;
    a.C = C;
    a.col_offset = col_offset;
    a.num_classes = num_classes;
    a.y_a = index(target, "target");
    a.y_b = index(mix_target, "mix_target");
    a.ignore_index = ignore_index;
    a.w = prep(weight, acc, "weight");
    a.R = prep(R, acc, "R");
    a.mass = prep(mass, acc, "mass");
    a.sp_idx = index(sp_idx, "sp_idx");
    a.sp_val = prep(sp_val, acc, "sp_val");
    a.K = sparse ? sp_idx->size(1) : 0;
    a.r0 = r0;
    a.eps_rows = prep(eps_rows, acc, "eps_rows");
    a.eps = smoothing;
    a.lam_rows = prep(mix_rows, acc, "mix_rows");
    a.lam = mix_lambda;
    a.adaptive_mode = static_cast<int>(adaptive_mode);
    a.adaptive_threshold = adaptive_threshold;
    a.adaptive_factor = adaptive_factor;
    a.z_loss = z_loss;
    a.softcap = softcap;
    a.cp = confidence_penalty;
    a.reduction = static_cast<int>(reduction);
    a.need_stats = need_stats;
  }

  void logits(const at::Tensor& x) {
    a.x = x.const_data_ptr();
    a.x_stride = x.stride(0);
  }
  void gradient(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad_loss) {
    check_logits(out, "out");
    TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                    out.device() == x.device(),
                "fused_ls: out must match the logits' shape, dtype and device");
    const bool per_row = a.reduction == RED_NONE;
    TORCH_CHECK(per_row ? (grad_loss.dim() == 1 && grad_loss.size(0) == a.N)
                        : grad_loss.numel() == 1,
                "fused_ls: grad_loss must be [N] for reduction none, else a scalar");
    a.out = out.data_ptr();
    a.out_stride = out.stride(0);
    a.go = prep(grad_loss, acc, "grad_loss");
    a.go_per_row = per_row;
  }
  // The pack of a finished forward (the gradient passes read lse, ε and Σpz from it).
  void finished(const at::Tensor& pack) {
    TORCH_CHECK(pack.dim() == 2 && pack.size(0) == a.N + 1 && pack.size(1) == kWidth &&
                    pack.scalar_type() == acc,
                "fused_ls: pack must be [N + 1, 8] in the accumulation dtype");
    a.pack = const_cast<void*>(prep(pack, acc, "pack"));
  }
  // The outputs of the finalisation: (loss, pack).
  std::tuple<at::Tensor, at::Tensor> outputs() {
    auto o = at::TensorOptions().dtype(acc).device(device);
    at::Tensor loss = a.reduction == RED_NONE ? at::empty({a.N}, o) : at::empty({}, o);
    at::Tensor pack = at::empty({a.N + 1, kWidth}, o);
    a.loss = loss.data_ptr();
    a.pack = pack.data_ptr();
    return {loss, pack};
  }
};

// The call of an op over the logits x ([N, C] on Device): checked, the problem's tensors prepared.
template <typename Device>
Call logits_call(const at::Tensor& x, FLS_PROBLEM_PARAMS) {
  Device::check(x);
  check_logits(x, "x");
  Call call(x, x.size(0), x.size(1), x.scalar_type(), FLS_PROBLEM_ARGS);
  call.logits(x);
  return call;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x, FLS_PROBLEM_PARAMS) {
  Call call = logits_call<Device>(x, FLS_PROBLEM_ARGS);
  Device::validate(call.a, call.acc);
  auto outs = call.outputs();
  Device::run(call.a, PH_STATS | PH_FINALIZE, x);
  Device::reduce(call.a, std::get<1>(outs), std::get<0>(outs));
  return outs;
}

// The gradient pass. ext_backward (kRescale false): out = the gradient for grad_loss.
// ext_rescale (kRescale true): `out` holds the gradient of forward_backward for a unit upstream
// gradient; make it that of grad_loss (see args.h skip_unit / scale_only): rows whose upstream is
// 1 are not touched, the others are recomputed from x, or scaled in place when x is out (the
// logits are gone).
template <typename Device, bool kRescale>
void grad_op(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& out,
             const at::Tensor& pack, FLS_PROBLEM_PARAMS) {
  Call call = logits_call<Device>(x, FLS_PROBLEM_ARGS);
  call.gradient(x, out, grad_loss);
  call.finished(pack);
  if constexpr (kRescale) {
    call.a.skip_unit = true;
    call.a.scale_only = x.data_ptr() == out.data_ptr();
  }
  // computing: the gradient of go · loss (÷ Σ W for "mean"); scaling: out already holds the
  // mean's 1/ΣW, so only go
  call.a.go_mean = call.a.reduction == RED_MEAN && !call.a.scale_only;
  if (x.size(0) == 0 || x.size(1) == 0) return;
  Device::run(call.a, PH_GRAD, x);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> forward_backward_op(const at::Tensor& x, const at::Tensor& out,
                                                       const at::Tensor& grad_loss,
                                                       FLS_PROBLEM_PARAMS) {
  Call call = logits_call<Device>(x, FLS_PROBLEM_ARGS);
  call.gradient(x, out, grad_loss);
  Device::validate(call.a, call.acc);
  auto outs = call.outputs();
  if (call.a.reduction == RED_MEAN) {
    // "mean"'s denominator Σ W_i needs only the targets: into the pack's totals row now, so
    // that the one pass over the logits can write d(go · mean)/dx
    call.a.go_mean = true;
    Device::weights(call.a, std::get<1>(outs));
  }
  Device::run(call.a, PH_STATS | PH_FINALIZE | PH_GRAD, x);
  Device::reduce(call.a, std::get<1>(outs), std::get<0>(outs));
  return outs;
}

template <typename Device>
at::Tensor row_stats_op(const at::Tensor& x, FLS_PROBLEM_PARAMS) {
  Call call = logits_call<Device>(x, FLS_PROBLEM_ARGS);
  Device::validate(call.a, call.acc);
  at::Tensor stats = at::empty({x.size(0), kWidth}, x.options().dtype(call.acc));
  call.a.stats = stats.data_ptr();
  Device::run(call.a, PH_STATS, x);
  return stats;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> finalize_op(const at::Tensor& stats, FLS_PROBLEM_PARAMS) {
  Device::check(stats);
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == kWidth &&
                  (stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble),
              "fused_ls: stats must be [N, 8] fp32 or fp64");
  // the statistics hold no columns (C = 0); num_classes is the whole class space
  Call call(stats, stats.size(0), 0, stats.scalar_type(), FLS_PROBLEM_ARGS);
  call.a.stats = const_cast<void*>(call.prep(stats, call.acc, "stats"));
  Device::validate(call.a, call.acc);
  auto outs = call.outputs();
  Device::run(call.a, PH_FINALIZE, stats);
  Device::reduce(call.a, std::get<1>(outs), std::get<0>(outs));
  return outs;
}

// Registers the five ops' implementations for one dispatch key.
#define FLS_REGISTER_IMPLS(m, Device)                                          \
  m.impl("ext_forward", &fused_ls::forward_op<Device>);                        \
  m.impl("ext_backward", &fused_ls::grad_op<Device, false>);                   \
  m.impl("ext_forward_backward", &fused_ls::forward_backward_op<Device>);      \
  m.impl("ext_rescale", &fused_ls::grad_op<Device, true>);                     \
  m.impl("ext_row_stats", &fused_ls::row_stats_op<Device>);                    \
  m.impl("ext_finalize", &fused_ls::finalize_op<Device>)

}  // namespace fused_ls
