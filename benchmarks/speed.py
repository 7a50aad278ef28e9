"""Speed of RepQ-ViT/Percentile calibration, fake-quant evaluation and the QwT stage vs FP (one run).

For DeiT-S, Swin-T (RepQ-ViT, W4A4) and ResNet-50 (Percentile, W4A4) from timm with random
weights at 224², this measures in ONE run the three ratios of issue 10, each against FP forwards
of the same model on the same images:

* ``calibration``: ``qwt_core.calibrate`` on the calibration batch (32 images) ÷ one FP
  forward of that batch (target ≤ 3×);
* ``fake-quant eval``: forward of the calibrated fake-quant model ÷ FP forward over the evaluation
  images (target ≤ 1.25× on CPU, ≤ 1.5× on GPU); also reported after QwT (compensations included),
  against FP forwards timed next to it. ``--eval_rounds`` (3) alternating passes per repetition,
  each a sample: on a shared 2-core host the evaluation after QwT, which does strictly more work,
  had measured below the one before it with a single pass (1.18× vs 1.25×, DeiT-S);
* ``QwT stage``: ``qwt_core.compensate`` over the QwT calibration set ÷ one FP forward over that set
  (target ≤ 2.3× on CPU, ≤ 2.5× on GPU). The papers use 512 images; on 2 CPU cores the default is
  64 (``--qwt_size``); the ratio barely depends on the size (both sides scale linearly).

The machine may be shared: every repetition builds a fresh quantized copy of the model and times
the FP forward right next to the quantized step it is compared with (alternating), so that
contention hits both sides alike, and each time is summarised over ``--reps`` by its minimum
(``--stat min``, default: interference only ever slows a run down, so the best of N is the least
disturbed one) or its median (``--stat median``). Times are wall-clock seconds.

``--phases`` measures where the QwT stage's time goes instead (``benchmarks/qwt_phases.py``).

Usage: ``python -m benchmarks.speed [--threads 2] [--reps 3] [--stat min|median] [--device cpu cuda] [--modes eager fused]
[--models deit_small_patch16_224 swin_tiny_patch4_window7_224 resnet50]
[--output results/speed_<cpu|cuda>.json]``. GPU rows are measured only with ``--device cuda``
(default: also on CUDA when one is available).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections import Counter
from typing import Callable, Sequence

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

import qwt_core
import qwt_core.quantizers as qz
from benchmarks.common import cpu_name, machine_info, results_path
from qwt_core.model_io import atomic_write_json

ADAPTERS: dict[str, tuple[str, Callable]] = {
    "deit_small_patch16_224": ("RepQ-ViT", qwt_core.adapters.quantize_timm_vit),
    "swin_tiny_patch4_window7_224": ("RepQ-ViT", qwt_core.adapters.quantize_timm_swin),
    "resnet50": ("Percentile", qwt_core.adapters.quantize_resnet),
}
TARGETS = {"cpu": {"calibration": 3.0, "eval": 1.25, "qwt": 2.3},
           "cuda": {"calibration": 3.0, "eval": 1.5, "qwt": 2.5}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def _forward_all(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(b) for b in batches]


def _images(n: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g).to(device)


def calibrated_for_qwt(name: str, args: argparse.Namespace, device: torch.device):
    """``(fp, qm, qwt_batches)`` for the QwT-stage benchmark (``qwt_phases.py``): the FP model (warmed up), a RepQ-ViT/Percentile-calibrated quantized copy
    (to deep-copy per run) and the QwT images cut into batches; seeded like :func:`measure_model`."""
    _, adapter = ADAPTERS[name]
    torch.manual_seed(args.seed)
    fp = timm.create_model(name, pretrained=False).eval().to(device)
    calib = _images(args.calib_size, args.seed, device)
    batches = list(_images(args.qwt_size, args.seed + 2, device).split(args.batch_size))
    _forward_all(fp, [calib[:4]])  # warm-up (allocator, kernels)
    qm = adapter(copy.deepcopy(fp), args.w_bits, args.a_bits)
    qwt_core.calibrate(qm, calib)
    return fp, qm, batches


def _eval_rounds(fp: nn.Module, model: nn.Module, evals: list[torch.Tensor], rounds: int,
                 device: torch.device, fp_times: list[float], q_times: list[float]) -> None:
    """``rounds`` evaluation passes, FP and ``model`` batch by batch, alternating; each pass's two
    sums are appended as one sample each (the samples are summarised with the repetitions')."""
    for _ in range(rounds):
        fp_s = q_s = 0.0
        for b in evals:
            fp_s += _timed(lambda: _forward_all(fp, [b]), device)
            q_s += _timed(lambda: _forward_all(model, [b]), device)
        fp_times.append(fp_s)
        q_times.append(q_s)


def measure_model(name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """All three ratios for one architecture and fake-quant mode; ``reps`` fresh quantized copies,
    summarised by --stat. ``mode``: ``"eager"`` or ``"fused"`` (``torch.compile``-fused quantizers, compiled
    once before the timed runs; the compile time is reported, not included)."""
    method, adapter = ADAPTERS[name]
    qz.set_fused_fake_quant(mode == "fused")
    torch.manual_seed(args.seed)
    fp = timm.create_model(name, pretrained=False).eval().to(device)
    calib = _images(args.calib_size, args.seed, device)
    evals = list(_images(args.eval_size, args.seed + 1, device).split(args.batch_size))
    qwt_batches = list(_images(args.qwt_size, args.seed + 2, device).split(args.batch_size))
    _forward_all(fp, [calib[:4]])  # warm-up (allocator, kernels)
    compile_s = None
    if mode == "fused":  # compile every quantizer kernel variant on a throwaway copy
        def warm_up() -> None:
            warm = adapter(copy.deepcopy(fp), args.w_bits, args.a_bits)
            qwt_core.calibrate(warm, calib[:2])
            qwt_core.compensate(warm, [calib[:2]], progress=False)
            _forward_all(warm.model, [calib[:2]])
        compile_s = _timed(warm_up, device)

    t = {k: [] for k in ("fp_calib", "calibration", "fp_eval", "quant_eval", "fp_qwt", "qwt",
                         "fp_qwt_eval", "qwt_eval")}
    blocks = applied = 0
    solvers: dict = {}
    for _ in tqdm(range(args.reps), desc=f"{name} ({mode})", leave=False):
        model = copy.deepcopy(fp)
        qm = adapter(model, args.w_bits, args.a_bits)
        # calibration vs one FP forward of the calibration batch (FP on both sides of it)
        fp_a = _timed(lambda: _forward_all(fp, [calib]), device)
        t["calibration"].append(_timed(lambda qm=qm: qwt_core.calibrate(qm, calib), device))
        fp_b = _timed(lambda: _forward_all(fp, [calib]), device)
        t["fp_calib"].append((fp_a + fp_b) / 2)
        # evaluation: FP and fake-quant batch by batch, alternating, --eval_rounds times (one untimed
        # quantized forward first: it fills the quantized-weight caches, as any evaluation's first
        # batch does)
        _forward_all(model, [evals[0][:2]])
        _eval_rounds(fp, model, evals, args.eval_rounds, device, t["fp_eval"], t["quant_eval"])
        # QwT stage vs one FP forward over its calibration set (FP on both sides of it)
        fp_a = _timed(lambda: _forward_all(fp, qwt_batches), device)
        box: dict = {}
        t["qwt"].append(_timed(lambda qm=qm, box=box: box.setdefault(
            "report", qwt_core.compensate(qm, qwt_batches, progress=False)), device))
        fp_b = _timed(lambda: _forward_all(fp, qwt_batches), device)
        t["fp_qwt"].append((fp_a + fp_b) / 2)
        blocks = len(box["report"].blocks)
        applied = sum(b.applied for b in box["report"].blocks)
        # which least-squares factorisation solved the blocks (auto: Cholesky on CUDA)
        solvers = dict(Counter(b.solver for b in box["report"].blocks if b.solver))
        _forward_all(model, [evals[0][:2]])  # the compensations' first call
        _eval_rounds(fp, model, evals, args.eval_rounds, device, t["fp_qwt_eval"], t["qwt_eval"])
        del model, qm, box

    summarise = min if args.stat == "min" else statistics.median
    med = {k: summarise(v) for k, v in t.items()}
    targets = TARGETS[device.type]
    ratios = {"calibration": med["calibration"] / med["fp_calib"],
              "eval": med["quant_eval"] / med["fp_eval"],
              "eval_after_qwt": med["qwt_eval"] / med["fp_qwt_eval"],
              "qwt": med["qwt"] / med["fp_qwt"]}
    qz.set_fused_fake_quant(False)
    return {"model": name, "method": method, "device": device.type, "mode": mode,
            "compile_s": compile_s,
            "times_s": t, "stat": args.stat, "summary_s": med, "ratios": ratios, "targets": targets,
            "meets": {k: ratios[k] <= targets[k] for k in targets},
            "qwt_blocks_compensated": applied, "qwt_blocks": blocks, "qwt_solvers": solvers}


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"{'model':<30} {'dev':<4} {'mode':<6} {'calib/FP':>9} {'target':>7} {'eval/FP':>8} "
            f"{'target':>7} {'+QwT':>6} {'QwT/FP':>7} {'target':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ra, tg, ok = r["ratios"], r["targets"], r["meets"]

        def cell(k: str, w: int) -> str:
            return f"{ra[k]:.2f}x{'' if ok[k] else '!'}".rjust(w)

        lines.append(f"{r['model']:<30} {r['device']:<4} {r['mode']:<6} {cell('calibration', 9)} "
                     f"{'<=' + format(tg['calibration'], '.2f'):>7} {cell('eval', 8)} "
                     f"{'<=' + format(tg['eval'], '.2f'):>7} {ra['eval_after_qwt']:5.2f}x "
                     f"{cell('qwt', 7)} {'<=' + format(tg['qwt'], '.2f'):>7}")
    compiles = [f"{r['model']} {r['compile_s']:.0f}s" for r in rows if r["compile_s"] is not None]
    if compiles:
        lines.append("fused: one-time torch.compile warm-up, not in the ratios: " + ", ".join(compiles))
    lines.append(f"('!' = misses the target; calibration batch {args.calib_size}, eval "
                 f"{args.eval_size} images, QwT on {args.qwt_size} images, batch {args.batch_size}, "
                 f"W{args.w_bits}A{args.a_bits}, {args.stat} of {args.reps} repetitions (evaluation: "
                 f"{args.eval_rounds} passes each))")
    return "\n".join(lines)


def add_setup_arguments(p: argparse.ArgumentParser, reps: int) -> None:
    """Models, threads, repetitions, set sizes, bits and seed: the arguments ``speed.py`` and
    ``qwt_phases.py`` share."""
    p.add_argument("--models", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--calib_size", type=int, default=32, help="RepQ-ViT calibration batch")
    p.add_argument("--qwt_size", type=int, default=64, help="QwT calibration images (paper: 512)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--w_bits", type=int, default=4)
    p.add_argument("--a_bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """One-line exit for a count argument below 1 (the shared ones, plus ``names``)."""
    for n in ("reps", "threads", "calib_size", "qwt_size", "batch_size", *names):
        v = getattr(args, n)
        if v < 1:
            raise SystemExit(f"--{n}={v}: must be at least 1")


def start_run(args: argparse.Namespace, devices: Sequence[str], *positive: str) -> None:
    """What every benchmark does after parsing its arguments, before any model: one-line exits for
    a CUDA device that is not visible and for counts below 1 (:func:`require_positive`, plus
    ``positive``), ``--threads``, and QwT's "fewer rows than 10x the features" warning silenced (the small
    benchmark sets trigger it once per run; the time, not the fit, is measured)."""
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; drop it or run on a GPU machine")
    require_positive(args, *positive)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"QwT block .* fit rows")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--phases" in argv:
        from benchmarks import qwt_phases

        argv.remove("--phases")
        qwt_phases.main(argv)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(p, reps=3)
    p.add_argument("--device", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="devices to measure (default: cpu, plus cuda when available)")
    p.add_argument("--modes", nargs="+", default=["eager", "fused"], choices=["eager", "fused"],
                   help="fake-quant kernels: eager PyTorch ops and/or torch.compile-fused")
    p.add_argument("--stat", choices=["min", "median"], default="min",
                   help="summary of each time over the repetitions (default: min, the least disturbed)")
    p.add_argument("--eval_size", type=int, default=32)
    p.add_argument("--eval_rounds", type=int, default=3,
                   help="evaluation passes (FP and fake-quant alternating) per repetition, before and "
                        "after QwT; every pass is a sample of --stat (evaluation is the cheapest step "
                        "and its ratio the one nearest its target, so it gets the most samples)")
    p.add_argument("--phases", action="store_true",
                   help="measure where the QwT stage's time goes instead (benchmarks/qwt_phases.py)")
    p.add_argument("--output", default=None, help="default: results/speed_<devices>.json")
    args = p.parse_args(argv)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    args.output = args.output or results_path(f"speed_{'_'.join(devices)}.json")
    start_run(args, devices, "eval_size", "eval_rounds")

    t0 = time.perf_counter()
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else None
    rows: list[dict] = []
    for dev in devices:
        for name in args.models:
            for mode in args.modes:
                rows.append(measure_model(name, mode, args, torch.device(dev)))
                print(format_table(rows[-1:], args).splitlines()[2], flush=True)
                _write_json(args, rows, cpu, gpu, time.perf_counter() - t0, "")  # partial results
    table = format_table(rows, args)
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {args.threads} CPU threads ({cpu}), "
          f"GPU: {gpu or 'none measured'}; total {time.perf_counter() - t0:.0f}s")
    print(table)
    _write_json(args, rows, cpu, gpu, time.perf_counter() - t0, table)
    print(f"wrote {args.output}")


def _write_json(args: argparse.Namespace, rows: list[dict], cpu: str, gpu: str | None,
                total_s: float, table: str) -> None:
    """Atomic write of everything measured so far to ``args.output``."""
    out = {"machine": machine_info(args.threads), "torch": torch.__version__, "timm": timm.__version__,
           "threads": args.threads, "cpu": cpu, "gpu": gpu, "settings": vars(args), "total_s": total_s,
           "complete": bool(table),
           "note": f"wall-clock {args.stat} over repetitions on a possibly shared machine; FP and "
                   "quantized timings interleaved per repetition", "rows": rows, "table": table}
    atomic_write_json(args.output, out)


if __name__ == "__main__":
    main()
