// The CPU row kernels, written once and compiled once per instruction set.
//
// kernel_default.cpp, kernel_avx2.cpp and kernel_avx512.cpp define CPU_CAPABILITY (DEFAULT, AVX2,
// AVX512) and the matching CPU_CAPABILITY_* macro, then include this file; setup.py adds the ISA
// flags (-mavx2 -mfma ... / -mavx512f ...) to those translation units only. Everything here lives
// in namespace fused_ls::cpu::<CPU_CAPABILITY> (and at::vec / rowmath use the same inline
// namespace), so the three copies never meet at link time; ops.cpp picks one at run time.
// This file must not include ATen operator headers: only at::vec and c10 scalar types, so that
// as little code as possible is compiled with the wide-ISA flags.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including kernel_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "args.h"

// Vectorized overloads of the rowmath primitives; they must be declared before rowmath.h's
// templates so that those templates find them.
namespace fused_ls {
namespace rowmath {
inline namespace CPU_CAPABILITY {
// exp of the vector loops. Every argument the kernels pass is ≤ ~0 (z − m, z − lse) or NaN, so
// for fp32 we use at::vec's inline exp_u20 (max error 20 ulp ≈ 2.4e-6 relative, well inside
// fp32's tolerance) instead of a call to Sleef's 1-ulp exp; exp_u20 clamps NaN to a finite value,
// so NaN lanes are passed through explicitly. fp64 keeps the 1-ulp exp.
template <typename T>
inline at::vec::Vectorized<T> rm_exp(at::vec::Vectorized<T> v) {
  return v.exp();
}
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> rm_exp(at::vec::Vectorized<float> v) {
  using Vec = at::vec::Vectorized<float>;
  return Vec::blendv(v.exp_u20(), v, v.isnan());
}
#endif
// exp for arguments known to be finite or −inf (z − m with a finite chunk max m, z − lse with a
// finite lse): no NaN pass-through needed.
template <typename T>
inline at::vec::Vectorized<T> exp_no_nan(at::vec::Vectorized<T> v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return v.exp_u20();
#endif
  return rm_exp(v);
}
template <typename T>
inline at::vec::Vectorized<T> rm_log(at::vec::Vectorized<T> v) {
  return v.log();
}
template <typename T>
inline at::vec::Vectorized<T> rm_tanh(at::vec::Vectorized<T> v) {
  return v.tanh();
}
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// fp32 tanh of the softcap transform, inline (at::vec's tanh is a call to Sleef's 1-ulp
// double-float tanh, which made the soft-capped kernels ~4× slower than the plain ones).
// With a = |v|:
//   a < 0.625:  tanh a = a + a³ · P(a²), P a degree-5 minimax fit of (tanh a − a) / a³ (relative
//               error of the fit 1.6e-10; ≤ 1 ulp in fp32, exact as a → 0, so that z = x for
//               small x just as without softcap);
//   a ≥ 0.625:  tanh a = 1 − 2 / (exp(2a) + 1), with a clamped to 10 (tanh 10 rounds to 1 in
//               fp32) and exp_u20: its relative error δ ≤ 2.4e-6 enters damped, by
//               2e/(e + 1)² / tanh a ≤ 0.75 at a = 0.625 and falling fast beyond (measured over
//               every 7th fp32 in [0, 12]: ≤ 1.9 ulp overall, the worst just above 0.625).
// The sign bit of v is copied onto the result (tanh(−0) = −0), ±inf gives ±1, NaN passes through.
template <>
inline at::vec::Vectorized<float> rm_tanh(at::vec::Vectorized<float> v) {
  using Vec = at::vec::Vectorized<float>;
  const Vec a = v.abs();
  const Vec s = a * a;
  Vec p(0x1.18e4a6p-9f);
  p = at::vec::fmadd(p, s, Vec(-0x1.0bf5bcp-7f));
  p = at::vec::fmadd(p, s, Vec(0x1.638b7ep-6f));
  p = at::vec::fmadd(p, s, Vec(-0x1.b9ee94p-5f));
  p = at::vec::fmadd(p, s, Vec(0x1.111066p-3f));
  p = at::vec::fmadd(p, s, Vec(-0x1.555554p-2f));
  Vec t = at::vec::fmadd(a * s, p, a);
  // the exp branch only when a lane needs it (NaN lanes do not: they are passed through below);
  // with the usual |x| < 0.625 · softcap, never
  const Vec is_large = a >= Vec(0.625f);
  constexpr int all_lanes = static_cast<int>((1ull << Vec::size()) - 1);
  if ((is_large.zero_mask() & all_lanes) != all_lanes) {
    const Vec e = (at::vec::minimum(a, Vec(10.f)) * Vec(2.f)).exp_u20();
    t = Vec::blendv(t, Vec(1.f) - Vec(2.f) / (e + Vec(1.f)), is_large);
  }
  const Vec r = t | (v & Vec(-0.f));  // t ≥ 0: copy v's sign bit onto it
  return Vec::blendv(r, v, v.isnan());
}
#endif
template <typename T>
inline at::vec::Vectorized<T> rm_zero_where_zero(at::vec::Vectorized<T> test,
                                                 at::vec::Vectorized<T> v) {
  using Vec = at::vec::Vectorized<T>;
  return Vec::blendv(v, Vec(T(0)), test == Vec(T(0)));
}
}  // inline namespace CPU_CAPABILITY
}  // namespace rowmath
}  // namespace fused_ls

