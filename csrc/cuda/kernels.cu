// CUDA implementation of the kernel-level ops (schemas in csrc/cpu/ops.cpp, host side in
// csrc/ext_common.h, per-row math in csrc/rowmath.h, contract in fused_ls/backends/__init__.py).
//
// Layout: grid = (N rows, S column slices). A block owns the columns [c0, c1) of one row; its
// threads stride over 16-byte packs (4 fp32, 8 bf16/fp16, 2 fp64) when the row is aligned, so a
// warp reads 512 contiguous bytes per step. All offsets are 64-bit (row · stride overflows int32
// once N·C ≥ 2³¹). No host synchronisation: the number of SMs is read once per device; targets
// and per-sample values are checked with device-side asserts.
//
// rows_kernel: each thread keeps the online-softmax state (m, d, s), argmax and the dense dots
//   for its columns; warp shuffles and one shared-memory step combine them per block
//   (rowmath::merge). With S = 1 (rows short enough for one block) thread 0 then gathers the
//   target and sparse terms and finalises the row (rowmath::finalize_row) in the same kernel,
//   and with PH_GRAD the block goes on to write the row's gradient while it is in L2
//   (forward_backward). With S > 1 the blocks write partials and merge_kernel (one thread per
//   row) merges and finalises. Bytes: one read of the logits (N·C·sizeof(x)) + the R row(s)
//   (L2-resident when they are the class weights) + O(N·S) partials.
// grad_kernel: each element is read once and written once (N·C·sizeof(x) each way). Thread 0
//   computes the row's coefficients (rowmath::grad_coefs) and its point masses (targets, sparse
//   neighbours) into shared memory; the block owning such a column reads its logit before the
//   dense pass (out may alias x), and rewrites it after a __syncthreads() from an
//   accumulation-dtype expression that includes the masses (docs/design.md §3).
// reduce_kernel: Σ W_i and Σ loss_i in a fixed order (one block, no atomics: deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../ext_common.h"
#include "../rowmath.h"

