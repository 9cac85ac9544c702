// CUDA implementation of the kernel-level ops fused_ls::ext_row_stats / fused_ls::ext_grad_rows
// (schemas in csrc/cpu/ops.cpp, math in csrc/rowmath.h, contract in fused_ls/backends/__init__.py).
//
// Layout: grid = (N rows, S column slices). A block owns the columns [c0, c1) of one row; its
// threads stride over 16-byte packs (4 fp32, 8 bf16/fp16, 2 fp64) when the row is aligned, so a
// warp reads 512 contiguous bytes per step. All offsets are 64-bit (row · stride overflows int32
// once N·C ≥ 2³¹). No host synchronisation: the number of SMs is read once per device.
//
// row_stats: each thread keeps the online-softmax state (m, d, s), argmax and the dots for its
//   columns; warp shuffles and one shared-memory step combine them per block (rowmath::merge),
//   and a second small kernel merges the S slices of each row. Bytes: one read of the logits
//   (N·C·sizeof(x)) + R row(s) (L2-resident when R is [1, C]) + 6·S accumulation values per row.
// grad_rows: each element is read once and written once (N·C·sizeof(x) each way). The target and
//   sparse-similarity masses hit 2 + K columns per row: the block owning such a column reads its
//   logit before the dense pass (out may alias x), and rewrites it after a __syncthreads() from
//   an accumulation-dtype expression that includes the masses (DESIGN.md §3).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <climits>
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

// The shared arguments (csrc/cpu/args.h; the out pointers m … pz are written by the merge kernel)
// and the launch layout.
struct StatsParams : StatsArgs {
  int64_t slice;          // columns per block (a multiple of the pack width)
  int S;                  // slices per row
  bool vec;               // rows are 16-byte aligned: use packed loads
  void* part;             // [N, S, 6] out: m, d, s, dot_a, dot_b, best (accumulation dtype)
  int64_t* part_arg;      // [N, S] out: argmax of the slice
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) stats_partial_kernel(StatsParams p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  const scalar_t* xr = static_cast<const scalar_t*>(p.x) + row * p.x_stride;
  const acc_t* R = static_cast<const acc_t*>(p.R);
  const acc_t* Ra = R + (p.ridx_a ? p.ridx_a[row] : 0) * p.C;
  const acc_t* Rb = p.ridx_b ? R + p.ridx_b[row] * p.C : nullptr;
  const bool has_cap = p.softcap > 0;
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t rcp = has_cap ? acc_t(1) / cap : acc_t(0);

  Partial<acc_t> part = empty_partial<acc_t>();
  auto consume = [&](int64_t c, scalar_t xv) {
    acc_t z = static_cast<acc_t>(xv);
    if (has_cap) z = rm::softcap_z(z, cap, rcp);
    rm::online_add(part.st, z);
    if (rm::argmax_takes<acc_t>(z, c, part.best, part.arg)) {
      part.best = z;
      part.arg = c;
    }
    part.dot_a += rm::masked_term(Ra[c], z);
    if (Rb) part.dot_b += rm::masked_term(Rb[c], z);
  };
  int64_t tail = c0;
  if (p.vec) {
    constexpr int V = Pack<scalar_t>::n;
    const int64_t nv = (c1 - c0) / V;
    const Pack<scalar_t>* xp = reinterpret_cast<const Pack<scalar_t>*>(xr + c0);
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      const Pack<scalar_t> pk = xp[v];
#pragma unroll
      for (int k = 0; k < V; ++k) consume(c0 + v * V + k, pk.v[k]);
    }
    tail = c0 + nv * V;
  }
  for (int64_t c = tail + threadIdx.x; c < c1; c += blockDim.x) consume(c, xr[c]);
  if (!p.need_pz) part.st.s = acc_t(0);

  part = block_combine(part);
  if (threadIdx.x == 0) {
    acc_t* out = static_cast<acc_t*>(p.part) + (row * p.S + blockIdx.y) * 6;
    out[0] = part.st.m;
    out[1] = part.st.d;
    out[2] = part.st.s;
    out[3] = part.dot_a;
    out[4] = part.dot_b;
    out[5] = part.best;
    p.part_arg[row * p.S + blockIdx.y] = part.arg;
  }
}

