// Plain-data arguments of the row kernels, filled once from the op's tensors by ext_common.h for
// both implementations (the CPU kernels take them as they are; the CUDA kernels add their launch
// layout). This header is shared by the dispatcher (compiled with the baseline flags), the per-ISA
// CPU kernel translation units and nvcc, so it includes no ATen header: the ISA-specific objects
// see only raw pointers and sizes (see cpu/kernel_impl.h).
//
// Layouts (fused_ls/_problem.py; "acc" = the accumulation dtype, double for fp64 logits, else
// float; every per-row tensor is contiguous):
//   stats [N, 8]:      m | d = Σ exp(z − m) | s = Σ exp(z − m)·z | D_a | D_b | z_ya | z_yb | argmax
//   pack  [N + 1, 8]:  lse | ε_i | Σ p·z | max p | argmax | loss_i | W_i | log p_y;  row N: ΣW | Σloss
// (s and Σ p·z only with the confidence penalty or need_stats, else 0)
// (the argmax columns hold the integer's bits: int32 in a float, int64 in a double).
#pragma once

#include <cstdint>

namespace fused_ls {

namespace cpu {
// Logits dtype; the accumulation dtype is double for F64 and float otherwise.
enum class Dtype : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
}  // namespace cpu

// Column indices of the layouts above.
enum StatsCol : int { S_M = 0, S_D, S_S, S_DA, S_DB, S_ZA, S_ZB, S_ARG };
enum PackCol : int { P_LSE = 0, P_EPS, P_PZ, P_CONF, P_ARG, P_LOSS, P_W, P_LOGP };
constexpr int kWidth = 8;
enum Reduction : int { RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2 };

// Which steps a kernel call runs for each row (ops: ext_row_stats = STATS, ext_finalize =
// FINALIZE, ext_forward = STATS | FINALIZE, ext_backward = GRAD, ext_forward_backward = all).
enum Phase : int { PH_STATS = 1, PH_FINALIZE = 2, PH_GRAD = 4 };

struct RowArgs {
  // logits: the columns [col_offset, col_offset + C) of num_classes (a vocabulary shard, or all)
  const void* x;            // [N, C], unit stride on C, row stride x_stride (elements)
  int64_t x_stride;
  int64_t N, C, col_offset, num_classes;
  // targets (global class ids; rows with y_a == ignore_index are ignored)
  const int64_t* y_a;       // [N]
  const int64_t* y_b;       // [N] mixup target, or null
  int64_t ignore_index;
  // the smoothing distribution (fused_ls/_smoothing.py): R_y,c = r0·w_c, or R[y, c] when dense
  const void* w;            // [num_classes] class weights (acc), or null (all ones)
  const void* R;            // [num_classes, num_classes] folded dense rows (acc), or null
  const void* mass;         // [num_classes] when R is given, else [1]: M_y without sparse part
  const int64_t* sp_idx;    // [num_classes, K] sparse neighbours (padding: column 0, value 0)
  const void* sp_val;       // [num_classes, K] β·S̃ (acc), or null
  int64_t K;
  double r0;                // uniform mass per class before the class weight
  // per-row options
  const void* eps_rows;     // [N] per-sample ε (acc), or null: eps
  double eps;
  const void* lam_rows;     // [N] per-sample mixup λ (acc), or null: lam
  double lam;
  int adaptive_mode;        // 0 none, 1 max p, 2 p at the target
  double adaptive_threshold, adaptive_factor;
  double z_loss, softcap, cp;  // softcap 0: none; cp: confidence penalty β
  int reduction;            // Reduction
  bool need_stats;         // return_stats: lse, max p and argmax of every row, ignored ones too
                            // (otherwise ignored rows are skipped and no argmax is gathered)
  // statistics: out of PH_STATS without PH_FINALIZE, in of PH_FINALIZE without PH_STATS
  void* stats;              // [N, 8]
  // finalisation: out of PH_FINALIZE, in of PH_GRAD without PH_FINALIZE
  void* pack;               // [N + 1, 8]
  void* loss;               // [N] for reduction none, else [] (written after the row loop)
  // gradient (PH_GRAD): d(go · loss)/dx into out, which may alias x
  void* out;
  int64_t out_stride;
  const void* go;           // upstream gradient (acc): [N] when go_per_row, else [1]
  bool go_per_row;
  bool go_mean;             // divide go by pack[N, 0] = Σ W_i (reduction "mean"; forward_backward
                            // writes Σ W_i there before the rows, from the targets alone)
  // ext_rescale: `out` holds the gradient for a unit upstream gradient; rows whose go is 1 are
  // skipped (skip_unit), the others recomputed from x, or, with scale_only (x is out: the logits
  // are gone), scaled in place: out = go · out in the accumulation dtype, zero staying zero
  bool skip_unit;
  bool scale_only;
};

}  // namespace fused_ls
