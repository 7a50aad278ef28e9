"""Data-free calibration on the demo classifier: real vs synthetic calibration images, same sizes.

For every seed (as ``scripts/demo.py``; its data, training and caching functions are reused):

1. the demo DeiT (timm ``VisionTransformer`` on scikit-learn digits) is trained on the *real* digits
   (or reused from ``outputs/demo/models/``, shared with ``make demo``);
2. a synthetic set of ``CALIB_SIZE`` (512) images is made from the trained model alone
   (``python -m cls_repq_vit.synthesize``: cross-entropy to balanced target classes + patch-similarity
   entropy, clamped to the pixel range, image ``i`` seeded with ``seed + i``); its time is measured;
3. the classification command line runs FP → RepQ-ViT → + QwT with ``--calib_source real`` (digits
   ``train/``, subset drawn with the seed) and ``--calib_source synthetic``, both with 512 QwT images
   and a 32-image RepQ-ViT batch, for every bit setting; val top-1 is reported as mean ± std over seeds.

Usage: ``python -m benchmarks.datafree [--seeds 0 1 2] [--bits W4A4 W3A3] [--iterations 300] [--jobs 2]``.
Writes ``outputs/datafree/results.json`` (+ ``accuracy.png`` when ``qwt_core.plotting`` is available).
One thread per process with deterministic algorithms (as the demo), one seed per process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional, Sequence

from benchmarks.common import ROOT, machine_info, results_path  # noqa: F401

from qwt_core.model_io import atomic_write_json  # noqa: E402

OUT = os.path.join(ROOT, "outputs", "datafree")
SOURCES = ("real", "synthetic")


def demo_module():
    """The digits demo's data and model helpers (:mod:`cls_repq_vit.digits`)."""
    from cls_repq_vit import digits

    return digits


