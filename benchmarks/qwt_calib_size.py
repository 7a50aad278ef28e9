"""QwT vs calibration-set size: the in-sample rule (papers) against the held-out rule (default).

A small timm ViT is *trained here* on scikit-learn's digits (8×8 images, 10 classes; a real model, so
quantization damage is real), quantized W4A4 with RepQ-ViT (32 calibration images), then compensated
with QwT on ``n`` calibration images for n in ``--sizes`` (several random draws each) with

* ``insample``: ``gate="insample"``, λ = 0 (the papers' rule: compensate iff in-sample R² > 0);
* ``holdout``: ``gate="holdout"``, ``ridge="auto"`` (the default: λ and the decision on held-out samples).

Metrics on held-out test images (never used for training or calibration): mean squared error of the
logits to the FP model's logits, and top-1 accuracy. Prints a table and writes JSON.

Usage: ``python -m benchmarks.qwt_calib_size [--threads 1] [--sizes 4 8 16 ... 512] [--draws 2]
[--output results/qwt_calib_size.json]``.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from benchmarks.common import ROOT, machine_info, results_path  # noqa: F401

import qwt_core  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402


def load_digits_split(seed: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train (N, 1, 8, 8), y_train, x_test, y_test)``: digits scaled to zero mean, unit std."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def build_vit(embed_dim: int, depth: int) -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=embed_dim,
                             depth=depth, num_heads=4, mlp_ratio=2.0)


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
          lr: float = 5e-3) -> None:
    """AdamW + one-cycle schedule, batch 64; in place."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in tqdm(range(epochs), desc="train", leave=False):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(256)])


def metrics(logits: torch.Tensor, fp_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"mse_to_fp": float((logits - fp_logits).pow(2).mean()),
            "top1": float((logits.argmax(1) == labels).float().mean() * 100)}


def quantized(fp_state: dict, args: argparse.Namespace, repq_images: torch.Tensor) -> qwt_core.QuantizedModel:
    """A fresh W/A-bit RepQ-ViT copy of the trained model (deterministic)."""
    model = build_vit(args.embed_dim, args.depth)
    model.load_state_dict(fp_state)
    model.eval()
    qm = qwt_core.adapters.quantize_timm_vit(model, args.w_bits, args.a_bits)
    qwt_core.calibrate(qm, repq_images)
    return qm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--draws", type=int, default=2, help="random calibration sets per size")
    p.add_argument("--w_bits", type=int, default=4)
    p.add_argument("--a_bits", type=int, default=4)
    p.add_argument("--embed_dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n_test", type=int, default=597)
    p.add_argument("--batch_size", type=int, default=32, help="QwT calibration batch size")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="relative noise tolerance of the 'never worse than baseline' check")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared machine: tiny ops, no OpenMP barriers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=results_path("qwt_calib_size.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed, args.n_test)
    if max(args.sizes) > len(x_tr):
        raise SystemExit(f"--sizes up to {max(args.sizes)} but only {len(x_tr)} training images")
    torch.manual_seed(args.seed)
    fp_model = build_vit(args.embed_dim, args.depth)
    t0 = time.perf_counter()
    train(fp_model, x_tr, y_tr, args.epochs, args.seed)
    train_seconds = time.perf_counter() - t0
    fp_state = {k: v.clone() for k, v in fp_model.state_dict().items()}
    fp_logits = logits_of(fp_model, x_te)
    fp = metrics(fp_logits, fp_logits, y_te)
    repq_images = x_tr[torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(args.seed + 1))[:32]]
    base = metrics(logits_of(quantized(fp_state, args, repq_images).model, x_te), fp_logits, y_te)

    runs = []
    jobs = [(n, d, rule) for n in args.sizes for d in range(args.draws) for rule in ("insample", "holdout")]
    for n, d, rule in tqdm(jobs, desc="QwT runs"):
        g = torch.Generator().manual_seed(1000 * args.seed + 17 * n + d)
        calib = x_tr[torch.randperm(len(x_tr), generator=g)[:n]]
        qm = quantized(fp_state, args, repq_images)
        opts = {"gate": "insample", "ridge": 0.0} if rule == "insample" else {"gate": "holdout", "ridge": "auto"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the few-rows warning is expected at small sizes
            report = qwt_core.compensate(qm, list(calib.split(args.batch_size)), progress=False, **opts)
        m = metrics(logits_of(qm.model, x_te), fp_logits, y_te)
        runs.append({"size": n, "draw": d, "rule": rule, **m,
                     "blocks_applied": sum(b.applied for b in report.blocks),
                     "qwt": report.to_dict()})

    summary = []
    for n in args.sizes:
        row = {"size": n, "tokens": n * (fp_model.patch_embed.num_patches + 1)}
        for rule in ("insample", "holdout"):
            sel = [r for r in runs if r["size"] == n and r["rule"] == rule]
            row[rule] = {k: sum(r[k] for r in sel) / len(sel) for k in ("mse_to_fp", "top1", "blocks_applied")}
            row[rule]["mse_to_fp_worst"] = max(r["mse_to_fp"] for r in sel)
        summary.append(row)
    tol = 1 + args.tolerance
    checks = {
        "holdout_never_worse_than_baseline": all(r["holdout"]["mse_to_fp_worst"] <= base["mse_to_fp"] * tol
                                                 for r in summary),
        "holdout_matches_or_beats_insample_at_largest_size":
            summary[-1]["holdout"]["mse_to_fp"] <= summary[-1]["insample"]["mse_to_fp"] * tol,
    }

    head = (f"{'calib':>5} {'tokens':>6} | {'in-sample MSE':>13} {'top1':>6} {'blk':>4} | "
            f"{'holdout MSE':>11} {'worst':>8} {'top1':>6} {'blk':>4}")
    lines = [f"ViT (dim {args.embed_dim}, depth {args.depth}) trained on digits; W{args.w_bits}A{args.a_bits}; "
             f"{len(x_te)} held-out test images; mean over {args.draws} calibration draws",
             f"FP top1 {fp['top1']:.2f} | baseline (RepQ-ViT, no QwT): MSE to FP {base['mse_to_fp']:.4f}, "
             f"top1 {base['top1']:.2f}", head]
    for r in summary:
        a, b = r["insample"], r["holdout"]
        lines.append(f"{r['size']:>5} {r['tokens']:>6} | {a['mse_to_fp']:>13.4f} {a['top1']:>6.2f} "
                     f"{a['blocks_applied']:>4.1f} | {b['mse_to_fp']:>11.4f} {b['mse_to_fp_worst']:>8.4f} "
                     f"{b['top1']:>6.2f} {b['blocks_applied']:>4.1f}")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    seconds = time.perf_counter() - t_start
    lines.append(f"total {seconds:.1f} s (training {train_seconds:.1f} s) on {args.threads} threads")
    print("\n".join(lines))
    atomic_write_json(args.output, {"machine": machine_info(args.threads), "config": vars(args), "fp": fp, "baseline": base, "summary": summary,
                             "checks": checks, "runs": runs, "seconds": seconds,
                             "train_seconds": train_seconds, "depth_blocks": args.depth})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
