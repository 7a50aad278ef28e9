"""Percentile PTQ + QwT of torchvision's ResNet-50 FPN Mask R-CNN, evaluated on COCO (bbox / segm AP).

    python -m det_torchvision.ptq --checkpoint maskrcnn_resnet50_fpn.pth --coco-root data/coco \\
        --w_bits 8 --a_bits 8 --qwt
    torchrun --nproc_per_node=8 -m det_torchvision.ptq --launcher pytorch --checkpoint ... --qwt

Stages: FP (unless --skip-fp); PTQ — the published ResNet Percentile recipe
(``qwt_core.adapters.timm_resnet``: three-candidate MSE quantizers, weights per output channel,
inputs per tensor, FrozenBatchNorm kept) on the paper's layer set (``--layer-set paper``: the
residual-block convs of layer1-4 except the last block of layer4, FPN lateral/output convs of
C3-C5) or every backbone + FPN conv (``--layer-set all``), initialised by one forward of
``--calib_batch`` real images; + QwT (``--qwt``) — the grouped-conv compensation of every quantized
residual block on ``--calib_size`` images, and of the FPN output convs with ``--qwt-fpn``. One JSON
with the AP of every stage, the configuration and the per-block QwT decisions.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qwt_core.adapters.base import QuantizedModel  # noqa: E402
from qwt_core.adapters.torchvision_rcnn import (LAYER_SETS, fpn_block_input, fpn_output_blocks,  # noqa: E402
                                                quantize_torchvision_rcnn)


def quantize_detector(model: nn.Module, w_bits: int, a_bits: int, layer_set: str = "paper",
                      act_mode: str = "true", recipe: str = "published") -> QuantizedModel:
    """Fake-quant convs in place (adapter :func:`qwt_core.adapters.torchvision_rcnn.quantize_torchvision_rcnn`)."""
    return quantize_torchvision_rcnn(model, w_bits, a_bits, layer_set=layer_set, act_mode=act_mode,
                                     recipe=recipe)


@torch.no_grad()
def calibrate_detector(qm: QuantizedModel, images: torch.Tensor) -> None:
    """Percentile calibration: every quantizer initialises in one detector forward of ``images``
    (``(B, 3, H, W)`` in [0, 1]; 32 images in the published recipe). The only call of the library's
    calibration in this package."""
    import qwt_core

    qwt_core.calibrate(qm, {"images": list(images)})


@torch.no_grad()
def compensate_detector(qm: QuantizedModel, batches: Sequence[torch.Tensor], fpn: bool = False,
                        progress: bool = True, **qwt_kwargs: Any) -> dict[str, Any]:
    """QwT on the quantized residual blocks of the trunk, then (``fpn=True``) on each quantized FPN
    output conv, level by level; the only call of the library's QwT in this package.

    Args:
        qm: from :func:`quantize_detector`, calibrated.
        batches: this rank's calibration batches, each ``(B, 3, S, S)`` in [0, 1] (one S for all).
        fpn: also compensate the FPN output convs (each block's input is the top-down sum it reads,
            from the compensated trunk).
        qwt_kwargs: :func:`qwt_core.compensate` options (``gate``, ``ridge``, ``solver``, ``start_block``).
    Returns:
        ``{"backbone": QwTReport.to_dict(), "fpn": [QwTReport.to_dict(), ...]}``.
    """
    from qwt_core import compensate

    batches = list(batches)
    out: dict[str, Any] = {"backbone": compensate(qm, batches, progress=progress, **qwt_kwargs).to_dict(),
                           "fpn": []}
    if fpn:
        fpn_kwargs = {k: v for k, v in qwt_kwargs.items() if k != "start_block"}
        for name in fpn_output_blocks(qm.model):
            level = dataclasses.replace(qm, block_names=[name], transition=None, run_block=None,
                                        first_block_input=fpn_block_input(qm.model, name))
            out["fpn"].append(compensate(level, batches, progress=progress, **fpn_kwargs).to_dict())
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from det_torchvision.cli import add_common_arguments
    from qwt_core.cli_options import add_qwt_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--w_bits", "--w_bit", "--w-bits", dest="w_bits", type=int, default=8,
                   help="weight bits of the quantized convs, 2..8 (default 8)")
    p.add_argument("--a_bits", "--a_bit", "--a-bits", dest="a_bits", type=int, default=8,
                   help="input-activation bits of the quantized convs, 2..8 (default 8)")
    p.add_argument("--qwt", action="store_true", help="also run QwT and evaluate PTQ + QwT")
    p.add_argument("--qwt-fpn", "--qwt_fpn", dest="qwt_fpn", action="store_true",
                   help="with --qwt: also compensate the quantized FPN output convs")
    p.add_argument("--skip-fp", "--skip_fp", dest="skip_fp", action="store_true",
                   help="do not evaluate the full-precision detector")
    p.add_argument("--layer-set", "--layer_set", dest="layer_set", choices=list(LAYER_SETS), default="paper",
                   help="paper: residual-block convs of layer1-4 except the last block of layer4 + FPN "
                        "C3-C5 convs (default); all: every conv of backbone + FPN")
    p.add_argument("--act-mode", "--act_mode", dest="act_mode", choices=["true", "reference8"], default="true",
                   help="true: conv inputs at --a_bits (default); reference8: at 8 bits")
    p.add_argument("--recipe", choices=["published", "folded"], default="published",
                   help="published: BatchNorm kept as an fp32 module (default); folded: folded into the conv")
    p.add_argument("--calib-source", "--calib_source", dest="calib_source", choices=["folder", "synthetic"],
                   default="folder", help="folder: real images of --calib-split; synthetic: a set made by "
                   "det_torchvision.synthesize from this checkpoint (no real image)")
    p.add_argument("--synth-dir", "--synth_dir", dest="synth_dir", default=None,
                   help="synthetic set folder (with --calib-source synthetic)")
    p.add_argument("--calib-split", "--calib_split", dest="calib_split", default="train2017",
                   help="folder of real calibration images under --coco-root (default train2017)")
    p.add_argument("--calib_size", "--calib-size", dest="calib_size", type=int, default=256,
                   help="QwT calibration images (default 256)")
    p.add_argument("--calib_batch", "--calib-batch", dest="calib_batch", type=int, default=32,
                   help="images of the one Percentile calibration forward (default 32)")
    p.add_argument("--qwt-batch", "--qwt_batch", dest="qwt_batch", type=int, default=8,
                   help="images per QwT batch (default 8)")
    p.add_argument("--calib-img-size", "--calib_img_size", dest="calib_img_size", type=int, default=None,
                   help="calibration images are resized to SxS (default: the detector's min_size)")
    p.add_argument("--start_block", "--start-block", dest="start_block", type=int, default=0,
                   help="first residual block that QwT compensates")
    add_qwt_arguments(p, default_note="the published ResNet recipe's: insample, λ = 1e-3")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the per-block backbone output error to FP before/after QwT")
    return p.parse_args(argv)


def write_plot(summary: dict[str, Any], path: str) -> str:
    """Per-block trunk output error to FP before/after QwT with R² (``summary["qwt_report"]``)."""
    from qwt_core.plotting import plot_block_errors

    ap = summary["ap"]
    box = " → ".join(f"{ap[k]['bbox']:.1f}" for k in ("ptq", "qwt") if ap.get(k, {}).get("bbox") is not None)
    title = (f"{summary['arch']} W{summary['w_bits']}A{summary['a_bits']} ({summary['layer_set']}): "
             f"per-block trunk output error to FP" + (f"\nbox AP PTQ → + QwT: {box}" if box else ""))
    return plot_block_errors(summary["qwt_report"]["blocks"], path, title)


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Checks that need no model (one line, exit 2); returns the QwT keyword arguments."""
    from det_torchvision.cli import fail
    from det_torchvision.data import check_split
    from qwt_core.cli_options import qwt_overrides
    from qwt_core.quantizers import validate_bits

    try:
        validate_bits(args.w_bits, "--w_bits")
        validate_bits(args.a_bits, "--a_bits")
    except ValueError as err:
        fail(str(err))
    for flag, v in (("--calib_size", args.calib_size), ("--calib_batch", args.calib_batch),
                    ("--qwt-batch", args.qwt_batch)):
        if v < 1:
            fail(f"{flag} {v}: use a positive number")
    if args.qwt_fpn and not args.qwt:
        fail("--qwt-fpn needs --qwt")
    if args.plot is not None and (not args.qwt or not args.plot.lower().endswith(".png")):
        fail(f"--plot {args.plot}: needs --qwt and a file name ending in .png")
    try:
        check_split(args.coco_root, args.split)
    except FileNotFoundError as err:
        fail(str(err))
    if args.calib_source == "synthetic":
        if not args.synth_dir:
            fail("--calib-source synthetic needs --synth-dir DIR (made by det_torchvision.synthesize)")
    elif args.synth_dir:
        fail("--synth-dir is only used with --calib-source synthetic")
    else:
        try:
            check_split(args.coco_root, args.calib_split, need_annotations=False)
        except FileNotFoundError as err:
            fail(f"calibration images: {err}")
    try:
        return qwt_overrides(args.qwt_gate, args.qwt_ridge, default_gate="insample", solver=args.qwt_solver)
    except ValueError as err:
        fail(str(err))