#include "../rowmath.h"

namespace fused_ls {
namespace cpu {
namespace CPU_CAPABILITY {

namespace rm = fused_ls::rowmath;
using at::vec::Vectorized;

// Columns per chunk, swept twice by the statistics loops while it sits in L1 (2048 fp32 = 8 KiB).
// fp32/fp64 logits without softcap are read in place; bf16/fp16 or soft-capped logits are first
// converted to the accumulation dtype into a chunk buffer.
constexpr int64_t kChunk = 2048;

template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}

template <typename T>
inline T reduce_min(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) {
    m = (lanes[k] < m || lanes[k] != lanes[k]) ? lanes[k] : m;  // NaN propagates
  }
  return m;
}

template <typename T>
inline T reduce_max(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) m = rm::nan_max(m, lanes[k]);
  return m;
}

// A chunk of z in the accumulation dtype, swept as whole vectors: `full` columns read straight
// from `src`, then (when n is not a multiple of the vector width) one padded tail vector.
template <typename acc_t>
struct ChunkView {
  const acc_t* src;
  int64_t n, full;
  alignas(64) acc_t tail[at::vec::Vectorized<acc_t>::size()];

  template <typename F>  // f(z, j, cnt): the vector of columns [j, j + cnt)
  inline void for_each(F&& f) const {
    using Vec = Vectorized<acc_t>;
    for (int64_t j = 0; j < full; j += Vec::size()) f(Vec::loadu(src + j), j, Vec::size());
    if (full < n) f(Vec::loadu(tail), full, n - full);
  }
  inline acc_t at(int64_t j) const { return j < full ? src[j] : tail[j - full]; }
};

// z for n ≤ kChunk logits: the logits themselves when they already are z (accumulation dtype,
// no softcap), else converted and/or soft-capped into buf (rcp = 1 / cap). Tail lanes past n
// hold `pad`.
template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* x, int64_t n, acc_t* buf, bool has_cap, acc_t cap,
                       acc_t rcp, acc_t pad, ChunkView<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  v.n = n;
  v.full = n / W * W;
  const acc_t* src = buf;  // the chunk in the accumulation dtype, before the softcap
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!has_cap) {
      v.src = x;
      for (int64_t j = v.full; j < v.full + W; ++j) v.tail[j - v.full] = j < n ? x[j] : pad;
      return;
    }
    src = x;  // soft-capped straight from x into buf below
  } else {
    using RVec = Vectorized<scalar_t>;  // 2W lanes of bf16 / fp16
    int64_t j = 0;
    for (; j + RVec::size() <= n; j += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(x + j));
      lo.store(buf + j);
      hi.store(buf + j + W);
    }
    for (; j < n; ++j) buf[j] = static_cast<acc_t>(x[j]);
  }
  if (has_cap) {
    const Vec vcap(cap), vrcp(rcp);
    for (int64_t j = 0; j < v.full; j += W) {
      rm::softcap_z(Vec::loadu(src + j), vcap, vrcp).store(buf + j);
    }
    if (v.full < n) {  // partial load: src may be x, which ends at n
      const int64_t cnt = n - v.full;
      rm::softcap_z(Vec::loadu(src + v.full, cnt), vcap, vrcp).store(buf + v.full, cnt);
    }
  }
  v.src = buf;
  for (int64_t j = v.full; j < v.full + W; ++j) v.tail[j - v.full] = j < n ? buf[j] : pad;
}

