// Kernel-level ops of the compiled backends and their CPU implementation.
//
//   fused_ls::ext_row_stats(x, R, ridx_a?, ridx_b?, softcap, need_pz)
//       -> (m, lse, argmax, dot_a, dot_b, pz)                      dot_b / pz are [0] when absent
//   fused_ls::ext_grad_rows(x, out!, R, ridx_a?, ridx_b?, lse, pz?, coef, gamma?, u_a, u_b?,
//                           y_a, t_a, y_b?, t_b?, sparse_cols?, sparse_mass?, softcap) -> ()
//
// These are the two row kernels of the contract in fused_ls/backends/__init__.py (the math is in
// csrc/rowmath.h); the Python ops fused_ls::forward / fused_ls::backward call them through
// fused_ls/backends/{cpp,cuda}_backend.py. The CUDA implementation is in csrc/cuda/kernels.cu.
//
// CPU: rows are split over threads with at::parallel_for (each row is reduced by one thread in a
// fixed order, so results do not depend on the thread count). The row loops are compiled once per
// instruction set (kernel_{default,avx2,avx512}.cpp); the widest one this CPU supports is used,
// or the one named by $FUSED_LS_CPU_ISA ("default", "avx2", "avx512"; read at every call).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ext_common.h"

namespace fused_ls {
namespace cpu {

#define FLS_DECLARE_ISA(NS)                                               \
  namespace NS {                                                          \
  void row_stats(const StatsArgs& a, Dtype dt, int64_t begin, int64_t end); \
  void grad_rows(const GradArgs& a, Dtype dt, int64_t begin, int64_t end);  \
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
  void (*stats)(const StatsArgs&, Dtype, int64_t, int64_t);
  void (*grad)(const GradArgs&, Dtype, int64_t, int64_t);
};

// Compiled paths, narrowest first, with whether this CPU can run them.
const std::vector<Isa>& compiled_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> v{{"default", true, &DEFAULT::row_stats, &DEFAULT::grad_rows}};
#if defined(FUSED_LS_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    v.push_back({"avx2", avx2, &AVX2::row_stats, &AVX2::grad_rows});
#endif
#if defined(FUSED_LS_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma");
    v.push_back({"avx512", avx512, &AVX512::row_stats, &AVX512::grad_rows});
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

Dtype dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kBFloat16: return Dtype::BF16;
    case at::kHalf: return Dtype::F16;
    default: TORCH_CHECK(false, "fused_ls: unsupported dtype ", x.scalar_type());
  }
}

// Rows per task: at least ~32k elements of work, so that small-C calls are not all overhead.
int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// The gradient buffer is usually fresh (torch.empty_like in the backward): each 4 KiB page then
// faults on its first write, which at 500 MB costs more than the kernel itself (measured: 327 ms
// vs 117 ms into an existing buffer). The buffer is about to be written in full, so ask the kernel
// for transparent huge pages on it: 512× fewer faults. A hint only (no effect where THP is off);
// $FUSED_LS_NO_HUGEPAGES=1 disables it.
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!out.is_contiguous() || std::getenv("FUSED_LS_NO_HUGEPAGES") != nullptr) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(out.nbytes());
  if (bytes < 8 * kHuge) return;
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fused_ls: the cpp backend serves CPU tensors only");
}

// The CPU side of row_stats_op / grad_rows_op (ext_common.h).
struct CpuDevice {
  static void check(const at::Tensor& x) { check_cpu(x); }
  static void stats(const StatsArgs& a, const at::Tensor& x) {
    const Isa& isa = select_isa();
    const Dtype dt = dtype_of(x);
    at::parallel_for(0, x.size(0), grain_rows(a.C),
                     [&](int64_t begin, int64_t end) { isa.stats(a, dt, begin, end); });
  }
  static void grad(const GradArgs& a, const at::Tensor& x, const at::Tensor& out) {
    const Isa& isa = select_isa();
    const Dtype dt = dtype_of(x);
    if (out.data_ptr() != x.data_ptr()) advise_huge_pages(out);
    at::parallel_for(0, x.size(0), grain_rows(a.C),
                     [&](int64_t begin, int64_t end) { isa.grad(a, dt, begin, end); });
  }
};

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
  m.def(
      "ext_row_stats(Tensor x, Tensor R, Tensor? ridx_a, Tensor? ridx_b, float softcap, "
      "bool need_pz) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ext_grad_rows(Tensor x, Tensor(a!) out, Tensor R, Tensor? ridx_a, Tensor? ridx_b, "
      "Tensor lse, Tensor? pz, Tensor coef, Tensor? gamma, Tensor u_a, Tensor? u_b, Tensor y_a, "
      "Tensor t_a, Tensor? y_b, Tensor? t_b, Tensor? sparse_cols, Tensor? sparse_mass, "
      "float softcap) -> ()");
  // The CPU path the next call would take, and the paths compiled in and supported by this CPU.
  m.def("ext_cpu_isa() -> str", &fused_ls::cpu::cpu_isa);
  m.def("ext_cpu_isas() -> str[]", &fused_ls::cpu::cpu_isas);
}

TORCH_LIBRARY_IMPL(fused_ls, CPU, m) {
  m.impl("ext_row_stats", &fused_ls::row_stats_op<fused_ls::cpu::CpuDevice>);
  m.impl("ext_grad_rows", &fused_ls::grad_rows_op<fused_ls::cpu::CpuDevice>);
}

// `import fused_ls._C` loads this library, which runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
