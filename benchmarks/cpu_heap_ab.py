"""Effect of keeping the CPU heap (``qwt_core.cpu_heap``) on FP and fake-quant speed, in one run.

The heap setting is process-wide and cannot be undone, so this runs ``benchmarks/speed.py`` in child
processes, one with ``--cpu_heap system`` (glibc's own trimming and mmap of large blocks) and one with
``--cpu_heap retain``, for the same models, modes and seeds, alternating the order per model. It prints
the absolute seconds of the FP and the quantized side of each step (minimum over repetitions) and the
ratios of issue 10 for both settings.

Usage: ``python benchmarks/cpu_heap_ab.py [--models ...] [--modes eager] [--reps 3]
[--output outputs/bench/cpu_heap_ab.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from qwt_core.model_io import atomic_write_json  # noqa: E402

MODELS = ["deit_small_patch16_224", "swin_tiny_patch4_window7_224", "resnet50"]
#: (speed.py summary key, label) of the absolute times printed
TIMES = [("fp_eval", "FP eval"), ("quant_eval", "FQ eval"), ("fp_calib", "FP calib batch"),
         ("calibration", "calibration"), ("fp_qwt", "FP QwT set"), ("qwt", "QwT stage")]


def run_speed(model: str, heap: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one ``speed.py`` child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speed.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--models", model,
               "--device", "cpu", "--modes", *args.modes, "--reps", str(args.reps),
               "--threads", str(args.threads), "--cpu_heap", heap, "--output", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["rows"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "fused"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "cpu_heap_ab.json"))
    args = p.parse_args()
    t0 = time.perf_counter()
    results: list[dict] = []
    for k, model in enumerate(args.models):
        order = ["system", "retain"] if k % 2 == 0 else ["retain", "system"]
        for heap in order:
            print(f"{model}: speed.py --cpu_heap {heap} ...", flush=True)
            for row in run_speed(model, heap, args):
                results.append({"heap": heap, **row})
    head = f"{'model':<30} {'mode':<6} {'heap':<7} " + " ".join(f"{lab:>14}" for _, lab in TIMES) + \
        f" {'calib/FP':>9} {'eval/FP':>8} {'QwT/FP':>7}"
    lines = [head, "-" * len(head)]
    for model in args.models:
        for mode in args.modes:
            for heap in ("system", "retain"):
                r = next(x for x in results if x["model"] == model and x["mode"] == mode and x["heap"] == heap)
                s, ra = r["summary_s"], r["ratios"]
                lines.append(f"{model:<30} {mode:<6} {heap:<7} " + " ".join(f"{s[k]:>13.2f}s" for k, _ in TIMES)
                             + f" {ra['calibration']:>8.2f}x {ra['eval']:>7.2f}x {ra['qwt']:>6.2f}x")
    table = "\n".join(lines)
    print(f"\n(min of {args.reps} repetitions per child process, {args.threads} CPU threads; "
          f"total {time.perf_counter() - t0:.0f}s)")
    print(table)
    atomic_write_json(args.output, {"settings": vars(args), "rows": results, "table": table,
                                    "total_s": time.perf_counter() - t0})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
