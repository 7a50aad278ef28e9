"""`make demo`: what QwT adds to RepQ-ViT, measured on data that ships with scikit-learn (no download).

1. scikit-learn's digits (1797 8×8 images, 10 classes) are upsampled to 16×16 RGB and written as an
   ImageFolder (``train/`` 70 %, ``val/`` 30 %, stratified; the split is fixed) under ``outputs/demo/``;
2. for every seed, a small timm DeiT (the real ``VisionTransformer``: 16×16 input, patch 4, dim 64,
   depth 4) is trained on the CPU (cached per seed in ``outputs/demo/models/``; for the default
   seeds and recipe the models trained by this script ship in ``scripts/demo_models/`` and are
   used instead, ``--retrain`` trains again);
3. for every seed and bit width, the classification command line (``cls_repq_vit``, the same entry
   point as for ImageNet) runs FP → RepQ-ViT → RepQ-ViT + QwT with ``--seed`` = that seed;
4. FP, RepQ-ViT and + QwT top-1 as mean ± std over the seeds go to ``outputs/demo/demo_results.json``,
   the figure ``outputs/demo/demo.png`` is drawn from that JSON, and a table is printed.
5. the first seed's model at W8A8 + QwT is exported as a real int8 ONNX QDQ graph, run by onnxruntime
   on ``val/`` next to the fake-quant model, and timed (``deploy`` in the JSON; ``--no-onnx`` skips it).

A seed fixes the training (initialisation, batch order, augmentation) and the calibration subset
(512 QwT images, of which the first 32 calibrate RepQ-ViT). Every process runs one thread with
deterministic algorithms, so the numbers do not depend on ``--jobs`` or on the machine's core count.

Usage: ``python scripts/demo.py [--seeds 0 1 2] [--bits W4A4 W3A3 W2A4 W2A3] [--epochs N] [--jobs N]``;
``python scripts/demo.py --readme-table`` prints the markdown table of the last run's JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cls_repq_vit.digits import (CALIB_SIZE, DEFAULT_BITS, DEFAULT_SEEDS, FIGURE, IMG_SIZE,  # noqa: E402,F401
                                 METHODS, MODEL_KWARGS, MODEL_NAME, OUT, REPQ_CALIB_SIZE, RESULTS_JSON,
                                 SHIPPED_MODELS, SPLIT_SEED, THREADS, TRAIN, _tensors, data_dir,
                                 deterministic, is_cached, mean_std, parse_bits, prepare_model, shipped_model,
                                 train_demo_model, write_digits_imagefolder)





# ----------------------------------------------------------------------------------------- data




# ------------------------------------------------------------------------------------- training










def run_seed(seed: int, settings: Sequence[str], retrain: bool, folder: str = OUT,
             train: Optional[dict] = None) -> dict[str, Any]:
    """One seed: train (or reuse) the model, then the classification CLI at every setting.

    Runs in a worker process; its output goes to ``folder/logs/seed{seed}.log``."""
    train = dict(train or TRAIN)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    log = os.path.join(folder, "logs", f"seed{seed}.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), deterministic():
        from cls_repq_vit import cli

        ckpt, trained = prepare_model(seed, folder, train, retrain)
        res: dict[str, Any] = {"seed": seed, "checkpoint": os.path.relpath(ckpt, folder),
                               "log": os.path.relpath(log, folder), "runs": {}, "train": trained}
        for k, setting in enumerate(settings):
            w, a = parse_bits(setting)
            path = os.path.join(folder, "runs", f"seed{seed}_{setting}.json")
            argv = ["--model", MODEL_NAME, "--data_dir", data_dir(folder), "--checkpoint", ckpt,
                    "--w_bit", str(w), "--a_bit", str(a), "--calib_size", str(CALIB_SIZE),
                    "--repq_calib_size", str(REPQ_CALIB_SIZE), "--batch_size", "128", "--workers", "0",
                    "--device", "cpu", "--seed", str(seed), "--no_progress", "--output", path,
                    "--model_kwargs", *[f"{key}={v}" for key, v in MODEL_KWARGS.items()]]
            if k == 0:
                argv.append("--eval_fp")
            print(f"\n$ python cls_repq_vit/qwt_vit_and_deit.py {' '.join(argv)}", flush=True)
            run = cli.main(argv)
            res["runs"][setting] = {"json": os.path.relpath(path, folder), "accuracy": run["accuracy"],
                                    "blocks": run["qwt"]["blocks"], "qwt_seconds": run["qwt"]["seconds"]}
        return res


# ------------------------------------------------------------------------------------- deploy
DEPLOY_SETTING = "W8A8"
DEPLOY_BATCH = 32


def deploy_demo(seed: int, folder: str = OUT, setting: str = DEPLOY_SETTING,
                batch: int = DEPLOY_BATCH) -> dict[str, Any]:
    """Real int8 inference of the seed's demo model through ONNX QDQ + onnxruntime.

    The trained model is quantized at ``setting`` (RepQ-ViT with integer zero points, so the
    export is exact), compensated by QwT, exported by :func:`qwt_core.export.export_onnx` and run
    by onnxruntime on the whole ``val/`` split next to the fake-quant model. Latencies (median
    seconds, ``batch`` images, one thread) of PyTorch FP, PyTorch fake-quant, ORT FP and ORT int8.
    Runs in a worker process like :func:`run_seed`; its output goes to ``logs/deploy.log``.
    """
    log = os.path.join(folder, "logs", "deploy.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), deterministic():
        import copy

        import torch

        import qwt_core
        from cls_repq_vit.models import get_spec
        from cls_repq_vit.export_onnx import ort_latency, torch_latency
        from qwt_core import export as qx

        w, a = parse_bits(setting)
        ckpt = os.path.join(folder, "models", f"deit_digits_seed{seed}.pth")
        fp = get_spec(MODEL_NAME).create(MODEL_KWARGS)
        fp.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
        fp.eval()
        x_train, _ = _tensors("train", folder)
        x_val, y_val = _tensors("val", folder)
        g = torch.Generator().manual_seed(seed)
        calib = x_train[torch.randperm(len(x_train), generator=g)[:CALIB_SIZE]]
        t0 = time.perf_counter()
        qm = qwt_core.adapters.quantize_timm_vit(copy.deepcopy(fp), w, a)
        qwt_core.calibrate(qm, calib[:REPQ_CALIB_SIZE], integer_zero_point=True)
        report = qwt_core.compensate(qm, list(calib.split(128)), progress=False)
        onnx_dir = os.path.join(folder, "onnx")
        int8_path = os.path.join(onnx_dir, f"deit_digits_seed{seed}_{setting.lower()}_qwt.onnx")
        fp_path = os.path.join(onnx_dir, f"deit_digits_seed{seed}_fp32.onnx")
        rep = qx.export_onnx(qm.model, x_val[:2], int8_path, threads=THREADS)
        qx.export_fp_onnx(fp, x_val[:2], fp_path)
        print(rep.summary(), flush=True)
        agree = qx.compare_onnx(int8_path, rep.reference, list(zip(x_val.split(128), y_val.split(128))),
                                threads=THREADS)
        with torch.no_grad():
            fp_top1 = (fp(x_val).argmax(-1) == y_val).float().mean().item() * 100
        xb = x_val[:batch]
        lat = {"pytorch_fp": torch_latency(fp, xb, THREADS, repeats=20)["median_s"],
               "pytorch_fake_quant": torch_latency(qm.model, xb, THREADS, repeats=20)["median_s"],
               "ort_fp": ort_latency(fp_path, xb, THREADS, repeats=20)["median_s"],
               "ort_int8": ort_latency(int8_path, xb, THREADS, repeats=20)["median_s"]}
        out = {"seed": seed, "setting": setting, "integer_zero_point": True, "compensation": "fp32",
               "qwt_blocks_compensated": sum(1 for b in report.blocks if b.applied),
               "onnx": os.path.relpath(int8_path, folder), "onnx_fp": os.path.relpath(fp_path, folder),
               "integer_layers": len(rep.integer_layers), "float_layers": len(rep.float_layers),
               "ort_integer_ops": rep.ort["integer_ops"], "ort_float_ops": rep.ort["float_ops"],
               "quantized_in_float": rep.ort["quantized_in_float"],
               "top1_fp32": round(fp_top1, 2), "top1_fake_quant": round(agree["top1_reference"], 2),
               "top1_ort_int8": round(agree["top1_onnx"], 2), "identical_predictions": agree["identical"],
               "max_rel_logit_diff": agree["max_rel_logit_diff"], "images": agree["count"],
               "latency_batch": int(len(xb)), "latency_threads": THREADS,
               "latency_ms": {k: round(v * 1e3, 3) for k, v in lat.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(out, indent=2), flush=True)
        return out


def format_deploy(d: dict[str, Any]) -> str:
    """Two lines: int8 top-1 next to fake-quant, and the latencies."""
    ms = d["latency_ms"]
    return (f"ONNX int8 ({d['setting']} + QwT, seed {d['seed']}, onnxruntime): top-1 {d['top1_ort_int8']:.2f} vs "
            f"fake-quant {d['top1_fake_quant']:.2f} (FP {d['top1_fp32']:.2f}); "
            f"{100 * d['identical_predictions']:.1f} % identical predictions, max rel. logit diff "
            f"{d['max_rel_logit_diff']:.2g}; {d['integer_layers']} integer layers, {len(d['quantized_in_float'])} "
            f"quantized layers left in float\n"
            f"latency, batch {d['latency_batch']}, {d['latency_threads']} thread (ms): PyTorch FP "
            f"{ms['pytorch_fp']:.2f}, PyTorch fake-quant {ms['pytorch_fake_quant']:.2f}, ORT FP {ms['ort_fp']:.2f}, "
            f"ORT int8 {ms['ort_int8']:.2f} (dim 64: per-op overhead, not the "
            f"matmuls, sets the time at this size; `make bench-onnx` measures DeiT-S)")


# ---------------------------------------------------------------------------------- aggregation


def aggregate(per_seed: list[dict[str, Any]], settings: Sequence[str], counts: dict[str, int],
              seconds: float, train: dict, deploy: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The demo's JSON: per setting FP / RepQ-ViT / + QwT top-1 (mean ± std over seeds) and the
    per-block QwT report of the first seed."""
    import numpy
    import timm
    import torch

    seeds = [r["seed"] for r in per_seed]
    fp = [r["runs"][settings[0]]["accuracy"]["fp32"]["top1"] for r in per_seed]
    results: dict[str, Any] = {}
    for setting in settings:
        base = [r["runs"][setting]["accuracy"]["baseline"]["top1"] for r in per_seed]
        qwt = [r["runs"][setting]["accuracy"]["qwt"]["top1"] for r in per_seed]
        results[setting] = {"fp32": mean_std(fp), "baseline": mean_std(base), "qwt": mean_std(qwt),
                            "baseline_vs_fp": mean_std([b - f for f, b in zip(fp, base)]),
                            "qwt_gain": mean_std([q - b for q, b in zip(qwt, base)])}
    return {
        "title": "QwT demo: timm DeiT on scikit-learn digits",
        "dataset": {"name": "scikit-learn digits (8x8, 10 classes), upsampled to "
                            f"{IMG_SIZE}x{IMG_SIZE} RGB", "train": counts["train"], "val": counts["val"],
                    "split_seed": SPLIT_SEED},
        "model": MODEL_NAME, "model_kwargs": MODEL_KWARGS, "train": train,
        "calib_size": CALIB_SIZE, "repq_calib_size": REPQ_CALIB_SIZE,
        "seeds": seeds,
        "seed_controls": "training (initialisation, batch order, augmentation) and the calibration subset "
                         "(--seed of the classification CLI); the train/val split is fixed",
        "std": "sample standard deviation over seeds (n - 1)",
        "metric": "val top-1 (%)",
        "settings": list(settings),
        "baseline": "RepQ-ViT",
        "results": results,
        "blocks_seed": seeds[0],
        "blocks": {s: per_seed[0]["runs"][s]["blocks"] for s in settings},
        "per_seed": per_seed,
        "deploy": deploy,
        "determinism": {"threads_per_process": THREADS, "use_deterministic_algorithms": True},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": numpy.__version__, "machine": platform.machine()},
        "seconds": round(seconds, 1),
    }