namespace fused_ls {
namespace cuda_impl {

namespace rm = fused_ls::rowmath;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// 16 bytes of logits.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int n = 16 / sizeof(scalar_t);
  scalar_t v[n];
};

// The shared arguments (args.h) and the launch layout.
struct KParams : RowArgs {
  int64_t slice;  // columns per block (a multiple of the pack width)
  int S;          // slices per row
  bool vec;       // rows of x (and out) are 16-byte aligned: packed loads
  void* part;     // [N, S, 8] partials (S > 1): m, d, s, dense dot a, dense dot b, best, -, arg
  int phases;     // Phase bits
};

template <typename T>
__device__ __forceinline__ T* ptr(void* p) {
  return static_cast<T*>(p);
}

// The data-dependent checks of one row (the CPU raises IndexError / ValueError for the same).
template <typename T>
__device__ __forceinline__ void validate_row(const RowArgs& a, int64_t i) {
  const int64_t y = a.y_a[i];
  if (y == a.ignore_index) return;
  CUDA_KERNEL_ASSERT(y >= 0 && y < a.num_classes && "fused_ls: target out of range");
  if (a.y_b) {
    const int64_t yb = a.y_b[i];
    CUDA_KERNEL_ASSERT(yb >= 0 && yb < a.num_classes && "fused_ls: mix_target out of range");
  }
  if (a.eps_rows) {
    const T e = rm::at<T>(a.eps_rows, i);
    CUDA_KERNEL_ASSERT(e >= T(0) && e <= T(1) && "fused_ls: smoothing must lie in [0, 1]");
  }
  if (a.lam_rows) {
    const T l = rm::at<T>(a.lam_rows, i);
    CUDA_KERNEL_ASSERT(l >= T(0) && l <= T(1) && "fused_ls: mix_lambda must lie in [0, 1]");
  }
}

// ---- statistics -------------------------------------------------------------------------------

// Partial statistics over a set of columns of one row.
template <typename T>
struct Partial {
  rm::SoftmaxState<T> st;
  T dot_a, dot_b, best;
  long long arg;
};

template <typename T>
__device__ __forceinline__ Partial<T> empty_partial() {
  return {rm::empty_state<T>(), T(0), T(0), rm::neg_inf<T>(), LLONG_MAX};
}

template <typename T>
__device__ __forceinline__ Partial<T> combine(const Partial<T>& a, const Partial<T>& b) {
  Partial<T> r;
  r.st = rm::merge(a.st, b.st);
  r.dot_a = a.dot_a + b.dot_a;
  r.dot_b = a.dot_b + b.dot_b;
  const bool take_b = rm::argmax_takes<T>(b.best, b.arg, a.best, a.arg);
  r.best = take_b ? b.best : a.best;
  r.arg = take_b ? b.arg : a.arg;
  return r;
}

template <typename T>
__device__ __forceinline__ Partial<T> shfl_down(const Partial<T>& p, int off) {
  constexpr unsigned full = 0xffffffffu;
  Partial<T> o;
  o.st.m = __shfl_down_sync(full, p.st.m, off);
  o.st.d = __shfl_down_sync(full, p.st.d, off);
  o.st.s = __shfl_down_sync(full, p.st.s, off);
  o.dot_a = __shfl_down_sync(full, p.dot_a, off);
  o.dot_b = __shfl_down_sync(full, p.dot_b, off);
  o.best = __shfl_down_sync(full, p.best, off);
  o.arg = __shfl_down_sync(full, p.arg, off);
  return o;
}

// Block-wide combine; the result is valid in thread 0.
template <typename T>
__device__ Partial<T> block_combine(Partial<T> p) {
  __shared__ Partial<T> warps[kWarps];
  for (int off = 16; off > 0; off >>= 1) p = combine(p, shfl_down(p, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warps[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kWarps ? warps[lane] : empty_partial<T>();
    for (int off = 16; off > 0; off >>= 1) p = combine(p, shfl_down(p, off));
  }
  return p;
}

// What one column c of a row adds to the statistics of a thread's columns: z (soft-capped), into
// the online-softmax state, the argmax and the dense dots of the row's R row(s).
template <typename acc_t>
struct ColumnStats {
  rm::RRow<acc_t> Ra, Rb;
  bool two;
  rm::SoftCap<acc_t> sc;
  __device__ __forceinline__ void add(Partial<acc_t>& part, int64_t c, acc_t x) const {
    const acc_t z = sc.z(x);
    rm::online_add(part.st, z);
    if (rm::argmax_takes<acc_t>(z, c, part.best, part.arg)) {
      part.best = z;
      part.arg = c;
    }
    part.dot_a += Ra.p ? rm::masked_term(Ra.p[c], z) : z;
    if (two) part.dot_b += rm::masked_term(Rb.p[c], z);
  }
};

// A thread's share of the columns [c0, c1) of row xr into its statistics `part` (16-byte packs
// where p.vec, then the tail). kKeep: each value is also stored at keep[c − c0] (the cluster
// kernel's slice in shared memory).
template <bool kKeep, typename scalar_t, typename acc_t>
__device__ __forceinline__ void consume_columns(const KParams& p, const scalar_t* xr, int64_t c0,
                                                int64_t c1, const ColumnStats<acc_t>& column,
                                                Partial<acc_t>& part, scalar_t* keep = nullptr) {
  int64_t tail = c0;
  if (p.vec) {
    constexpr int V = Pack<scalar_t>::n;
    const int64_t nv = (c1 - c0) / V;
    const Pack<scalar_t>* xp = reinterpret_cast<const Pack<scalar_t>*>(xr + c0);
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      const Pack<scalar_t> pk = xp[v];
      if constexpr (kKeep) reinterpret_cast<Pack<scalar_t>*>(keep)[v] = pk;
#pragma unroll
      for (int q = 0; q < V; ++q) column.add(part, c0 + v * V + q, static_cast<acc_t>(pk.v[q]));
    }
    tail = c0 + nv * V;
  }
  for (int64_t c = tail + threadIdx.x; c < c1; c += blockDim.x) {
    if constexpr (kKeep) keep[c - c0] = xr[c];
    column.add(part, c, static_cast<acc_t>(xr[c]));
  }
  if (!rm::gathers_s(p)) part.st.s = acc_t(0);
}

// Thread 0: the finished statistics of a row → pack row (+ loss_i) or the stats row; returns
// (lse, ε, Σpz) for a gradient pass that follows.
template <typename acc_t>
__device__ void finish_row(const KParams& p, int64_t row, rm::Stats<acc_t>& st, acc_t* vals) {
  if (p.phases & PH_FINALIZE) {
    const rm::Final<acc_t> f = rm::finalize_row<acc_t>(p, row, st);
    rm::store_pack(ptr<acc_t>(p.pack) + row * kWidth, f, st.arg);
    if (p.reduction == RED_NONE) ptr<acc_t>(p.loss)[row] = f.loss;
    vals[0] = f.lse;
    vals[1] = f.eps;
    vals[2] = f.pz;
  } else {
    rm::store_stats(ptr<acc_t>(p.stats) + row * kWidth, st);
  }
}

// ---- gradient ---------------------------------------------------------------------------------

// The gradient of the columns [c0, c1) of one row, by the whole block (see the file comment).
// Shared memory: the point-mass list (2 + 2K entries) after the coefficients.
template <typename scalar_t>
__device__ void grad_slice(const KParams& p, int64_t row, int64_t c0, int64_t c1,
                           acc_of<scalar_t> lse, acc_of<scalar_t> eps, acc_of<scalar_t> pz,
                           unsigned char* smem, const scalar_t* xr_in = nullptr) {
  using acc_t = acc_of<scalar_t>;
  // the row's logits: in global memory, or (xr_in) wherever the caller holds columns [c0, c1)
  const scalar_t* xr = xr_in ? xr_in : static_cast<const scalar_t*>(p.x) + row * p.x_stride;
  scalar_t* orow = static_cast<scalar_t*>(p.out) + row * p.out_stride;
  if (p.y_a[row] == p.ignore_index) {  // ignored rows: a zero gradient, without reading them
    for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) orow[c] = scalar_t(0);
    return;
  }
  rm::Coefs<acc_t>* k = reinterpret_cast<rm::Coefs<acc_t>*>(smem);
  int* nf_ptr = reinterpret_cast<int*>(k + 1);
  int64_t* fcol = reinterpret_cast<int64_t*>(smem + 2 * sizeof(rm::Coefs<acc_t>));
  const int max_fix = 2 + 2 * static_cast<int>(p.K);
  acc_t* fmass = reinterpret_cast<acc_t*>(fcol + max_fix);
  acc_t* fx = fmass + max_fix;
  const int64_t lo = p.col_offset;
  if (threadIdx.x == 0) {
    *k = rm::grad_coefs<acc_t>(p, row, lse, eps, rm::row_go<acc_t>(p, row));
    int nf = 0;
    for (int t = 0; t < (p.y_b ? 2 : 1); ++t) {
      const int64_t y = t == 0 ? p.y_a[row] : p.y_b[row];
      auto add = [&](int64_t col, acc_t mass) {
        if (col >= lo && col < lo + p.C) {
          fcol[nf] = col - lo;
          fmass[nf] = mass;
          // the logit of a point column of this slice, read before anything is written
          fx[nf] = (col - lo >= c0 && col - lo < c1) ? static_cast<acc_t>(xr[col - lo]) : acc_t(0);
          ++nf;
        }
      };
      add(y, t == 0 ? k->t_a : k->t_b);
      const acc_t sp = t == 0 ? k->sp_a : k->sp_b;
      for (int64_t j = 0; j < p.K; ++j) {
        add(p.sp_idx[y * p.K + j], rm::scaled(rm::sparse_rw<acc_t>(p, y, j) * sp, k->go));
      }
    }
    *nf_ptr = nf;
  }
  __syncthreads();
  const rm::Coefs<acc_t> kc = *k;
  const int nf = *nf_ptr;
  const rm::SoftCap<acc_t> sc(p.softcap);
  const bool has_gamma = p.cp != 0;
  const rm::RRow<acc_t> Ra = rm::r_row<acc_t>(p, p.y_a[row]);
  const bool two = p.R && p.y_b;
  const rm::RRow<acc_t> Rb = two ? rm::r_row<acc_t>(p, p.y_b[row]) : Ra;

  auto grad_at = [&](int64_t c, acc_t x, acc_t extra_mass) {
    const acc_t z = sc.z(x);
    const acc_t soft = has_gamma ? rm::grad_softmax_part(z, lse, kc.coef, kc.gamma, pz)
                                 : rm::grad_softmax_part(z, lse, kc.coef);
    const acc_t lin = kc.u_a * Ra.at(c) + (two ? kc.u_b * Rb.at(c) : acc_t(0)) + extra_mass;
    return static_cast<scalar_t>(rm::grad_finish(soft, lin, z, sc.on, sc.rcp));
  };
  int64_t tail = c0;
  if (p.vec) {
    constexpr int V = Pack<scalar_t>::n;
    const int64_t nv = (c1 - c0) / V;
    const Pack<scalar_t>* xp = reinterpret_cast<const Pack<scalar_t>*>(xr + c0);
    Pack<scalar_t>* op = reinterpret_cast<Pack<scalar_t>*>(orow + c0);
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      Pack<scalar_t> pk = xp[v];
#pragma unroll
      for (int q = 0; q < V; ++q) {
        pk.v[q] = grad_at(c0 + v * V + q, static_cast<acc_t>(pk.v[q]), acc_t(0));
      }
      op[v] = pk;
    }
    tail = c0 + nv * V;
  }
  for (int64_t c = tail + threadIdx.x; c < c1; c += blockDim.x) {
    orow[c] = grad_at(c, static_cast<acc_t>(xr[c]), acc_t(0));
  }
  __syncthreads();

