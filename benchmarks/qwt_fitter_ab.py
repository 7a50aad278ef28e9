"""A/B of the QwT least-squares code: the stage with ``qwt_core/compensation.py`` of a git revision
against the working tree's, in one process (alternating, so host load hits both alike).

Host timings on a shared machine drift by ±5–10 % between runs; a change to the fitters (moments,
solver) is only comparable inside one run. This loads ``compensation.py`` as it was at ``--base``
(``git show``), swaps its ``TokenLeastSquares`` / ``GroupedConvLeastSquares`` into ``apply_qwt`` for
the "before" runs, and times ``qwt_core.compensate`` on the same calibrated copy of DeiT-S, Swin-T
(RepQ-ViT) and ResNet-50 (Percentile), W4A4, random weights at 224². Also prints the largest R²
difference and whether every block's decision agrees (the numbers should not change).

Usage: ``python benchmarks/qwt_fitter_ab.py --base REV [--models ...] [--reps 3] [--threads 2]
[--output outputs/bench/qwt_fitter_ab.json]``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from types import ModuleType

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import qwt_core  # noqa: E402
import qwt_core.compensation as current  # noqa: E402
import qwt_core.qwt as qwt_mod  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402
from speed import add_setup_arguments, calibrated_for_qwt, start_run  # noqa: E402

FITTERS = ("TokenLeastSquares", "GroupedConvLeastSquares")


def load_base(rev: str) -> ModuleType:
    """``qwt_core/compensation.py`` at git revision ``rev``, imported as a module of ``qwt_core``."""
    try:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:qwt_core/compensation.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise SystemExit(f"--base {rev}: cannot read qwt_core/compensation.py at that revision "
                         f"({err.strip()}); pass a commit of this repository") from None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    try:
        spec = importlib.util.spec_from_file_location("qwt_core._compensation_base", f.name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)
    missing = [n for n in FITTERS if not hasattr(module, n)]
    if missing:
        raise SystemExit(f"--base {rev}: its compensation.py has no {', '.join(missing)}")
    return module


def use_fitters(module: ModuleType) -> None:
    for n in FITTERS:
        setattr(qwt_mod, n, getattr(module, n))


def measure(name: str, variants: dict[str, ModuleType], args: argparse.Namespace) -> dict:
    _, q0, batches = calibrated_for_qwt(name, args, torch.device("cpu"))
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    reports = {}
    try:
        for _ in range(args.reps):
            for tag, module in variants.items():
                use_fitters(module)
                qm = copy.deepcopy(q0)
                start = time.perf_counter()
                reports[tag] = qwt_core.compensate(qm, batches, progress=False)
                seconds[tag].append(time.perf_counter() - start)
    finally:
        use_fitters(current)
    before, after = reports["before"].blocks, reports["after"].blocks
    dr2 = max((abs(a.r2 - b.r2) for a, b in zip(before, after) if a.r2 is not None and b.r2 is not None),
              default=0.0)
    best = {k: min(v) for k, v in seconds.items()}
    return {"model": name, "seconds": seconds, "best": best, "speedup": best["before"] / best["after"],
            "max_abs_r2_difference": dr2,
            "same_decisions": [a.applied for a in before] == [b.applied for b in after]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision whose qwt_core/compensation.py is 'before'")
    add_setup_arguments(p, reps=3)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "qwt_fitter_ab.json"))
    args = p.parse_args()
    start_run(args, ["cpu"], True)
    variants = {"before": load_base(args.base), "after": current}
    rows = []
    for name in args.models:
        r = measure(name, variants, args)
        rows.append(r)
        print(f"{name:<30} QwT stage {r['best']['before']:7.2f} s ({args.base}) -> {r['best']['after']:7.2f} s "
              f"(working tree): {r['speedup']:.2f}x; max |dR2| {r['max_abs_r2_difference']:.1e}; "
              f"same decisions: {r['same_decisions']}", flush=True)
    print(f"(cpu, {args.threads} threads, W{args.w_bits}A{args.a_bits}, {args.qwt_size} QwT images, "
          f"min of {args.reps}, alternating)")
    atomic_write_json(args.output, {"torch": torch.__version__, "timm": timm.__version__,
                                    "settings": vars(args), "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