def accuracy_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``qwt_core.plotting.plot_accuracy`` rows of the demo JSON: one per (setting, method)."""
    return [{"setting": s, "method": label, "top1": summary["results"][s][key]["mean"],
             "std": summary["results"][s][key]["std"]}
            for s in summary["settings"] for key, label in METHODS]


def plot_from_json(json_path: str = RESULTS_JSON, png_path: str = FIGURE) -> str:
    """Draw the demo figure from the JSON file (so figure and JSON are the same numbers)."""
    from qwt_core.plotting import plot_summary

    summary = load_results(json_path)
    n = len(summary["seeds"])
    block_sets = {f"{s}: per-block error (seed {summary['blocks_seed']})": summary["blocks"][s]
                  for s in summary["settings"]}
    return plot_summary(accuracy_rows(summary), block_sets, png_path,
                        f"{summary['title']} — val top-1, mean ± std over {n} seeds",
                        accuracy_title=f"top-1 (%) by bit width, {n} seeds", ylabel="val top-1 accuracy (%)")


def load_results(json_path: str = RESULTS_JSON) -> dict[str, Any]:
    if not os.path.isfile(json_path):
        raise SystemExit(f"error: {json_path} does not exist: run `make demo` (or python scripts/demo.py) first")
    with open(json_path) as f:
        return json.load(f)


def readme_table(summary: dict[str, Any]) -> str:
    """Markdown table of the demo JSON (what the README's demo section shows)."""
    n = len(summary["seeds"])

    def cell(d: dict[str, Any], sign: bool = False) -> str:
        return f"{d['mean']:+.2f} ± {d['std']:.2f}" if sign else f"{d['mean']:.2f} ± {d['std']:.2f}"

    lines = ["| setting | FP32 | RepQ-ViT | RepQ-ViT + QwT | RepQ-ViT − FP | QwT gain |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summary["settings"]:
        r = summary["results"][s]
        lines.append(f"| {s} | {cell(r['fp32'])} | {cell(r['baseline'])} | {cell(r['qwt'])} | "
                     f"{cell(r['baseline_vs_fp'], True)} | {cell(r['qwt_gain'], True)} |")
    mk = summary["model_kwargs"]
    lines.append("")
    lines.append(f"timm DeiT ({mk['img_size']}×{mk['img_size']} input, patch {mk['patch_size']}, dim "
                 f"{mk['embed_dim']}, depth {mk['depth']}) trained {summary['train']['epochs']} epochs on "
                 f"scikit-learn digits; {summary['metric']} on {summary['dataset']['val']} images, mean ± std "
                 f"(n − 1) over seeds {', '.join(map(str, summary['seeds']))} ({n} seeds; a seed fixes the "
                 f"training and the calibration subset). Generated by `python scripts/demo.py --readme-table` "
                 f"from `outputs/demo/demo_results.json` (torch {summary['versions']['torch']}).")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    lines = [f"=== demo summary: {summary['title']} ({summary['metric']}, {summary['dataset']['val']} images, "
             f"mean ± std over {n} seeds) ===",
             f"{'setting':<8} {'FP32':>13} {'RepQ-ViT':>13} {'+ QwT':>13} {'QwT gain':>13}"]
    for s in summary["settings"]:
        r = summary["results"][s]
        cells = [f"{r[k]['mean']:6.2f} ± {r[k]['std']:4.2f}" for k in ("fp32", "baseline", "qwt")]
        gain = r["qwt_gain"]
        lines.append(f"{s:<8} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {gain['mean']:+6.2f} ± {gain['std']:4.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds (training + calibration subset), default 0 1 2")
    parser.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), metavar="WxAy",
                        help="bit settings, default W4A4 W3A3 W2A4 W2A3")
    parser.add_argument("--epochs", type=int, default=TRAIN["epochs"], help="training epochs of the demo DeiT")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel processes, one seed each, one thread each (default: number of seeds)")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached demo models")
    parser.add_argument("--no-onnx", action="store_true",
                        help=f"skip the ONNX int8 export of the first seed's model ({DEPLOY_SETTING} + QwT)")
    parser.add_argument("--out", default=OUT, help="output folder (default outputs/demo)")
    parser.add_argument("--readme-table", action="store_true",
                        help="print the markdown table of outputs/demo/demo_results.json and exit")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw outputs/demo/demo.png from outputs/demo/demo_results.json and exit")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    results_json, figure = os.path.join(out, "demo_results.json"), os.path.join(out, "demo.png")
    if args.readme_table:
        print(readme_table(load_results(results_json)))
        return {}
    if args.plot_only:
        print(f"figure written to {plot_from_json(results_json, figure)}")
        return {}
    for b in args.bits:
        try:
            w, a = parse_bits(b)
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"error: {exc}") from None
        if not (2 <= w <= 8 and 2 <= a <= 8):
            raise SystemExit(f"error: {b}: bit widths must be 2..8")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("error: --seeds repeats a seed")
    if args.epochs < 1:
        raise SystemExit("error: --epochs must be at least 1")
    train = dict(TRAIN, epochs=args.epochs)
    settings = [b.upper() for b in args.bits]
    jobs = max(1, args.jobs or len(args.seeds))

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    counts = write_digits_imagefolder(data_dir(out))
    print(f"digits ImageFolder at {data_dir(out)}: {counts['train']} train / {counts['val']} val images, 10 classes")
    print(f"{len(args.seeds)} seeds × {', '.join(settings)}: train a timm DeiT {MODEL_KWARGS} for "
          f"{args.epochs} epochs per seed (cached), then FP → RepQ-ViT → + QwT through the classification CLI; "
          f"{jobs} process(es) × {THREADS} thread; logs in {os.path.join(out, 'logs')}", flush=True)
    per_seed: list[dict[str, Any]] = []
    if jobs == 1:
        for seed in args.seeds:
            per_seed.append(_report(run_seed(seed, settings, args.retrain, out, train), t0))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, seed, settings, args.retrain, out, train) for seed in args.seeds]
            per_seed = [_report(f.result(), t0) for f in futures]
    deploy = None
    if not args.no_onnx:
        print(f"ONNX: {DEPLOY_SETTING} + QwT of seed {args.seeds[0]}'s model, exported as an int8 QDQ graph and "
              f"run by onnxruntime (log {os.path.join(out, 'logs', 'deploy.log')})", flush=True)
        deploy = deploy_demo(args.seeds[0], out)
    summary = aggregate(per_seed, settings, counts, time.perf_counter() - t0, train, deploy)
    from benchmarks.common import machine_info, results_path
    from qwt_core.model_io import atomic_write_json

    summary["machine"] = machine_info(THREADS)
    atomic_write_json(results_json, summary)
    png = plot_from_json(results_json, figure)
    if (tuple(args.seeds), tuple(settings), args.retrain, out, train) == (DEFAULT_SEEDS, DEFAULT_BITS, False, OUT, TRAIN):
        # the README's table and figure: the default run with the shipped models
        atomic_write_json(results_path("demo.json"), summary)
        shutil.copyfile(png, results_path("demo.png"))
    print("\n" + format_summary(summary))
    if deploy is not None:
        print(format_deploy(deploy))
    print(f"(demo took {time.perf_counter() - t0:.0f}s; results {results_json}; figure {png}; "
          f"per-run JSON in {os.path.join(out, 'runs')})")
    return summary


def _report(res: dict[str, Any], t0: float) -> dict[str, Any]:
    tr = res["train"]
    trained = ("shipped model" if tr.get("shipped") else "cached model") if tr.get("cached") else f"trained in {tr['seconds']:.0f}s (val {tr['val_top1']:.2f})"
    accs = "; ".join(f"{s} {r['accuracy']['baseline']['top1']:.2f} → {r['accuracy']['qwt']['top1']:.2f}"
                     for s, r in res["runs"].items())
    print(f"[{time.perf_counter() - t0:5.0f}s] seed {res['seed']}: {trained}; RepQ-ViT → + QwT: {accs}", flush=True)
    return res


if __name__ == "__main__":
    main()
