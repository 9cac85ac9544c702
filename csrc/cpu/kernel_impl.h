// The CPU row kernels, written once and compiled once per instruction set.
//
// kernel_default.cpp, kernel_avx2.cpp and kernel_avx512.cpp define CPU_CAPABILITY (DEFAULT, AVX2,
// AVX512) and the matching CPU_CAPABILITY_* macro, then include this file; fused_ls/build.py adds the ISA
// flags (-mavx2 -mfma ... / -mavx512f ...) to those translation units only. Everything here lives
// in namespace fused_ls::cpu::<CPU_CAPABILITY> (and at::vec / rowmath use the same inline
// namespace), so the three copies never meet at link time; ops.cpp picks one at run time.
// This file must not include ATen operator headers: only at::vec and c10 scalar types, so that
// as little code as possible is compiled with the wide-ISA flags.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including kernel_impl.h"
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>  // streaming stores
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../args.h"

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
// max(a, b) in one instruction where the ISA has it, with x86's rule: b where either lane is NaN
// (at::vec::maximum propagates NaN from both sides in four instructions). Callers put a NaN
// they must keep in b, or detect NaN some other way.
template <typename T>
inline at::vec::Vectorized<T> max_raw(const at::vec::Vectorized<T>& a,
                                      const at::vec::Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm256_max_pd(a, b);
#endif
  return at::vec::maximum(a, b);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// exp(x) of the hot loops for x ≤ 0 or −inf (z − m with a finite chunk max m, z − lse with a
// finite lse), in 11 vector instructions, max error 3 ulp (exp_u20: 20 ulp in ~19 ops; the statistics
// pass is bound by this exp). x = n·ln2 + r with n = round(x·log2 e) and r from a two-constant
// Cody-Waite reduction (|r| ≤ ln2/2, exact to ~2⁻³³), exp r by a degree-5 polynomial fitted to the
// relative error on that interval (2.8 ulp in fp32 Horner), times 2ⁿ: AVX-512's scalef, which
// rounds what underflows to 0; on AVX2 the exponent bits, with n ≥ −127 (2⁻¹²⁷ has no normal
// bits: 0). x is clamped at −110 first, so exp(−∞) = 0 exactly (zero-mass terms stay 0), and
// exp(0) = 1 exactly (r = 0, the polynomial's constant terms are 1).
inline at::vec::Vectorized<float> exp_neg(at::vec::Vectorized<float> v) {
  using Vec = at::vec::Vectorized<float>;
  const Vec x = max_raw(Vec(-110.f), v);  // a NaN v stays NaN (the second operand)
  const Vec n = (x * Vec(1.44269504088896341f)).round();  // round half to even
  Vec r = at::vec::fnmadd(n, Vec(0.693359375f), x);       // ln2_hi: 9 bits, n·ln2_hi exact
  r = at::vec::fnmadd(n, Vec(-2.12194440e-4f), r);        // ln2_lo = ln2 − ln2_hi
  Vec p = at::vec::fmadd(Vec(0.008312528f), r, Vec(0.041890118f));
  p = at::vec::fmadd(p, r, Vec(0.16667114f));
  p = at::vec::fmadd(p, r, Vec(0.4999923f));
  p = at::vec::fmadd(p, r, Vec(1.f));
  p = at::vec::fmadd(p, r, Vec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(at::vec::maximum(n, Vec(-127.f))),
                       _mm256_set1_epi32(127)),
      23);
  return p * Vec(_mm256_castsi256_ps(e));
#endif
}
#endif

