// Per-row math of the label-smoothing cross-entropy, shared by the C++ CPU kernel and the CUDA
// kernel so that the math the GPU runs is the math the CPU tests run (docs/design.md §2, §5).
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
// Per row, the statistics are finalised into the loss and the coefficients of the gradient by
// `finalize_row` and `grad_coefs` below: the C++ mirror of the readable Python finalisation in
// fused_ls/backends/torch_backend.py (TorchBackend.finalize / grad_terms), which the tests use as
// the reference. They read the per-row inputs straight from RowArgs (args.h).
//
// Every function is a template over the value type V: a scalar (float, double: CPU tails, CPU
// fix-ups, every CUDA thread) or an at::vec::Vectorized<T> (the CPU vector loops). The few
// primitives that differ between the two (exp, log, tanh, selects) are overloaded: the scalar
// overloads are defined below; the CPU kernel defines the Vectorized overloads before including
// this header so that the templates find them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "args.h"

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
// The softcap of a row or a kernel, read once from the arguments' softcap (0: none): z(x) is
// the transform when on, else x itself.
template <typename T>
struct SoftCap {
  bool on;
  T cap, rcp;
  FLS_HD explicit SoftCap(double softcap)
      : on(softcap > 0), cap(static_cast<T>(softcap)), rcp(on ? T(1) / cap : T(0)) {}
  FLS_HD T z(T x) const { return on ? softcap_z(x, cap, rcp) : x; }
};

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
  if (a.d == T(0)) return b;  // a holds nothing (empty, or all −inf): no rescaling, no exp
  if (b.d == T(0)) return a;
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

