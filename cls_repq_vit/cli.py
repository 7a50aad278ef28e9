"""Shared command line of the ImageNet scripts: FP → RepQ-ViT (or Percentile for ResNet) → +QwT.

``run(args)``: build the model → optional FP eval (``--eval_fp``) → quantize with the qwt_core
adapter and calibrate (RepQ-ViT on ``--repq_calib_size`` images) → eval → QwT on ``--calib_size``
images (``--start_block``) → eval → table, per-block R², timings, JSON (``--output``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

import qwt_core
from qwt_core.adapters.base import QuantizedModel
from qwt_core.cli_options import (add_qwt_arguments, add_speed_arguments, apply_speed_arguments,
                                  compiled_for_eval, qwt_overrides)
from qwt_core.cli_options import malloc_tunables
from qwt_core.distributed import is_main_process

from . import data as cls_data
from .distributed import cleanup, setup
from .evaluate import Accuracy, evaluate
from .models import MODELS, ROOT, ModelSpec, get_spec

BASELINE_NAME = {"vit": "RepQ-ViT", "swin": "RepQ-ViT", "resnet": "Percentile"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --model_kwargs expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def build_parser(choices: Optional[list[str]] = None, description: str = "") -> argparse.ArgumentParser:
    """The scripts' argparse; ``choices`` restricts ``--model`` to one family (checked in :func:`run`)."""
    names = choices if choices is not None else list(MODELS)
    p = OneLineParser(description=description or __doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="NAME", help="one of: " + ", ".join(names))
    p.add_argument("--data_dir", "--data-dir", required=True,
                   help="ImageNet-style folder with train/ (calibration) and val/ (evaluation)")
    p.add_argument("--w_bit", "--w_bits", dest="w_bit", default="4", help="weight bits, 2..8 (default 4)")
    p.add_argument("--a_bit", "--a_bits", dest="a_bit", default="4", help="activation bits, 2..8 (default 4)")
    p.add_argument("--checkpoint", default=None,
                   help="weights file (.pth/.pt/.bin/.safetensors); default pretrained_weights/ then timm hub")
    p.add_argument("--random-init", "--random_init", dest="random_init", action="store_true",
                   help="random weights (testing only)")
    p.add_argument("--model_kwargs", "--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. img_size=32 depth=2 num_classes=10")
    p.add_argument("--img_size", type=int, default=None,
                   help="input resolution (default: model_kwargs img_size, else 224)")
    p.add_argument("--calib_size", type=int, default=512, help="QwT calibration images (default 512)")
    p.add_argument("--repq_calib_size", type=int, default=32,
                   help="images of the one RepQ-ViT / Percentile calibration batch (default 32)")
    p.add_argument("--batch_size", type=int, default=64, help="eval and QwT batch size per process")
    p.add_argument("--start_block", type=int, default=0, help="first block that gets QwT compensation")
    p.add_argument("--integer_zero_point", action="store_true",
                   help="round the reparameterized zero point (exact reparameterization); "
                        "default keeps it fractional as RepQ-ViT does")
    p.add_argument("--act_mode", choices=["reference8", "true"], default=None,
                   help="ResNet only: 'reference8' feeds every conv input at 8 bits as the QwT reference "
                        "(default); 'true' quantizes conv inputs at --a_bit")
    p.add_argument("--resnet_recipe", "--resnet-recipe", dest="resnet_recipe", choices=["published", "folded"],
                   default=None,
                   help="ResNet only: 'published' keeps BatchNorm as fp32 modules after the fake-quant convs, "
                        "as the QwT reference (default); 'folded' folds BatchNorm into the convs first "
                        "(what a deployment runs). Both use the RepQ-ViT MSE quantizers")
    add_qwt_arguments(p, default_note="the model's recipe: holdout for ViT/DeiT/Swin, insample with "
                                      "λ 1e-3 for the published ResNet recipe; insample reproduces the papers")
    add_speed_arguments(p, compile_model=True)
    p.add_argument("--eval_fp", action="store_true", help="also evaluate the full-precision model")
    p.add_argument("--skip_qwt", "--skip-qwt", "--no_qwt", "--no-qwt", dest="skip_qwt", action="store_true",
                   help="stop after the baseline quantization")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset and torch")
    p.add_argument("--calib_source", "--calib-source", dest="calib_source", choices=["real", "synthetic"],
                   default="real", help="real: images of --data_dir/train; synthetic: a set made by "
                   "`python -m cls_repq_vit.synthesize` from the same weights (no real images)")
    p.add_argument("--synth_dir", "--synth-dir", dest="synth_dir", default=None,
                   help="synthetic set folder (with --calib_source synthetic)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader workers per process (default: min(8, CPU count))")
    p.add_argument("--output", default=None, help="JSON results file (default outputs/cls/...)")
    p.add_argument("--save_quantized", default=None, metavar="PATH",
                   help="save the quantized + compensated model (reloads without recalibration)")
    p.add_argument("--load_quantized", default=None, metavar="PATH",
                   help="evaluate a model saved with --save_quantized instead of calibrating")
    p.add_argument("--export_onnx", default=None, metavar="PATH",
                   help="write the quantized (+QwT) model as an ONNX QDQ graph that onnxruntime runs "
                        "with int8 kernels (after calibration/QwT, or with --load_quantized)")
    p.add_argument("--eval_onnx", action="store_true",
                   help="evaluate the --export_onnx graph with onnxruntime on val/: top-1 next to the "
                        "fake-quant top-1, identical predictions, max relative logit difference")
    p.add_argument("--onnx_compensation", choices=["fp32", "int8"], default="fp32",
                   help="QwT compensation in the ONNX graph: fp32 Linear (default) or W8A8 QDQ Linear "
                        "(calibrated on the RepQ-ViT calibration images)")
    p.add_argument("--round_zero_points", action="store_true",
                   help="--export_onnx: round fractional activation zero points (models calibrated "
                        "without --integer_zero_point) instead of refusing; --eval_onnx shows the effect")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the run as a PNG: top-1 per method and per-block output error to FP "
                        "before/after QwT with R² (same numbers as the JSON)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    return p


