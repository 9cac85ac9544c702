// The kernel-level ops of the compiled backends (schemas below, host side in ../ext_common.h,
// per-row math in ../rowmath.h) and their CPU implementation; the CUDA one is in
// ../cuda/kernels.cu. fused_ls/backends/cpp_backend.py calls them.
//
// CPU: rows are split over threads with at::parallel_for (each row is reduced by one thread in a
// fixed order, and the reductions over rows run serially in row order afterwards, so results do
// not depend on the thread count). The row loops are compiled once per instruction set
// (kernel_{default,avx2,avx512}.cpp); the widest one this CPU supports is used, or the one named
// by $FUSED_LS_CPU_ISA ("default", "avx2", "avx512"; read at every call).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <utility>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ext_common.h"
#include "../rowmath.h"

namespace fused_ls {
namespace cpu {

#define FLS_DECLARE_ISA(NS)                                                         \
  namespace NS {                                                                    \
  void run_rows(const RowArgs& a, Dtype dt, int phases, int64_t begin, int64_t end);  \
  void accumulate(float* acc, const void* src, Dtype dt, bool add, int64_t begin,    \
                  int64_t end);                                                     \
  void scaled_copy(void* out, const float* src, float scale, Dtype dt, int64_t begin,  \
                   int64_t end);                                                    \
  }
FLS_DECLARE_ISA(DEFAULT)
#ifdef FUSED_LS_HAVE_AVX2
FLS_DECLARE_ISA(AVX2)
#endif
#ifdef FUSED_LS_HAVE_AVX512
FLS_DECLARE_ISA(AVX512)
#endif

namespace {

struct Isa {
  const char* name;
  bool supported;  // by this CPU
  void (*run)(const RowArgs&, Dtype, int, int64_t, int64_t);
  void (*accumulate)(float*, const void*, Dtype, bool, int64_t, int64_t);
  void (*scaled_copy)(void*, const float*, float, Dtype, int64_t, int64_t);
};

// Compiled paths, narrowest first, with whether this CPU can run them.
const std::vector<Isa>& compiled_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> v{{"default", true, &DEFAULT::run_rows, &DEFAULT::accumulate,
                             &DEFAULT::scaled_copy}};
#if defined(FUSED_LS_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    v.push_back({"avx2", avx2, &AVX2::run_rows, &AVX2::accumulate, &AVX2::scaled_copy});
#endif
#if defined(FUSED_LS_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma");
    v.push_back(
        {"avx512", avx512, &AVX512::run_rows, &AVX512::accumulate, &AVX512::scaled_copy});
#endif
    return v;
  }();
  return isas;
}

const Isa& select_isa() {
  const auto& isas = compiled_isas();
  const char* env = std::getenv("FUSED_LS_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    for (auto it = isas.rbegin(); it != isas.rend(); ++it) {
      if (it->supported) return *it;
    }
    return isas.front();
  }
  for (const auto& isa : isas) {
    if (want == isa.name) {
      TORCH_CHECK(isa.supported, "fused_ls: $FUSED_LS_CPU_ISA=", want,
                  " but this CPU does not support it");
      return isa;
    }
  }
  std::string names;
  for (const auto& isa : isas) names += std::string(" ") + isa.name;
  TORCH_CHECK(false, "fused_ls: $FUSED_LS_CPU_ISA=", want, " is not a compiled path (compiled:",
              names, ")");
}

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kBFloat16: return Dtype::BF16;
    case at::kHalf: return Dtype::F16;
    default: TORCH_CHECK(false, "fused_ls: unsupported dtype ", t);
  }
}

// Rows per task: at least ~32k elements of work, so that small-C calls are not all overhead.
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// The gradient buffer is usually fresh (torch.empty_like in the backward): each 4 KiB page then
// faults on its first write, which at 500 MB costs more than the kernel itself (measured: 327 ms
// vs 117 ms into an existing buffer). The buffer is about to be written in full, so ask the kernel
// for transparent huge pages on it: 512× fewer faults. A hint only (no effect where THP is off);
// $FUSED_LS_NO_HUGEPAGES=1 disables it.
void advise_huge_pages(void* ptr, int64_t bytes_) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (std::getenv("FUSED_LS_NO_HUGEPAGES") != nullptr) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t bytes = static_cast<uintptr_t>(bytes_);
  if (bytes < 8 * kHuge) return;
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes_;
#endif
}