  // rewrite the point columns of this slice with every mass that lands on them (duplicate
  // columns write equal values)
  for (int f = threadIdx.x; f < nf; f += blockDim.x) {
    const int64_t c = fcol[f];
    if (c < c0 || c >= c1) continue;
    acc_t mass = 0;
    for (int f2 = 0; f2 < nf; ++f2) {
      if (fcol[f2] == c) mass += fmass[f2];
    }
    orow[c] = grad_at(c, fx[f], mass);
  }
}

// ---- kernels ------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rows_kernel(KParams p) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t vals[3];  // lse, ε, Σpz of the row, for the gradient pass
  const int64_t row = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  if (threadIdx.x == 0 && blockIdx.y == 0) validate_row<acc_t>(p, row);
  const bool ignored = p.y_a[row] == p.ignore_index;
  if (ignored && !p.need_stats && p.S == 1) {
    // nothing of this row is observable: a zero pack row, and a zero gradient
    if (threadIdx.x == 0) {
      acc_t* r = ptr<acc_t>(p.phases & PH_FINALIZE ? p.pack : p.stats) + row * kWidth;
      for (int c = 0; c < kWidth; ++c) r[c] = acc_t(0);
      if ((p.phases & PH_FINALIZE) && p.reduction == RED_NONE) ptr<acc_t>(p.loss)[row] = 0;
    }
    if (p.phases & PH_GRAD) grad_slice<scalar_t>(p, row, c0, c1, acc_t(0), acc_t(0), acc_t(0), smem);
    return;
  }
  const scalar_t* xr = static_cast<const scalar_t*>(p.x) + row * p.x_stride;
  const rm::RRow<acc_t> Ra = rm::r_row<acc_t>(p, p.y_a[row]);
  const bool two = p.R && p.y_b;
  const rm::RRow<acc_t> Rb = two ? rm::r_row<acc_t>(p, p.y_b[row]) : Ra;
  const rm::SoftCap<acc_t> sc(p.softcap);

  Partial<acc_t> part = empty_partial<acc_t>();
  consume_columns<false>(p, xr, c0, c1, ColumnStats<acc_t>{Ra, Rb, two, sc}, part);

  part = block_combine(part);
  // the dense dots in R's units: scale · Σ p[c] z_c (a zero scale is a zero dot)
  const acc_t dense_a = Ra.scale == acc_t(0) ? acc_t(0) : Ra.scale * part.dot_a;
  const acc_t dense_b = two ? part.dot_b : dense_a;
  if (p.S > 1) {
    if (threadIdx.x == 0) {
      acc_t* out = ptr<acc_t>(p.part) + (row * p.S + blockIdx.y) * kWidth;
      out[0] = part.st.m;
      out[1] = part.st.d;
      out[2] = part.st.s;
      out[3] = dense_a;
      out[4] = dense_b;
      out[5] = part.best;
      out[6] = acc_t(0);
      out[7] = rm::to_bits<acc_t>(p.col_offset + part.arg);
    }
    return;
  }
  if (threadIdx.x == 0) {
    rm::Stats<acc_t> st{part.st.m, part.st.d, part.st.s, 0, 0, 0, 0,
                        static_cast<int64_t>(p.col_offset + part.arg)};
    rm::target_stats<acc_t>(
        p, row, dense_a, dense_b,
        [&](int64_t c) { return sc.z(static_cast<acc_t>(xr[c])); }, st);
    finish_row<acc_t>(p, row, st, vals);
  }
  if (p.phases & PH_GRAD) {
    __syncthreads();
    grad_slice<scalar_t>(p, row, c0, c1, vals[0], vals[1], vals[2], smem);
  }
}

