"""Quick tour of the fused_ls API on random data (runs on a laptop CPU in a second).

python examples/quickstart.py
"""

import torch
import torch.nn.functional as F

import fused_ls
from fused_ls import ConfidenceAdaptive, FusedLabelSmoothingCE, SparseSimilarity

torch.manual_seed(0)
N, C = 8, 10
logits = torch.randn(N, C, requires_grad=True)
target = torch.randint(0, C, (N,))

# 1. drop-in for nn.CrossEntropyLoss(label_smoothing=0.1)
crit = FusedLabelSmoothingCE(smoothing=0.1)
loss = crit(logits, target)
loss.backward()
reference = F.cross_entropy(logits, target, label_smoothing=0.1)
print(f"fused loss {loss.item():.6f}   PyTorch {reference.item():.6f}")

# 2. similarity-aware smoothing: mass goes to classes similar to the target, not uniformly
similarity = torch.rand(C, C)  # e.g. from class-embedding distances; rows are normalised
loss = fused_ls.label_smoothing_cross_entropy(
    logits, target, 0.1, similarity=similarity, similarity_mix=0.5
)
print(f"similarity-aware (β=0.5): {loss.item():.6f}")
sparse = SparseSimilarity.from_dense(similarity, k=3)  # k neighbours per class, for large C
loss = fused_ls.label_smoothing_cross_entropy(logits, target, 0.1, similarity=sparse)
print(f"sparse similarity (k=3):  {loss.item():.6f}")

# 3. per-sample smoothing and confidence-adaptive smoothing
eps = torch.linspace(0.0, 0.3, N)
print(f"per-sample ε:             {crit(logits, target, smoothing=eps).item():.6f}")
adaptive = ConfidenceAdaptive(threshold=0.5, factor=2.0, confidence="max")
loss, stats = fused_ls.label_smoothing_cross_entropy(
    logits, target, 0.1, adaptive=adaptive, return_stats=True
)
print(f"adaptive:                 {loss.item():.6f}; max p per row {stats.confidence}")

# 4. LM-style: [batch, vocab, seq] layout, padding ignored, z-loss and logit soft-capping
lm_logits = torch.randn(2, 50, 7)
lm_target = torch.randint(0, 50, (2, 7))
lm_target[:, -2:] = -100
loss = fused_ls.label_smoothing_cross_entropy(lm_logits, lm_target, 0.1, z_loss=1e-4, softcap=30.0)
print(f"LM loss:                  {loss.item():.6f}")

from fused_ls.info import report  # noqa: E402

print("\n" + report())
