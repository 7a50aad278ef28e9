"""Where the QwT stage's time goes, against one FP forward over the same images (one run).

``qwt_core.compensate`` runs, for every block, the quantized block and the FP block over the QwT
calibration set, accumulates the float64 moments ``AᵀA``, ``AᵀY`` of the least-squares fit, solves
it and applies the compensation. This benchmark times those phases separately (wall clock, device
synchronised around each timed call) for DeiT-S, Swin-T (RepQ-ViT) and ResNet-50 (Percentile),
W4A4, random weights at 224², and prints each phase as a multiple of one FP forward over the set:

* ``quantized blocks`` / ``FP blocks``: the two block passes (the stage's floor: they are what
  compensation is computed from, so ``QwT / FP`` cannot fall below their sum);
* ``moments``: the fitter's ``update`` (float64 products, as DESIGN.md requires);
* ``solve``: the fitter's ``fit`` (factorisation, held-out gate, ridge grid; ``--qwt_solver``);
* ``other``: block-0 inputs, compensation applied to the next block's input, bookkeeping.

Alongside, not part of the stage, the same ``fit`` of every block is timed with the other
least-squares factorisations (``--solve_ab``, default on for CUDA): ``eigh`` and ``cholesky`` (see
``qwt_core.compensation``; ``auto``, what the stage uses, is Cholesky on CUDA and eigh on the CPU),
and on CUDA each also on a copy of the moments moved to the host (``--cpu_solve_threads`` threads,
default all cores; the copy is part of its time). On a GPU the solve is a fixed cost per block against
an FP forward of only milliseconds, and ``eigh`` of a few hundred columns is latency-bound there
(batched over the groups of the ResNet fitter, a loop), so which is cheapest is measured here rather
than guessed; those results are discarded.

The phases are timed by wrapping the functions ``apply_qwt`` calls, restored afterwards; the model
and the numbers are those of an ordinary ``compensate`` call. Each figure is the minimum over
``--reps`` fresh quantized copies (FP forwards timed next to each).

Usage: ``python -m benchmarks.speed --phases [--models ...] [--device cpu|cuda] [--reps 2]
[--qwt_size 64] [--qwt_solver auto|eigh|cholesky] [--[no-]solve_ab] [--output
results/qwt_phases_<device>.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from collections import defaultdict
from typing import Callable, Iterator

import timm
import torch

import qwt_core
import qwt_core.compensation as comp
import qwt_core.qwt as qwt_mod
from benchmarks.common import machine_info, results_path
from qwt_core.model_io import atomic_write_json
from benchmarks.speed import (ADAPTERS, _forward_all, _sync, _timed, add_setup_arguments,
                              calibrated_for_qwt, start_run)

PHASES = ("quantized blocks", "FP blocks", "moments", "solve", "other")


def alternatives(device: torch.device) -> list[tuple[str, str, bool]]:
    """``(label, solver, on a host copy)`` of the solves timed next to the stage's own."""
    out = [(f"solve: {s}", s, False) for s in ("eigh", "cholesky")]
    if device.type == "cuda":
        out += [(f"solve: {s}, CPU copy", s, True) for s in ("eigh", "cholesky")]
    return out


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
def phase_timers(device: torch.device, totals: dict[str, float], solve_ab: bool = False,
                 cpu_solve_threads: int = 0) -> Iterator[Callable]:
    """Wrap the fitters' ``update``/``fit`` and ``quant_disabled`` for the duration; yields a
    ``run_block`` wrapper factory that books block passes as FP or quantized. With ``solve_ab``,
    every ``fit`` is also timed with each of :func:`alternatives` (``totals[label]``, outside the
    stage's phases; ``totals["alternatives"]`` their sum, to subtract from the stage)."""
    fp_pass = {"on": False}
    saved: list[tuple[object, str, object]] = []

    def timed_call(fn: Callable, *a, **k) -> tuple[object, float]:
        _sync(device)
        t = time.perf_counter()
        out = fn(*a, **k)
        _sync(device)
        return out, time.perf_counter() - t

    def patch(owner: object, attr: str, key: str) -> None:
        orig = getattr(owner, attr)
        saved.append((owner, attr, orig))

        def timed(*a, **k):
            out, dt = timed_call(orig, *a, **k)
            totals[key] += dt
            if key == "solve" and solve_ab:
                t_all = time.perf_counter()
                for label, solver, host in alternatives(device):
                    threads = torch.get_num_threads()
                    if host:
                        torch.set_num_threads(cpu_solve_threads)
                    try:  # the copy to the host is part of that cost
                        _, dt = timed_call(lambda: orig(cpu_copy(a[0]) if host else a[0], *a[1:],
                                                        **dict(k, solver=solver)))
                    finally:
                        torch.set_num_threads(threads)
                    totals[label] += dt
                totals["alternatives"] += time.perf_counter() - t_all
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
    solve_ab = args.solve_ab if args.solve_ab is not None else device.type == "cuda"
    best: dict[str, float] = {}
    solvers: set = set()
    for _ in range(args.reps):
        qm = copy.deepcopy(qm0)
        fp_a = _timed(lambda: _forward_all(fp, batches), device)
        totals: dict[str, float] = defaultdict(float)
        out: dict = {}
        with phase_timers(device, totals, solve_ab, args.cpu_solve_threads) as wrap_run:
            qm.run_block = wrap_run(qm.run_block or qwt_mod._default_run_block)
            stage = _timed(lambda: out.update(report=qwt_core.compensate(
                qm, batches, progress=False, solver=args.qwt_solver)), device)
        stage -= totals.pop("alternatives", 0.0)  # the alternative solves are not part of the stage
        solvers |= {b.solver for b in out["report"].blocks if b.solver}
        fp_b = _timed(lambda: _forward_all(fp, batches), device)
        sample = dict(totals, stage=stage, fp=(fp_a + fp_b) / 2)
        sample["other"] = stage - sum(totals[k] for k in PHASES if k != "other")
        best = sample if not best or sample["stage"] / sample["fp"] < best["stage"] / best["fp"] else best
    ratios = {k: best[k] / best["fp"] for k in (*PHASES, "stage")}
    for label, _, _ in alternatives(device) if solve_ab else []:
        ratios[label] = best[label] / best["fp"]
    return {"model": name, "method": method, "device": device.type, "seconds": best, "ratios": ratios,
            "floor_two_passes": ratios["quantized blocks"] + ratios["FP blocks"],
            "stage_solver": sorted(solvers)}