def run_seed(seed: int, settings: Sequence[str], iterations: int, synth_batch: int, out: str) -> dict[str, Any]:
    """One seed: model (cached or trained on real digits) → synthetic set → CLI real / synthetic."""
    demo = demo_module()
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log = os.path.join(out, "logs", f"seed{seed}.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), demo.deterministic():
        from cls_repq_vit import cli, synthesize

        res: dict[str, Any] = {"seed": seed, "log": os.path.relpath(log, out), "runs": {}}
        ckpt, res["train"] = demo.prepare_model(seed, demo.OUT, demo.TRAIN)
        model_argv = ["--model", demo.MODEL_NAME, "--checkpoint", ckpt,
                      "--model_kwargs", *[f"{k}={v}" for k, v in demo.MODEL_KWARGS.items()]]

        synth_dir = os.path.join(out, "synth", f"seed{seed}_n{demo.CALIB_SIZE}_it{iterations}_b{synth_batch}")
        argv = model_argv + ["--num-images", str(demo.CALIB_SIZE), "--out", synth_dir, "--batch-size",
                             str(synth_batch), "--iterations", str(iterations), "--seed", str(seed),
                             "--device", "cpu", "--no_progress"]
        print(f"$ python -m cls_repq_vit.synthesize {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        summary = synthesize.main(argv)
        seconds = time.perf_counter() - t0
        timing_file = os.path.join(synth_dir, "timing.json")
        if summary["batches_made"] == (demo.CALIB_SIZE + synth_batch - 1) // synth_batch:
            timing = {"seconds": seconds, "seconds_per_image": seconds / demo.CALIB_SIZE,
                      "seconds_per_iteration": summary["seconds_per_iteration"], "threads": 1}
            atomic_write_json(timing_file, timing)
        elif os.path.isfile(timing_file):  # a finished folder from an earlier run: its measured time
            with open(timing_file) as tf:
                timing = dict(json.load(tf), reused=True)
        else:
            timing = {"seconds": None, "seconds_per_image": None, "note": "resumed; partial timing"}
        res["synthesis"] = dict(timing, dir=os.path.relpath(synth_dir, out))

        for k, setting in enumerate(settings):
            w, a = demo.parse_bits(setting)
            for source in SOURCES:
                path = os.path.join(out, "runs", f"seed{seed}_{setting}_{source}.json")
                argv = model_argv + [
                    "--data_dir", demo.data_dir(demo.OUT), "--w_bit", str(w), "--a_bit", str(a),
                    "--calib_size", str(demo.CALIB_SIZE), "--repq_calib_size", str(demo.REPQ_CALIB_SIZE),
                    "--batch_size", "128", "--workers", "0", "--device", "cpu", "--seed", str(seed),
                    "--no_progress", "--output", path, "--calib_source", source]
                if source == "synthetic":
                    argv += ["--synth_dir", synth_dir]
                if k == 0 and source == "real":
                    argv.append("--eval_fp")
                print(f"\n$ python cls_repq_vit/qwt_vit_and_deit.py {' '.join(argv)}", flush=True)
                run = cli.main(argv)
                res["runs"][f"{setting}/{source}"] = {"json": os.path.relpath(path, out), "accuracy": run["accuracy"]}
        return res


def aggregate(demo, per_seed: list[dict[str, Any]], settings: Sequence[str], args, seconds: float) -> dict[str, Any]:
    """Mean ± std over seeds (``scripts/demo.py``'s ``mean_std``) of every (setting, source, method)."""
    fp = [r["runs"][f"{settings[0]}/real"]["accuracy"]["fp32"]["top1"] for r in per_seed]
    results: dict[str, Any] = {}
    for s in settings:
        results[s] = {"fp32": demo.mean_std(fp)}
        for source in SOURCES:
            base = [r["runs"][f"{s}/{source}"]["accuracy"]["baseline"]["top1"] for r in per_seed]
            qwt = [r["runs"][f"{s}/{source}"]["accuracy"]["qwt"]["top1"] for r in per_seed]
            results[s][source] = {"baseline": demo.mean_std(base), "qwt": demo.mean_std(qwt)}
        for key in ("baseline", "qwt"):
            gap = [r["runs"][f"{s}/synthetic"]["accuracy"][key]["top1"] - r["runs"][f"{s}/real"]["accuracy"][key]["top1"]
                   for r in per_seed]
            results[s][f"gap_{key}"] = demo.mean_std(gap)
    spi = [r["synthesis"]["seconds_per_image"] for r in per_seed if r["synthesis"].get("seconds_per_image")]
    spit = [r["synthesis"]["seconds_per_iteration"] for r in per_seed if r["synthesis"].get("seconds_per_iteration")]
    val = per_seed[0]["runs"][f"{settings[0]}/real"]["accuracy"]["fp32"]["count"]
    return {
        "title": "data-free calibration: demo DeiT on digits, real vs synthetic calibration images",
        "model": demo.MODEL_NAME, "model_kwargs": demo.MODEL_KWARGS, "train": demo.TRAIN,
        "calib_size": demo.CALIB_SIZE, "repq_calib_size": demo.REPQ_CALIB_SIZE, "val_images": val,
        "seeds": [r["seed"] for r in per_seed], "settings": list(settings),
        "synthesis": {"iterations": args.iterations, "batch_size": args.synth_batch, "lr": 0.2,
                      "priors": "cross-entropy + patch-similarity entropy (1.0), clamped",
                      "seconds_per_image": _mean_std4(spi) if spi else None,
                      "seconds_per_iteration": _mean_std4(spit) if spit else None,
                      "threads_per_process": 1, "note": "CPU, 2-core machine shared with other jobs"},
        "metric": "val top-1 (%), mean ± std (n − 1) over seeds",
        "results": results, "per_seed": per_seed, "seconds": round(seconds, 1),
    }


def _mean_std4(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample std (n − 1) of timings, 4 decimals."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4), "per_seed": [round(v, 4) for v in values]}


def format_table(summary: dict[str, Any]) -> str:
    def cell(d: dict[str, Any], sign: bool = False) -> str:
        return f"{d['mean']:+.2f} ± {d['std']:.2f}" if sign else f"{d['mean']:.2f} ± {d['std']:.2f}"

    lines = ["| setting | calibration | FP32 | RepQ-ViT | RepQ-ViT + QwT |", "|---|---|---:|---:|---:|"]
    for s in summary["settings"]:
        r = summary["results"][s]
        for source, label in (("real", f"real ({summary['calib_size']} digits)"),
                              ("synthetic", f"synthetic ({summary['calib_size']}, no data)")):
            lines.append(f"| {s} | {label} | {cell(r['fp32'])} | {cell(r[source]['baseline'])} | "
                         f"{cell(r[source]['qwt'])} |")
        lines.append(f"| {s} | synthetic − real | | {cell(r['gap_baseline'], True)} | {cell(r['gap_qwt'], True)} |")
    syn = summary["synthesis"]
    spi = syn["seconds_per_image"]
    lines.append("")
    lines.append(f"Val top-1 (%) on {summary['val_images']} digits, mean ± std over seeds "
                 f"{', '.join(map(str, summary['seeds']))}; RepQ-ViT batch {summary['repq_calib_size']}, QwT on "
                 f"{summary['calib_size']} images for both sources. Synthesis: {syn['iterations']} iterations, "
                 f"batch {syn['batch_size']}, " + (f"{spi['mean']:.3f} ± {spi['std']:.3f} s per image on one CPU "
                                                   f"thread (shared machine)." if spi else "time not measured."))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"], metavar="WxAy",
                   help="bit settings (default W4A4 W3A3)")
    p.add_argument("--iterations", type=int, default=300, help="synthesis iterations per batch (default 300)")
    p.add_argument("--synth_batch", type=int, default=64, help="synthesis batch size (default 64)")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes, one seed each (default 2)")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    demo = demo_module()
    settings = [b.upper() for b in args.bits]
    for b in settings:
        demo.parse_bits(b)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    counts = demo.write_digits_imagefolder(demo.data_dir(demo.OUT))
    print(f"digits: {counts['train']} train / {counts['val']} val; seeds {args.seeds}; {settings}; "
          f"logs in {os.path.join(out, 'logs')}", flush=True)
    jobs = max(1, min(args.jobs, len(args.seeds)))
    if jobs == 1:
        per_seed = [run_seed(s, settings, args.iterations, args.synth_batch, out) for s in args.seeds]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, s, settings, args.iterations, args.synth_batch, out) for s in args.seeds]
            per_seed = [f.result() for f in futures]
    for r in per_seed:
        accs = "; ".join(f"{k}: {v['accuracy']['baseline']['top1']:.2f} → {v['accuracy']['qwt']['top1']:.2f}"
                         for k, v in r["runs"].items())
        print(f"seed {r['seed']}: {accs}", flush=True)
    summary = aggregate(demo, per_seed, settings, args, time.perf_counter() - t0)
    summary["machine"] = machine_info(1)
    atomic_write_json(os.path.join(out, "results.json"), summary)
    if os.path.abspath(out) == os.path.abspath(OUT):  # the default run: the docs' table
        atomic_write_json(results_path("datafree.json"), summary)
    print("\n" + format_table(summary))
    try:
        from qwt_core.plotting import plot_accuracy
    except ImportError:
        plot_accuracy = None
    if plot_accuracy is not None:
        rows = [{"setting": f"{s} {src}", "method": label, "top1": summary["results"][s][src][key]["mean"],
                 "std": summary["results"][s][src][key]["std"]}
                for s in settings for src in SOURCES for key, label in (("baseline", "RepQ-ViT"), ("qwt", "RepQ-ViT + QwT"))]
        print("figure:", plot_accuracy(rows, os.path.join(out, "accuracy.png"),
                                       "demo DeiT on digits: real vs synthetic calibration"))
    print(f"results written to {os.path.join(out, 'results.json')} ({summary['seconds']:.0f}s)")
    return summary


if __name__ == "__main__":
    main()