def _bits(value: str, flag: str) -> int:
    try:
        bits = int(value)
    except ValueError:
        raise SystemExit(f"error: {flag}={value!r} is not supported: use an integer bit width from 2 to 8") from None
    try:
        return qwt_core.quantizers.validate_bits(bits, flag)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def validate_args(args: argparse.Namespace, choices: Optional[list[str]] = None) -> ModelSpec:
    """Check the arguments; every problem is a one-line ``SystemExit``. Returns the model spec."""
    spec = get_spec(args.model, choices)
    args.w_bit = _bits(str(args.w_bit), "--w_bit")
    args.a_bit = _bits(str(args.a_bit), "--a_bit")
    if args.act_mode is not None and spec.family != "resnet":
        raise SystemExit(f"error: --act_mode is for ResNet models only, not {args.model}")
    if spec.family == "resnet" and args.act_mode is None:
        args.act_mode = "reference8"
    if getattr(args, "resnet_recipe", None) is not None and spec.family != "resnet":
        raise SystemExit(f"error: --resnet_recipe is for ResNet models only, not {args.model}")
    if spec.family == "resnet" and getattr(args, "resnet_recipe", None) is None:
        args.resnet_recipe = "published"
    # ResNet's published recipe (QuantizedModel.qwt_kwargs) gates in-sample; the token paths hold out
    default_gate = "insample" if spec.family == "resnet" else "holdout"
    try:
        args.qwt_options = qwt_overrides(getattr(args, "qwt_gate", None), getattr(args, "qwt_ridge", None),
                                         default_gate, solver=getattr(args, "qwt_solver", None))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    apply_speed_arguments(args, device)
    if args.qwt_options and (args.skip_qwt or getattr(args, "load_quantized", None)):
        raise SystemExit("error: --qwt_gate/--qwt_ridge/--qwt_solver set the QwT fit, but "
                         + ("--skip_qwt computes none" if args.skip_qwt else
                            "--load_quantized reuses the saved one") + "; drop one of them")
    for flag in ("calib_size", "repq_calib_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag} must be at least 1")
    if args.start_block < 0:
        raise SystemExit("error: --start_block must be >= 0")
    if getattr(args, "calib_source", "real") == "synthetic" and not args.synth_dir:
        raise SystemExit("error: --calib_source synthetic needs --synth_dir DIR (python -m cls_repq_vit.synthesize)")
    if getattr(args, "calib_source", "real") != "synthetic" and getattr(args, "synth_dir", None):
        raise SystemExit("error: --synth_dir is only used with --calib_source synthetic")
    if getattr(args, "export_onnx", None) is None and (
            getattr(args, "eval_onnx", False) or getattr(args, "round_zero_points", False)
            or getattr(args, "onnx_compensation", "fp32") != "fp32"):
        raise SystemExit("error: --eval_onnx, --round_zero_points and --onnx_compensation need "
                         "--export_onnx PATH")
    if getattr(args, "onnx_compensation", "fp32") == "int8" and args.skip_qwt:
        raise SystemExit("error: --onnx_compensation int8 quantizes the QwT compensation, but --skip_qwt "
                         "computes none; drop one of them")
    if getattr(args, "export_onnx", None) is not None and not args.export_onnx.endswith(".onnx"):
        raise SystemExit(f"error: --export_onnx {args.export_onnx}: the file name must end in .onnx")
    if args.checkpoint is not None and args.random_init:
        raise SystemExit("error: --checkpoint and --random-init exclude each other")
    if getattr(args, "plot", None) is not None and not args.plot.lower().endswith(".png"):
        raise SystemExit(f"error: --plot {args.plot}: the figure is a PNG, the file name must end in .png")
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: --data_dir {args.data_dir} does not exist (expected ImageNet-style "
                         f"train/ and val/ folders inside)")
    args.model_kwargs = _parse_kwargs(args.model_kwargs) if isinstance(args.model_kwargs, list) else args.model_kwargs
    if args.img_size is None:
        size = args.model_kwargs.get("img_size", spec.img_size)
        args.img_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return spec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quantize_model(model: nn.Module, spec: ModelSpec, w_bit: int, a_bit: int,
                   act_mode: Optional[str] = None, resnet_recipe: Optional[str] = None) -> QuantizedModel:
    """Fake-quantize ``model`` in place with the family's qwt_core adapter."""
    if spec.family == "vit":
        return qwt_core.adapters.quantize_timm_vit(model, w_bit, a_bit)
    if spec.family == "swin":
        return qwt_core.adapters.quantize_timm_swin(model, w_bit, a_bit)
    return qwt_core.adapters.quantize_resnet(model, w_bit, a_bit, act_mode=act_mode or "reference8",
                                    recipe=resnet_recipe or "published")


