"""What label smoothing does to the target, in numbers and in a picture.

With C classes and smoothing ε, the smoothed target of a sample of class y is

    q_c = (1 − ε)·[c = y] + ε/C        (PyTorch's convention: ε/C goes to every class, y included)

so the target class gets 1 − ε + ε/C and each other class ε/C. The cross-entropy against q is
minimised by p = q, i.e. by a finite logit gap z_y − z_c = log(q_y / q_c): the model is no
longer pushed to make its logits ever larger (Szegedy et al. 2016; Müller et al. 2019).

Usage:
    python examples/smoothing_table.py --classes 10 --out smoothing_targets.png
"""

from __future__ import annotations

import argparse
import math

import torch

from fused_ls.reference import label_smoothing

EPSILONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def smoothing_rows(num_classes: int, epsilons=EPSILONS) -> list[dict]:
    """One dict per ε: target and non-target probability, their ratio, the optimal logit gap
    log(q_y/q_c) and the entropy H(q) (the smallest achievable loss), all computed from the
    explicit smoothed target."""
    rows = []
    for eps in epsilons:
        q = label_smoothing(torch.tensor([0]), num_classes, eps)[0]
        t, o = float(q[0]), float(q[1]) if num_classes > 1 else 0.0
        ent = float(-(q[q > 0] * q[q > 0].log()).sum()) + 0.0  # no "-0.0" at ε = 0
        rows.append(
            dict(
                eps=eps,
                target=t,
                other=o,
                sum=float(q.sum()),
                ratio=t / o if o > 0 else math.inf,
                gap=math.log(t / o) if o > 0 else math.inf,
                entropy=ent,
            )
        )
    return rows


def format_table(num_classes: int, rows: list[dict]) -> str:
    out = [
        f"Smoothed targets for C = {num_classes} classes (q_y = 1 − ε + ε/C, q_c = ε/C for c ≠ y)",
        "",
        "| ε | target q_y | each non-target q_c | q_y / q_c | optimal logit gap "
        "log(q_y/q_c) | min loss H(q) (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "∞" if math.isinf(r["ratio"]) else f"{r['ratio']:.1f}"
        gap = "∞" if math.isinf(r["gap"]) else f"{r['gap']:.3f}"
        out.append(
            f"| {r['eps']:.2f} | {r['target']:.4f} | {r['other']:.4f} | {ratio} | {gap} | "
            f"{r['entropy']:.4f} |"
        )
    return "\n".join(out)


def draw(num_classes: int, path: str, target: int = 3) -> None:
    """Bar charts: one-hot, uniform ε = 0.1 and 0.3, and similarity-aware ε = 0.3."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    C = num_classes
    y = torch.tensor([target % C])
    # a toy similarity: the two neighbouring class ids count as "similar" to each class
    S = torch.zeros(C, C)
    for c in range(C):
        for d in (-1, 1):
            if 0 <= c + d < C:
                S[c, c + d] = 1.0
    panels = [
        ("one-hot (ε = 0)", label_smoothing(y, C, 0.0)[0]),
        ("uniform, ε = 0.1", label_smoothing(y, C, 0.1)[0]),
        ("uniform, ε = 0.3", label_smoothing(y, C, 0.3)[0]),
        (
            "similarity-aware, ε = 0.3\n(mass on classes y ± 1)",
            label_smoothing(y, C, 0.3, similarity=S)[0],
        ),
    ]
    fig = Figure(figsize=(3.1 * len(panels), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, q) in zip(axes, panels, strict=True):
        colors = ["#c44e52" if c == int(y) else "#4c72b0" for c in range(C)]
        ax.bar(range(C), q.numpy(), color=colors, edgecolor="black", linewidth=0.5)
        for c in range(C):
            if q[c] > 0:
                ax.text(c, float(q[c]) + 0.02, f"{float(q[c]):.2f}", ha="center", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(C))
        ax.set_xlabel(f"class (target y = {int(y)} in red)", fontsize=8)
        ax.set_ylim(0, 1.1)
    axes[0].set_ylabel("target probability q_c")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=10, help="number of classes C")
    ap.add_argument("--out", default="smoothing_targets.png", help="PNG to draw ('' to skip)")
    args = ap.parse_args(argv)
    if args.classes < 2:
        ap.error("--classes must be at least 2")
    rows = smoothing_rows(args.classes)
    print(format_table(args.classes, rows))
    if args.out:
        draw(args.classes, args.out)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
