"""PTQ and PTQ + QwT of a YOLO detector, evaluated with Ultralytics' validator.

    python -m yolo_qwt.ptq --model yolo11s.pt --data coco.yaml --w-bits 8 --a-bits 8 --qwt
    python -m yolo_qwt.ptq --model yolov5n.yaml --data shapes/data.yaml --w-bits 4 --a-bits 8 --qwt

Writes one JSON into ``--out`` (FP / PTQ / + QwT metrics, the configuration, per-layer QwT
decisions). Bad input (a missing or wrong model file, a dataset yaml that does not exist, bits out
of range) gives one ``error:`` line on stderr, exit status 2, and writes nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any, NoReturn, Optional, Sequence

import torch

from qwt_core.cli_options import parse_ridge

from .evaluate import DatasetError, calibration_images, check_dataset, validate
from .models import FAMILIES, ModelSpecError, load_detector
from .quant import BN_MODES, YoloQuantConfig, calibrate_yolo, compensate_yolo, quantize_yolo
from .synth import SynthSetError, load_images as load_synthetic


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m yolo_qwt.ptq", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local .pt checkpoint, or a model .yaml (random init)")
    p.add_argument("--data", required=True, help="dataset yaml (Ultralytics format)")
    p.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8")
    p.add_argument("--qwt", action="store_true", help="add QwT compensation after PTQ")
    p.add_argument("--bn", choices=BN_MODES, default="folded",
                   help="BatchNorm folded into the convs before quantization (default) or kept")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize the Detect head too (default: stem and head full precision)")
    p.add_argument("--family", choices=FAMILIES, default="auto",
                   help="ultralytics, or the original anchor-based yolov5 (auto: from the model)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16, help="validation and QwT batch size")
    p.add_argument("--calib-images", type=int, default=32, help="PTQ calibration images (one forward)")
    p.add_argument("--qwt-images", type=int, default=512, help="QwT calibration images")
    p.add_argument("--calib-split", default="train", help="dataset split the calibration images come from")
    p.add_argument("--synthetic", default=None, metavar="DIR",
                   help="calibrate on a synthetic set (python -m yolo_qwt.synth) instead of real images")
    p.add_argument("--split", default="val", help="dataset split to evaluate")
    p.add_argument("--qwt-gate", choices=("holdout", "insample"), default=None,
                   help="QwT gate (default holdout: compensate iff held-out R² > 0)")
    p.add_argument("--qwt-ridge", type=parse_ridge, default=None, help="'auto' or a float λ")
    p.add_argument("--no-fp", action="store_true", help="skip the FP evaluation")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "yolo_qwt"), help="output folder")
    return p


def synthetic_images(folder: str, det, n: int) -> torch.Tensor:
    """The first ``n`` images of the synthetic set in ``folder`` (made from this detector)."""
    images = load_synthetic(folder, det)
    if images.shape[0] < n:
        raise SynthSetError(f"--synthetic {folder!r} holds {images.shape[0]} images, {n} needed")
    return images[:n]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # ---- every check before any work or any file -----------------------------------------------
    try:
        config = YoloQuantConfig(args.w_bits, args.a_bits, quantize_head=args.quantize_head, bn=args.bn)
    except ValueError as e:
        return _fail(str(e).splitlines()[0])
    for name in ("imgsz", "batch", "calib_images", "qwt_images"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    try:
        data = check_dataset(args.data)
        det = load_detector(args.model, nc=int(data["nc"]), names=data["names"], family=args.family)
        n_img = max(args.calib_images, args.qwt_images if args.qwt else 0)
        if args.synthetic:
            images = synthetic_images(args.synthetic, det, n_img)
        else:
            images = calibration_images(data, n_img, args.imgsz, seed=args.seed, split=args.calib_split)
    except (ModelSpecError, DatasetError, SynthSetError) as e:
        return _fail(str(e))
    if set(det.names) != set(range(int(data["nc"]))):
        return _fail(f"--model has {len(det.names)} classes, --data {args.data!r} has {data['nc']}")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    det.model.to(device)
    images = images.to(device)
    ul_device = "cpu" if device.type == "cpu" else str(device.index or 0)
    val = lambda d: validate(d.for_validator(), args.data, imgsz=args.imgsz, batch=args.batch,  # noqa: E731
                             device=ul_device, split=args.split, progress=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"model": det.describe(), "data": os.path.abspath(args.data),
                              "config": config.to_dict(), "imgsz": args.imgsz, "split": args.split,
                              "calibration": {"ptq_images": args.calib_images, "split": args.calib_split,
                                              "seed": args.seed,
                                              "source": f"synthetic: {args.synthetic}" if args.synthetic else "real"}}
    if not args.no_fp:
        result["fp"] = val(copy.deepcopy(det))
        print(f"FP      mAP50-95 {result['fp']['map50_95']:.4f}  mAP50 {result['fp']['map50']:.4f}")
    qy = quantize_yolo(det, config)
    result["quantization"] = {**qy.meta, "layers": qy.quantized}
    result["calibration"]["report"] = calibrate_yolo(qy, images[:args.calib_images])
    result["ptq"] = val(det)
    print(f"PTQ     {config.label} mAP50-95 {result['ptq']['map50_95']:.4f}  mAP50 {result['ptq']['map50']:.4f}")
    if args.qwt:
        rep = compensate_yolo(qy, list(images[:args.qwt_images].split(args.batch)),
                              gate=args.qwt_gate, ridge=args.qwt_ridge)
        result["qwt_report"] = rep.to_dict()
        result["calibration"]["qwt_images"] = args.qwt_images
        result["qwt"] = val(det)
        print(f"+QwT    {config.label} mAP50-95 {result['qwt']['map50_95']:.4f}  "
              f"mAP50 {result['qwt']['map50']:.4f}  ({len(rep.applied())} layers compensated)")
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.model))[0]
    path = os.path.join(args.out, f"{stem}_{config.label}{'_qwt' if args.qwt else ''}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