// exp for arguments known to be finite or −inf (see exp_neg): no NaN pass-through needed.
template <typename T>
inline at::vec::Vectorized<T> exp_no_nan(at::vec::Vectorized<T> v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return exp_neg(v);
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

// Horizontal reductions of one vector (at::vec's shuffle trees: a few instructions, not a store
// and a scalar loop — at classifier sizes these are a large part of a row's fixed cost).
template <typename T>
inline T reduce_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
inline T reduce_max(const Vectorized<T>& v) {  // NaN propagates
  return at::vec::vec_reduce_all<T>(
      [](Vectorized<T>& a, Vectorized<T>& b) { return at::vec::maximum(a, b); }, v);
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
// no softcap), else converted and/or soft-capped into buf. Tail lanes past n hold `pad`.
template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* x, int64_t n, acc_t* buf, const rm::SoftCap<acc_t>& sc,
                       acc_t pad, ChunkView<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  v.n = n;
  v.full = n / W * W;
  const acc_t* src = buf;  // the chunk in the accumulation dtype, before the softcap
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!sc.on) {
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
  if (sc.on) {
    const Vec vcap(sc.cap), vrcp(sc.rcp);
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

// A full vector of v at dst: a non-temporal (streaming) store when `stream` (dst must then be
// aligned to the vector's size), which skips the read-for-ownership of a destination line that
// is not in cache (a fresh gradient buffer) and does not evict the row being worked on; else an
// ordinary store. The portable path has no streaming store.
template <typename T>
inline void store_vec(T* dst, const Vectorized<T>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(reinterpret_cast<float*>(dst), __m512(v));
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(reinterpret_cast<double*>(dst), __m512d(v));
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), __m512i(v));
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(reinterpret_cast<float*>(dst), __m256(v));
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(reinterpret_cast<double*>(dst), __m256d(v));
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), __m256i(v));
    }
    return;
  }
#endif
  v.store(dst);
}

// Whether streaming stores serve: a compiled path that has them, and dst aligned to a vector.
template <typename T>
inline bool can_stream(const void* dst) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return reinterpret_cast<uintptr_t>(dst) % sizeof(Vectorized<T>) == 0;
#else
  (void)dst;
  return false;
#endif
}

// Orders this thread's streaming stores before what follows (the fix-up columns rewritten over
// them; the caller reading the gradient).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// fp32 → bf16 of a chunk with AVX512-BF16's one conversion instruction per 32 values (at::vec's
// rounding takes ~14), for CPUs that have it (bf16_native()). Both round to nearest even; the
// instruction flushes denormal inputs to zero, so a group of 32 holding one is converted the
// portable way (exact), and NaN stays NaN.
__attribute__((target("avx512bf16"))) void store_bf16_native(const float* buf, int64_t n,
                                                             c10::BFloat16* dst, bool stream) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 lo = _mm512_loadu_ps(buf + j), hi = _mm512_loadu_ps(buf + j + 16);
    constexpr int kDenormal = 0x20;  // vfpclassps category
    __m512i r;
    if ((_mm512_fpclass_ps_mask(lo, kDenormal) | _mm512_fpclass_ps_mask(hi, kDenormal)) != 0) {
      r = at::vec::convert_from_float<c10::BFloat16>(Vectorized<float>(lo), Vectorized<float>(hi));
    } else {
      r = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo in the low half
    }
    store_vec(dst + j, Vectorized<c10::BFloat16>(r), stream);
  }
  for (; j < n; ++j) dst[j] = static_cast<c10::BFloat16>(buf[j]);
}

inline bool bf16_native() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

// Writes n accumulation-dtype values to the low-precision output dtype (round to nearest even);
// full vectors streamed when `stream` (dst aligned: chunks start at multiples of kChunk columns).
// Same-dtype outputs never come here: their kernels write each vector into the output directly.
template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* buf, int64_t n, scalar_t* dst, bool stream = false) {
  static_assert(!std::is_same_v<scalar_t, acc_t>, "same-dtype outputs are written in place");
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (bf16_native()) return store_bf16_native(buf, n, dst, stream);
  }
#endif
  using RVec = Vectorized<scalar_t>;
  int64_t j = 0;
  for (; j + RVec::size() <= n; j += RVec::size()) {
    store_vec(dst + j,
              at::vec::convert_from_float<scalar_t>(Vec::loadu(buf + j), Vec::loadu(buf + j + W)),
              stream);
  }
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
}

// What the one-pass gradient keeps of a row between its statistics and its gradient (in the
// thread's cache, not re-read from memory): e_c = exp(z_c − m_k) of every column c with m_k the
// max of c's chunk k, so that p_c = e_c · exp(m_k − lse) needs no second exp; the chunk maxima;
// and z itself when the gradient reads it (softcap's dz/dx, the confidence penalty's γ(z − Σpz)).
// C accumulation-dtype values per buffer: 128 KB for a row of 32000 in fp32, L2-resident.
template <typename acc_t>
struct RowKeep {
  std::vector<acc_t> e, z, cmax;
  bool with_z = false;
  bool finite = true;  // every chunk max is finite or −inf (else the exact fallback from x)
  void init(int64_t C, bool need_z) {
    e.resize(C);
    cmax.resize((C + kChunk - 1) / kChunk);
    with_z = need_z;
    if (need_z) z.resize(C);
  }
};