def resized(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``(N, 3, H, W)`` → N images ``(3, size, size)`` (bilinear when the size differs)."""
    import torch.nn.functional as F

    if tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return list(images)


def _shard(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from det_torchvision.cli import fail, load_model_and_data, setup, write_json
    from det_torchvision.data import calibration_batches, list_calibration_images
    from det_torchvision.evaluate import ap_percent, evaluate_coco
    from qwt_core.distributed import is_main_process

    args = parse_args(argv)
    qwt_kwargs = _check_args(args)
    device, rank, world = setup(args)
    model, info, dataset = load_model_and_data(args, device)
    size = args.calib_img_size or int(model.transform.min_size[0])
    n_calib = max(args.calib_size, args.calib_batch)
    try:
        if args.calib_source == "synthetic":
            from det_torchvision.synth import synthetic_images
            from qwt_core.synth_io import SynthSetError

            try:
                images = synthetic_images(args.synth_dir, n_calib, checkpoint=args.checkpoint)
            except SynthSetError as err:
                fail(str(err))
            if images.shape[0] < n_calib:
                fail(f"{args.synth_dir} holds {images.shape[0]} images, {n_calib} needed for calibration")
            paths = resized(images, size)
        else:
            paths = list_calibration_images(args.coco_root, args.calib_split, n_calib, args.seed)
    except ValueError as err:
        fail(str(err))
    if args.calib_size < world:
        fail(f"--calib_size {args.calib_size} is smaller than the number of processes {world}")

    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}

    def run_eval(stage: str) -> None:
        t0 = time.perf_counter()
        results[stage] = evaluate_coco(model, dataset, device, args.eval, desc=stage)
        seconds[f"eval_{stage}"] = time.perf_counter() - t0

    if not args.skip_fp:
        run_eval("fp")
    t0 = time.perf_counter()
    qm = quantize_detector(model, args.w_bits, args.a_bits, args.layer_set, args.act_mode, args.recipe)
    calib = next(calibration_batches(paths[:args.calib_batch], args.calib_batch, size)).to(device)
    calibrate_detector(qm, calib)
    del calib
    seconds["ptq_calibration"] = time.perf_counter() - t0
    run_eval("ptq")
    qwt: Optional[dict[str, Any]] = None
    if args.qwt:
        t0 = time.perf_counter()
        batches = [b.to(device) for b in calibration_batches(
            _shard(paths[:args.calib_size], rank, world), args.qwt_batch, size)]
        qwt = compensate_detector(qm, batches, fpn=args.qwt_fpn, start_block=args.start_block, **qwt_kwargs)
        del batches
        seconds["qwt"] = time.perf_counter() - t0
        run_eval("qwt")

    summary: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "arch": info["arch"], "num_classes": info["num_classes"],
        "model_kwargs": info["model_kwargs"], "coco_root": str(args.coco_root), "split": args.split,
        "images": len(dataset), "w_bits": args.w_bits, "a_bits": args.a_bits,
        "layer_set": args.layer_set, "act_mode": args.act_mode, "recipe": qm.meta["recipe"],
        "calib_source": args.calib_source, "synth_dir": args.synth_dir,
        "calib_split": args.calib_split, "calib_size": args.calib_size, "calib_batch": args.calib_batch,
        "qwt_batch": args.qwt_batch, "calib_img_size": size, "start_block": args.start_block,
        "seed": args.seed, "world_size": world, "device": str(device),
        "results": results, "ap": {k: ap_percent(v) for k, v in results.items()},
        "qwt_options": qwt_kwargs, "qwt_report": None if qwt is None else qwt["backbone"],
        "qwt_fpn_reports": None if qwt is None else qwt["fpn"], "seconds": seconds,
        "config": {k: v for k, v in vars(args).items() if k != "local_rank"},
    }
    if is_main_process():
        for stage, ap in summary["ap"].items():
            print(f"{stage:<4} box AP {ap['bbox']}  mask AP {ap['segm']}")
        if args.plot and qwt is not None:
            summary["plot"] = write_plot(summary, args.plot)
        if args.output:
            print(f"results written to {write_json(summary, args.output)}")
    return summary


if __name__ == "__main__":
    main()