// max p = exp(m − lse) = 1 / d (exactly so in real arithmetic; 1/d is also the more accurate);
// an all −inf row (d = 0) keeps exp(m − lse) = NaN.
template <typename T>
FLS_HD T max_prob(T m, T d, T lse) {
  return d > T(0) ? T(1) / d : rm_exp(m - lse);
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
// (rcp = 1 / cap). The subtraction happens before rounding to the output dtype (docs/design.md §3).
template <typename V>
FLS_HD V grad_finish(V soft, V lin, V z, bool has_cap, V rcp) {
  V g = soft - lin;
  return has_cap ? g * softcap_dzdx(z, rcp) : g;
}

// ---- finalisation ------------------------------------------------------------------------------
//   L(y)   = w_y (1 − ε)(lse − z_y) + ε (M_y · lse − D_y)            M_y = ⟨r_y, w⟩
//   loss_i = λ L(y_a) + (1 − λ) L(y_b)   [mixup]   + λ_z W lse² − β_cp W (lse − Σpz)
//   W      = λ w_ya + (1 − λ) w_yb   (w_ya without mixup)
// ε_i is the per-sample or scalar ε, raised to min(1, ε·factor) when the row's detached
// confidence (max p, or p at the target) is below the adaptive threshold.

// Whether v is ±inf (written without isinf so that one spelling serves host and device).
template <typename T>
FLS_HD bool rm_isinf(T v) {
  return v == v && (v - v) != (v - v);
}
// a·b where a zero coefficient times ±inf gives 0 (zero-mass terms), but NaN stays NaN.
template <typename T>
FLS_HD T wmul(T a, T b) {
  return (a == T(0) && rm_isinf(b)) ? T(0) : a * b;
}
// c·go where c = 0 stays 0 even for an infinite or NaN upstream gradient (the "mean" over no
// counted rows is 0/0; PyTorch gives those rows a zero gradient too).
template <typename T>
FLS_HD T scaled(T c, T go) {
  return c == T(0) ? T(0) : c * go;
}

template <typename T>
FLS_HD T at(const void* p, int64_t i) {
  return static_cast<const T*>(p)[i];
}

// The mass rw_j = β S̃_y,j w_col of the j-th sparse neighbour of target y, and its column.
template <typename T>
FLS_HD T sparse_rw(const RowArgs& a, int64_t y, int64_t j) {
  const T v = at<T>(a.sp_val, y * a.K + j);
  return a.w ? v * at<T>(a.w, a.sp_idx[y * a.K + j]) : v;
}

// w_y and M_y = ⟨r_y, w⟩ for a target y: the dense part precomputed in `mass`, plus the sparse
// neighbours' masses.
template <typename T>
struct TargetTerms {
  T w, M;
};
template <typename T>
FLS_HD T class_weight(const RowArgs& a, int64_t y) {
  return a.w ? at<T>(a.w, y) : T(1);
}
template <typename T>
FLS_HD TargetTerms<T> target_terms(const RowArgs& a, int64_t y) {
  TargetTerms<T> t;
  t.w = class_weight<T>(a, y);
  t.M = at<T>(a.mass, a.R ? y : 0);
  for (int64_t j = 0; j < a.K; ++j) t.M += sparse_rw<T>(a, y, j);
  return t;
}

template <typename T>
FLS_HD T row_lambda(const RowArgs& a, int64_t i) {
  return a.lam_rows ? at<T>(a.lam_rows, i) : T(a.lam);
}

// W_i, the row's weight in "mean"'s denominator: w_ya (λ·w_ya + (1 − λ)·w_yb with mixup), 0 on
// ignored rows. It needs only the targets, so Σ W_i is known before any logit is read; the
// finalisation and the gradient form it from the target weights they already hold.
// On the GPU the one fused multiply-add is written out, so that every kernel rounds it alike (the
// compiler would otherwise choose which product to fuse by context: the Σ W_i pre-pass and the
// finalisation could differ in the last bit); host compilers do not contract (ISO C++ mode).
template <typename T>
FLS_HD T mixed_weight(T lam, T wa, T wb) {
#if defined(__CUDA_ARCH__)
  return fma(lam, wa, (T(1) - lam) * wb);
#else
  return lam * wa + (T(1) - lam) * wb;
#endif
}
template <typename T>
FLS_HD T row_weight(const RowArgs& a, int64_t i) {
  const int64_t ya = a.y_a[i];
  if (ya == a.ignore_index) return T(0);
  const T wa = class_weight<T>(a, ya);
  return a.y_b ? mixed_weight(row_lambda<T>(a, i), wa, class_weight<T>(a, a.y_b[i])) : wa;
}

// One dense smoothing row R_y,c over the local columns c: scale · p[c], or the constant scale
// when p is null (uniform smoothing without class weights). scale = 1 for a dense similarity row
// (its weights are folded in), r0 otherwise (p = the class weights).
template <typename T>
struct RRow {
  const T* p;
  T scale;
  FLS_HD T at(int64_t c) const { return p ? scale * p[c] : scale; }
};

template <typename T>
FLS_HD RRow<T> r_row(const RowArgs& a, int64_t y) {
  if (a.R) {
    if (y < 0 || y >= a.num_classes) y = 0;  // ignored rows: any row serves
    return {static_cast<const T*>(a.R) + y * a.num_classes + a.col_offset, T(1)};
  }
  const T* w = static_cast<const T*>(a.w);
  return {w ? w + a.col_offset : nullptr, static_cast<T>(a.r0)};
}

// The statistics of one row (args.h, "stats"), in the accumulation type.
template <typename T>
struct Stats {
  T m, d, s, Da, Db, za, zb;
  int64_t arg;
};

// The target-dependent statistics of a row, from its dense dots: z at the targets (0 when a
// target is not among the columns [col_offset, col_offset + C) held here), and D = dense dot +
// Σ_j rw_j z_{col_j} over the sparse neighbours held here (zero-mass terms give 0 at z = −inf).
// `zat(c)` returns z at local column c. dense_b is used only with a dense similarity (otherwise
// both targets share dense_a).
template <typename T, typename ZAt>
FLS_HD void target_stats(const RowArgs& a, int64_t i, T dense_a, T dense_b, ZAt zat,
                         Stats<T>& st) {
  st.za = st.zb = T(0);
  st.Da = dense_a;
  st.Db = a.y_b ? (a.R ? dense_b : dense_a) : T(0);
  const int64_t ya = a.y_a[i];
  if (ya == a.ignore_index) return;
  const int64_t lo = a.col_offset, hi = a.col_offset + a.C;
  for (int t = 0; t < (a.y_b ? 2 : 1); ++t) {
    const int64_t y = t == 0 ? ya : a.y_b[i];
    T& z_y = t == 0 ? st.za : st.zb;
    T& D = t == 0 ? st.Da : st.Db;
    if (y >= lo && y < hi) z_y = zat(y - lo);
    for (int64_t j = 0; j < a.K; ++j) {
      const int64_t col = a.sp_idx[y * a.K + j];
      if (col >= lo && col < hi) D += masked_term(sparse_rw<T>(a, y, j), zat(col - lo));
    }
  }
}

template <typename T>
struct Final {
  T loss, W, lse, eps, conf, pz, logp;  // logp = z_y − lse, log p at the target (0 if ignored)
};

// ---- the stats and pack rows (args.h's layouts) -------------------------------------------------

// An integer in a float slot: the bits of an int32 in a float, of an int64 in a double.
template <typename T>
FLS_HD T to_bits(int64_t v) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return __longlong_as_double(static_cast<long long>(v));
  } else {
    return __int_as_float(static_cast<int>(v));
  }
