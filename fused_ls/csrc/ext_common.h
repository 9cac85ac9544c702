// The host side of the kernel-level ops fused_ls::ext_row_stats / fused_ls::ext_grad_rows,
// shared by the CPU (cpu/ops.cpp) and CUDA (cuda/kernels.cu) implementations: argument checks,
// preparation, and the filling of the plain-data kernel arguments (cpu/args.h). Each
// implementation is row_stats_op<Device> / grad_rows_op<Device> with a Device that has
//   static void check(const at::Tensor& x);                        the logits' device is served
//   static void stats(const StatsArgs& a, const at::Tensor& x);    runs the statistics kernel
//   static void grad(const GradArgs& a, const at::Tensor& x, const at::Tensor& out);
// The O(N) per-row tensors may arrive as strided views (columns of the coefficient pack) or in
// another dtype: they are made contiguous in the accumulation dtype here (a device copy on CUDA,
// never a host sync); they stay alive until the kernels are launched. The N×C logits are never
// copied.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "cpu/args.h"

namespace fused_ls {

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

// [n] or [n, k] tensor in dtype t, contiguous, on x's device; undefined when absent.
inline at::Tensor prep(const c10::optional<at::Tensor>& v, at::ScalarType t) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  return v->to(t).contiguous();
}
inline at::Tensor prep(const at::Tensor& v, at::ScalarType t) { return v.to(t).contiguous(); }

inline void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == x.device(), "fused_ls: ", name, " is on ", t.device(),
              " but the logits are on ", x.device());
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == x.size(0), "fused_ls: ", name, " must have ",
              x.size(0), " rows");
}

inline at::Tensor prep_R(const at::Tensor& R, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(R.dim() == 2 && R.size(1) == C && (R.size(0) == 1 || R.size(0) == C),
              "fused_ls: R must be [1, C] or [C, C] with C = ", C);
  TORCH_CHECK(R.device() == x.device(), "fused_ls: R is on ", R.device(), " but the logits are on ",
              x.device());
  return prep(R, acc_type(x.scalar_type()));
}

