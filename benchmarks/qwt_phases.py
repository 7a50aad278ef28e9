"""Where the QwT stage's time goes, against one FP forward over the same images (one run).

``qwt_core.compensate`` runs, for every block, the quantized block and the FP block over the QwT
calibration set, accumulates the float64 moments ``AᵀA``, ``AᵀY`` of the least-squares fit, solves
it and applies the compensation. This benchmark times those phases separately (wall clock, device
synchronised around each timed call) for DeiT-S, Swin-T (RepQ-ViT) and ResNet-50 (Percentile),
W4A4, random weights at 224², and prints each phase as a multiple of one FP forward over the set:

* ``quantized blocks`` / ``FP blocks``: the two block passes (the stage's floor: they are what
  compensation is computed from, so ``QwT / FP`` cannot fall below their sum);
* ``moments``: the fitter's ``update`` (float64 products, as DESIGN.md requires);
* ``solve``: the fitter's ``fit`` (eigendecomposition, held-out gate, ridge grid);
* ``other``: block-0 inputs, compensation applied to the next block's input, bookkeeping.

On CUDA one more figure, not part of the stage: ``solve, CPU copy``, the same ``fit`` on a copy of
each fitter's moments moved to the host (``--cpu_solve_threads`` threads, default all cores), timed
right after the device's own. On a GPU the solve is a fixed cost per block (two ``eigh`` of
``d × d``, small GEMMs, host reads) against an FP forward of only milliseconds, so whether it is
cheaper on the host is measured here rather than guessed; its result is discarded.

The phases are timed by wrapping the functions ``apply_qwt`` calls, restored afterwards; the model
and the numbers are those of an ordinary ``compensate`` call. Each figure is the minimum over
``--reps`` fresh quantized copies (FP forwards timed next to each).

Usage: ``python benchmarks/qwt_phases.py [--models ...] [--device cpu|cuda] [--reps 2]
[--qwt_size 64] [--output outputs/bench/qwt_phases.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from collections import defaultdict
from typing import Callable, Iterator

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import qwt_core  # noqa: E402
import qwt_core.compensation as comp  # noqa: E402
import qwt_core.qwt as qwt_mod  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402
from speed import (ADAPTERS, _forward_all, _sync, _timed, add_setup_arguments,  # noqa: E402
                   calibrated_for_qwt, start_run)

PHASES = ("quantized blocks", "FP blocks", "moments", "solve", "other")
CPU_SOLVE = "solve, CPU copy"


def cpu_copy(fitter: object) -> object:
    """A shallow copy of a QwT fitter whose tensors (and lists of tensors) live on the host."""
    new = copy.copy(fitter)
    for k, v in vars(fitter).items():
        if isinstance(v, torch.Tensor):
            setattr(new, k, v.cpu())
        elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            setattr(new, k, [t.cpu() for t in v])
        elif isinstance(v, torch.device):
            setattr(new, k, torch.device("cpu"))
    return new


@contextlib.contextmanager
def phase_timers(device: torch.device, totals: dict[str, float],
                 cpu_solve_threads: int = 0) -> Iterator[Callable]:
    """Wrap the fitters' ``update``/``fit`` and ``quant_disabled`` for the duration; yields a
    ``run_block`` wrapper factory that books block passes as FP or quantized. With
    ``cpu_solve_threads`` > 0 (CUDA), every ``fit`` is also timed on a host copy of the fitter
    (``totals[CPU_SOLVE]``, outside the stage's phases)."""
    fp_pass = {"on": False}
    saved: list[tuple[object, str, object]] = []

    def patch(owner: object, attr: str, key: str) -> None:
        orig = getattr(owner, attr)
        saved.append((owner, attr, orig))

        def timed(*a, **k):
            _sync(device)
            t = time.perf_counter()
            out = orig(*a, **k)
            _sync(device)
            totals[key] += time.perf_counter() - t
            if key == "solve" and cpu_solve_threads > 0:
                threads = torch.get_num_threads()
                torch.set_num_threads(cpu_solve_threads)
                try:
                    t = time.perf_counter()  # the copy to the host is part of that cost
                    orig(cpu_copy(a[0]), *a[1:], **k)
                    totals[CPU_SOLVE] += time.perf_counter() - t
                finally:
                    torch.set_num_threads(threads)
            return out
        setattr(owner, attr, timed)

    for cls in (comp.TokenLeastSquares, comp.GroupedConvLeastSquares):
        patch(cls, "update", "moments")
        patch(cls, "fit", "solve")
    quant_disabled = qwt_mod.quant_disabled

    @contextlib.contextmanager
    def marked(block):
        fp_pass["on"] = True
        try:
            with quant_disabled(block):
                yield
        finally:
            fp_pass["on"] = False
    qwt_mod.quant_disabled = marked

    def wrap_run(run: Callable) -> Callable:
        def run_block(i, block, x, **kw):
            _sync(device)
            t = time.perf_counter()
            out = run(i, block, x, **kw)
            _sync(device)
            totals["FP blocks" if fp_pass["on"] else "quantized blocks"] += time.perf_counter() - t
            return out
        return run_block
    try:
        yield wrap_run
    finally:
        qwt_mod.quant_disabled = quant_disabled
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    method = ADAPTERS[name][0]
    fp, qm0, batches = calibrated_for_qwt(name, args, device)
    best: dict[str, float] = {}
    for _ in range(args.reps):
        qm = copy.deepcopy(qm0)
        fp_a = _timed(lambda: _forward_all(fp, batches), device)
        totals: dict[str, float] = defaultdict(float)
        cpu_threads = args.cpu_solve_threads if device.type == "cuda" else 0
        with phase_timers(device, totals, cpu_threads) as wrap_run:
            qm.run_block = wrap_run(qm.run_block or qwt_mod._default_run_block)
            stage = _timed(lambda: qwt_core.compensate(qm, batches, progress=False), device)
        stage -= totals.get(CPU_SOLVE, 0.0)  # the host copy's solve is not part of the stage
        fp_b = _timed(lambda: _forward_all(fp, batches), device)
        sample = dict(totals, stage=stage, fp=(fp_a + fp_b) / 2)
        sample["other"] = stage - sum(totals[k] for k in PHASES if k != "other")
        best = sample if not best or sample["stage"] / sample["fp"] < best["stage"] / best["fp"] else best
    ratios = {k: best[k] / best["fp"] for k in (*PHASES, "stage")}
    if CPU_SOLVE in best:
        ratios[CPU_SOLVE] = best[CPU_SOLVE] / best["fp"]
    return {"model": name, "method": method, "device": device.type, "seconds": best, "ratios": ratios,
            "floor_two_passes": ratios["quantized blocks"] + ratios["FP blocks"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_arguments(p, reps=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cpu_solve_threads", type=int, default=os.cpu_count() or 1,
                   help="CUDA only: host threads for the 'solve, CPU copy' timing (default: all cores)")
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "qwt_phases.json"))
    args = p.parse_args()
    start_run(args, [args.device], args.device == "cpu", "cpu_solve_threads")
    device = torch.device(args.device)
    rows = [measure(name, args, device) for name in args.models]
    head = f"{'model':<30} " + " ".join(f"{k:>16}" for k in PHASES) + f" {'QwT / FP':>9} {'2 passes':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<30} " + " ".join(f"{r['ratios'][k]:15.2f}x" for k in PHASES)
                     + f" {r['ratios']['stage']:8.2f}x {r['floor_two_passes']:8.2f}x")
        if CPU_SOLVE in r["ratios"]:
            lines.append(f"{'':<30} {CPU_SOLVE} ({args.cpu_solve_threads} host threads; not in the stage): "
                         f"{r['ratios'][CPU_SOLVE]:.2f}x against {r['ratios']['solve']:.2f}x on the device")
    lines.append(f"(multiples of one FP forward over the {args.qwt_size} QwT images; {device.type}, "
                 f"{args.threads} threads, W{args.w_bits}A{args.a_bits}, best of {args.reps}; "
                 "'2 passes' = quantized + FP blocks, the floor of the stage)")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(args.output, {"torch": torch.__version__, "timm": timm.__version__,
                                    "settings": vars(args), "rows": rows, "table": table})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
