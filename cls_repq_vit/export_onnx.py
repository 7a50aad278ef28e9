"""``python -m cls_repq_vit.export_onnx SAVED.pt OUT.onnx``: export a saved quantized model to ONNX QDQ.

The model file is one written by ``qwt_core.save_quantized`` (the classification scripts'
``--save_quantized``). It is rebuilt by ``--builder MODULE:FUNCTION`` (default
``cls_repq_vit.cli:load_saved``, a function ``(path, device) -> (QuantizedModel, meta)``), exported
by :func:`qwt_core.export.export_onnx`, checked in onnxruntime (integer / float op counts) and,
with ``--data_dir``, evaluated on ``val/`` next to the fake-quant model.

Examples::

    python -m cls_repq_vit.export_onnx outputs/deit_s_w8a8.pt outputs/deit_s_w8a8.onnx
    python -m cls_repq_vit.export_onnx q.pt q.onnx --compensation int8 --data_dir /data/imagenet --eval --latency
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from qwt_core.onnx_check import compare_onnx, iter_batches, ort_run, ort_session


# ------------------------------------------------------------- evaluation and latency (task level)
def evaluate_onnx(path: str, loader, reference: Optional[nn.Module] = None, threads: int = 2,
                  progress: bool = True) -> dict[str, Any]:
    """Top-1 / top-5 of the ONNX model on ``loader`` (``(images, labels)`` batches); with
    ``reference`` also the fake-quant accuracy and the agreement of :func:`compare_onnx`."""
    from tqdm.auto import tqdm
    if reference is not None:
        return compare_onnx(path, reference, loader, threads, progress, desc="eval ORT + fake-quant")
    sess = ort_session(path, threads)
    c1 = c5 = n = 0
    for images, labels in tqdm(iter_batches(loader), desc="eval ORT", disable=not progress, leave=False):
        logits = torch.from_numpy(ort_run(sess, images))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.cpu()[:, None]
        c1 += int(top[:, 0].sum())
        c5 += int(top.any(1).sum())
        n += len(labels)
    return {"count": n, "top1_onnx": 100.0 * c1 / max(n, 1), "top5_onnx": 100.0 * c5 / max(n, 1)}


def ort_latency(path: str, example_input: torch.Tensor, threads: int = 2, warmup: int = 2,
                repeats: int = 10) -> dict[str, float]:
    """Wall-clock latency of one onnxruntime run on ``example_input`` (seconds: median, min, mean)."""
    sess = ort_session(path, threads)
    x = {sess.get_inputs()[0].name: example_input.detach().cpu().float().numpy()}
    return _time(lambda: sess.run(None, x), warmup, repeats)


@torch.no_grad()
def torch_latency(model: nn.Module, example_input: torch.Tensor, threads: int = 2, warmup: int = 2,
                  repeats: int = 10) -> dict[str, float]:
    """Wall-clock latency of ``model(example_input)`` in PyTorch with ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time(lambda: model(example_input), warmup, repeats)
    finally:
        torch.set_num_threads(old)


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
            "mean_s": float(np.mean(times)), "repeats": repeats}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cls_repq_vit.export_onnx", description=__doc__.splitlines()[0])
    p.add_argument("saved", help="quantized model file written by save_quantized / --save_quantized")
    p.add_argument("output", help="ONNX file to write (.onnx)")
    p.add_argument("--builder", default="cls_repq_vit.cli:load_saved",
                   help="MODULE:FUNCTION rebuilding the model: (path, device) -> (QuantizedModel, meta)")
    p.add_argument("--img_size", type=int, default=None, help="input size (default: the saved meta's)")
    p.add_argument("--compensation", choices=["fp32", "int8"], default="fp32",
                   help="QwT compensation as fp32 Linear (default) or W8A8 QDQ Linear (needs --data_dir)")
    p.add_argument("--round_zero_points", action="store_true",
                   help="round fractional activation zero points instead of refusing")
    p.add_argument("--weight_dtype", choices=["auto", "int8"], default="auto",
                   help="auto: exact on every x86 CPU (int8 within ±64, else uint8); int8: int8 only")
    p.add_argument("--data_dir", default=None,
                   help="ImageNet-style folder: train/ for --compensation int8 calibration, val/ for --eval")
    p.add_argument("--calib_size", type=int, default=32, help="images calibrating an int8 compensation")
    p.add_argument("--eval", action="store_true", help="top-1 of onnxruntime vs the fake-quant model on val/")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--latency", action="store_true", help="also time onnxruntime at batch 1 and --batch_size")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    p.add_argument("--report", default=None, help="JSON report file (default: OUTPUT with .json)")
    return p


def _builder(spec: str) -> Callable[[str, torch.device], tuple[Any, dict[str, Any]]]:
    if ":" not in spec:
        raise SystemExit(f"error: --builder {spec!r}: expected MODULE:FUNCTION")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"error: --builder {spec!r} cannot be imported ({exc})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from qwt_core import export as qx

    if not args.output.endswith(".onnx"):
        raise SystemExit(f"error: output {args.output}: the file name must end in .onnx")
    if not os.path.isfile(args.saved):
        raise SystemExit(f"error: quantized model file not found: {args.saved}")
    if (args.eval or args.compensation == "int8") and not args.data_dir:
        raise SystemExit("error: --eval and --compensation int8 need --data_dir (train/ and val/ folders)")
    torch.manual_seed(0)
    qm, meta = _builder(args.builder)(args.saved, torch.device("cpu"))
    model = qm.model if hasattr(qm, "model") else qm
    img = args.img_size or int(meta.get("img_size") or 224)
    spec = None
    if args.data_dir:
        from cls_repq_vit.models import get_spec
        spec = get_spec(meta["model"])
    calib = None
    if args.compensation == "int8":
        from cls_repq_vit import data as cls_data
        calib = cls_data.CalibrationSet(args.data_dir, spec, img, args.calib_size, args.calib_size, 0
                                        ).repq_images(args.workers)
    try:
        rep = qx.export_onnx(model, torch.zeros(1, 3, img, img), args.output, compensation=args.compensation,
                             calib_images=calib, round_zero_points=args.round_zero_points,
                             weight_dtype=args.weight_dtype,
                             threads=args.threads)
    except qx.ExportError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(rep.summary(), flush=True)
    out: dict[str, Any] = {"saved": os.path.abspath(args.saved), "meta": meta, "export": rep.to_dict()}
    if args.eval:
        from cls_repq_vit import data as cls_data
        val = cls_data.val_loader(args.data_dir, spec, img, args.batch_size, args.workers)
        res = evaluate_onnx(args.output, val, reference=rep.reference, threads=args.threads)
        out["eval"] = res
        print(f"onnxruntime int8 top-1 {res['top1_onnx']:.2f} vs fake-quant {res['top1_reference']:.2f} "
              f"({res['count']} images); identical predictions {100 * res['identical']:.2f} %; "
              f"max relative logit difference {res['max_rel_logit_diff']:.4f}", flush=True)
    if args.latency:
        out["latency"] = {}
        for b in sorted({1, args.batch_size}):
            lat = ort_latency(args.output, torch.randn(b, 3, img, img), threads=args.threads)
            out["latency"][str(b)] = lat
            print(f"onnxruntime latency batch {b}: {1e3 * lat['median_s']:.1f} ms (median of "
                  f"{lat['repeats']}, {args.threads} threads)", flush=True)
    report = args.report or os.path.splitext(args.output)[0] + ".json"
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2, default=str)
    os.replace(tmp, report)
    print(f"report written to {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