// One thread per row: merge the S partials of split rows, gather the target and sparse terms,
// and finish (PH_FINALIZE: the pack; else the stats); or, for ext_finalize (p.part null),
// finalise statistics given in p.stats.
template <typename scalar_t>
__global__ void merge_kernel(KParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.N) return;
  validate_row<acc_t>(p, row);
  rm::Stats<acc_t> st;
  if (p.part == nullptr) {
    st = rm::load_stats(ptr<acc_t>(p.stats) + row * kWidth);
  } else {
    Partial<acc_t> r = empty_partial<acc_t>();
    acc_t dense_a = 0, dense_b = 0;
    for (int s = 0; s < p.S; ++s) {
      const acc_t* q = ptr<acc_t>(p.part) + (row * p.S + s) * kWidth;
      Partial<acc_t> o{{q[0], q[1], q[2]}, acc_t(0), acc_t(0), q[5],
                       static_cast<long long>(rm::from_bits(q[7]))};
      r = combine(r, o);
      dense_a += q[3];
      dense_b += q[4];
    }
    st = {r.st.m, r.st.d, r.st.s, 0, 0, 0, 0, static_cast<int64_t>(r.arg)};
    const scalar_t* xr = static_cast<const scalar_t*>(p.x) + row * p.x_stride;
    const rm::SoftCap<acc_t> sc(p.softcap);
    rm::target_stats<acc_t>(
        p, row, dense_a, dense_b,
        [&](int64_t c) { return sc.z(static_cast<acc_t>(xr[c])); }, st);
  }
  acc_t vals[3];
  finish_row<acc_t>(p, row, st, vals);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_kernel(KParams p) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row = blockIdx.x;
  if (rm::unit_row<acc_t>(p, row)) return;  // rescale: the row's upstream is 1, nothing to do
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  const acc_t* pr = ptr<acc_t>(p.pack) + row * kWidth;
  grad_slice<scalar_t>(p, row, c0, c1, pr[P_LSE], pr[P_EPS], pr[P_PZ], smem);
}

