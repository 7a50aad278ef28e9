"""Evaluation through ``torch.compile`` of the whole quantized model vs the eager one (one process).

For DeiT-S, Swin-T (RepQ-ViT) and ResNet-50 (Percentile), W4A4, random weights at 224²: the model
is calibrated and QwT-compensated once, then four forwards over the same evaluation images are
timed in turn, ``--reps`` rounds (minimum per variant; alternating, so that a shared machine slows
them alike):

* ``FP``: the FP model, eager (the reference of every ratio);
* ``quant``: the fake-quant model, eager (``--fused_fake_quant`` off);
* ``quant compiled``: ``torch.compile(model, dynamic=False)`` of the fake-quant model (inductor, one
  graph: what ``--compile_model`` runs);
* ``FP compiled``: the same for the FP model.

The compile (first forward) is timed apart. The compiled model is not the eager one bit for bit:
inductor fuses LayerNorm / softmax / GELU and rounds them differently, which moves values across
quantization boundaries; the agreement with the eager quantized model is reported next to the
quantization error itself (eager quantized vs FP), both as the norm of the logit difference relative
to the norm of the logits, and as the argmax agreement. On random weights the logits are nearly
flat, so argmax moves far more easily than on a trained model.

Usage: ``python benchmarks/compile_ab.py [--models ...] [--device cpu|cuda] [--reps 6]
[--eval_size 32] [--output outputs/bench/compile_ab.json]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import qwt_core  # noqa: E402
from qwt_core.cli_options import compiled_for_eval  # noqa: E402
from qwt_core.model_io import atomic_write_json  # noqa: E402
from speed import ADAPTERS, _forward_all, _images, _timed, add_setup_arguments, start_run  # noqa: E402

VARIANTS = ("FP", "quant", "quant compiled", "FP compiled")


def _logits_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """``‖a - b‖ / ‖b‖`` over all logits and the fraction of equal argmax."""
    a_, b_ = torch.cat(a).float(), torch.cat(b).float()
    return {"rel_norm": float((a_ - b_).norm() / b_.norm().clamp_min(1e-12)),
            "argmax_agreement": float((a_.argmax(1) == b_.argmax(1)).float().mean())}


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Times (s, minimum over ``reps`` rounds) of the four variants over the evaluation images, the
    compile times and the agreement figures for one architecture."""
    method, adapter = ADAPTERS[name]
    torch.manual_seed(args.seed)
    fp = timm.create_model(name, pretrained=False).eval().to(device)
    calib = _images(args.calib_size, args.seed, device)
    evals = list(_images(args.eval_size, args.seed + 1, device).split(args.batch_size))
    qm = adapter(copy.deepcopy(fp), args.w_bits, args.a_bits)
    qwt_core.calibrate_repq(qm, calib)
    report = qwt_core.compensate(qm, list(_images(args.qwt_size, args.seed + 2, device).split(args.batch_size)),
                                 progress=False)
    models = {"FP": fp, "quant": qm.model,
              "quant compiled": compiled_for_eval(qm.model),  # what --compile_model evaluates
              "FP compiled": compiled_for_eval(fp)}
    first = {k: _timed(lambda m=m: _forward_all(m, evals), device) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.reps):
        for k in VARIANTS:
            times[k].append(_timed(lambda m=models[k]: _forward_all(m, evals), device))
    best = {k: min(v) for k, v in times.items()}
    out = {k: _forward_all(m, evals) for k, m in models.items()}
    return {"model": name, "method": method, "device": device.type,
            "qwt_blocks_compensated": sum(b.applied for b in report.blocks),
            "times_s": times, "best_s": best,
            "compile_s": {"quant compiled": first["quant compiled"] - best["quant compiled"],
                          "FP compiled": first["FP compiled"] - best["FP compiled"]},
            "ratios_to_fp": {k: best[k] / best["FP"] for k in VARIANTS},
            "compiled_vs_eager_quant": _logits_distance(out["quant compiled"], out["quant"]),
            "eager_quant_vs_fp": _logits_distance(out["quant"], out["FP"]),
            "fp_compiled_vs_fp": _logits_distance(out["FP compiled"], out["FP"])}


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"{'model':<30} {'dev':<4} {'quant/FP':>9} {'compiled/FP':>12} {'FP comp./FP':>12} "
            f"{'compile s':>10}  {'compiled vs eager quant':>24}  {'eager quant vs FP':>18}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ra, c, q = r["ratios_to_fp"], r["compiled_vs_eager_quant"], r["eager_quant_vs_fp"]
        lines.append(f"{r['model']:<30} {r['device']:<4} {ra['quant']:8.2f}x {ra['quant compiled']:11.2f}x "
                     f"{ra['FP compiled']:11.2f}x {r['compile_s']['quant compiled']:10.0f}  "
                     f"{c['rel_norm']:9.3g} rel, {100 * c['argmax_agreement']:5.1f} % top-1  "
                     f"{q['rel_norm']:9.3g} rel")
    lines.append(f"(W{args.w_bits}A{args.a_bits} + QwT, random weights; {args.eval_size} evaluation images, "
                 f"batch {args.batch_size}; minimum of {args.reps} alternating rounds; 'rel' = ‖Δ logits‖ / "
                 "‖logits‖; top-1 = argmax agreement)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(p, reps=6)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--eval_size", type=int, default=32)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "bench", "compile_ab.json"))
    args = p.parse_args()
    start_run(args, [args.device], args.device == "cpu", "eval_size")  # CPU: heap kept, as the CLIs do
    device = torch.device(args.device)
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows.append(measure(name, args, device))
        print(format_table(rows[-1:], args).splitlines()[2], flush=True)
    table = format_table(rows, args)
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {args.threads} CPU threads, "
          f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}; "
          f"total {time.perf_counter() - t0:.0f}s")
    print(table)
    atomic_write_json(args.output, {"torch": torch.__version__, "timm": timm.__version__,
                                    "settings": vars(args), "rows": rows, "table": table})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