// Statistics of one row (rowmath.h Stats): one read of the row (C · sizeof(scalar_t) bytes) and
// of the dense R row(s) (cache-resident when they are the class weights), per chunk one sweep
// for max, min and the dots, one exp sweep from L1 for the softmax state relative to the chunk's
// max, merged into the row's state with rowmath::merge; with need_stats one more vectorised
// scan of the chunk that holds the argmax; then O(2 + K) scattered reads for the targets and
// sparse neighbours. With `keep`, the exp sweep also stores e (and z) for grad_row.
template <typename scalar_t, typename acc_t>
rm::Stats<acc_t> row_stats(const RowArgs& a, int64_t i, acc_t* buf, ChunkView<acc_t>& cv,
                           RowKeep<acc_t>* keep = nullptr) {
  using Vec = Vectorized<acc_t>;
  const acc_t NEG = rm::neg_inf<acc_t>();
  const rm::SoftCap<acc_t> sc(a.softcap);
  const int64_t C = a.C;
  const scalar_t* xr = static_cast<const scalar_t*>(a.x) + i * a.x_stride;
  const rm::RRow<acc_t> Ra = rm::r_row<acc_t>(a, a.y_a[i]);
  const bool two = a.R && a.y_b;  // a second dense row (mixup with a dense similarity)
  const rm::RRow<acc_t> Rb = two ? rm::r_row<acc_t>(a, a.y_b[i]) : Ra;
  const bool dots = Ra.scale != acc_t(0);
  if (keep) keep->finite = true;
  rm::SoftmaxState<acc_t> st = rm::empty_state<acc_t>();
  acc_t best = NEG;  // the best chunk max so far, and where that chunk starts
  int64_t best_c0 = 0;
  acc_t dot_a = 0, dot_b = 0;

  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    load_chunk<scalar_t, acc_t>(xr + c0, n, buf, sc, NEG, cv);
    // sweep 1: max, the −inf lanes, and the dots Σ R z as plain products; padded lanes hold
    // z = −inf and R = 0 (masked load). Only if the chunk holds a −inf or NaN (the −inf lanes or
    // a NaN max tell) are the dots redone with zero-mass terms forced to 0 — the rare
    // masked-vocabulary case. Without an R row (uniform mass, every term counts: Σ z) there is
    // nothing to redo, and the sweep is a max and a sum.
    const Vec vneg(NEG);
    Vec vmax(NEG), vinf(acc_t(0)), va(acc_t(0)), vb(acc_t(0));
    const int64_t nfull = cv.full;
    const bool masked = dots && (Ra.p != nullptr || two);
    if (!masked) {
      // Two accumulators each, so that consecutive vectors do not wait on one dependency chain;
      // a one-instruction max (max_raw) that drops a NaN z: the sum Σ z, NaN when the chunk
      // holds a NaN (or both infinities), tells, and the rare chunk is then redone below with
      // the NaN-propagating max.
      Vec vmax2(NEG), va2(acc_t(0));
      constexpr int64_t W = Vec::size();
      int64_t j = 0;
      for (; j + 2 * W <= nfull; j += 2 * W) {
        const Vec z0 = Vec::loadu(cv.src + j), z1 = Vec::loadu(cv.src + j + W);
        vmax = rm::max_raw(z0, vmax);
        vmax2 = rm::max_raw(z1, vmax2);
        va += z0;
        va2 += z1;
      }
      for (; j < nfull; j += W) {
        const Vec z = Vec::loadu(cv.src + j);
        vmax = rm::max_raw(z, vmax);
        va += z;
      }
      if (nfull < n) {
        const Vec z = Vec::loadu(cv.tail);
        vmax = rm::max_raw(z, vmax);
        va += Vec::set(Vec(acc_t(0)), z, n - nfull);
      }
      vmax = rm::max_raw(vmax, vmax2);
      va += va2;
      const acc_t sum = reduce_sum(va);
      if (sum != sum) {  // a NaN or ±inf in the chunk: the max with NaN propagated
        vmax = Vec(NEG);
        cv.for_each([&](const Vec& z, int64_t, int64_t) { vmax = at::vec::maximum(vmax, z); });
      }
      if (!dots) va = Vec(acc_t(0));
    } else {
      cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
        vmax = at::vec::maximum(vmax, z);
        // the tail's padded lanes enter the −inf test and the dots as 0 (0 · −inf is NaN)
        const Vec zd = j < nfull ? z : Vec::set(Vec(acc_t(0)), z, cnt);
        vinf = vinf | (zd == vneg);  // all-ones bits in the lanes that saw −inf
        va = Ra.p ? at::vec::fmadd(Vec::loadu(Ra.p + c0 + j, cnt), zd, va) : va + zd;
        if (two) vb = at::vec::fmadd(Vec::loadu(Rb.p + c0 + j, cnt), zd, vb);
      });
    }
    const acc_t cm = reduce_max(vmax);
    constexpr int all_lanes = static_cast<int>((1ull << Vec::size()) - 1);
    const bool has_neg_inf = (vinf.zero_mask() & all_lanes) != all_lanes;
    if (masked && (has_neg_inf || cm != cm)) {  // −inf or NaN in the chunk
      va = Vec(acc_t(0));
      vb = Vec(acc_t(0));
      cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
        const Vec ra = Ra.p ? Vec::loadu(Ra.p + c0 + j, cnt) : Vec::set(Vec(acc_t(0)), Vec(acc_t(1)), cnt);
        va += rm::masked_term(ra, z);
        if (two) vb += rm::masked_term(Vec::loadu(Rb.p + c0 + j, cnt), z);
      });
    }
    if (dots) dot_a += reduce_sum(va);
    if (two) dot_b += reduce_sum(vb);
    // argmax: remember the first chunk holding the row's max (or its first NaN)
    if (c0 == 0 || rm::argmax_takes<acc_t>(cm, c0, best, best_c0)) {
      best = cm;
      best_c0 = c0;
    }
    if (keep) {
      keep->cmax[c0 / kChunk] = cm;
      if (cm != cm || cm == -NEG) keep->finite = false;
      if (cm == NEG) std::fill_n(keep->e.data() + c0, n, acc_t(0));  // p = 0 on the chunk
      if (keep->with_z) {
        cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
          z.store(keep->z.data() + c0 + j, static_cast<int>(cnt));
        });
      }
    }
    // sweep 2 (from L1): softmax state of the chunk relative to its own max (an all −inf chunk
    // adds nothing), merged into the row's state; with `keep`, e = exp(z − cm) is stored
    if (cm != NEG) {
      const Vec vcm(cm);
      Vec vd(acc_t(0)), vs(acc_t(0));
      // a finite max means no NaN or +inf in the chunk: z − m is finite or −inf
      const bool finite = cm == cm && cm != -NEG;
      // this sweep is compute-bound (exp): meanwhile, prefetch the next chunk of the row (sweep
      // 1 would otherwise stall on it; prefetches past the row's end do not fault)
      const char* next = reinterpret_cast<const char*>(xr + c0 + kChunk);
      constexpr int64_t step = sizeof(scalar_t);
      acc_t* ke = keep ? keep->e.data() + c0 : nullptr;
      if (rm::gathers_s(a)) {
        cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
          __builtin_prefetch(next + j * step, 0, 3);
          const Vec e = finite ? rm::exp_no_nan(z - vcm) : rm::rm_exp(z - vcm);
          vd += e;
          vs += rm::pz_term(e, z);
          if (ke) e.store(ke + j, static_cast<int>(cnt));
        });
      } else if (finite && ke) {
        constexpr int64_t W = Vec::size();
        Vec vd2(acc_t(0));
        int64_t j = 0;
        for (; j + 2 * W <= cv.full; j += 2 * W) {
          __builtin_prefetch(next + j * step, 0, 3);
          const Vec e0 = rm::exp_no_nan(Vec::loadu(cv.src + j) - vcm);
          const Vec e1 = rm::exp_no_nan(Vec::loadu(cv.src + j + W) - vcm);
          vd += e0;
          vd2 += e1;
          e0.store(ke + j);
          e1.store(ke + j + W);
        }
        vd += vd2;
        for (; j < n; j += W) {
          const Vec e = rm::exp_no_nan(
              (j < cv.full ? Vec::loadu(cv.src + j) : Vec::loadu(cv.tail)) - vcm);
          vd += e;
          e.store(ke + j, static_cast<int>(std::min(W, n - j)));
        }
      } else if (finite) {
        cv.for_each([&](const Vec& z, int64_t j, int64_t) {
          __builtin_prefetch(next + j * step, 0, 3);
          vd += rm::exp_no_nan(z - vcm);
        });
      } else {
        cv.for_each([&](const Vec& z, int64_t, int64_t) { vd += rm::rm_exp(z - vcm); });
      }
      const acc_t cs = rm::gathers_s(a) ? reduce_sum(vs) : acc_t(0);
      st = rm::merge(st, rm::SoftmaxState<acc_t>{cm, reduce_sum(vd), cs});
    }
  }
  rm::Stats<acc_t> out;
  out.m = st.m;
  out.d = st.d;
  out.s = st.s;
  out.arg = 0;
  if (a.need_stats) {
    // the argmax's position inside its chunk: one vectorised scan of that chunk per row
    const int64_t nb = std::min(kChunk, C - best_c0);
    load_chunk<scalar_t, acc_t>(xr + best_c0, nb, buf, sc, NEG, cv);
    const bool find_nan = best != best;
    const Vec vbest(best);
    int64_t arg = -1;
    cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
      if (arg >= 0) return;
      const int hits = ~(find_nan ? z.isnan() : (z == vbest)).zero_mask() &
                       static_cast<int>((1ull << cnt) - 1);
      if (hits) arg = best_c0 + j + __builtin_ctz(static_cast<unsigned>(hits));
    });
    out.arg = a.col_offset + (arg < 0 ? best_c0 : arg);  // arg < 0: not reached
  }
  rm::target_stats<acc_t>(a, i, Ra.scale * dot_a, Rb.scale * dot_b,
                          [&](int64_t c) { return sc.z(static_cast<acc_t>(xr[c])); },
                          out);
  return out;
}