// rescale with x = out (the logits were overwritten by the gradient): out ← go · out in the
// accumulation dtype, rounded once, zero staying zero (rowmath::scaled); a row whose go is 1
// reads and writes nothing. Bytes: N·C·sizeof(x) each way for the other rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(KParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = blockIdx.x;
  if (rm::unit_row<acc_t>(p, row)) return;
  const acc_t go = rm::raw_go<acc_t>(p, row);
  scalar_t* orow = static_cast<scalar_t*>(p.out) + row * p.out_stride;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  for (int64_t c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
    orow[c] = static_cast<scalar_t>(rm::scaled(static_cast<acc_t>(orow[c]), go));
  }
}

// Σ over rows of a per-row value in a fixed order: thread t sums rows t, t + 256, ... in double,
// then a shared-memory tree in a fixed pattern (reduce_kernel and weights_kernel: the same sums).
template <typename F>
__device__ double block_sum_rows(int64_t N, F value) {
  __shared__ double s[kThreads];
  double v = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) v += value(i);
  s[threadIdx.x] = v;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) s[threadIdx.x] += s[threadIdx.x + off];
    __syncthreads();
  }
  return s[0];
}

// Σ W_i from the targets alone (rowmath::row_weight, the W_i finalisation writes) into the pack's
// totals row, summed as reduce_kernel sums them: "mean"'s denominator before the rows are read.
// It is the first kernel to read the targets: they are validated here, before w[y] is read.
template <typename acc_t>
__global__ void weights_kernel(KParams p) {
  const double sw = block_sum_rows(p.N, [&](int64_t i) {
    validate_row<acc_t>(p, i);
    return double(rm::row_weight<acc_t>(p, i));
  });
  if (threadIdx.x == 0) ptr<acc_t>(p.pack)[p.N * kWidth + 0] = static_cast<acc_t>(sw);
}

// Σ W_i and Σ loss_i in a fixed order: thread t sums rows t, t + 256, ... in double, then a
// shared-memory tree in a fixed pattern.
template <typename acc_t>
__global__ void reduce_kernel(KParams p) {
  const acc_t* pk = ptr<acc_t>(p.pack);
  const double sw = block_sum_rows(p.N, [&](int64_t i) { return double(pk[i * kWidth + P_W]); });
  __syncthreads();  // not needed by the buffers (one per lambda type); one barrier, kept for safety
  const double sl = block_sum_rows(p.N, [&](int64_t i) { return double(pk[i * kWidth + P_LOSS]); });
  if (threadIdx.x == 0) {
    acc_t* tot = ptr<acc_t>(p.pack) + p.N * kWidth;
    for (int c = 0; c < kWidth; ++c) tot[c] = acc_t(0);
    tot[0] = static_cast<acc_t>(sw);
    tot[1] = static_cast<acc_t>(sl);
    if (p.reduction == RED_SUM) ptr<acc_t>(p.loss)[0] = tot[1];
    if (p.reduction == RED_MEAN) ptr<acc_t>(p.loss)[0] = tot[1] / tot[0];
  }
}