// One thread per row: merge the S slices and finish lse, pz.
template <typename acc_t>
__global__ void stats_merge_kernel(const acc_t* part, const int64_t* part_arg, int64_t N, int S,
                                   acc_t* m, acc_t* lse, int64_t* argmax, acc_t* dot_a,
                                   acc_t* dot_b, acc_t* pz) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  Partial<acc_t> r = empty_partial<acc_t>();
  for (int s = 0; s < S; ++s) {
    const acc_t* q = part + (row * S + s) * 6;
    Partial<acc_t> o{{q[0], q[1], q[2]}, q[3], q[4], q[5], part_arg[row * S + s]};
    r = combine(r, o);
  }
  m[row] = r.st.m;
  lse[row] = rm::finish_lse(r.st);
  argmax[row] = r.arg;
  dot_a[row] = r.dot_a;
  if (dot_b) dot_b[row] = r.dot_b;
  if (pz) pz[row] = rm::finish_pz(r.st);
}

// ---- gradient ---------------------------------------------------------------------------------

// The shared arguments (csrc/cpu/args.h) and the launch layout.
struct GradParams : GradArgs {
  int64_t slice;          // columns per block (a multiple of the pack width)
  bool vec;               // x and out rows are 16-byte aligned
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_kernel(GradParams p) {
  using acc_t = acc_of<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t row = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t c1 = min(p.C, c0 + p.slice);
  const scalar_t* xr = static_cast<const scalar_t*>(p.x) + row * p.x_stride;
  scalar_t* orow = static_cast<scalar_t*>(p.out) + row * p.out_stride;
  const acc_t* R = static_cast<const acc_t*>(p.R);
  const acc_t* Ra = R + (p.ridx_a ? p.ridx_a[row] : 0) * p.C;
  const acc_t* Rb = p.ridx_b ? R + p.ridx_b[row] * p.C : nullptr;
  auto get = [row](const void* q) { return static_cast<const acc_t*>(q)[row]; };
  const acc_t lse = get(p.lse), coef = get(p.coef);
  const bool has_gamma = p.gamma != nullptr;
  const acc_t gamma = has_gamma ? get(p.gamma) : acc_t(0);
  const acc_t pz = has_gamma ? get(p.pz) : acc_t(0);
  const acc_t ua = get(p.u_a);
  const acc_t ub = (Rb && p.u_b) ? get(p.u_b) : acc_t(0);
  const bool has_cap = p.softcap > 0;
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t rcp = has_cap ? acc_t(1) / cap : acc_t(0);

  // 1. fix-up columns of this row (target, mixup target, sparse neighbours) and, for those in
  //    this block's slice, their logits, read before anything is written
  const int nf = 1 + (p.y_b ? 1 : 0) + static_cast<int>(p.K);
  int64_t* fcol = reinterpret_cast<int64_t*>(smem_raw);
  acc_t* fmass = reinterpret_cast<acc_t*>(fcol + nf);
  acc_t* fx = fmass + nf;
  for (int f = threadIdx.x; f < nf; f += blockDim.x) {
    int64_t c;
    acc_t mass;
    if (f == 0) {
      c = p.y_a[row];
      mass = get(p.t_a);
    } else if (p.y_b && f == 1) {
      c = p.y_b[row];
      mass = get(p.t_b);
    } else {
      const int64_t k = f - 1 - (p.y_b ? 1 : 0);
      c = p.sp_cols[row * p.K + k];
      mass = static_cast<const acc_t*>(p.sp_mass)[row * p.K + k];
    }
    fcol[f] = c;
    fmass[f] = mass;
    fx[f] = (c >= c0 && c < c1) ? static_cast<acc_t>(xr[c]) : acc_t(0);
  }
  __syncthreads();

  // 2. dense pass: g = softmax part − u_a R_a − u_b R_b, × dz/dx
  auto grad_at = [&](int64_t c, acc_t x, acc_t extra_mass) {
    const acc_t z = has_cap ? rm::softcap_z(x, cap, rcp) : x;
    const acc_t soft = has_gamma ? rm::grad_softmax_part(z, lse, coef, gamma, pz)
                                 : rm::grad_softmax_part(z, lse, coef);
    const acc_t lin = ua * Ra[c] + (Rb ? ub * Rb[c] : acc_t(0)) + extra_mass;
    return static_cast<scalar_t>(rm::grad_finish(soft, lin, z, has_cap, rcp));
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
      for (int k = 0; k < V; ++k) {
        pk.v[k] = grad_at(c0 + v * V + k, static_cast<acc_t>(pk.v[k]), acc_t(0));
      }
      op[v] = pk;
    }
    tail = c0 + nv * V;
  }
  for (int64_t c = tail + threadIdx.x; c < c1; c += blockDim.x) {
    orow[c] = grad_at(c, static_cast<acc_t>(xr[c]), acc_t(0));
  }
  __syncthreads();

