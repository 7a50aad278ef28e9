"""A/B in one process: the log-√2 quantizer's integer form (``log_sqrt2_grid``: compares on the bits
of x/Δ, an exponent field for 2^(-q/2)) vs its log2/exp2 form, in the fused fake-quant kernels and
in ``torch.compile`` of the whole model (CPU).

Both forms give the same values (tested bit for bit in tests/test_speed_equivalence.py). One
calibrated copy per model (W4A4, eager calibration) runs rounds of FP / integer / log2 forwards in
fused mode; inside each fused forward the time spent in the log-√2 quantizers is summed too (wall
clock, CPU), which is the part the form changes and which on a noisy shared host is measured much
more steadily than the whole forward. With ``--compiled`` the model is then compiled once per form
(inductor; the form is fixed when the graph is traced) and rounds of FP / compiled forwards follow
each. Every time is summarised by its minimum; forwards are divided by the minimum FP forward. The
first call of each kernel or graph (compilation) is not timed.

Usage: ``python benchmarks/log_grid_ab.py [--models deit_small_patch16_224 ...] [--eval_reps 10]
[--compiled] [--threads 2] [--output outputs/bench/log_grid_ab.json]``
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from typing import Callable, Iterator

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402

import qwt_core  # noqa: E402
import qwt_core.quantizers as qz  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402

ADAPTERS = {"deit_small_patch16_224": qwt_core.quantize_timm_vit,
            "swin_tiny_patch4_window7_224": qwt_core.quantize_timm_swin}
BITS = 4


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _form(form: str) -> Iterator[None]:
    """``integer``: the grid as computed; ``log2``: no grid for BITS (the log2/exp2 kernels)."""
    grid = qz.log_sqrt2_grid(BITS)
    if form == "integer" and grid is None:
        raise SystemExit(f"error: this CPU's log2 gives no log-√2 grid for {BITS} bits; nothing to compare")
    qz._LOG_GRIDS[BITS] = grid if form == "integer" else None
    try:
        yield
    finally:
        qz._LOG_GRIDS[BITS] = grid


@contextlib.contextmanager
def _log_quantizer_time(acc: list[float]) -> Iterator[None]:
    """Add the wall-clock time of every ``LogSqrt2Quantizer.quantize`` call to ``acc[0]``."""
    original = qz.LogSqrt2Quantizer.quantize

    def timed(self, x):
        t0 = time.perf_counter()
        out = original(self, x)
        acc[0] += time.perf_counter() - t0
        return out

    qz.LogSqrt2Quantizer.quantize = timed
    try:
        yield
    finally:
        qz.LogSqrt2Quantizer.quantize = original


def measure(name: str, eval_reps: int, batch: int, seed: int, compiled: bool) -> dict:
    """Minimum seconds per step and form, and the forwards' ratios to the minimum FP forward."""
    torch.manual_seed(seed)
    fp = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    forms = ("integer", "log2")
    times: dict[str, list[float]] = {"fp": []}
    with torch.no_grad():
        fp(x[:2])
        qm = ADAPTERS[name](copy.deepcopy(fp), BITS, BITS)
        qwt_core.calibrate_repq(qm, x)
        qz.set_fused_fake_quant(True)
        try:
            for form in forms:  # compile each form's kernels, fill the weight caches
                with _form(form):
                    qm.model(x)
            for _ in range(eval_reps):
                times["fp"].append(_timed(lambda: fp(x)))
                for form in forms:
                    acc = [0.0]
                    with _form(form), _log_quantizer_time(acc):
                        times.setdefault(f"eval_{form}", []).append(_timed(lambda: qm.model(x)))
                    times.setdefault(f"log_quantizers_{form}_s", []).append(acc[0])
        finally:
            qz.set_fused_fake_quant(False)
        if compiled:
            for form in forms:
                torch._dynamo.reset()
                with _form(form):
                    runner = torch.compile(qm.model, dynamic=False)
                    times.setdefault(f"compile_{form}_s", []).append(_timed(lambda: runner(x)))
                for _ in range(eval_reps):  # one graph per form: run it now, next to FP forwards
                    times["fp"].append(_timed(lambda: fp(x)))
                    times.setdefault(f"compiled_{form}", []).append(_timed(lambda: runner(x)))
            torch._dynamo.reset()
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: best[k] / best["fp"] for k in best if k != "fp" and not k.endswith("_s")}
    return {"model": name, "times_s": times, "min_s": best, "ratios_to_fp": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=sorted(ADAPTERS), choices=sorted(ADAPTERS))
    p.add_argument("--eval_reps", type=int, default=10, help="evaluation forwards per form")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compiled", action="store_true", help="also time torch.compile of the whole model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "log_grid_ab.json"))
    args = p.parse_args()
    if args.eval_reps < 1 or args.batch < 2:
        p.error("--eval_reps must be >= 1 and --batch >= 2")
    torch.set_num_threads(args.threads)
    rows = []
    head = (f"{'model':<30} {'log-sqrt2 ms/forward integer':>29} {'log2':>7} "
            f"{'fused eval/FP integer':>22} {'log2':>6}")
    print(head + (f" {'compiled/FP integer':>20} {'log2':>6}" if args.compiled else ""))
    for name in args.models:
        r = measure(name, args.eval_reps, args.batch, args.seed, args.compiled)
        rows.append(r)
        ra, best = r["ratios_to_fp"], r["min_s"]
        line = (f"{name:<30} {1e3 * best['log_quantizers_integer_s']:29.1f} "
                f"{1e3 * best['log_quantizers_log2_s']:7.1f} "
                f"{ra['eval_integer']:21.2f}x {ra['eval_log2']:5.2f}x")
        if args.compiled:
            line += f" {ra['compiled_integer']:19.2f}x {ra['compiled_log2']:5.2f}x"
        print(line, flush=True)
    atomic_write_json(args.output, {"torch": torch.__version__, "settings": vars(args), "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