// ---- one read, one write: a row held in the shared memory of a thread-block cluster (sm_90) ----
//
// forward_backward with every row read from HBM exactly once: the S CTAs of a cluster each load
// a slice of the row into their shared memory (16-byte loads, consumed into the online-softmax
// state on the way), combine their statistics through distributed shared memory (every CTA reads
// the S partials in rank order, so all finalise identically), and write the gradient of their
// slice from shared memory. Bytes: N·C·sizeof(x) read + N·C·sizeof(x) written, nothing else of
// the row's size. S = ceil(row bytes / kClusterSliceBytes) ≤ 16 (at most ~100 KB of a row per
// CTA, so that two CTAs fit an SM); rows are taken by clusters in a grid-stride loop.
// Until a GPU run has measured it, it serves only when $FUSED_LS_CUDA_CLUSTER=1 (sm_90+).
constexpr int64_t kClusterSliceBytes = 64 << 10;
constexpr int kMaxCluster = 16;

template <typename acc_t>
struct ClusterPart {
  Partial<acc_t> p;       // the slice's online-softmax state, dense dots, max and argmax
  acc_t za, zb, Da, Db;   // the target terms of the slice's columns (z at a target, sparse parts)
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cluster_rows_kernel(KParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using acc_t = acc_of<scalar_t>;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int S = static_cast<int>(cluster.num_blocks());
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem);  // this CTA's slice of the row
  unsigned char* points = smem + p.slice * sizeof(scalar_t);  // grad_slice's point list
  __shared__ ClusterPart<acc_t> part;  // read by every CTA of the cluster
  __shared__ acc_t vals[3];            // lse, ε, Σpz of the row
  const int64_t c0 = static_cast<int64_t>(rank) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  const rm::SoftCap<acc_t> sc(p.softcap);
  for (int64_t row = blockIdx.y; row < p.N; row += gridDim.y) {  // uniform over the cluster
    if (threadIdx.x == 0 && rank == 0) validate_row<acc_t>(p, row);
    const scalar_t* xr = static_cast<const scalar_t*>(p.x) + row * p.x_stride;
    const rm::RRow<acc_t> Ra = rm::r_row<acc_t>(p, p.y_a[row]);
    const bool two = p.R && p.y_b;
    const rm::RRow<acc_t> Rb = two ? rm::r_row<acc_t>(p, p.y_b[row]) : Ra;
    // 1. the slice into shared memory, consumed into the statistics on the way
    Partial<acc_t> mine = empty_partial<acc_t>();
    consume_columns<true>(p, xr, c0, c1, ColumnStats<acc_t>{Ra, Rb, two, sc}, mine, xs);
    mine = block_combine(mine);  // valid in thread 0; ends with every thread past a barrier
    __syncthreads();             // the slice is in shared memory for every thread
    if (threadIdx.x == 0) {
      part.p = mine;
      rm::Stats<acc_t> local{};
      RowArgs here = p;  // the slice's columns, for the target and sparse terms held here
      here.col_offset = p.col_offset + c0;
      here.C = c1 - c0;
      rm::target_stats<acc_t>(here, row, acc_t(0), acc_t(0),
                              [&](int64_t c) { return sc.z(static_cast<acc_t>(xs[c])); }, local);
      part.za = local.za;
      part.zb = local.zb;
      part.Da = local.Da;
      part.Db = local.Db;
    }
    cluster.sync();  // every CTA's part is written
    // 2. the row's statistics from the S parts, in rank order on every CTA (identical results)
    if (threadIdx.x == 0) {
      Partial<acc_t> r = empty_partial<acc_t>();
      acc_t za = 0, zb = 0, sDa = 0, sDb = 0;
      for (int k = 0; k < S; ++k) {
        const ClusterPart<acc_t>* q = cluster.map_shared_rank(&part, k);
        r = combine(r, q->p);
        za += q->za;
        zb += q->zb;
        sDa += q->Da;
        sDb += q->Db;
      }
      const acc_t dense_a = Ra.scale == acc_t(0) ? acc_t(0) : Ra.scale * r.dot_a;
      const acc_t dense_b = two ? r.dot_b : dense_a;
      rm::Stats<acc_t> st{r.st.m, r.st.d, r.st.s, dense_a + sDa,
                          (p.y_b ? dense_b : acc_t(0)) + sDb, za, zb,
                          static_cast<int64_t>(p.col_offset + r.arg)};
      const rm::Final<acc_t> f = rm::finalize_row<acc_t>(p, row, st);
      if (rank == 0) {
        const bool blank = p.y_a[row] == p.ignore_index && !p.need_stats;
        acc_t* pr = ptr<acc_t>(p.pack) + row * kWidth;
        if (blank) {  // as rows_kernel: nothing of an ignored row is observable
          for (int c = 0; c < kWidth; ++c) pr[c] = acc_t(0);
        } else {
          rm::store_pack(pr, f, st.arg);
        }
        if (p.reduction == RED_NONE) ptr<acc_t>(p.loss)[row] = blank ? acc_t(0) : f.loss;
      }
      vals[0] = f.lse;
      vals[1] = f.eps;
      vals[2] = f.pz;
    }
    cluster.sync();  // no CTA overwrites its part (next row) or exits while others read it
    // 3. the gradient of the slice, from shared memory (so `out` may alias the logits)
    grad_slice<scalar_t>(p, row, c0, c1, vals[0], vals[1], vals[2], points, xs - c0);
    __syncthreads();  // the slice buffer and the point list are reused by the next row
  }
#else
  CUDA_KERNEL_ASSERT(false && "fused_ls: cluster_rows_kernel needs sm_90");
#endif
}