def main(argv: "list[str] | None" = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_arguments(p, reps=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--qwt_solver", default="auto", choices=["auto", "eigh", "cholesky"],
                   help="the stage's least-squares factorisation (default auto: Cholesky on CUDA, eigh "
                        "on the CPU)")
    p.add_argument("--solve_ab", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every block's solve with eigh and Cholesky (and on CUDA with each "
                        "on a host copy), outside the stage (default: on for CUDA)")
    p.add_argument("--cpu_solve_threads", type=int, default=os.cpu_count() or 1,
                   help="CUDA only: host threads for the 'CPU copy' solve timings (default: all cores)")
    p.add_argument("--output", default=None, help="default: results/qwt_phases_<device>.json")
    args = p.parse_args(argv)
    args.output = args.output or results_path(f"qwt_phases_{args.device}.json")
    start_run(args, [args.device], "cpu_solve_threads")
    device = torch.device(args.device)
    rows = []
    for name in args.models:  # the JSON after every model: a run stopped at a time limit keeps the rows done
        rows.append(measure(name, args, device))
        atomic_write_json(args.output, {"machine": machine_info(args.threads), "torch": torch.__version__, "timm": timm.__version__,
                                        "settings": vars(args), "rows": rows, "complete": False})
    head = f"{'model':<30} " + " ".join(f"{k:>16}" for k in PHASES) + f" {'QwT / FP':>9} {'2 passes':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<30} " + " ".join(f"{r['ratios'][k]:15.2f}x" for k in PHASES)
                     + f" {r['ratios']['stage']:8.2f}x {r['floor_two_passes']:8.2f}x")
        alts = [(k, v) for k, v in r["ratios"].items() if k.startswith("solve: ")]
        if alts:
            lines.append(f"{'':<30} the stage solved with {'/'.join(r['stage_solver'])}; not in the stage: "
                         + ", ".join(f"{k.removeprefix('solve: ')} {v:.2f}x" for k, v in alts))
    lines.append(f"(multiples of one FP forward over the {args.qwt_size} QwT images; {device.type}, "
                 f"{args.threads} threads, W{args.w_bits}A{args.a_bits}, best of {args.reps}; "
                 "'2 passes' = quantized + FP blocks, the floor of the stage"
                 + (f"; CPU copies on {args.cpu_solve_threads} host threads" if device.type == "cuda" else "")
                 + ")")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(args.output, {"machine": machine_info(args.threads), "torch": torch.__version__, "timm": timm.__version__,
                                    "settings": vars(args), "rows": rows, "table": table, "complete": True})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