def load_saved(path: str, device: torch.device) -> tuple[QuantizedModel, dict[str, Any]]:
    """Rebuild a model written by ``--save_quantized`` (no calibration, no original weights needed)."""

    def build(meta: dict[str, Any]) -> QuantizedModel:
        spec = get_spec(meta["model"])
        model = spec.create(meta.get("model_kwargs") or {})
        # files saved before --resnet_recipe existed hold BatchNorm-folded ResNets
        recipe = meta.get("resnet_recipe", "folded") if spec.family == "resnet" else None
        return quantize_model(model, spec, meta["w_bits"], meta["a_bits"], meta.get("act_mode"), recipe)

    try:
        qm, meta = qwt_core.load_quantized(path, build)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    # Built and loaded on the CPU (the file's tensors are CPU tensors), then moved as a whole.
    qm.model.to(device)
    return qm, meta


def default_output(args: argparse.Namespace) -> str:
    suffix = f"_{args.act_mode}" if args.act_mode else ""
    if getattr(args, "resnet_recipe", None) == "folded":
        suffix += "_folded"
    return os.path.join(ROOT, "outputs", "cls", f"{args.model}_w{args.w_bit}a{args.a_bit}{suffix}.json")


def format_results(model: str, bits: str, rows: list[tuple[str, Optional[Accuracy]]]) -> str:
    """A plain-text table: method, top-1, top-5, eval images."""
    width = max([22] + [len(name) for name, _ in rows])
    lines = [f"{model}  {bits}", f"{'method':<{width}} {'top-1':>7} {'top-5':>7} {'images':>8}"]
    for name, acc in rows:
        if acc is not None:
            lines.append(f"{name:<{width}} {acc.top1:7.2f} {acc.top5:7.2f} {acc.count:8d}")
    return "\n".join(lines)


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def run(args: argparse.Namespace, choices: Optional[list[str]] = None) -> dict[str, Any]:
    """The whole flow; returns the results dict (also written to ``--output`` by rank 0)."""
    spec = validate_args(args, choices)
    t_total = time.perf_counter()
    rank, world, device = setup(args.device, args.local_rank)
    try:
        return _run(args, spec, rank, world, device, t_total)
    finally:
        cleanup()