// ---- host side --------------------------------------------------------------------------------

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 80;
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = n > 0 ? n : 80;
  }
  return cached[device];
}

// The cluster kernel (cluster_rows_kernel) for forward_backward: $FUSED_LS_CUDA_CLUSTER=1 and a
// device of compute capability 9.0 or more.
bool cluster_wanted(int device) {
  const char* env = std::getenv("FUSED_LS_CUDA_CLUSTER");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

bool aligned16(const void* ptr, int64_t stride, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * elem) % 16 == 0;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The CUDA side of the ops in ext_common.h.
struct CudaDevice {
  static void check(const at::Tensor& x) {
    TORCH_CHECK(x.is_cuda(), "fused_ls: the cuda backend serves CUDA tensors only");
  }
  static void validate(const RowArgs&, at::ScalarType) {}  // device-side asserts in the kernels
  static void run(const RowArgs& a, int phases, const at::Tensor& x);
  static void reduce(const RowArgs& a, const at::Tensor& pack, const at::Tensor& loss);
  static void weights(const RowArgs& a, const at::Tensor& pack);
};

// forward_backward by cluster_rows_kernel; false (nothing launched) when a row does not fit the
// shared memory of kMaxCluster CTAs.
bool launch_cluster(KParams p, at::ScalarType x_dtype, size_t elem, int64_t pack_w,
                    size_t point_bytes, cudaStream_t stream) {
  const int64_t row_bytes = p.C * static_cast<int64_t>(elem);
  int64_t S = std::max<int64_t>(1, (row_bytes + kClusterSliceBytes - 1) / kClusterSliceBytes);
  if (S > kMaxCluster) return false;
  p.slice = round_up((p.C + S - 1) / S, pack_w);
  S = (p.C + p.slice - 1) / p.slice;
  const size_t smem = static_cast<size_t>(p.slice) * elem + point_bytes;
  if (smem > 200 * 1024) return false;
  p.S = static_cast<int>(S);
  p.vec = aligned16(p.x, p.x_stride, elem) && aligned16(p.out, p.out_stride, elem);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(S),
                     static_cast<unsigned>(std::min<int64_t>(p.N, 65535)), 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(S);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "fused_ls_cluster", [&] {
    auto kernel = cluster_rows_kernel<scalar_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    if (S > 8) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  });
  return true;
}