// Gradient of one row: one write of the gradient (C · sizeof(scalar_t) bytes), the dense R
// row(s), and 2 + K scattered columns. The dense part comes from the row's kept e (one-pass
// forward_backward: p = e · exp(m_k − lse), no exp, no read of the logits from memory) when
// `keep` holds a finite row, else from one read of the logits. The target and sparse-similarity
// masses hit a few columns only: those columns' logits are read before the dense pass (out may
// alias x), the dense pass writes every column without them, and the few columns are then
// rewritten from an accumulation-dtype expression that includes them, so the subtraction happens
// before rounding (docs/design.md §3). `stream`: the dense pass writes with streaming stores.
template <typename acc_t>
struct Fixups {  // the point-mass columns of a row: local column, mass, logit
  std::vector<int64_t> col;
  std::vector<acc_t> mass, x;
  int64_t n = 0;
  explicit Fixups(int64_t max) : col(max), mass(max), x(max) {}
};

template <typename scalar_t, typename acc_t>
void grad_row(const RowArgs& a, int64_t i, acc_t lse, acc_t eps, acc_t pz, acc_t go, acc_t* buf,
              ChunkView<acc_t>& cv, Fixups<acc_t>& fx, const RowKeep<acc_t>* keep, bool stream) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = a.C;
  const scalar_t* xr = static_cast<const scalar_t*>(a.x) + i * a.x_stride;
  scalar_t* orow = static_cast<scalar_t*>(a.out) + i * a.out_stride;
  if (a.y_a[i] == a.ignore_index) {  // ignored rows: a zero gradient, without reading them
    std::memset(static_cast<void*>(orow), 0, C * sizeof(scalar_t));
    return;
  }
  const rm::SoftCap<acc_t> sc(a.softcap);
  const rm::Coefs<acc_t> k = rm::grad_coefs<acc_t>(a, i, lse, eps, go);
  const bool has_gamma = a.cp != 0;
  const rm::RRow<acc_t> Ra = rm::r_row<acc_t>(a, a.y_a[i]);
  const bool two = a.R && a.y_b;
  const rm::RRow<acc_t> Rb = two ? rm::r_row<acc_t>(a, a.y_b[i]) : Ra;
  // the linear (smoothing) part per column: ua_eff · pa[c] + ub_eff · pb[c], or a constant
  const acc_t ua = k.u_a * Ra.scale, ub = two ? k.u_b * Rb.scale : acc_t(0);

  // 1. the fix-up columns held here and their logits, read before anything of this row is written
  const int64_t lo = a.col_offset;
  fx.n = 0;
  auto add = [&](int64_t col, acc_t mass) {
    if (col >= lo && col < lo + C) {
      fx.col[fx.n] = col - lo;
      fx.mass[fx.n++] = mass;
    }
  };
  for (int t = 0; t < (a.y_b ? 2 : 1); ++t) {
    const int64_t y = t == 0 ? a.y_a[i] : a.y_b[i];
    add(y, t == 0 ? k.t_a : k.t_b);
    const acc_t sp = t == 0 ? k.sp_a : k.sp_b;
    for (int64_t j = 0; j < a.K; ++j) {
      add(a.sp_idx[y * a.K + j], rm::scaled(rm::sparse_rw<acc_t>(a, y, j) * sp, go));
    }
  }
  for (int64_t f = 0; f < fx.n; ++f) fx.x[f] = static_cast<acc_t>(xr[fx.col[f]]);

  // 2. dense pass: g = softmax part − u_a R_a − u_b R_b, × dz/dx
  const Vec vlse(lse), vcoef(k.coef), vgamma(k.gamma), vpz(pz), vua(ua), vub(ub), vrcp(sc.rcp);
  const bool lse_finite = lse == lse && lse != -rm::neg_inf<acc_t>() && lse != rm::neg_inf<acc_t>();
  const bool kept = keep != nullptr && keep->finite && lse_finite;
  // same dtype: write each vector straight into out (reading x first, so out may alias x); else
  // into buf, converted to the output dtype by store_chunk
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  stream = stream && can_stream<scalar_t>(orow);
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    acc_t* dst = direct ? reinterpret_cast<acc_t*>(orow + c0) : buf;
    auto finish = [&](const Vec& p, const Vec& z, int64_t j, int64_t cnt) {
      const Vec soft = has_gamma ? rm::grad_softmax_part_p(p, z, vcoef, vgamma, vpz)
                                 : rm::grad_softmax_part_p(p, vcoef);
      Vec lin = Ra.p ? vua * Vec::loadu(Ra.p + c0 + j, cnt) : vua;
      if (two) lin += vub * Vec::loadu(Rb.p + c0 + j, cnt);
      const Vec g = rm::grad_finish(soft, lin, z, sc.on, vrcp);
      if (direct && stream && cnt == Vec::size()) {
        store_vec(dst + j, g, true);
      } else {
        g.store(dst + j, static_cast<int>(cnt));
      }
    };
    if (kept) {
      // p = e · exp(m_k − lse): one scalar exp per chunk (0 for an all −inf chunk)
      const Vec vf(std::exp(keep->cmax[c0 / kChunk] - lse));
      const acc_t* e = keep->e.data() + c0;
      const acc_t* zk = keep->with_z ? keep->z.data() + c0 : nullptr;
      constexpr int64_t W = Vec::size();
      for (int64_t j = 0; j < n; j += W) {
        const int64_t cnt = std::min(W, n - j);
        const Vec p = Vec::loadu(e + j, cnt) * vf;
        finish(p, zk ? Vec::loadu(zk + j, cnt) : p, j, cnt);
      }
    } else {
      load_chunk<scalar_t, acc_t>(xr + c0, n, buf, sc, acc_t(0), cv);
      cv.for_each([&](const Vec& z, int64_t j, int64_t cnt) {
        // a finite lse means the row holds no NaN or +inf: z − lse is finite or −inf
        finish(lse_finite ? rm::exp_no_nan(z - vlse) : rm::rm_exp(z - vlse), z, j, cnt);
      });
    }
    if constexpr (!direct) store_chunk<scalar_t, acc_t>(buf, n, orow + c0, stream);
  }
  if (stream) stream_fence();  // the dense stores land before the fix-ups below

  // 3. the fix-up columns, with every mass that lands on them (duplicates write equal values)
  for (int64_t f = 0; f < fx.n; ++f) {
    const int64_t c = fx.col[f];
    acc_t lin = k.u_a * Ra.at(c) + (two ? k.u_b * Rb.at(c) : acc_t(0));
    for (int64_t f2 = 0; f2 < fx.n; ++f2) {
      if (fx.col[f2] == c) lin += fx.mass[f2];
    }
    const acc_t z = sc.z(fx.x[f]);
    const acc_t soft = has_gamma ? rm::grad_softmax_part(z, lse, k.coef, k.gamma, pz)
                                 : rm::grad_softmax_part(z, lse, k.coef);
    orow[c] = static_cast<scalar_t>(rm::grad_finish(soft, lin, z, sc.on, sc.rcp));
  }
}