// ---- gradient buffers ------------------------------------------------------------------------
// The loss writes its gradient into a buffer of the logits' size in its forward. A fresh buffer
// costs the kernel's page faults and zeroing on its first write (measured here: 33 ms to clone
// 65 MB with 4 KiB pages; the copy itself is 4 ms), every step, since glibc maps and unmaps
// allocations this large. So the large ones come from a small cache, as GPU allocators do: a
// buffer goes back to it when the gradient tensor is freed (after the matmul's backward, or
// zero_grad) and serves the next call of the same size without a fault. At most kPoolSlots
// buffers are kept; ext_release_buffers (fused_ls.empty_cache()) frees them;
// $FUSED_LS_NO_BUFFER_POOL=1 switches the cache off (fresh buffers, huge pages advised).
constexpr size_t kPoolMinBytes = size_t(8) << 20;
constexpr size_t kPoolAlign = size_t(2) << 20;  // huge-page aligned
constexpr size_t kPoolSlots = 2;

struct BufferPool {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free;  // (bytes, block), most recently returned last

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = free.rbegin(); it != free.rend(); ++it) {
      if (it->first == bytes) {
        void* p = it->second;
        free.erase(std::next(it).base());
        return p;
      }
    }
    return nullptr;
  }
  void give(void* p, size_t bytes) {
    void* drop = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu);
      free.emplace_back(bytes, p);
      if (free.size() > kPoolSlots) {
        drop = free.front().second;
        free.erase(free.begin());
      }
    }
    std::free(drop);
  }
  size_t release() {
    std::vector<std::pair<size_t, void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mu);
      blocks.swap(free);
    }
    size_t total = 0;
    for (auto& [bytes, p] : blocks) {
      total += bytes;
      std::free(p);
    }
    return total;
  }
};

BufferPool& pool() {
  static BufferPool* p = new BufferPool();  // never destroyed: tensors may outlive static teardown
  return *p;
}

template <typename T>
T get(const void* p, int64_t i) {
  return static_cast<const T*>(p)[i];
}

// The data-dependent checks, in row order so that the first offending value is named: an O(N)
// serial scan of the targets and per-sample values before the row kernels run.
template <typename T>
void validate_rows(const RowArgs& a) {
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t y = a.y_a[i];
    if (y == a.ignore_index) continue;
    TORCH_CHECK_INDEX(y >= 0 && y < a.num_classes, "target contains ", y, ", outside [0, ",
                      a.num_classes, ") and not ignore_index=", a.ignore_index);
    if (a.y_b) {
      const int64_t yb = a.y_b[i];
      TORCH_CHECK_INDEX(yb >= 0 && yb < a.num_classes, "mix_target contains ", yb,
                        " on a non-ignored row, outside [0, ", a.num_classes, ")");
    }
  }
  for (const auto& [name, p] : {std::pair<const char*, const void*>{"smoothing", a.eps_rows},
                                {"mix_lambda", a.lam_rows}}) {
    if (!p) continue;
    for (int64_t i = 0; i < a.N; ++i) {
      const T v = get<T>(p, i);
      TORCH_CHECK_VALUE(v >= T(0) && v <= T(1), name,
                        " (per-sample tensor) must lie in [0, 1]; found ", v);
    }
  }
}