void CudaDevice::run(const RowArgs& a, int phases, const at::Tensor& x) {
  if (a.N == 0) return;
  TORCH_CHECK(a.N <= INT_MAX, "fused_ls: too many rows for one launch");
  c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType x_dtype = x.scalar_type();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fp64 = x_dtype == at::kDouble;
  const size_t acc_size = fp64 ? 8 : 4;
  const size_t elem = c10::elementSize(x_dtype);
  KParams p{};
  static_cast<RowArgs&>(p) = a;
  p.phases = phases;
  const int max_fix = 2 + 2 * static_cast<int>(a.K);
  // coefficients (2 slots) + the point list: columns, masses, logits
  const size_t smem = 2 * sizeof(rm::Coefs<double>) + max_fix * (sizeof(int64_t) + 2 * acc_size);
  TORCH_CHECK(smem <= 48 * 1024, "fused_ls: too many sparse-similarity neighbours (", a.K,
              ") for the CUDA kernels");
  const int64_t pack_w = 16 / static_cast<int64_t>(elem);

  if (phases == PH_FINALIZE) {  // ext_finalize: one thread per row over given statistics
    p.part = nullptr;
    const int mt = 128;
    AT_DISPATCH_FLOATING_TYPES(fp64 ? at::kDouble : at::kFloat, "fused_ls_finalize", [&] {
      merge_kernel<scalar_t><<<static_cast<unsigned>((a.N + mt - 1) / mt), mt, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  if (phases == PH_GRAD) {
    // about 8 packs per thread per block; many blocks per row keep the GPU busy at any N
    p.slice = round_up(std::min<int64_t>(a.C, kThreads * pack_w * 8), pack_w);
    const int64_t S = (a.C + p.slice - 1) / p.slice;
    TORCH_CHECK(S <= 65535, "fused_ls: too many classes for one launch");
    p.S = static_cast<int>(S);
    p.vec = aligned16(a.x, a.x_stride, elem) && aligned16(a.out, a.out_stride, elem);
    const dim3 grid(static_cast<unsigned>(a.N), static_cast<unsigned>(S));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "fused_ls_grad", [&] {
      if (a.scale_only) {
        scale_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
      } else {
        grad_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  if (phases == (PH_STATS | PH_FINALIZE | PH_GRAD) && cluster_wanted(x.get_device()) &&
      launch_cluster(p, x_dtype, elem, pack_w, smem, stream)) {
    return;
  }
  // statistics (+ finalisation, + gradient): split rows over several blocks only when there are
  // too few rows to fill the GPU and no gradient pass has to follow in the same kernel
  const int sms = sm_count(x.get_device());
  int64_t S = 1;
  if (a.N < 2 * sms) {
    S = std::min<int64_t>((2 * sms + a.N - 1) / a.N, (a.C + 4095) / 4096);
    S = std::max<int64_t>(1, std::min<int64_t>(S, 65535));
  }
  p.slice = round_up((a.C + S - 1) / S, pack_w);
  S = std::max<int64_t>(1, (a.C + p.slice - 1) / p.slice);
  p.S = static_cast<int>(S);
  p.vec = aligned16(a.x, a.x_stride, elem) &&
          (!(phases & PH_GRAD) || aligned16(a.out, a.out_stride, elem));
  at::Tensor part;
  if (S > 1) {
    part = at::empty({a.N, S, kWidth}, x.options().dtype(fp64 ? at::kDouble : at::kFloat));
    p.part = part.data_ptr();
    p.phases = phases & ~PH_GRAD;  // the gradient needs the merged row: a grad launch follows
  }
  const dim3 grid(static_cast<unsigned>(a.N), static_cast<unsigned>(S));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "fused_ls_rows", [&] {
    rows_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (S > 1) {
      const int mt = 128;
      merge_kernel<scalar_t><<<static_cast<unsigned>((a.N + mt - 1) / mt), mt, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (S > 1 && (phases & PH_GRAD)) run(a, PH_GRAD, x);
}

void CudaDevice::weights(const RowArgs& a, const at::Tensor& pack) {
  c10::cuda::CUDAGuard guard(pack.device());
  KParams p{};
  static_cast<RowArgs&>(p) = a;
  p.pack = pack.data_ptr();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pack.scalar_type(), "fused_ls_weights", [&] {
    weights_kernel<scalar_t><<<1, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaDevice::reduce(const RowArgs& a, const at::Tensor& pack, const at::Tensor& loss) {
  c10::cuda::CUDAGuard guard(pack.device());
  KParams p{};
  static_cast<RowArgs&>(p) = a;
  p.pack = pack.data_ptr();
  p.loss = loss.data_ptr();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pack.scalar_type(), "fused_ls_reduce", [&] {
    reduce_kernel<scalar_t><<<1, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_impl
}  // namespace fused_ls

TORCH_LIBRARY_IMPL(fused_ls, CUDA, m) { FLS_REGISTER_IMPLS(m, fused_ls::cuda_impl::CudaDevice); }