#else
  using B = std::conditional_t<std::is_same_v<T, double>, int64_t, int32_t>;
  const B b = static_cast<B>(v);
  T out;
  std::memcpy(&out, &b, sizeof(b));
  return out;
#endif
}

template <typename T>
FLS_HD int64_t from_bits(T v) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<int64_t>(__double_as_longlong(v));
  } else {
    return static_cast<int64_t>(__float_as_int(v));
  }
#else
  using B = std::conditional_t<std::is_same_v<T, double>, int64_t, int32_t>;
  B b;
  std::memcpy(&b, &v, sizeof(b));
  return static_cast<int64_t>(b);
#endif
}

template <typename T>
FLS_HD Stats<T> load_stats(const T* sr) {
  return {sr[S_M], sr[S_D], sr[S_S], sr[S_DA], sr[S_DB], sr[S_ZA], sr[S_ZB], from_bits(sr[S_ARG])};
}

template <typename T>
FLS_HD void store_stats(T* sr, const Stats<T>& st) {
  sr[S_M] = st.m;
  sr[S_D] = st.d;
  sr[S_S] = st.s;
  sr[S_DA] = st.Da;
  sr[S_DB] = st.Db;
  sr[S_ZA] = st.za;
  sr[S_ZB] = st.zb;
  sr[S_ARG] = to_bits<T>(st.arg);
}

template <typename T>
FLS_HD void store_pack(T* pr, const Final<T>& f, int64_t arg) {
  pr[P_LSE] = f.lse;
  pr[P_EPS] = f.eps;
  pr[P_PZ] = f.pz;
  pr[P_CONF] = f.conf;
  pr[P_ARG] = to_bits<T>(arg);
  pr[P_LOSS] = f.loss;
  pr[P_W] = f.W;
  pr[P_LOGP] = f.logp;
}

// Whether the statistics gather s = Σ exp(z − m)·z: for the confidence penalty, and for the
// entropy H = lse − Σp·z that return_stats reports.
FLS_HD bool gathers_s(const RowArgs& a) { return a.cp != 0 || a.need_stats; }

template <typename T>
FLS_HD Final<T> finalize_row(const RowArgs& a, int64_t i, const Stats<T>& st) {
  Final<T> f;
  f.lse = finish_lse(SoftmaxState<T>{st.m, st.d, st.s});
  f.conf = max_prob(st.m, st.d, f.lse);
  f.pz = gathers_s(a) ? st.s / st.d : T(0);
  f.loss = f.W = f.eps = f.logp = T(0);
  const int64_t ya = a.y_a[i];
  if (ya == a.ignore_index) return f;
  f.logp = st.za - f.lse;
  T eps = a.eps_rows ? at<T>(a.eps_rows, i) : T(a.eps);
  if (a.adaptive_mode != 0) {
    // the row's own detached confidence: max p, or p at the target
    const T c = a.adaptive_mode == 1 ? f.conf : rm_exp(st.za - f.lse);
    if (c < T(a.adaptive_threshold)) {
      const T raised = eps * T(a.adaptive_factor);
      eps = raised > T(1) ? T(1) : raised;
    }
  }
  f.eps = eps;
  const TargetTerms<T> ta = target_terms<T>(a, ya);
  T loss = wmul(ta.w * (T(1) - eps), f.lse - st.za) + wmul(eps, ta.M * f.lse - st.Da);
  T W = ta.w;  // row_weight
  if (a.y_b) {
    const T lam = row_lambda<T>(a, i);
    const TargetTerms<T> tb = target_terms<T>(a, a.y_b[i]);
    const T lb = wmul(tb.w * (T(1) - eps), f.lse - st.zb) + wmul(eps, tb.M * f.lse - st.Db);
    loss = wmul(lam, loss) + wmul(T(1) - lam, lb);
    W = mixed_weight(lam, ta.w, tb.w);
  }
  if (a.z_loss != 0) loss += T(a.z_loss) * W * f.lse * f.lse;
  if (a.cp != 0) loss -= T(a.cp) * W * (f.lse - f.pz);
  f.loss = loss;
  f.W = W;
  return f;
}

