"""Seconds per iteration and peak memory of YOLO stage I (synthesis) and stage II (zero-shot QAT).

    python benchmarks/yolo_gpu.py                          # yolo11s, 640 px, batch 32 / 16, on cuda
    python benchmarks/yolo_gpu.py --device cpu --imgsz 64 --batch 2 --qat-batch 2 --iterations 2

A random-init model from its yaml (timings do not depend on the weights). Writes
``results/yolo_gpu_<device>.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="yolo11s.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=32, help="stage I batch")
    p.add_argument("--qat-batch", type=int, default=16, help="stage II batch")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations of each stage (after 2 warm-up)")
    p.add_argument("--results", default=os.path.join(ROOT, "results"))
    args = p.parse_args(argv)
    from yolo_qwt.models import load_detector
    from yolo_qwt.synth import IMAGE_STAGE, init_images, seed_labels, synthesize_batch
    from yolo_qwt.zsqat import ZsqatConfig, train

    device = torch.device(args.device)
    torch.manual_seed(0)
    det = load_detector(args.model, nc=80)
    det.model.to(device)
    out: dict = {"model": args.model, "device": str(device), "imgsz": args.imgsz, "torch": torch.__version__}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    # stage I: warm-up, then timed iterations
    n = args.iterations + 2
    stage = IMAGE_STAGE.scaled(n, args.imgsz, args.batch)
    idx = list(range(args.batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    res = synthesize_batch(det.model, seed_labels(idx, 80, 0), stage, init_images(idx, args.imgsz, 0))
    _sync(device)
    out["stage1"] = {"batch": args.batch, "iterations": n, "seconds": res.seconds,
                     "seconds_per_iteration": res.seconds / n,
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                         if device.type == "cuda" else None)}
    print("stage I:", out["stage1"], flush=True)
    # stage II: one epoch of n iterations on random images with seed labels
    imgs = torch.rand(args.qat_batch * n, 3, args.imgsz, args.imgsz)
    labels = seed_labels(range(len(imgs)), 80, 0)
    teacher = copy.deepcopy(det.model).eval()
    cfg = ZsqatConfig(w_bits=4, a_bits=8, epochs=1, batch=args.qat_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    r = train(det, teacher, imgs, labels, cfg, os.path.join(ROOT, "outputs", "yolo_gpu_qat"), progress=False)
    _sync(device)
    out["stage2"] = {"batch": args.qat_batch, "iterations": len(r["history"]), "seconds": time.perf_counter() - t0,
                     "seconds_per_iteration": r["seconds"] / max(1, len(r["history"])),
                     "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                         if device.type == "cuda" else None)}
    print("stage II:", out["stage2"], flush=True)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"yolo_gpu_{device.type}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
