"""YOLO11n on the synthetic shapes set: FP, PTQ and PTQ + QwT at W8A8 / W6A6 / W4A8 / W4A4 (CPU).

1. writes the shapes-detection set (``benchmarks/shapes.py``: 4 classes, coloured shapes on textured
   backgrounds) in YOLO format;
2. trains a random-init yolo11n on it with Ultralytics' trainer at a small image size until mAP50 is
   clearly above chance (the *last* epoch is used: no model selection on the validation split);
3. in one run, for each bit width and for BatchNorm folded / unfolded: PTQ (RepQ-ViT-style
   percentile-MSE quantizers, 32 calibration images) and PTQ + QwT (real calibration images from the
   train split), mAP50-95 / mAP50 by Ultralytics' validator on the val split;
4. writes ``results/yolo_shapes.json`` (numbers, configs, per-layer QwT decisions, the machine) and
   ``results/yolo_shapes.png``.

    python benchmarks/yolo_shapes.py                 # trains once (cached under outputs/), then measures
    python benchmarks/yolo_shapes.py --epochs 60 --retrain
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
import types
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.shapes import write_yolo_dataset  # noqa: E402

BITS = ((8, 8), (6, 6), (4, 8), (4, 4))


def machine() -> dict[str, Any]:
    """CPU model, flags of interest, threads and library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}
    try:
        import ultralytics
        info["ultralytics"] = ultralytics.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))
                break
    except OSError:
        pass
    info["cuda"] = torch.cuda.is_available()
    return info


def train(data_yaml: str, out: str, epochs: int, imgsz: int, batch: int, seed: int) -> tuple[str, float]:
    """Train yolo11n from its yaml; returns (path of the last-epoch checkpoint, seconds)."""
    from ultralytics import YOLO
    t0 = time.perf_counter()
    model = YOLO("yolo11n.yaml")
    model.train(data=data_yaml, imgsz=imgsz, epochs=epochs, batch=batch, workers=0, device="cpu",
                plots=False, amp=False, seed=seed, deterministic=True, project=out, name="train",
                exist_ok=True, verbose=False, val=True, patience=epochs, close_mosaic=max(1, epochs // 5),
                cache=False)
    return os.path.join(out, "train", "weights", "last.pt"), time.perf_counter() - t0


def training_log(run_dir: str) -> dict[str, Any]:
    """Epochs completed, cumulative training seconds and the last epoch's validation mAPs, read from
    Ultralytics' ``results.csv``."""
    import csv
    path = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        return {}
    last = rows[-1]
    out: dict[str, Any] = {"epochs_completed": len(rows)}
    for key, name in (("time", "seconds"), ("metrics/mAP50(B)", "last_epoch_val_map50"),
                      ("metrics/mAP50-95(B)", "last_epoch_val_map50_95")):
        if key in last:
            out[name] = float(last[key])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "yolo_shapes"))
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calib", type=int, default=32, help="PTQ calibration images (one forward)")
    p.add_argument("--qwt-images", type=int, default=256, help="QwT calibration images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-images", type=int, default=64,
                   help="stage I images for the synthetic-calibration rows (0: none)")
    p.add_argument("--synth-iterations", type=int, default=200, help="stage C iterations (published 3000)")
    p.add_argument("--synth-label-iterations", type=int, default=200, help="stage B iterations (published 3000)")
    p.add_argument("--synth-label-imgsz", type=int, default=64, help="stage B size (published: imgsz / 4)")
    p.add_argument("--synth-batch", type=int, default=32)
    p.add_argument("--qat-epochs", type=int, default=10, help="zero-shot QAT epochs at W4A8 (0: none)")
    p.add_argument("--qat-batch", type=int, default=16)
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data_dir = os.path.join(args.out, "data")
    data_yaml = os.path.join(data_dir, "data.yaml")
    if not os.path.isfile(data_yaml):
        write_yolo_dataset(data_dir, n_train=args.n_train, n_val=args.n_val, size=args.imgsz, seed=args.seed)
    ckpt = os.path.join(args.out, "train", "weights", "last.pt")
    train_seconds = None
    if args.retrain or not os.path.isfile(ckpt):
        shutil.rmtree(os.path.join(args.out, "train"), ignore_errors=True)
        ckpt, train_seconds = train(data_yaml, args.out, args.epochs, args.imgsz, args.batch, args.seed)
    if args.train_only:
        print(f"trained: {ckpt} ({train_seconds} s)")
        return 0
    return measure(args, data_yaml, ckpt, train_seconds)


