// Per-row math of the label-smoothing cross-entropy, shared by the C++ CPU kernel and the CUDA
// kernel so that the math the GPU runs is the math the CPU tests run (DESIGN.md §2, §5).
//
// Row i, logits x_c, classes c in [0, C):
//
//   z_c   = softcap · tanh(x_c / softcap)          (identity when softcap = 0)
//   m     = max_c z_c,   d = Σ_c exp(z_c − m),   lse = m + log d,   p_c = exp(z_c − lse)
//   dot   = Σ_c R_c · z_c        (a term with R_c = 0 is 0 even where z_c = −inf)
//   pz    = Σ_c p_c z_c          (a term with p_c = 0 is 0 even where z_c = −inf)
//
//   g_c   = ( [coef + γ (z_c − pz)] · p_c − u_a R_a,c − u_b R_b,c − Σ_{j: col_j = c} mass_j )
//           · dz_c/dx_c,         dz/dx = 1 − (z / softcap)²
//
// The statistics pass keeps the online-softmax state (m, d, s) with s = Σ exp(z_c − m) z_c, so
// pz = s / d; two states over disjoint column sets merge associatively (`merge`), which is what
// lets one row be split over vector lanes, chunks, warps, thread blocks or devices.
//
// Every function is a template over the value type V: a scalar (float, double: CPU tails, CPU
// fix-ups, every CUDA thread) or an at::vec::Vectorized<T> (the CPU vector loops). The few
// primitives that differ between the two (exp, log, tanh, selects) are overloaded: the scalar
// overloads are defined below; the CPU kernel defines the Vectorized overloads before including
// this header so that the templates find them.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLS_HD __host__ __device__ __forceinline__
#else
#define FLS_HD inline
#endif