// The CPU side of the ops in ext_common.h.
struct CpuDevice {
  static void check(const at::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu(), "fused_ls: the cpp backend serves CPU tensors only");
  }
  static void validate(const RowArgs& a, at::ScalarType acc) {
    // (the per-sample tensors hold the accumulation dtype)
    if (acc == at::kDouble) {
      validate_rows<double>(a);
    } else {
      validate_rows<float>(a);
    }
  }
  static void run(const RowArgs& a, int phases, const at::Tensor& x) {
    if (a.N == 0) return;
    const at::ScalarType x_dtype = x.scalar_type();
    const Isa& isa = select_isa();
    const Dtype dt = dtype_of(x_dtype);
    if ((phases & PH_GRAD) && a.out != a.x) {
      advise_huge_pages(a.out, a.N * a.out_stride * c10::elementSize(x_dtype));
    }
    at::parallel_for(0, a.N, grain_rows(std::max<int64_t>(a.C, 64)),
                     [&](int64_t begin, int64_t end) { isa.run(a, dt, phases, begin, end); });
  }
  // Σ W_i from the targets alone (rowmath::row_weight: the W_i finalisation writes), in row order
  // in double as reduce sums them, into the totals row before the rows are read.
  static void weights(const RowArgs& a, const at::Tensor& pack) {
    AT_DISPATCH_FLOATING_TYPES(pack.scalar_type(), "fused_ls_weights", [&] {
      double sw = 0;
      for (int64_t i = 0; i < a.N; ++i) sw += rowmath::row_weight<scalar_t>(a, i);
      pack.data_ptr<scalar_t>()[a.N * kWidth + 0] = static_cast<scalar_t>(sw);
    });
  }
  // Σ W_i and Σ loss_i in row order (in double), into the totals row and the reduced loss.
  static void reduce(const RowArgs& a, const at::Tensor& pack, const at::Tensor& loss) {
    AT_DISPATCH_FLOATING_TYPES(pack.scalar_type(), "fused_ls_reduce", [&] {
      scalar_t* pk = pack.data_ptr<scalar_t>();
      double sw = 0, sl = 0;
      for (int64_t i = 0; i < a.N; ++i) {
        sw += pk[i * kWidth + P_W];
        sl += pk[i * kWidth + P_LOSS];
      }
      scalar_t* tot = pk + a.N * kWidth;
      for (int c = 0; c < kWidth; ++c) tot[c] = scalar_t(0);
      tot[0] = static_cast<scalar_t>(sw);
      tot[1] = static_cast<scalar_t>(sl);
      scalar_t* out = loss.data_ptr<scalar_t>();
      if (a.reduction == RED_NONE) {
        for (int64_t i = 0; i < a.N; ++i) out[i] = pk[i * kWidth + P_LOSS];
      } else if (a.reduction == RED_SUM) {
        out[0] = tot[1];
      } else {
        out[0] = tot[1] / tot[0];
      }
    });
  }
};

// acc += src, or acc = src without `add` (elementwise; acc fp32, src fp32/bf16/fp16 of the same
// size, both contiguous).
void accumulate_op(const at::Tensor& acc, const at::Tensor& src, bool add) {
  TORCH_CHECK(acc.device().is_cpu() && src.device().is_cpu(), "fused_ls: CPU tensors only");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(),
              "fused_ls: the accumulator must be a contiguous fp32 tensor");
  TORCH_CHECK(src.is_contiguous() && src.numel() == acc.numel(),
              "fused_ls: src must be contiguous with the accumulator's size");
  const at::ScalarType t = src.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "fused_ls: src must be fp32, bf16 or fp16, got ", t);
  const Isa& isa = select_isa();
  const Dtype dt = dtype_of(t);
  float* a = acc.data_ptr<float>();
  const void* s = src.const_data_ptr();
  at::parallel_for(0, acc.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    isa.accumulate(a, s, dt, add, begin, end);
  });
}