def _run(args: argparse.Namespace, spec: ModelSpec, rank: int, world: int, device: torch.device,
         t_total: float) -> dict[str, Any]:
    seed_everything(args.seed)
    progress = not args.no_progress
    compile_eval = bool(getattr(args, "compile_model", False))
    bits = f"W{args.w_bit}A{args.a_bit}" + (f" ({args.act_mode})" if args.act_mode else "")
    timings: dict[str, float] = {}
    results: dict[str, Any] = {
        "model": args.model, "timm_model": spec.timm_name, "w_bit": args.w_bit, "a_bit": args.a_bit,
        "act_mode": args.act_mode, "img_size": args.img_size, "calib_size": args.calib_size,
        "repq_calib_size": args.repq_calib_size, "start_block": args.start_block, "seed": args.seed,
        "integer_zero_point": args.integer_zero_point, "world_size": world, "device": str(device),
        "fused_fake_quant": bool(getattr(args, "fused_fake_quant", False)),
        "compile_model": compile_eval,
        "malloc_tunables": malloc_tunables(), "torch": torch.__version__, "python": platform.python_version(),
        "accuracy": {}, "timings_s": timings}
    baseline = BASELINE_NAME[spec.family]
    rows: list[tuple[str, Optional[Accuracy]]] = []

    if args.load_quantized:
        t = time.perf_counter()
        qm, meta = load_saved(args.load_quantized, device)
        timings["load"] = time.perf_counter() - t
        if meta.get("model") != args.model:
            raise SystemExit(f"error: {args.load_quantized} holds a quantized {meta.get('model')}, "
                             f"not {args.model}; pass --model {meta.get('model')}")
        results["img_size"] = args.img_size = int(meta.get("img_size") or args.img_size)
        results.update(w_bit=meta["w_bits"], a_bit=meta["a_bits"], act_mode=meta.get("act_mode"))
        if meta.get("qwt_gate") is not None:
            results.update(qwt_gate=meta["qwt_gate"], qwt_ridge=meta.get("qwt_ridge"))
        if "recipe" in qm.meta:
            results["recipe"] = qm.meta["recipe"]
        bits = f"W{meta['w_bits']}A{meta['a_bits']}" + (f" ({meta['act_mode']})" if meta.get("act_mode") else "")
        val = cls_data.val_loader(args.data_dir, spec, args.img_size, args.batch_size, args.workers,
                                  rank, world)
        label = f"{baseline} + QwT (loaded)" if meta.get("qwt") else f"{baseline} (loaded)"
        acc = evaluate(compiled_for_eval(qm.model, compile_eval), val, device, label, progress)
        results["accuracy"]["loaded"] = acc.to_dict()
        results["loaded_meta"] = meta
        rows.append((label, acc))
        if args.export_onnx:
            calib_images = None
            if args.onnx_compensation == "int8":
                calib_images = cls_data.CalibrationSet(
                    args.data_dir, spec, args.img_size, args.repq_calib_size, args.repq_calib_size,
                    args.seed, 0, 1).repq_images(args.workers).to(device)
            export_and_eval_onnx(args, qm.model, calib_images, val, world, results, rows, timings)
        return _finish(args, results, rows, bits, timings, t_total)

    val = cls_data.val_loader(args.data_dir, spec, args.img_size, args.batch_size, args.workers, rank, world)
    t = time.perf_counter()
    model, source = spec.build(args.checkpoint, pretrained=not args.random_init,
                               model_kwargs=args.model_kwargs)
    model = model.to(device)
    timings["build"] = time.perf_counter() - t
    results["weights"] = source
    _log(f"{args.model} ({spec.timm_name}) from {source}; {bits}; {world} process(es) on {device}")
    if args.calib_source == "synthetic":
        calib = cls_data.SyntheticCalibrationSet(args.synth_dir, spec, args.model, model, args.img_size,
                                                 args.calib_size, args.repq_calib_size, rank, world)
    else:
        calib = cls_data.CalibrationSet(args.data_dir, spec, args.img_size, args.calib_size,
                                        args.repq_calib_size, args.seed, rank, world)
    results["calib_source"] = args.calib_source

    if args.eval_fp:
        acc = evaluate(compiled_for_eval(model, compile_eval), val, device, "FP32", progress)
        timings["eval_fp"] = acc.seconds
        results["accuracy"]["fp32"] = acc.to_dict()
        rows.append(("FP32", acc))

    t = time.perf_counter()
    qm = quantize_model(model, spec, args.w_bit, args.a_bit, args.act_mode, getattr(args, "resnet_recipe", None))
    if "recipe" in qm.meta:
        results["recipe"] = qm.meta["recipe"]
    try:
        qwt_core.calibrate(qm, calib.repq_images(args.workers).to(device),
                                integer_zero_point=args.integer_zero_point)
    except RuntimeError as exc:
        raise SystemExit(f"error: {baseline} calibration failed: {exc}") from None
    timings["calibrate_" + baseline.lower().replace("-", "")] = time.perf_counter() - t
    acc = evaluate(compiled_for_eval(model, compile_eval), val, device, baseline, progress)
    timings["eval_baseline"] = acc.seconds
    results["accuracy"]["baseline"] = acc.to_dict()
    results["baseline"] = baseline
    rows.append((baseline, acc))

    if not args.skip_qwt:
        if args.start_block >= len(qm.block_names):
            raise SystemExit(f"error: --start_block {args.start_block} but {args.model} has "
                             f"{len(qm.block_names)} blocks")
        t = time.perf_counter()
        batches = calib.qwt_batches(args.batch_size, args.workers)
        timings["load_calibration"] = time.perf_counter() - t
        report = qwt_core.compensate(qm, (b.to(device) for b in batches), start_block=args.start_block,
                                     progress=progress, **getattr(args, "qwt_options", {}))
        timings["qwt"] = report.seconds
        results["qwt"] = report.to_dict()
        results["qwt_gate"], results["qwt_ridge"] = report.gate, report.ridge
        _log("QwT per-block R² (compensation applied when R² > 0):\n" + report.format_table())
        acc = evaluate(compiled_for_eval(model, compile_eval), val, device, f"{baseline} + QwT", progress)
        timings["eval_qwt"] = acc.seconds
        results["accuracy"]["qwt"] = acc.to_dict()
        rows.append((f"{baseline} + QwT", acc))

    if args.save_quantized and is_main_process():
        meta = {"model": args.model, "w_bits": args.w_bit, "a_bits": args.a_bit, "act_mode": args.act_mode,
                "model_kwargs": args.model_kwargs, "img_size": args.img_size, "qwt": not args.skip_qwt,
                "integer_zero_point": args.integer_zero_point}
        if "qwt_gate" in results:
            meta.update(qwt_gate=results["qwt_gate"], qwt_ridge=results["qwt_ridge"])
        if "recipe" in qm.meta:
            meta.update(resnet_recipe=qm.meta["resnet_recipe"], recipe=qm.meta["recipe"])
        qwt_core.save_quantized(model, args.save_quantized, meta)
        results["saved_quantized"] = os.path.abspath(args.save_quantized)
        _log(f"saved quantized model to {args.save_quantized}")
    if args.export_onnx:
        calib_images = calib.repq_images(args.workers).to(device) if args.onnx_compensation == "int8" else None
        export_and_eval_onnx(args, model, calib_images, val, world, results, rows, timings)
    return _finish(args, results, rows, bits, timings, t_total)