namespace fused_ls {
namespace rowmath {
// The CPU kernel translation unit is compiled once per instruction set (DEFAULT, AVX2, AVX512):
// an ISA-specific inline namespace keeps the copies of these inline functions apart at link time,
// so that a copy compiled with AVX-512 can never be picked for the portable path.
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
inline namespace CPU_CAPABILITY {
#endif

// ---- scalar primitives ------------------------------------------------------------------------
FLS_HD float rm_exp(float v) { return ::expf(v); }
FLS_HD double rm_exp(double v) { return ::exp(v); }
FLS_HD float rm_log(float v) { return ::logf(v); }
FLS_HD double rm_log(double v) { return ::log(v); }
FLS_HD float rm_tanh(float v) { return ::tanhf(v); }
FLS_HD double rm_tanh(double v) { return ::tanh(v); }
// `v` where `test` is nonzero, else 0 (NaN tests keep v: NaN != 0).
FLS_HD float rm_zero_where_zero(float test, float v) { return test == 0.f ? 0.f : v; }
FLS_HD double rm_zero_where_zero(double test, double v) { return test == 0.0 ? 0.0 : v; }

template <typename T>
FLS_HD T neg_inf() {
  return -static_cast<T>(INFINITY);  // INFINITY: a constant expression in host and device code
}

// NaN-propagating max of two scalars (a NaN anywhere in the row makes the row's max NaN, as in
// torch.max).
template <typename T>
FLS_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// ---- the softcap transform --------------------------------------------------------------------
// z = cap · tanh(x / cap); the caller applies it only when cap > 0. Both functions take
// rcp = 1 / cap, computed once per row or kernel: x · rcp is within 1.5 ulp of x / cap, and a
// multiply instead of a divide per element matters in the vector loops.
template <typename V>
FLS_HD V softcap_z(V x, V cap, V rcp) {
  return cap * rm_tanh(x * rcp);
}
// dz/dx = 1 − tanh²(x / cap) = 1 − (z / cap)², from z itself (no second tanh).
template <typename V>
FLS_HD V softcap_dzdx(V z, V rcp) {
  V t = z * rcp;
  return V(1) - t * t;
}

// ---- statistics -------------------------------------------------------------------------------
// One term R_c · z_c of a smoothing dot product: 0 where R_c = 0, even if z_c = −inf.
template <typename V>
FLS_HD V masked_term(V r, V z) {
  return rm_zero_where_zero(r, r * z);
}
// One term e · z of s = Σ exp(z − m) z: 0 where e = 0 (z = −inf).
template <typename V>
FLS_HD V pz_term(V e, V z) {
  return rm_zero_where_zero(e, e * z);
}

// Online-softmax state over a set of columns: m = max z, d = Σ exp(z − m), s = Σ exp(z − m) z.
// The empty set is (−inf, 0, 0). A state with d = 0 contributes nothing to a merge.
template <typename T>
struct SoftmaxState {
  T m, d, s;
};

template <typename T>
FLS_HD SoftmaxState<T> empty_state() {
  return {neg_inf<T>(), T(0), T(0)};
}

// Merge two states over disjoint column sets: rescale both to the common max.
template <typename T>
FLS_HD SoftmaxState<T> merge(SoftmaxState<T> a, SoftmaxState<T> b) {
  T m = nan_max(a.m, b.m);
  T fa = a.d == T(0) ? T(0) : rm_exp(a.m - m);  // guard: exp(−inf − (−inf)) would be NaN
  T fb = b.d == T(0) ? T(0) : rm_exp(b.m - m);
  return {m, a.d * fa + b.d * fb, a.s * fa + b.s * fb};
}

// Add one column z to a state (one exp per element; the rescale happens only when the max grows).
// z = −inf adds exactly nothing; z = +inf or NaN makes d NaN (as torch's logsumexp-by-max does
// for +inf: exp(inf − inf)).
template <typename T>
FLS_HD void online_add(SoftmaxState<T>& st, T z) {
  if (z > st.m) {
    T f = st.d == T(0) ? T(0) : rm_exp(st.m - z);
    T one = rm_exp(z - z);  // 1, or NaN for z = +inf
    st.d = st.d * f + one;
    st.s = st.s * f + one * z;
    st.m = z;
  } else if (z != neg_inf<T>()) {
    T e = rm_exp(z - st.m);  // NaN z → NaN d
    st.d += e;
    st.s += pz_term(e, z);
  }
}

// lse = m + log d (an all −inf row gives −inf).
template <typename T>
FLS_HD T finish_lse(SoftmaxState<T> st) {
  return st.m + rm_log(st.d);
}
// pz = Σ p z = s / d.
template <typename T>
FLS_HD T finish_pz(SoftmaxState<T> st) {
  return st.s / st.d;
}

// Argmax with torch's rules: the first maximal index, or the first NaN if the row has one.
template <typename T>
FLS_HD bool argmax_takes(T cand, long long cand_idx, T best, long long best_idx) {
  if (best != best) return cand != cand && cand_idx < best_idx;  // best is NaN: earlier NaN only
  if (cand != cand) return true;                                 // first NaN wins
  return cand > best || (cand == best && cand_idx < best_idx);
}

// ---- gradient ---------------------------------------------------------------------------------
// The softmax part of g_c, in the accumulation type:
//   [coef + γ (z − pz)] · p,  p = exp(z − lse); the γ term is 0 where p = 0 (z = −inf).
// The same from p itself (for callers that compute p = exp(z − lse) with their own exp).
template <typename V>
FLS_HD V grad_softmax_part_p(V p, V coef) {
  return coef * p;
}
template <typename V>
FLS_HD V grad_softmax_part_p(V p, V z, V coef, V gamma, V pz) {
  return coef * p + rm_zero_where_zero(p, gamma * (z - pz) * p);
}
template <typename V>
FLS_HD V grad_softmax_part(V z, V lse, V coef) {
  return grad_softmax_part_p(rm_exp(z - lse), coef);
}
template <typename V>
FLS_HD V grad_softmax_part(V z, V lse, V coef, V gamma, V pz) {
  return grad_softmax_part_p(rm_exp(z - lse), z, coef, gamma, pz);
}

// The whole gradient element from its parts: softmax part minus the linear (smoothing and
// target) mass `lin` = u_a R_a,c + u_b R_b,c + Σ masses at c, times dz/dx with a softcap
// (rcp = 1 / cap). The subtraction happens before rounding to the output dtype (DESIGN.md §3).
template <typename V>
FLS_HD V grad_finish(V soft, V lin, V z, bool has_cap, V rcp) {
  V g = soft - lin;
  return has_cap ? g * softcap_dzdx(z, rcp) : g;
}

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
}  // inline namespace CPU_CAPABILITY
#endif
}  // namespace rowmath
}  // namespace fused_ls