// ext_rescale with x = out (the logits were overwritten by the gradient): out = go · out in the
// accumulation dtype, rounded once, zero staying zero whatever go (rowmath::scaled); rows whose
// go is 1 never reach here.
template <typename scalar_t, typename acc_t>
void scale_row(const RowArgs& a, int64_t i, acc_t* buf, ChunkView<acc_t>& cv) {
  using Vec = Vectorized<acc_t>;
  scalar_t* orow = static_cast<scalar_t*>(a.out) + i * a.out_stride;
  const acc_t go = rm::raw_go<acc_t>(a, i);
  const Vec vgo(go);
  for (int64_t c0 = 0; c0 < a.C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.C - c0);
    load_chunk<scalar_t, acc_t>(orow + c0, n, buf, rm::SoftCap<acc_t>(0), acc_t(0), cv);
    acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(orow + c0) : buf;
    cv.for_each([&](const Vec& g, int64_t j, int64_t cnt) {
      rm::rm_zero_where_zero(g, g * vgo).store(dst + j, static_cast<int>(cnt));
    });
    if constexpr (!std::is_same_v<scalar_t, acc_t>) store_chunk<scalar_t, acc_t>(buf, n, orow + c0);
  }
}

// A gradient buffer this large leaves the caches anyway: stream it (no read-for-ownership).
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// Rows [begin, end) through the steps `phases` (args.h Phase). With every step (forward_backward)
// a row is read from memory once: its statistics keep e (RowKeep) for the gradient.
template <typename scalar_t, typename acc_t>
void rows_impl(const RowArgs& a, int phases, int64_t begin, int64_t end) {
  alignas(64) acc_t buf[kChunk];
  ChunkView<acc_t> cv;
  if (a.scale_only) {  // ext_rescale over the gradient itself: scale the rows, nothing else
    for (int64_t i = begin; i < end; ++i) {
      if (!rm::unit_row<acc_t>(a, i)) scale_row<scalar_t, acc_t>(a, i, buf, cv);
    }
    return;
  }
  Fixups<acc_t> fx(2 + 2 * a.K);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  acc_t* pack = static_cast<acc_t*>(a.pack);
  const bool one_pass = (phases & PH_STATS) && (phases & PH_GRAD);
  RowKeep<acc_t> keep;
  if (one_pass) keep.init(a.C, a.softcap > 0 || a.cp != 0);
  const bool stream = (phases & PH_GRAD) && a.out != a.x &&
                      a.N * a.C * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;

  for (int64_t i = begin; i < end; ++i) {
    if ((phases & PH_GRAD) && rm::unit_row<acc_t>(a, i)) continue;  // rescale: already right
    const bool ignored = a.y_a[i] == a.ignore_index;
    acc_t lse = 0, eps = 0, pz = 0;
    if (phases & PH_FINALIZE) {
      acc_t* pr = pack + i * kWidth;
      if (ignored && !a.need_stats) {
        // nothing of this row is observable: skip reading it
        for (int c = 0; c < kWidth; ++c) pr[c] = acc_t(0);
      } else {
        rm::Stats<acc_t> st;
        if (phases & PH_STATS) {
          st = row_stats<scalar_t, acc_t>(a, i, buf, cv, one_pass ? &keep : nullptr);
        } else {
          st = rm::load_stats(stats + i * kWidth);
        }
        const rm::Final<acc_t> f = rm::finalize_row<acc_t>(a, i, st);
        rm::store_pack(pr, f, st.arg);
        lse = f.lse;
        eps = f.eps;
        pz = f.pz;
      }
    } else if (phases & PH_STATS) {  // statistics only (vocabulary sharding merges them)
      acc_t* sr = stats + i * kWidth;
      if (ignored && !a.need_stats) {
        for (int c = 0; c < kWidth; ++c) sr[c] = acc_t(0);
        continue;
      }
      rm::store_stats(sr, row_stats<scalar_t, acc_t>(a, i, buf, cv));
    } else {  // gradient from a finished pack
      const acc_t* pr = pack + i * kWidth;
      lse = pr[P_LSE];
      eps = pr[P_EPS];
      pz = pr[P_PZ];
    }
    if (phases & PH_GRAD) {
      grad_row<scalar_t, acc_t>(a, i, lse, eps, pz, rm::row_go<acc_t>(a, i), buf, cv, fx,
                                one_pass ? &keep : nullptr, stream);
    }
  }
}