def export_and_eval_onnx(args: argparse.Namespace, model: nn.Module, calib_images: Optional[torch.Tensor],
                         val, world: int, results: dict[str, Any], rows: list, timings: dict[str, float]) -> None:
    """``--export_onnx`` (rank 0) and ``--eval_onnx`` (single process): the ONNX QDQ graph, its
    integer-op check, and onnxruntime's top-1 next to the fake-quant top-1 (``results["onnx"]``)."""
    if not is_main_process():
        return
    from cls_repq_vit.export_onnx import evaluate_onnx
    from qwt_core import export as qx
    example = torch.zeros(1, 3, args.img_size, args.img_size)
    try:
        rep = qx.export_onnx(model, example, args.export_onnx, compensation=args.onnx_compensation,
                             calib_images=calib_images, round_zero_points=args.round_zero_points)
    except qx.ExportError as exc:
        raise SystemExit(f"error: --export_onnx: {exc}") from None
    timings["export_onnx"] = rep.seconds
    _log(rep.summary())
    results["onnx"] = rep.to_dict()
    if args.eval_onnx:
        if world > 1:
            raise SystemExit("error: --eval_onnx runs in one process; run it without torchrun")
        t = time.perf_counter()
        res = evaluate_onnx(args.export_onnx, val, reference=rep.reference, progress=not args.no_progress)
        timings["eval_onnx"] = time.perf_counter() - t
        results["onnx"]["eval"] = res
        rows.append((f"ORT int8 ({args.onnx_compensation} comp)",
                     Accuracy(res["top1_onnx"], res["top5_onnx"], res["count"], timings["eval_onnx"])))
        _log(f"onnxruntime int8: top-1 {res['top1_onnx']:.2f} vs fake-quant {res['top1_reference']:.2f}; "
             f"identical predictions {100 * res['identical']:.2f} %; max relative logit difference "
             f"{res['max_rel_logit_diff']:.4f}")


