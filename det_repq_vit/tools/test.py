"""RepQ-ViT and QwT post-training quantization of Swin Mask / Cascade Mask R-CNN, evaluated on COCO.

    python tools/test.py CONFIG CHECKPOINT --eval bbox segm --w_bits 4 --a_bits 4 [--fp]
    bash tools/dist_test.sh CONFIG CHECKPOINT NGPUS --eval bbox segm --w_bits 4 --a_bits 4

Stages: FP (with --fp), RepQ-ViT (every Conv2d/Linear quantized, attention matmuls of the backbone,
LayerNorm reparameterization, one seeded calibration batch), RepQ-ViT + QwT (closed-form compensation
of every Swin backbone block on the calibration images). Prints a table of COCO bbox/segm AP and
writes it to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


DETECTION_SETUP = "make det"


def require_detection_stack() -> None:
    """One-line ``SystemExit`` naming the command to run when mmengine / mmcv (with its compiled ops) /
    mmdet are missing: they are the optional detection layer, not part of the core install."""
    try:
        import mmengine  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
        import mmdet  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or mmcv without its compiled ops
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SystemExit(f"error: detection needs mmengine, mmcv 2.1.0 with its compiled ops and mmdet 3.3.0, "
                         f"which are not installed here ({reason}): run `{DETECTION_SETUP}` in the repository "
                         f"root once (compiles mmcv, 10-50 minutes on 2 cores; cached afterwards)") from None


def write_plot(summary: dict[str, Any], path: str) -> str:
    """Per-block backbone output error to FP before/after QwT, with R², from the summary written as
    JSON (``summary["qwt_report"]["blocks"]``); returns the PNG path."""
    from qwt_core.plotting import plot_block_errors

    ap = summary.get("ap", {})
    box = " → ".join(f"{ap[k]['bbox']:.1f}" for k in ("repq", "qwt") if ap.get(k, {}).get("bbox") is not None)
    title = (f"{Path(str(summary['config'])).stem}\nW{summary['w_bits']}A{summary['a_bits']}: per-block backbone "
             f"output error to FP" + (f" (box AP RepQ-ViT → + QwT: {box})" if box else ""))
    return plot_block_errors(summary["qwt_report"]["blocks"], path, title)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    require_detection_stack()
    from mmengine.config import DictAction

    from qwt_core.cli_options import add_qwt_arguments, add_speed_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="detector config (configs/swin/*.py)")
    p.add_argument("checkpoint", help="detector checkpoint (original Swin detection or mmdet 3.x layout)")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"],
                   help="COCO metrics to compute")
    p.add_argument("--w_bits", "--w_bit", "--w-bits", dest="w_bits", type=int, default=4,
                   help="weight bits (default 4)")
    p.add_argument("--a_bits", "--a_bit", "--a-bits", dest="a_bits", type=int, default=4,
                   help="activation bits (default 4)")
    p.add_argument("--fp", action="store_true", help="also evaluate the full-precision detector")
    p.add_argument("--calib_size", "--calib-size", dest="calib_size", type=int, default=None,
                   help="QwT calibration images (default qwt_calib.num_images of the config, 512)")
    p.add_argument("--calib_batch", "--calib-batch", dest="calib_batch", type=int, default=None,
                   help="RepQ-ViT calibration batch (default qwt_calib.repq_batch, 32)")
    p.add_argument("--start_block", "--start-block", dest="start_block", type=int, default=0,
                   help="first backbone block that QwT compensates")
    add_qwt_arguments(p, default_note="holdout; insample reproduces the papers' rule")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration image shuffle")
    p.add_argument("--calib-source", "--calib_source", dest="calib_source", choices=["folder", "synthetic"],
                   default="folder", help="folder: qwt_calib.img_dir images (train2017); synthetic: a set "
                   "made by tools/synthesize.py from this checkpoint (no real images)")
    p.add_argument("--synth-dir", "--synth_dir", dest="synth_dir", default=None,
                   help="synthetic set folder (with --calib-source synthetic)")
    p.add_argument("--synth-size", "--synth_size", dest="synth_size", type=int, default=None,
                   help="resize synthetic images to this square size for calibration (default: the "
                   "qwt_calib pipeline's Resize scale, 224; 0 keeps the synthesis size)")
    p.add_argument("--integer-zero-point", action="store_true",
                   help="round the reparameterized zero point (exact; the reference keeps it fractional)")
    p.add_argument("--output", default=None, help="JSON file for the results (default WORK_DIR/results.json)")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the per-block backbone output error to FP before/after QwT (with R²) "
                        "from the same run as the JSON")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                   help="folder for logs and results (default work_dirs/<config name>)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add_speed_arguments(p)
    p.add_argument("--cfg-options", "--cfg_options", dest="cfg_options", nargs="+", action=DictAction,
                   help="override config entries, key=value")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="pytorch: launched by torchrun / torch.distributed.launch (tools/dist_test.sh)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def resolve_path(path: str, *fallback_dirs: Path) -> Path:
    """``path`` as given if it exists, else the first ``fallback_dir / path`` that exists (so the seed
    commands work from det_repq_vit/ or the repository root), else ``path`` unchanged."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for d in fallback_dirs:
        if (d / p).exists():
            return d / p
    return p