// acc[i] (+)= float(src[i]) for i in [begin, end): the fused head's fp32 accumulation of a
// low-precision GEMM result (one read of src, one read+write of acc, or one write when `add` is
// false; PyTorch's own bf16 → fp32 conversion is a scalar loop, ~6× slower at 65M elements).
template <typename scalar_t>
void accumulate_impl(float* acc, const scalar_t* src, bool add, int64_t begin, int64_t end) {
  using Vec = Vectorized<float>;
  auto put = [&](int64_t i, const Vec& v) { (add ? Vec::loadu(acc + i) + v : v).store(acc + i); };
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= end; i += Vec::size()) put(i, Vec::loadu(src + i));
  } else {
    using RVec = Vectorized<scalar_t>;  // 2 × Vec::size() lanes
    for (; i + RVec::size() <= end; i += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
      put(i, lo);
      put(i + Vec::size(), hi);
    }
  }
  for (; i < end; ++i) acc[i] = (add ? acc[i] : 0.f) + static_cast<float>(src[i]);
}

void accumulate(float* acc, const void* src, Dtype dt, bool add, int64_t begin, int64_t end) {
  switch (dt) {
    case Dtype::F32: return accumulate_impl(acc, static_cast<const float*>(src), add, begin, end);
    case Dtype::BF16:
      return accumulate_impl(acc, static_cast<const c10::BFloat16*>(src), add, begin, end);
    case Dtype::F16:
      return accumulate_impl(acc, static_cast<const c10::Half*>(src), add, begin, end);
    case Dtype::F64: break;  // not offered (ops.cpp checks)
  }
}