// Writes n accumulation-dtype values to the output dtype (round to nearest even).
template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* buf, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, buf, n * sizeof(acc_t));
  } else {
    using Vec = Vectorized<acc_t>;
    using RVec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    int64_t j = 0;
    for (; j + RVec::size() <= n; j += RVec::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(buf + j), Vec::loadu(buf + j + W))
          .store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
  }
}

// Row statistics (see args.h and rowmath.h) for rows [begin, end). Per row: one read of the
// logits (C · sizeof(scalar_t) bytes) and of the R row(s) (C · sizeof(acc_t), cache-resident when
// R is [1, C]); per chunk one sweep for max, min and the dots, one exp sweep from L1 for the
// softmax state relative to the chunk's max, merged into the row's state with rowmath::merge;
// per row one more vectorised scan of the chunk that holds the argmax.
template <typename scalar_t, typename acc_t>
void stats_rows(const StatsArgs& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  const acc_t NEG = rm::neg_inf<acc_t>();
  alignas(64) acc_t buf[kChunk];
  ChunkView<acc_t> cv;
  const acc_t* R = static_cast<const acc_t*>(a.R);
  const bool has_cap = a.softcap > 0;
  const acc_t cap = static_cast<acc_t>(a.softcap);
  const acc_t rcp = has_cap ? acc_t(1) / cap : acc_t(0);
  const int64_t C = a.C;

  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* xr = static_cast<const scalar_t*>(a.x) + i * a.x_stride;
    const acc_t* Ra = R + (a.ridx_a ? a.ridx_a[i] : 0) * C;
    const acc_t* Rb = a.ridx_b ? R + a.ridx_b[i] * C : nullptr;
    rm::SoftmaxState<acc_t> st = rm::empty_state<acc_t>();
    acc_t best = NEG;     // the best chunk max so far, and where that chunk starts
    int64_t best_c0 = 0;
    acc_t dot_a = 0, dot_b = 0;

    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      load_chunk<scalar_t, acc_t>(xr + c0, n, buf, has_cap, cap, rcp, NEG, cv);
      // sweep 1: max, min, and the dots Σ R z as plain products; padded lanes hold z = −inf and
      // R = 0 (masked load). Only if the chunk holds a −inf or NaN (min tells) are the dots
      // redone with zero-mass terms forced to 0 — the rare masked-vocabulary case.
      Vec vmax(NEG), vmin(-NEG), va(acc_t(0)), vb(acc_t(0));
      const int64_t nfull = cv.full;
      auto plain = [&](const Vec& z, int64_t j, int64_t cnt) {
        vmax = at::vec::maximum(vmax, z);
        // the tail's padded lanes enter the min and the dots as 0 (0 · −inf would be NaN)
        const Vec zd = j < nfull ? z : Vec::set(Vec(acc_t(0)), z, cnt);
        vmin = at::vec::minimum(vmin, zd);
        va = at::vec::fmadd(Vec::loadu(Ra + c0 + j, cnt), zd, va);
        if (Rb) vb = at::vec::fmadd(Vec::loadu(Rb + c0 + j, cnt), zd, vb);
      };
      cv.for_each(plain);
      const acc_t cmin = reduce_min(vmin);
      if (!(cmin > NEG)) {  // −inf or NaN in the chunk
        va = Vec(acc_t(0));
        vb = Vec(acc_t(0));
        cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
          va += rm::masked_term(Vec::loadu(Ra + c0 + j, cnt), z);
          if (Rb) vb += rm::masked_term(Vec::loadu(Rb + c0 + j, cnt), z);
        });
      }
      const acc_t cm = reduce_max(vmax);
      dot_a += reduce_sum(va);
      if (Rb) dot_b += reduce_sum(vb);
      // argmax: remember the first chunk holding the row's max (or its first NaN)
      if (c0 == 0 || rm::argmax_takes<acc_t>(cm, c0, best, best_c0)) {
        best = cm;
        best_c0 = c0;
      }
      // sweep 2 (from L1): softmax state of the chunk relative to its own max (an all −inf chunk
      // adds nothing), merged into the row's state
      if (cm != NEG) {
        const Vec vcm(cm);
        Vec vd(acc_t(0)), vs(acc_t(0));
        // a finite max means no NaN or +inf in the chunk: z − m is finite or −inf
        const bool finite = cm == cm && cm != -NEG;
        // this sweep is compute-bound (exp): meanwhile, prefetch the next chunk of the row (sweep
        // 1 would otherwise stall on it; prefetches past the row's end do not fault)
        const char* next = reinterpret_cast<const char*>(xr + c0 + kChunk);
        constexpr int64_t step = sizeof(scalar_t);
        if (a.need_pz) {
          cv.for_each([&](const Vec& z, int64_t j, int64_t) {
            __builtin_prefetch(next + j * step, 0, 3);
            const Vec e = finite ? rm::exp_no_nan(z - vcm) : rm::rm_exp(z - vcm);
            vd += e;
            vs += rm::pz_term(e, z);
          });
        } else if (finite) {
          cv.for_each([&](const Vec& z, int64_t j, int64_t) {
            __builtin_prefetch(next + j * step, 0, 3);
            vd += rm::exp_no_nan(z - vcm);
          });
        } else {
          cv.for_each([&](const Vec& z, int64_t, int64_t) { vd += rm::rm_exp(z - vcm); });
        }
        st = rm::merge(st, rm::SoftmaxState<acc_t>{cm, reduce_sum(vd), reduce_sum(vs)});
      }
    }
    // the argmax's position inside its chunk: one vectorised scan of that chunk per row
    const int64_t nb = std::min(kChunk, C - best_c0);
    load_chunk<scalar_t, acc_t>(xr + best_c0, nb, buf, has_cap, cap, rcp, NEG, cv);
    const bool find_nan = best != best;
    const Vec vbest(best);
    int64_t arg = -1;
    cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
      if (arg >= 0) return;
      const int hits = ~(find_nan ? z.isnan() : (z == vbest)).zero_mask() &
                       static_cast<int>((1ull << cnt) - 1);
      if (hits) arg = best_c0 + j + __builtin_ctz(static_cast<unsigned>(hits));
    });
    if (arg < 0) arg = best_c0;  // not reached: the chunk holds its own max
    static_cast<acc_t*>(a.m)[i] = st.m;
    static_cast<acc_t*>(a.lse)[i] = rm::finish_lse(st);
    a.argmax[i] = arg;
    static_cast<acc_t*>(a.dot_a)[i] = dot_a;
    if (a.dot_b) static_cast<acc_t*>(a.dot_b)[i] = dot_b;
    if (a.need_pz) static_cast<acc_t*>(a.pz)[i] = rm::finish_pz(st);
  }
}