def load_config(args: argparse.Namespace):
    """Read the config, apply --cfg-options / --work-dir; SystemExit if the path is wrong."""
    from mmengine.config import Config

    path = resolve_path(args.config, ROOT / "det_repq_vit", ROOT)
    if not path.is_file():
        raise SystemExit(f"config not found: {path}. Pass a file from det_repq_vit/configs/swin/ "
                         "(run from det_repq_vit/ or give the full path).")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:  # noqa: BLE001 - broken config: one line naming it
        raise SystemExit(f"cannot read config {path}: {type(err).__name__}: {err}") from err
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / path.stem)
    if "qwt_calib" not in cfg:
        raise SystemExit(f"config {path} has no qwt_calib entry (calibration images); inherit "
                         "configs/_base_/datasets/coco_instance.py")
    return cfg


def _synth_size(pipeline: Sequence[dict]) -> Optional[int]:
    """Square size of the first fixed ``Resize`` of the QwT calibration pipeline (224), else None."""
    for step in pipeline:
        scale = step.get("scale") if step.get("type") == "Resize" else None
        if scale is not None and not step.get("keep_ratio", False):
            s = scale if isinstance(scale, int) else scale[0]
            if isinstance(scale, int) or scale[0] == scale[1]:
                return int(s)
    return None


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ap(metrics: dict[str, float], kind: str) -> Optional[float]:
    v = metrics.get(f"coco/{kind}_mAP")
    return None if v is None else round(100.0 * v, 2)