def synthetic_rows(args: argparse.Namespace, base, val, bn: str) -> dict[str, Any]:
    """Stage I set from the FP model alone (cached under ``--out``, resumable), then PTQ and PTQ + QwT
    calibrated on it, at every bit width with BatchNorm ``bn``."""
    from qwt_core.synth_io import load_synthetic_set
    from yolo_qwt.quant import YoloQuantConfig, calibrate_yolo, compensate_yolo, quantize_yolo
    from yolo_qwt.synth import IMAGE_STAGE, LABEL_STAGE, load_images, synthesize

    lab = LABEL_STAGE.scaled(args.synth_label_iterations, args.synth_label_imgsz, args.synth_batch)
    img = IMAGE_STAGE.scaled(args.synth_iterations, args.imgsz, args.synth_batch)
    import hashlib
    tag = hashlib.sha256(json.dumps([lab.to_dict(), img.to_dict()], sort_keys=True).encode()).hexdigest()[:8]
    out = os.path.join(args.out, f"synth_{args.synthetic_images}_{tag}")   # a new folder per setting
    ts = time.perf_counter()
    folder = synthesize(copy.deepcopy(base), out, args.synthetic_images, lab, img, seed=args.seed)
    wall = time.perf_counter() - ts
    images = load_images(folder, base)
    per_it = {}
    for name, stage, sub in (("label_stage", lab, "labels"), ("image_stage", img, "images")):
        sset = load_synthetic_set(os.path.join(out, sub), task="detection")
        secs = [sset[i]["metainfo"]["seconds"] for i in range(0, len(sset), stage.batch)]
        per_it[name] = {"config": stage.to_dict(), "batches": len(secs),
                        "seconds_per_iteration": sum(secs) / (len(secs) * stage.iterations)}
    n_boxes = [len(load_synthetic_set(folder, task="detection")[i]["target"]["labels"])
               for i in range(args.synthetic_images)]
    n_calib = min(args.calib, args.synthetic_images)
    runs = []
    for w, a in BITS:
        cfg = YoloQuantConfig(w, a, bn=bn)
        det = copy.deepcopy(base)
        qy = quantize_yolo(det, cfg)
        torch.manual_seed(args.seed)
        calibrate_yolo(qy, images[:n_calib])
        ptq = val(det)
        rep = compensate_yolo(qy, list(images.split(32)), progress=False)
        qwt = val(det)
        print(f"{cfg.label} synthetic PTQ {ptq['map50_95']:.4f}/{ptq['map50']:.4f}  "
              f"+QwT {qwt['map50_95']:.4f}/{qwt['map50']:.4f}  ({len(rep.applied())} layers)", flush=True)
        runs.append({"config": cfg.to_dict(), "ptq": ptq, "qwt": qwt, "qwt_report": rep.to_dict()})
    qat = []
    if args.qat_epochs > 0:
        from yolo_qwt.zsqat import ZsqatConfig, synthetic_training_set, train as qat_train
        for qbn in ("train", "frozen"):
            det = copy.deepcopy(base)
            teacher = copy.deepcopy(base.model).eval()
            imgs, labels = synthetic_training_set(folder, det)
            cfg = ZsqatConfig(w_bits=4, a_bits=8, epochs=args.qat_epochs, batch=args.qat_batch, lr=args.qat_lr,
                              bn=qbn, seed=args.seed)
            res = qat_train(det, teacher, imgs, labels, cfg, os.path.join(out, f"qat_W4A8_e{args.qat_epochs}_{qbn}"),
                            resume=False, progress=False)
            metrics = val(types.SimpleNamespace(for_validator=lambda: res["ema"]))
            print(f"W4A8 zero-shot QAT (BN {qbn}) {metrics['map50_95']:.4f}/{metrics['map50']:.4f}", flush=True)
            hist = res["history"]
            qat.append({"config": cfg.to_dict(), "metrics": metrics, "iterations": len(hist),
                        "seconds_per_iteration": res["seconds"] / max(1, len(hist)),
                        "loss_first": hist[0], "loss_last": hist[-1],
                        "curve": [{k: r[k] for k in ("iteration", "total", "det", "kl", "mse")} for r in hist]})
    return {"images": args.synthetic_images, "ptq_images": n_calib, "qat": qat, "qwt_images": args.synthetic_images,
            "folder": os.path.relpath(folder, ROOT), "synthesis_wall_seconds": wall,
            "labels_per_image_mean": sum(n_boxes) / len(n_boxes), **per_it, "runs": runs}