// Gradient rows [begin, end). Per row: one read of the logits, one write of the gradient
// (C · sizeof(scalar_t) bytes each), the R row(s), and 2 + K scattered columns. The target and
// sparse-similarity masses hit a few columns only: those columns' logits are read before the
// dense pass (out may alias x), the dense pass writes every column without them, and the few
// columns are then rewritten from an accumulation-dtype expression that includes them, so the
// subtraction happens before rounding (DESIGN.md §3).
template <typename scalar_t, typename acc_t>
void grad_rows_impl(const GradArgs& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  alignas(64) acc_t buf[kChunk];
  ChunkView<acc_t> cv;
  const acc_t* R = static_cast<const acc_t*>(a.R);
  const bool has_cap = a.softcap > 0;
  const acc_t cap = static_cast<acc_t>(a.softcap);
  const acc_t rcp = has_cap ? acc_t(1) / cap : acc_t(0);
  const bool has_gamma = a.gamma != nullptr;
  const int64_t C = a.C;
  auto get = [](const void* p, int64_t i) { return static_cast<const acc_t*>(p)[i]; };

  const int64_t max_fix = 2 + a.K;
  std::vector<int64_t> fcol(max_fix);
  std::vector<acc_t> fmass(max_fix), fx(max_fix);

  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* xr = static_cast<const scalar_t*>(a.x) + i * a.x_stride;
    scalar_t* orow = static_cast<scalar_t*>(a.out) + i * a.out_stride;
    const acc_t* Ra = R + (a.ridx_a ? a.ridx_a[i] : 0) * C;
    const acc_t* Rb = a.ridx_b ? R + a.ridx_b[i] * C : nullptr;
    const acc_t lse = get(a.lse, i), coef = get(a.coef, i);
    const acc_t gamma = has_gamma ? get(a.gamma, i) : acc_t(0);
    const acc_t pz = has_gamma ? get(a.pz, i) : acc_t(0);
    const acc_t ua = get(a.u_a, i);
    const acc_t ub = (Rb && a.u_b) ? get(a.u_b, i) : acc_t(0);

    // 1. the fix-up columns and their logits, read before anything of this row is written
    int64_t nf = 0;
    fcol[nf] = a.y_a[i];
    fmass[nf++] = get(a.t_a, i);
    if (a.y_b) {
      fcol[nf] = a.y_b[i];
      fmass[nf++] = get(a.t_b, i);
    }
    for (int64_t k = 0; k < a.K; ++k) {
      fcol[nf] = a.sp_cols[i * a.K + k];
      fmass[nf++] = get(a.sp_mass, i * a.K + k);
    }
    for (int64_t f = 0; f < nf; ++f) fx[f] = static_cast<acc_t>(xr[fcol[f]]);

    // 2. dense pass: g = softmax part − u_a R_a − u_b R_b, × dz/dx
    const Vec vlse(lse), vcoef(coef), vgamma(gamma), vpz(pz), vua(ua), vub(ub), vrcp(rcp);
    const bool lse_finite = lse == lse && lse != -rm::neg_inf<acc_t>() && lse != rm::neg_inf<acc_t>();
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      load_chunk<scalar_t, acc_t>(xr + c0, n, buf, has_cap, cap, rcp, acc_t(0), cv);
      // same dtype: write each vector straight into out (reading x first, so out may alias x);
      // else into buf, converted to the output dtype below
      constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
      acc_t* dst = direct ? reinterpret_cast<acc_t*>(orow + c0) : buf;
      cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
        // a finite lse means the row holds no NaN or +inf: z − lse is finite or −inf
        const Vec p = lse_finite ? rm::exp_no_nan(z - vlse) : rm::rm_exp(z - vlse);
        const Vec soft = has_gamma ? rm::grad_softmax_part_p(p, z, vcoef, vgamma, vpz)
                                   : rm::grad_softmax_part_p(p, vcoef);
        Vec lin = vua * Vec::loadu(Ra + c0 + j, cnt);
        if (Rb) lin += vub * Vec::loadu(Rb + c0 + j, cnt);
        rm::grad_finish(soft, lin, z, has_cap, vrcp).store(dst + j, cnt);
      });
      if constexpr (!direct) store_chunk<scalar_t, acc_t>(buf, n, orow + c0);
    }

    // 3. the fix-up columns, with every mass that lands on them (duplicates write equal values)
    for (int64_t f = 0; f < nf; ++f) {
      const int64_t c = fcol[f];
      acc_t lin = ua * Ra[c] + (Rb ? ub * Rb[c] : acc_t(0));
      for (int64_t f2 = 0; f2 < nf; ++f2) {
        if (fcol[f2] == c) lin += fmass[f2];
      }
      const acc_t z = has_cap ? rm::softcap_z(fx[f], cap, rcp) : fx[f];
      const acc_t soft = has_gamma ? rm::grad_softmax_part(z, lse, coef, gamma, pz)
                                   : rm::grad_softmax_part(z, lse, coef);
      orow[c] = static_cast<scalar_t>(rm::grad_finish(soft, lin, z, has_cap, rcp));
    }
  }
}

// Entry points seen by ops.cpp (one set per ISA namespace).
void row_stats(const StatsArgs& a, Dtype dt, int64_t begin, int64_t end) {
  switch (dt) {
    case Dtype::F32: return stats_rows<float, float>(a, begin, end);
    case Dtype::F64: return stats_rows<double, double>(a, begin, end);
    case Dtype::BF16: return stats_rows<c10::BFloat16, float>(a, begin, end);
    case Dtype::F16: return stats_rows<c10::Half, float>(a, begin, end);
  }
}

void grad_rows(const GradArgs& a, Dtype dt, int64_t begin, int64_t end) {
  switch (dt) {
    case Dtype::F32: return grad_rows_impl<float, float>(a, begin, end);
    case Dtype::F64: return grad_rows_impl<double, double>(a, begin, end);
    case Dtype::BF16: return grad_rows_impl<c10::BFloat16, float>(a, begin, end);
    case Dtype::F16: return grad_rows_impl<c10::Half, float>(a, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_ls
