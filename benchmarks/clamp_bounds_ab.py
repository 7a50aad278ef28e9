"""A/B in one process: fake quantization with Python-number clamp bounds (current) vs broadcast
tensor bounds (the previous eager code), for RepQ-ViT calibration and fake-quant evaluation.

Both variants compute the same values (tested bit for bit in tests/test_speed_equivalence.py); the
number bounds take PyTorch's vectorised CPU clamp kernel. Calibration: per repetition and variant a
fresh quantized copy is calibrated on the same batch, an FP forward timed next to it; evaluation:
rounds of FP / number / tensor forwards of one calibrated copy. Every time is summarised by its
minimum (the least disturbed run on a shared machine) and divided by the minimum FP forward.

Usage: ``python benchmarks/clamp_bounds_ab.py [--models deit_small_patch16_224 ...] [--reps 3] [--eval_reps 8]
[--threads 2] [--output outputs/bench/clamp_bounds_ab.json]``
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402

import qwt_core  # noqa: E402
import qwt_core.quantizers as qz  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402

ADAPTERS = {"deit_small_patch16_224": qwt_core.quantize_timm_vit,
            "swin_tiny_patch4_window7_224": qwt_core.quantize_timm_swin,
            "resnet50": qwt_core.quantize_resnet}
CURRENT = qz.uniform_fake_quant


def _tensor_bounds(x, delta, zero_point, n_bits, out=None, zero_point_number=None):
    """The previous eager path: the clamp bounds stay tensors."""
    return CURRENT(x, delta, zero_point, n_bits, out=out)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _use(fq: Callable) -> None:
    qz.uniform_fake_quant = fq


def measure(name: str, reps: int, eval_reps: int, batch: int, seed: int) -> dict:
    """Minimum seconds per step and variant, and the ratios to the minimum FP forward.

    Calibration: ``reps`` fresh quantized copies per variant, alternating, an FP forward next to
    each. Evaluation: one calibrated copy, ``eval_reps`` rounds of FP / number / tensor forwards."""
    torch.manual_seed(seed)
    fp = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    variants = (("number", CURRENT), ("tensor", _tensor_bounds))
    times: dict[str, list[float]] = {"fp": [], "calib_number": [], "calib_tensor": [],
                                     "eval_number": [], "eval_tensor": []}
    try:
        with torch.no_grad():
            fp(x[:2])
            qm = None
            for _ in range(reps):
                for variant, fq in variants:
                    _use(fq)
                    qm = ADAPTERS[name](copy.deepcopy(fp), 4, 4)
                    times["fp"].append(_timed(lambda: fp(x)))
                    times[f"calib_{variant}"].append(_timed(lambda: qwt_core.calibrate_repq(qm, x)))
            qm.model(x[:2])  # fills the quantized-weight caches
            for _ in range(eval_reps):
                times["fp"].append(_timed(lambda: fp(x)))
                for variant, fq in variants:
                    _use(fq)
                    times[f"eval_{variant}"].append(_timed(lambda: qm.model(x)))
    finally:
        _use(CURRENT)
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: best[k] / best["fp"] for k in best if k != "fp"}
    return {"model": name, "times_s": times, "min_s": best, "ratios_to_fp": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"],
                   choices=sorted(ADAPTERS))
    p.add_argument("--reps", type=int, default=3, help="calibrations per variant")
    p.add_argument("--eval_reps", type=int, default=8, help="evaluation forwards per variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "clamp_bounds_ab.json"))
    args = p.parse_args()
    if args.reps < 1 or args.eval_reps < 1 or args.batch < 2:
        p.error("--reps and --eval_reps must be >= 1 and --batch >= 2")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':<30} {'calib/FP number':>16} {'tensor':>7} {'eval/FP number':>15} {'tensor':>7}")
    for name in args.models:
        r = measure(name, args.reps, args.eval_reps, args.batch, args.seed)
        rows.append(r)
        ra = r["ratios_to_fp"]
        print(f"{name:<30} {ra['calib_number']:15.2f}x {ra['calib_tensor']:6.2f}x "
              f"{ra['eval_number']:14.2f}x {ra['eval_tensor']:6.2f}x", flush=True)
    atomic_write_json(args.output, {"torch": torch.__version__, "settings": vars(args), "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