def format_table(results: dict[str, dict[str, float]], w_bits: int, a_bits: int) -> str:
    """Rows: stage, precision, box AP, mask AP (percent)."""
    names = {"fp": ("Full precision", "FP32"), "repq": ("RepQ-ViT", f"W{w_bits}/A{a_bits}"),
             "qwt": ("RepQ-ViT + QwT", f"W{w_bits}/A{a_bits}")}
    lines = [f"{'method':<16} {'prec.':<7} {'AP box':>7} {'AP mask':>8}", "-" * 41]
    for key, metrics in results.items():
        label, prec = names[key]
        cells = [_ap(metrics, "bbox"), _ap(metrics, "segm")]
        box, mask = ("-" if c is None else f"{c:.1f}" for c in cells)
        lines.append(f"{label:<16} {prec:<7} {box:>7} {mask:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from qwt_core.quantizers import validate_bits

    try:
        validate_bits(args.w_bits, "--w_bits")
        validate_bits(args.a_bits, "--a_bits")
    except ValueError as err:
        raise SystemExit(str(err)) from err
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise SystemExit(f"--plot {args.plot}: the figure is a PNG, the file name must end in .png")
    from qwt_core.cli_options import apply_speed_arguments, qwt_overrides
    from qwt_core.cli_options import malloc_tunables

    try:
        qwt_kwargs = qwt_overrides(args.qwt_gate, args.qwt_ridge, solver=args.qwt_solver)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    cfg = load_config(args)
    args.checkpoint = str(resolve_path(args.checkpoint, ROOT, ROOT / "det_repq_vit"))
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint not found: {args.checkpoint}. Put the Swin detection checkpoint "
                         "in pretrained_weights/ (see pretrained_weights/README.md).")

    from det_repq_vit.runtime import setup_process

    from det_repq_vit.checkpoint import load_detector_checkpoint
    from det_repq_vit.data import (CalibrationImages, SyntheticCalibrationImages, check_synthetic_teacher,
                                   check_test_data, list_calibration_images, shard, synthetic_calibration_set)
    from det_repq_vit.evaluate import build_evaluator, build_test_loader, evaluate_detector
    from det_repq_vit.ptq import calibrate_detector_repq, compensate_backbone, quantize_detector
    from qwt_core.distributed import is_main_process

    device, rank, world = setup_process(args.device, args.launcher, args.local_rank)
    apply_speed_arguments(args, str(device))
    check_test_data(cfg)

    calib = cfg.qwt_calib
    calib_size = args.calib_size or calib.num_images
    repq_batch = args.calib_batch or calib.repq_batch
    if calib_size < world:
        raise SystemExit(f"--calib_size {calib_size} is smaller than the number of processes {world}")
    synth = None
    if args.calib_source == "synthetic":
        if not args.synth_dir:
            raise SystemExit("--calib-source synthetic needs --synth-dir DIR (made by tools/synthesize.py)")
        pre = cfg.model.data_preprocessor
        synth = synthetic_calibration_set(args.synth_dir, pre.mean, pre.std, max(calib_size, repq_batch))
        synth_size = _synth_size(calib.pipeline) if args.synth_size is None else (args.synth_size or None)
    elif args.synth_dir:
        raise SystemExit("--synth-dir is only used with --calib-source synthetic")
    else:
        paths = list_calibration_images(calib.img_dir, max(calib_size, repq_batch), args.seed)

    _seed_everything(args.seed)
    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model)
    info = load_detector_checkpoint(model, args.checkpoint)
    if synth is not None:
        check_synthetic_teacher(synth, model, args.checkpoint)
    model.to(device).eval()
    if is_main_process():
        print(f"loaded {args.checkpoint} ({info['tensors']} tensors"
              f"{', original Swin detection layout converted' if info['legacy_layout'] else ''})")

    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    loader = build_test_loader(cfg)

    def run_eval(stage: str) -> None:
        t0 = time.perf_counter()
        results[stage] = evaluate_detector(model, loader, build_evaluator(cfg, args.eval), desc=stage)
        timings[f"eval_{stage}"] = time.perf_counter() - t0

    if args.fp:
        run_eval("fp")

    t0 = time.perf_counter()
    qm = quantize_detector(model, args.w_bits, args.a_bits)
    if synth is not None:
        pad = dict(pad_size_divisor=getattr(model.data_preprocessor, "pad_size_divisor", 1),
                   pad_value=getattr(model.data_preprocessor, "pad_value", 0))
        repq_images = SyntheticCalibrationImages(synth, range(repq_batch), repq_batch, device, synth_size, **pad)
    else:
        repq_images = CalibrationImages(paths[:repq_batch], calib.pipeline, repq_batch, model.data_preprocessor)
    calibrate_detector_repq(qm, next(iter(repq_images)), integer_zero_point=args.integer_zero_point)
    timings["repq_calibration"] = time.perf_counter() - t0
    run_eval("repq")

    t0 = time.perf_counter()
    if synth is not None:
        qwt_images = SyntheticCalibrationImages(synth, shard(list(range(calib_size)), rank, world),
                                                calib.get("batch_size", 32), device, synth_size, **pad)
    else:
        qwt_images = CalibrationImages(shard(paths[:calib_size], rank, world), calib.pipeline,
                                       calib.get("batch_size", 32), model.data_preprocessor)
    report = compensate_backbone(qm, qwt_images, start_block=args.start_block, **qwt_kwargs)
    timings["qwt"] = time.perf_counter() - t0
    run_eval("qwt")

    summary = {
        "config": str(args.config), "checkpoint": str(args.checkpoint),
        "w_bits": args.w_bits, "a_bits": args.a_bits, "calib_size": calib_size,
        "repq_batch": repq_batch, "start_block": args.start_block, "seed": args.seed,
        "world_size": world, "results": results, "calib_source": args.calib_source,
        "synth_dir": args.synth_dir,
        "ap": {k: {"bbox": _ap(v, "bbox"), "segm": _ap(v, "segm")} for k, v in results.items()},
        "qwt_gate": report.gate, "qwt_ridge": report.ridge, "qwt_report": report.to_dict(), "seconds": timings,
        "fused_fake_quant": bool(args.fused_fake_quant), "malloc_tunables": malloc_tunables(),
    }
    if is_main_process():
        print(report.format_table())
        print(format_table(results, args.w_bits, args.a_bits))
        out = Path(args.output) if args.output else Path(cfg.work_dir) / f"results_w{args.w_bits}a{args.a_bits}.json"
        if args.plot:
            summary["plot"] = write_plot(summary, args.plot)
            print(f"figure written to {summary['plot']}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"results written to {out}")
    return summary


if __name__ == "__main__":
    main()