// out = src · scale (src a contiguous fp32 tensor, scale a one-element fp32 tensor, out
// fp32/bf16/fp16 of src's size), rounded once.
void scaled_copy_op(const at::Tensor& out, const at::Tensor& src, const at::Tensor& scale) {
  TORCH_CHECK(out.device().is_cpu() && src.device().is_cpu() && scale.device().is_cpu(),
              "fused_ls: CPU tensors only");
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous(),
              "fused_ls: src must be a contiguous fp32 tensor");
  TORCH_CHECK(out.is_contiguous() && out.numel() == src.numel(),
              "fused_ls: out must be contiguous with src's size");
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat,
              "fused_ls: scale must be one fp32 value");
  const at::ScalarType t = out.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "fused_ls: out must be fp32, bf16 or fp16, got ", t);
  const Isa& isa = select_isa();
  const Dtype dt = dtype_of(t);
  const float s = scale.data_ptr<float>()[0];
  void* o = out.data_ptr();
  const float* in = src.const_data_ptr<float>();
  at::parallel_for(0, src.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    isa.scaled_copy(o, in, s, dt, begin, end);
  });
}

// A contiguous tensor of `like`'s shape and dtype for a gradient the kernels write in full.
at::Tensor gradient_buffer(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "fused_ls: gradient buffers are CPU tensors");
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes < kPoolMinBytes || std::getenv("FUSED_LS_NO_BUFFER_POOL") != nullptr) {
    return at::empty(like.sizes(), like.options());
  }
  void* p = pool().take(bytes);
  if (p == nullptr) {
    const size_t padded = (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
    TORCH_CHECK(posix_memalign(&p, kPoolAlign, padded) == 0, "fused_ls: out of memory (",
                padded, " bytes for a gradient buffer)");
    advise_huge_pages(p, static_cast<int64_t>(padded));
  }
  return at::from_blob(
      p, like.sizes(), [bytes](void* q) { pool().give(q, bytes); }, like.options());
}

int64_t release_buffers() { return static_cast<int64_t>(pool().release()); }

std::string cpu_isa() { return select_isa().name; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> v;
  for (const auto& isa : compiled_isas()) {
    if (isa.supported) v.emplace_back(isa.name);
  }
  return v;
}

}  // namespace
}  // namespace cpu
}  // namespace fused_ls

TORCH_LIBRARY_FRAGMENT(fused_ls, m) {
  m.def("ext_forward(Tensor x, " FLS_PROBLEM_SCHEMA ") -> (Tensor, Tensor)");
  m.def("ext_backward(Tensor grad_loss, Tensor x, Tensor(a!) out, Tensor pack, " FLS_PROBLEM_SCHEMA
        ") -> ()");
  m.def("ext_forward_backward(Tensor x, Tensor(a!) out, Tensor grad_loss, " FLS_PROBLEM_SCHEMA
        ") -> (Tensor, Tensor)");
  m.def("ext_rescale(Tensor grad_loss, Tensor x, Tensor(a!) out, Tensor pack, " FLS_PROBLEM_SCHEMA
        ") -> ()");
  m.def("ext_row_stats(Tensor x, " FLS_PROBLEM_SCHEMA ") -> Tensor");
  m.def("ext_finalize(Tensor stats, " FLS_PROBLEM_SCHEMA ") -> (Tensor, Tensor)");
  // The fused head's fp32 accumulation of low-precision GEMM results, and its final scaling.
  m.def("ext_accumulate_(Tensor(a!) acc, Tensor src, bool add) -> ()");
  m.def("ext_scaled_copy_(Tensor(a!) out, Tensor src, Tensor scale) -> ()");
  // A gradient buffer of the logits' size (the cache above), and freeing the cached ones.
  m.def("ext_gradient_buffer(Tensor like) -> Tensor");
  m.def("ext_release_buffers() -> int", &fused_ls::cpu::release_buffers);
  // The CPU path the next call would take, and the paths compiled in and supported by this CPU.
  m.def("ext_cpu_isa() -> str", &fused_ls::cpu::cpu_isa);
  m.def("ext_cpu_isas() -> str[]", &fused_ls::cpu::cpu_isas);
}

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) {
  FLS_REGISTER_IMPLS(m, fused_ls::cpu::CpuDevice);
  m.impl("ext_accumulate_", &fused_ls::cpu::accumulate_op);
  m.impl("ext_scaled_copy_", &fused_ls::cpu::scaled_copy_op);
  m.impl("ext_gradient_buffer", &fused_ls::cpu::gradient_buffer);
}

// `import fused_ls._C` loads this library, which runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