def write_plot(results: dict[str, Any], path: str, title: str) -> str:
    """Draw ``results`` (this module's JSON dict): top-1 per method and, when QwT ran, the per-block
    output error to FP before/after QwT with R² (``qwt_core.plotting``). Returns the PNG path."""
    from qwt_core.plotting import plot_accuracy, plot_summary

    base = results.get("baseline", "quantized")
    names = {"fp32": "FP32", "baseline": base, "qwt": f"{base} + QwT", "loaded": "loaded"}
    setting = f"W{results['w_bit']}A{results['a_bit']}"
    rows = [{"setting": setting, "method": names.get(k, k), "top1": acc["top1"], "std": None}
            for k, acc in results["accuracy"].items() if k in names]
    if results.get("qwt", {}).get("blocks"):
        return plot_summary(rows, {"per-block output error to FP (calibration rows)": results["qwt"]["blocks"]},
                            path, title)
    return plot_accuracy(rows, path, title)


def _finish(args: argparse.Namespace, results: dict[str, Any], rows, bits: str,
            timings: dict[str, float], t_total: float) -> dict[str, Any]:
    timings["total"] = time.perf_counter() - t_total
    if is_main_process():
        print(format_results(args.model, bits, rows), flush=True)
        print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), flush=True)
        if getattr(args, "plot", None):
            results["plot"] = write_plot(results, args.plot, f"{args.model} {bits}")
            print(f"figure written to {results['plot']}", flush=True)
        path = args.output or default_output(args)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {path}", flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None, choices: Optional[list[str]] = None,
         description: str = "") -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; ``choices`` limits ``--model``."""
    args = build_parser(choices, description).parse_args(argv)
    return run(args, choices)


if __name__ == "__main__":
    main(sys.argv[1:])