  // 3. rewrite the fix-up columns of this slice with every mass that lands on them (duplicate
  //    columns write equal values)
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

bool aligned16(const void* ptr, int64_t stride, size_t elem) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * elem) % 16 == 0;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fused_ls: the cuda backend serves CUDA tensors only");
}

// The CUDA side of row_stats_op / grad_rows_op (ext_common.h).
struct CudaDevice {
  static void check(const at::Tensor& x) { check_cuda(x); }
  static void stats(const StatsArgs& a, const at::Tensor& x);
  static void grad(const GradArgs& a, const at::Tensor& x, const at::Tensor& out);
};

void CudaDevice::stats(const StatsArgs& a, const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = a.C;
  TORCH_CHECK(N <= INT_MAX, "fused_ls: too many rows for one launch");
  const auto acc = acc_type(x.scalar_type());
  const int64_t pack = 16 / x.element_size();
  // Split rows over several blocks only when there are too few rows to fill the GPU.
  const int sms = sm_count(x.get_device());
  int64_t S = 1;
  if (N < 2 * sms) {
    S = std::min<int64_t>((2 * sms + N - 1) / N, (C + 4095) / 4096);
    S = std::max<int64_t>(1, std::min<int64_t>(S, 65535));
  }
  const int64_t slice = round_up((C + S - 1) / S, pack);
  S = (C + slice - 1) / slice;
  at::Tensor part = at::empty({N, S, 6}, x.options().dtype(acc));
  at::Tensor part_arg = at::empty({N, S}, x.options().dtype(at::kLong));
  StatsParams p{};
  static_cast<StatsArgs&>(p) = a;
  p.slice = slice;
  p.S = static_cast<int>(S);
  p.vec = aligned16(p.x, p.x_stride, x.element_size());
  p.part = part.data_ptr();
  p.part_arg = part_arg.data_ptr<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(S));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_ls_row_stats",
                                  [&] {
    using acc_t = acc_of<scalar_t>;
    stats_partial_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int mt = 128;
    stats_merge_kernel<acc_t><<<static_cast<unsigned>((N + mt - 1) / mt), mt, 0, stream>>>(
        part.const_data_ptr<acc_t>(), part_arg.const_data_ptr<int64_t>(), N, p.S,
        static_cast<acc_t*>(a.m), static_cast<acc_t*>(a.lse), a.argmax,
        static_cast<acc_t*>(a.dot_a), static_cast<acc_t*>(a.dot_b), static_cast<acc_t*>(a.pz));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaDevice::grad(const GradArgs& a, const at::Tensor& x, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = a.C;
  TORCH_CHECK(N <= INT_MAX, "fused_ls: too many rows for one launch");
  const int64_t pack = 16 / x.element_size();
  // About 8 packs per thread per block; many blocks per row keep the GPU busy at any N.
  const int64_t slice = round_up(std::min<int64_t>(C, kThreads * pack * 8), pack);
  const int64_t S = (C + slice - 1) / slice;
  TORCH_CHECK(S <= 65535, "fused_ls: too many classes for one launch");
  const int nf = 1 + (a.y_b ? 1 : 0) + static_cast<int>(a.K);
  const size_t acc_size = x.scalar_type() == at::kDouble ? 8 : 4;
  const size_t smem = nf * (sizeof(int64_t) + 2 * acc_size);
  TORCH_CHECK(smem <= 48 * 1024, "fused_ls: too many sparse-similarity neighbours (", a.K,
              ") for the CUDA kernel");
  GradParams p{};
  static_cast<GradArgs&>(p) = a;
  p.slice = slice;
  p.vec = aligned16(p.x, p.x_stride, x.element_size()) &&
          aligned16(p.out, p.out_stride, x.element_size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(S));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_ls_grad_rows",
                                  [&] {
    grad_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_impl
}  // namespace fused_ls

TORCH_LIBRARY_IMPL(fused_ls, CUDA, m) {
  m.impl("ext_row_stats", &fused_ls::row_stats_op<fused_ls::cuda_impl::CudaDevice>);
  m.impl("ext_grad_rows", &fused_ls::grad_rows_op<fused_ls::cuda_impl::CudaDevice>);
}