// out[i] = scalar_t(src[i] · scale) for i in [begin, end): the fused head's last step for a
// gradient accumulated in fp32 (one read, one write, rounded once).
template <typename scalar_t>
void scaled_copy_impl(scalar_t* out, const float* src, float scale, int64_t begin, int64_t end) {
  using Vec = Vectorized<float>;
  const Vec vs(scale);
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= end; i += Vec::size()) (Vec::loadu(src + i) * vs).store(out + i);
  } else {
    using RVec = Vectorized<scalar_t>;
    for (; i + RVec::size() <= end; i += RVec::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i) * vs,
                                            Vec::loadu(src + i + Vec::size()) * vs)
          .store(out + i);
    }
  }
  for (; i < end; ++i) out[i] = static_cast<scalar_t>(src[i] * scale);
}

void scaled_copy(void* out, const float* src, float scale, Dtype dt, int64_t begin, int64_t end) {
  switch (dt) {
    case Dtype::F32: return scaled_copy_impl(static_cast<float*>(out), src, scale, begin, end);
    case Dtype::BF16:
      return scaled_copy_impl(static_cast<c10::BFloat16*>(out), src, scale, begin, end);
    case Dtype::F16: return scaled_copy_impl(static_cast<c10::Half*>(out), src, scale, begin, end);
    case Dtype::F64: break;  // not offered (ops.cpp checks)
  }
}

// Entry point seen by ops.cpp (one per ISA namespace).
void run_rows(const RowArgs& a, Dtype dt, int phases, int64_t begin, int64_t end) {
  switch (dt) {
    case Dtype::F32: return rows_impl<float, float>(a, phases, begin, end);
    case Dtype::F64: return rows_impl<double, double>(a, phases, begin, end);
    case Dtype::BF16: return rows_impl<c10::BFloat16, float>(a, phases, begin, end);
    case Dtype::F16: return rows_impl<c10::Half, float>(a, phases, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_ls
