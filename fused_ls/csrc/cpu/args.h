// Plain-data arguments of the two row kernels, filled once from the op's tensors by
// ext_common.h (row_stats_op / grad_rows_op) for both implementations: the CPU kernels take them
// as they are, the CUDA kernels extend them with their launch layout (csrc/cuda/kernels.cu).
// This header is shared by the dispatcher (compiled with the baseline flags), the per-ISA CPU
// kernel translation units and nvcc, so it includes no ATen header: the ISA-specific objects see
// only raw pointers and sizes (see kernel_impl.h).
#pragma once

#include <cstdint>

namespace fused_ls {
namespace cpu {
// Logits dtype; the accumulation dtype is double for F64 and float otherwise.
enum class Dtype : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
}  // namespace cpu

// row_stats: one streaming read of each row (C elements of the logits dtype, plus the R row(s),
// which stay in cache across rows when R is [1, C]); writes 5–6 accumulation-dtype values and one
// int64 per row.
struct StatsArgs {
  const void* x;          // [N, C] logits, unit stride on C, row stride x_stride (elements)
  int64_t x_stride;
  int64_t C;
  const void* R;          // [1, C] or [C, C] smoothing rows r ⊙ w, accumulation dtype, contiguous
  const int64_t* ridx_a;  // [N] row of R used by dot_a (null: row 0 for every sample)
  const int64_t* ridx_b;  // [N] row of R used by dot_b (null: no dot_b)
  double softcap;         // > 0: z = softcap·tanh(x/softcap); 0: z = x
  bool need_pz;           // gather s for pz = Σ p z
  void* m;                // [N] out: max z
  void* lse;              // [N] out: log Σ exp z
  int64_t* argmax;        // [N] out: first index of the max (first NaN if any)
  void* dot_a;            // [N] out: Σ R[ra, c] z_c
  void* dot_b;            // [N] out: Σ R[rb, c] z_c (null when ridx_b is null)
  void* pz;               // [N] out: Σ p_c z_c (null unless need_pz)
};

// grad_rows: one read of each row of x and one write of each row of out (which may be x itself),
// plus the R row(s) and 2 + K scattered columns per row for the target / sparse-similarity masses.
struct GradArgs {
  const void* x;          // [N, C] logits
  int64_t x_stride;
  void* out;              // [N, C] gradient, logits dtype; may alias x
  int64_t out_stride;
  int64_t C;
  const void* R;          // as in StatsArgs
  const int64_t* ridx_a;
  const int64_t* ridx_b;
  const void* lse;        // [N] accumulation dtype
  const void* pz;         // [N] or null (no confidence penalty)
  const void* coef;       // [N] coef_i
  const void* gamma;      // [N] γ_i, or null (then pz is unused)
  const void* u_a;        // [N] weight of R[ra]
  const void* u_b;        // [N] weight of R[rb], or null
  const int64_t* y_a;     // [N] target column, mass t_a
  const void* t_a;        // [N]
  const int64_t* y_b;     // [N] mixup target column, or null
  const void* t_b;        // [N] or null
  const int64_t* sp_cols; // [N, K] sparse-similarity columns, or null
  const void* sp_mass;    // [N, K] their masses
  int64_t K;
  double softcap;
};

}  // namespace fused_ls