def measure(args: argparse.Namespace, data_yaml: str, ckpt: str, train_seconds: float | None) -> int:
    from yolo_qwt.evaluate import calibration_images, check_dataset, validate
    from yolo_qwt.models import load_detector
    from yolo_qwt.quant import YoloQuantConfig, calibrate_yolo, compensate_yolo, quantize_yolo

    data = check_dataset(data_yaml)
    host = machine()                   # before anything can change the thread count
    calib = calibration_images(data, max(args.calib, args.qwt_images), args.imgsz, seed=args.seed)
    base = load_detector(ckpt)
    val = lambda det: validate(det.for_validator(), data_yaml, imgsz=args.imgsz, batch=32)  # noqa: E731
    t0 = time.perf_counter()
    fp = val(copy.deepcopy(base))
    print(f"FP  mAP50-95 {fp['map50_95']:.4f}  mAP50 {fp['map50']:.4f}", flush=True)
    rows, runs = [{"setting": "FP", "method": "FP", "top1": 100 * fp["map50_95"]}], []
    for bn in ("folded", "unfolded"):
        for w, a in BITS:
            cfg = YoloQuantConfig(w, a, bn=bn)
            det = copy.deepcopy(base)
            qy = quantize_yolo(det, cfg)
            torch.manual_seed(args.seed)
            ts = time.perf_counter()
            calibrate_yolo(qy, calib[:args.calib])
            t_cal = time.perf_counter() - ts
            ptq = val(det)
            ts = time.perf_counter()
            rep = compensate_yolo(qy, list(calib[:args.qwt_images].split(32)), progress=False)
            t_qwt = time.perf_counter() - ts
            qwt = val(det)
            print(f"{cfg.label} bn={bn:<8} PTQ {ptq['map50_95']:.4f}/{ptq['map50']:.4f}  "
                  f"+QwT {qwt['map50_95']:.4f}/{qwt['map50']:.4f}  "
                  f"({len(rep.applied())} layers compensated, {t_qwt:.1f} s)", flush=True)
            runs.append({"config": cfg.to_dict(), "meta": qy.meta, "ptq": ptq, "qwt": qwt,
                         "calibration_seconds": t_cal, "qwt_seconds": t_qwt,
                         "qwt_report": rep.to_dict()})
    mean_qwt = {bn: sum(r["qwt"]["map50_95"] for r in runs if r["config"]["bn"] == bn) / len(BITS)
                for bn in ("folded", "unfolded")}
    best_bn = max(mean_qwt, key=mean_qwt.get)
    for r in runs:
        if r["config"]["bn"] == best_bn:
            rows += [{"setting": r["config"]["label"], "method": "PTQ", "top1": 100 * r["ptq"]["map50_95"]},
                     {"setting": r["config"]["label"], "method": "PTQ + QwT", "top1": 100 * r["qwt"]["map50_95"]}]
    synthetic = synthetic_rows(args, base, val, best_bn) if args.synthetic_images > 0 else None
    if synthetic is not None:
        for q in synthetic["qat"]:
            rows.append({"setting": "W4A8", "method": f"zero-shot QAT, BN {q['config']['bn']}",
                         "top1": 100 * q["metrics"]["map50_95"]})
        for r in synthetic["runs"]:
            rows += [{"setting": r["config"]["label"], "method": "PTQ, synthetic calib",
                      "top1": 100 * r["ptq"]["map50_95"]},
                     {"setting": r["config"]["label"], "method": "PTQ + QwT, synthetic calib",
                      "top1": 100 * r["qwt"]["map50_95"]}]
    os.makedirs(args.results, exist_ok=True)
    result = {
        "benchmark": "yolo_shapes", "model": "yolo11n (random init, trained on the shapes set)",
        "checkpoint": os.path.relpath(ckpt, ROOT), "imgsz": args.imgsz,
        "dataset": {"generator": "benchmarks/shapes.py write_yolo_dataset", "n_train": args.n_train,
                    "n_val": args.n_val, "classes": data["names"]},
        "training": {"epochs": args.epochs, "batch": args.batch, "imgsz": args.imgsz, "device": "cpu",
                     "trainer": "ultralytics YOLO('yolo11n.yaml').train (default hyper-parameters)",
                     **training_log(os.path.dirname(os.path.dirname(ckpt))),
                     "selection": "last epoch (no selection on the validation split)"},
        "calibration": {"ptq_images": args.calib, "qwt_images": args.qwt_images, "source": "train split",
                        "seed": args.seed},
        "metric": "Ultralytics DetectionValidator on the val split (conf 0.001, IoU 0.7)",
        "bn_mean_qwt_map50_95": mean_qwt, "bn_better": best_bn,
        "fp": fp, "runs": runs, "synthetic": synthetic, "seconds": time.perf_counter() - t0,
        "machine": {**host, "threads_at_end": torch.get_num_threads()},
    }
    path = os.path.join(args.results, "yolo_shapes.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    from qwt_core.plotting import plot_summary
    panels = {f"{r['config']['label']} (BN {r['config']['bn']}): per-layer error": [
        layer for layer in r["qwt_report"]["layers"] if layer["r2"] is not None]
        for r in runs if r["config"]["label"] in ("W4A8", "W4A4") and r["config"]["bn"] == best_bn}
    plot_summary(rows, panels, os.path.join(args.results, "yolo_shapes.png"),
                 f"yolo11n on shapes ({args.imgsz} px): PTQ vs PTQ + QwT, real calibration, BN {best_bn}",
                 accuracy_title="mAP50-95, Ultralytics validator", ylabel="mAP50-95 (%)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
