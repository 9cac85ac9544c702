// Argument checks and preparation shared by the CPU (cpu/ops.cpp) and CUDA (cuda/kernels.cu)
// implementations of the kernel-level ops fused_ls::ext_row_stats / fused_ls::ext_grad_rows.
// The O(N) per-row tensors may arrive as strided views (columns of the coefficient pack) or in
// another dtype: they are made contiguous in the accumulation dtype here (a device copy on CUDA,
// never a host sync). The N×C logits are never copied.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

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

// The gradient op's O(N) inputs, prepared.
struct GradInputs {
  at::Tensor R, ridx_a, ridx_b, lse, pz, coef, gamma, u_a, u_b, y_a, t_a, y_b, t_b, cols, mass;
  int64_t K = 0;
};

inline GradInputs prep_grad(const at::Tensor& x, const at::Tensor& out, const at::Tensor& R,
                            const c10::optional<at::Tensor>& ridx_a,
                            const c10::optional<at::Tensor>& ridx_b, const at::Tensor& lse,
                            const c10::optional<at::Tensor>& pz, const at::Tensor& coef,
                            const c10::optional<at::Tensor>& gamma, const at::Tensor& u_a,
                            const c10::optional<at::Tensor>& u_b, const at::Tensor& y_a,
                            const at::Tensor& t_a, const c10::optional<at::Tensor>& y_b,
                            const c10::optional<at::Tensor>& t_b,
                            const c10::optional<at::Tensor>& sparse_cols,
                            const c10::optional<at::Tensor>& sparse_mass) {
  check_logits(x, "x");
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "fused_ls: out must match the logits' shape, dtype and device");
  const auto acc = acc_type(x.scalar_type());
  GradInputs g;
  g.R = prep_R(R, x);
  g.ridx_a = prep(ridx_a, at::kLong);
  g.ridx_b = prep(ridx_b, at::kLong);
  g.lse = prep(lse, acc);
  g.coef = prep(coef, acc);
  g.gamma = prep(gamma, acc);
  g.pz = g.gamma.defined() ? prep(pz, acc) : at::Tensor();
  TORCH_CHECK(!g.gamma.defined() || g.pz.defined(), "fused_ls: gamma needs pz");
  g.u_a = prep(u_a, acc);
  g.u_b = prep(u_b, acc);
  g.y_a = prep(y_a, at::kLong);
  g.t_a = prep(t_a, acc);
  g.y_b = prep(y_b, at::kLong);
  g.t_b = prep(t_b, acc);
  TORCH_CHECK(g.y_b.defined() == g.t_b.defined(), "fused_ls: y_b and t_b go together");
  g.cols = prep(sparse_cols, at::kLong);
  g.mass = prep(sparse_mass, acc);
  TORCH_CHECK(g.cols.defined() == g.mass.defined(), "fused_ls: sparse_cols and sparse_mass go together");
  if (g.cols.defined()) {
    TORCH_CHECK(g.cols.dim() == 2 && g.cols.sizes() == g.mass.sizes(),
                "fused_ls: sparse_cols / sparse_mass must be [N, K]");
    g.K = g.cols.size(1);
  }
  if (g.R.size(0) > 1) TORCH_CHECK(g.ridx_a.defined(), "fused_ls: a [C, C] R needs ridx_a");
  for (auto* t : {&g.ridx_a, &g.ridx_b, &g.lse, &g.pz, &g.coef, &g.gamma, &g.u_a, &g.u_b, &g.y_a,
                  &g.t_a, &g.y_b, &g.t_b, &g.cols, &g.mass}) {
    check_rows(*t, x, "a per-row input");
  }
  return g;
}

}  // namespace fused_ls
