"""QwT stage cost on DeiT-S, Swin-T and ResNet-50, as a multiple of one FP forward (one run).

For each architecture (random init, timm), W4A4: one FP forward over N calibration images (the unit),
one quantized forward, then ``qwt_core.compensate`` over the same images, with the peak accelerator
memory of the QwT stage and the output MSE to FP before / after compensation (on the calibration
images, random weights: a sanity check, not an accuracy figure).

Usage: ``python benchmarks/qwt_cost_models.py [--device cuda] [--calib_size 512] [--batch_size 32]
[--models deit_small_patch16_224 ...] [--output results/bench_models.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qwt_core  # noqa: E402

ADAPTERS: dict[str, Callable] = {
    "deit_small_patch16_224": qwt_core.quantize_timm_vit,
    "swin_tiny_patch4_window7_224": qwt_core.quantize_timm_swin,
    "resnet50": qwt_core.quantize_resnet,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _timed_forward(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device
                   ) -> tuple[float, list[torch.Tensor]]:
    _sync(device)
    t = time.perf_counter()
    outs = [model(b) for b in batches]
    _sync(device)
    return time.perf_counter() - t, outs


def measure(name: str, calib_size: int, batch_size: int, device: torch.device) -> dict:
    """Times (s), ratios to one FP forward, peak memory (MiB, CUDA only) and output MSE for one model."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device)
    images = torch.randn(calib_size, 3, 224, 224, device=device)
    batches = list(images.split(batch_size))
    with torch.no_grad():
        model(batches[0])  # warm-up
    t_fp, fp = _timed_forward(model, batches, device)
    qm = ADAPTERS[name](model, 4, 4)
    qwt_core.calibrate_repq(qm, batches[0])
    t_q, quant = _timed_forward(model, batches, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    report = qwt_core.compensate(qm, batches, progress=False)
    _sync(device)
    t_qwt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    _, comp = _timed_forward(model, batches, device)
    mse = lambda outs: sum((a - b).pow(2).mean().item() for a, b in zip(outs, fp)) / len(fp)  # noqa: E731
    return {"model": name, "fp_forward_s": t_fp, "quant_forward_ratio": t_q / t_fp,
            "qwt_s": t_qwt, "qwt_ratio": t_qwt / t_fp, "qwt_peak_mib": peak,
            "mse_quant": mse(quant), "mse_qwt": mse(comp),
            "blocks_compensated": sum(b.applied for b in report.blocks), "blocks": len(report.blocks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calib_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--models", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--output", default=os.path.join(ROOT, "results", "bench_models.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [measure(name, args.calib_size, args.batch_size, device) for name in args.models]
    print(f"{args.calib_size} calibration images, batch {args.batch_size}, W4A4, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    print(f"{'model':<30} {'FP fwd':>8} {'W4A4 fwd':>9} {'QwT':>8} {'QwT/FP':>7} {'peak MiB':>9} "
          f"{'MSE q':>9} {'MSE +QwT':>9}")
    for r in rows:
        peak = f"{r['qwt_peak_mib']:.0f}" if r["qwt_peak_mib"] is not None else "-"
        print(f"{r['model']:<30} {r['fp_forward_s']:7.2f}s {r['quant_forward_ratio']:8.2f}x "
              f"{r['qwt_s']:7.2f}s {r['qwt_ratio']:6.2f}x {peak:>9} {r['mse_quant']:9.3g} {r['mse_qwt']:9.3g}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "calib_size": args.calib_size,
                   "batch_size": args.batch_size, "rows": rows}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