// Outputs of ext_row_stats: m, lse, argmax, dot_a, dot_b ([N] or [0]), pz ([N] or [0]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
alloc_stats(const at::Tensor& x, bool has_b, bool need_pz) {
  const int64_t N = x.size(0);
  auto o = x.options().dtype(acc_type(x.scalar_type()));
  return {at::empty({N}, o), at::empty({N}, o), at::empty({N}, x.options().dtype(at::kLong)),
          at::empty({N}, o), at::empty({has_b ? N : 0}, o), at::empty({need_pz ? N : 0}, o)};
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline const int64_t* idx_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<int64_t>() : nullptr;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats_op(
    const at::Tensor& x, const at::Tensor& R_in, const c10::optional<at::Tensor>& ridx_a_in,
    const c10::optional<at::Tensor>& ridx_b_in, double softcap, bool need_pz) {
  check_logits(x, "x");
  Device::check(x);
  const at::Tensor R = prep_R(R_in, x);
  const at::Tensor ridx_a = prep(ridx_a_in, at::kLong), ridx_b = prep(ridx_b_in, at::kLong);
  TORCH_CHECK(R.size(0) > 1 || (!ridx_a.defined() && !ridx_b.defined()),
              "fused_ls: ridx_a / ridx_b index a [C, C] R only");
  TORCH_CHECK(R.size(0) == 1 || ridx_a.defined(), "fused_ls: a [C, C] R needs ridx_a");
  check_rows(ridx_a, x, "ridx_a");
  check_rows(ridx_b, x, "ridx_b");
  auto outs = alloc_stats(x, ridx_b.defined(), need_pz);
  auto& [m, lse, argmax, dot_a, dot_b, pz] = outs;
  if (x.size(0) == 0) return outs;
  TORCH_CHECK(x.size(1) > 0, "fused_ls: need at least one class");
  StatsArgs a{};
  a.x = x.const_data_ptr();
  a.x_stride = x.stride(0);
  a.C = x.size(1);
  a.R = R.const_data_ptr();
  a.ridx_a = idx_or_null(ridx_a);
  a.ridx_b = idx_or_null(ridx_b);
  a.softcap = softcap;
  a.need_pz = need_pz;
  a.m = m.data_ptr();
  a.lse = lse.data_ptr();
  a.argmax = argmax.data_ptr<int64_t>();
  a.dot_a = dot_a.data_ptr();
  a.dot_b = ridx_b.defined() ? dot_b.data_ptr() : nullptr;
  a.pz = need_pz ? pz.data_ptr() : nullptr;
  Device::stats(a, x);
  return outs;
}

template <typename Device>
void grad_rows_op(const at::Tensor& x, const at::Tensor& out, const at::Tensor& R_in,
                  const c10::optional<at::Tensor>& ridx_a_in,
                  const c10::optional<at::Tensor>& ridx_b_in, const at::Tensor& lse_in,
                  const c10::optional<at::Tensor>& pz_in, const at::Tensor& coef_in,
                  const c10::optional<at::Tensor>& gamma_in, const at::Tensor& u_a_in,
                  const c10::optional<at::Tensor>& u_b_in, const at::Tensor& y_a_in,
                  const at::Tensor& t_a_in, const c10::optional<at::Tensor>& y_b_in,
                  const c10::optional<at::Tensor>& t_b_in,
                  const c10::optional<at::Tensor>& sparse_cols,
                  const c10::optional<at::Tensor>& sparse_mass, double softcap) {
  Device::check(x);
  check_logits(x, "x");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "fused_ls: out must match the logits' shape, dtype and device");
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor R = prep_R(R_in, x);
  const at::Tensor ridx_a = prep(ridx_a_in, at::kLong), ridx_b = prep(ridx_b_in, at::kLong);
  const at::Tensor lse = prep(lse_in, acc), coef = prep(coef_in, acc), gamma = prep(gamma_in, acc);
  const at::Tensor pz = gamma.defined() ? prep(pz_in, acc) : at::Tensor();
  TORCH_CHECK(!gamma.defined() || pz.defined(), "fused_ls: gamma needs pz");
  const at::Tensor u_a = prep(u_a_in, acc), u_b = prep(u_b_in, acc);
  const at::Tensor y_a = prep(y_a_in, at::kLong), t_a = prep(t_a_in, acc);
  const at::Tensor y_b = prep(y_b_in, at::kLong), t_b = prep(t_b_in, acc);
  TORCH_CHECK(y_b.defined() == t_b.defined(), "fused_ls: y_b and t_b go together");
  const at::Tensor cols = prep(sparse_cols, at::kLong), mass = prep(sparse_mass, acc);
  TORCH_CHECK(cols.defined() == mass.defined(),
              "fused_ls: sparse_cols and sparse_mass go together");
  int64_t K = 0;
  if (cols.defined()) {
    TORCH_CHECK(cols.dim() == 2 && cols.sizes() == mass.sizes(),
                "fused_ls: sparse_cols / sparse_mass must be [N, K]");
    K = cols.size(1);
  }
  if (R.size(0) > 1) TORCH_CHECK(ridx_a.defined(), "fused_ls: a [C, C] R needs ridx_a");
  for (const at::Tensor* t : {&ridx_a, &ridx_b, &lse, &pz, &coef, &gamma, &u_a, &u_b, &y_a, &t_a,
                              &y_b, &t_b, &cols, &mass}) {
    check_rows(*t, x, "a per-row input");
  }
  if (x.size(0) == 0 || x.size(1) == 0) return;
  GradArgs a{};
  a.x = x.const_data_ptr();
  a.x_stride = x.stride(0);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.C = x.size(1);
  a.R = R.const_data_ptr();
  a.ridx_a = R.size(0) > 1 ? idx_or_null(ridx_a) : nullptr;
  a.ridx_b = R.size(0) > 1 ? idx_or_null(ridx_b) : nullptr;
  a.lse = lse.const_data_ptr();
  a.pz = ptr_or_null(pz);
  a.coef = coef.const_data_ptr();
  a.gamma = ptr_or_null(gamma);
  a.u_a = u_a.const_data_ptr();
  a.u_b = ptr_or_null(u_b);
  a.y_a = idx_or_null(y_a);
  a.t_a = t_a.const_data_ptr();
  a.y_b = idx_or_null(y_b);
  a.t_b = ptr_or_null(t_b);
  a.sp_cols = idx_or_null(cols);
  a.sp_mass = ptr_or_null(mass);
  a.K = K;
  a.softcap = softcap;
  Device::grad(a, x, out);
}

}  // namespace fused_ls