// The per-row coefficients of the gradient g (the header comment), times the upstream gradient
// go, from the row's lse and effective ε. Point masses: t_a at y_a, t_b at y_b, and
// scaled(rw_j · sp_a, go) at the sparse neighbours of y_a (sp_b for y_b's). All zero on an
// ignored row.
template <typename T>
struct Coefs {
  T coef, gamma, u_a, u_b, t_a, t_b, sp_a, sp_b, go;
};

template <typename T>
FLS_HD Coefs<T> grad_coefs(const RowArgs& a, int64_t i, T lse, T eps, T go) {
  Coefs<T> k{T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0), go};
  const int64_t ya = a.y_a[i];
  if (ya == a.ignore_index) return k;
  const TargetTerms<T> ta = target_terms<T>(a, ya);
  T W = ta.w;  // row_weight
  if (a.y_b) {
    const T lam = row_lambda<T>(a, i);
    const TargetTerms<T> tb = target_terms<T>(a, a.y_b[i]);
    W = mixed_weight(lam, ta.w, tb.w);
    k.coef = lam * (ta.w * (T(1) - eps) + eps * ta.M) +
             (T(1) - lam) * (tb.w * (T(1) - eps) + eps * tb.M);
    k.t_a = lam * ta.w * (T(1) - eps);
    k.t_b = (T(1) - lam) * tb.w * (T(1) - eps);
    // one R row for both targets unless the similarity is dense: λ + (1 − λ) = 1
    k.u_a = a.R ? eps * lam : eps;
    k.u_b = a.R ? eps * (T(1) - lam) : T(0);
    k.sp_a = eps * lam;
    k.sp_b = eps * (T(1) - lam);
  } else {
    k.coef = ta.w * (T(1) - eps) + eps * ta.M;
    k.t_a = ta.w * (T(1) - eps);
    k.u_a = eps;
    k.sp_a = eps;
  }
  if (a.z_loss != 0) k.coef += T(2) * T(a.z_loss) * W * lse;
  if (a.cp != 0) k.gamma = T(a.cp) * W;
  k.coef = scaled(k.coef, go);
  k.gamma = scaled(k.gamma, go);
  k.u_a = scaled(k.u_a, go);
  k.u_b = scaled(k.u_b, go);
  k.t_a = scaled(k.t_a, go);
  k.t_b = scaled(k.t_b, go);
  return k;
}

// The upstream gradient of row i as given: go[i] or go[0].
template <typename T>
FLS_HD T raw_go(const RowArgs& a, int64_t i) {
  return at<T>(a.go, a.go_per_row ? i : 0);
}

// The upstream gradient of row i's loss: raw_go, divided by ΣW (pack row N) for "mean".
template <typename T>
FLS_HD T row_go(const RowArgs& a, int64_t i) {
  T go = raw_go<T>(a, i);
  if (a.go_mean) go = go / at<T>(a.pack, a.N * kWidth + 0);
  return go;
}

// ext_rescale on a CPU or GPU row: whether the row is left as it is (its upstream gradient is 1).
template <typename T>
FLS_HD bool unit_row(const RowArgs& a, int64_t i) {
  return a.skip_unit && raw_go<T>(a, i) == T(1);
}

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
}  // inline namespace CPU_CAPABILITY
#endif
}  // namespace rowmath
}  // namespace fused_ls
