"""Zero-shot QAT of Swin Mask / Cascade Mask R-CNN on a labelled synthetic set (DFQ Stage II).

    python tools/zsqat.py CONFIG CHECKPOINT --synth-dir SYNTH --work-dir WORK --mode dfq --w_bits 4 --a_bits 8
    bash tools/dist_zsqat.sh CONFIG CHECKPOINT NGPUS --synth-dir SYNTH --work-dir WORK --mode repq ...

Modes:
  dfq   the published recipe: per-tensor symmetric LSQ on the backbone Linears and the patch-embed conv
        (everything else FP), the whole student trained with AdamW (lr 1e-6, wd 0.05, 1000-iteration
        linear warm-up), 1·L_det + 1·KL(RPN, τ=1) + 1·MSE(backbone blocks), one image per process.
        Reports the last epoch (per-epoch AP with --eval-every-epoch; its best epoch is labelled as
        selected on val).
  repq  toolkit extension: the RepQ-ViT-calibrated, reparameterized whole detector (as tools/test.py
        builds it), its uniform step sizes made learnable (log-√2 fixed; --train-weights to train the
        weights too), trained with the same losses, then QwT fitted on the synthetic set:
        calibrate → QAT → QwT → evaluate.

Writes WORK/epoch_K.pth after every epoch (atomic; --resume PATH|auto continues), a JSON of the
run with per-iteration loss curves (default WORK/zsqat_results.json) and a PNG of the curves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from det_repq_vit.tools.test import require_detection_stack

    require_detection_stack()
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="detector config (configs/swin/*.py): the student")
    p.add_argument("checkpoint", help="FP detector checkpoint (student initialisation and teacher)")
    p.add_argument("--synth-dir", "--synth_dir", dest="synth_dir", required=True,
                   help="labelled synthetic set made by tools/synthesize.py from this checkpoint")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                   help="checkpoints, JSON and PNG (default work_dirs/zsqat_<config name>_<mode>)")
    p.add_argument("--mode", choices=["dfq", "repq"], default="dfq")
    p.add_argument("--w_bits", "--w_bit", "--w-bits", dest="w_bits", type=int, default=4)
    p.add_argument("--a_bits", "--a_bit", "--a-bits", dest="a_bits", type=int, default=8)
    p.add_argument("--epochs", type=int, default=15, help="epochs over the synthetic set (DFQ: 15)")
    p.add_argument("--iters", "--iters-per-epoch", dest="iters_per_epoch", type=int, default=None,
                   help="cap the iterations of every epoch (default: all images of the process's share)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                   help="images per process and iteration (DFQ: 1, with 8 GPUs)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (DFQ: 1e-6)")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.05)
    p.add_argument("--no-step-decay", dest="step_decay", action="store_false",
                   help="no weight decay on the step sizes (DFQ decays them)")
    p.add_argument("--warmup-iters", dest="warmup_iters", type=int, default=1000,
                   help="linear warm-up from 0.001·lr (DFQ: 1000), then constant")
    p.add_argument("--w-det", dest="w_det", type=float, default=1.0, help="weight of the detector loss")
    p.add_argument("--w-kl", dest="w_kl", type=float, default=1.0, help="weight of KL on the RPN outputs")
    p.add_argument("--w-mse", dest="w_mse", type=float, default=1.0, help="weight of MSE on block outputs")
    p.add_argument("--train-weights", dest="train_weights", action="store_true",
                   help="repq: train the weights as well as the step sizes")
    p.add_argument("--learn-zero-point", dest="learn_zero_point", action="store_true",
                   help="repq: also learn the zero points of the uniform quantizers")
    p.add_argument("--amp", action="store_true", help="fp16 autocast + loss scaling (CUDA only; off on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint of this tool (auto: the newest epoch_K.pth in --work-dir)")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, default=2,
                   help="keep the newest N epoch checkpoints (0: all)")
    p.add_argument("--teacher-config", dest="teacher_config", default=None,
                   help="config of the FP teacher (default: CONFIG); must build the same detector")
    p.add_argument("--teacher-checkpoint", dest="teacher_checkpoint", default=None,
                   help="teacher weights (default: CHECKPOINT)")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--skip-eval", dest="skip_eval", action="store_true", help="no COCO evaluation")
    p.add_argument("--eval-every-epoch", dest="eval_every_epoch", action="store_true",
                   help="evaluate after every epoch (the best epoch is reported as selected on val)")
    p.add_argument("--calib_batch", "--calib-batch", dest="calib_batch", type=int, default=None,
                   help="repq: RepQ-ViT calibration batch (default qwt_calib.repq_batch)")
    p.add_argument("--calib_size", "--calib-size", dest="calib_size", type=int, default=None,
                   help="repq: synthetic images for QwT (default qwt_calib.num_images, at most the set)")
    p.add_argument("--synth-size", "--synth_size", dest="synth_size", type=int, default=None,
                   help="repq: square size of the calibration images (default the qwt_calib Resize, 224; 0: as stored)")
    p.add_argument("--start_block", "--start-block", dest="start_block", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON file (default WORK_DIR/zsqat_results.json)")
    p.add_argument("--plot", default=None, help="loss-curve PNG (default WORK_DIR/zsqat_losses.png)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--cfg-options", "--cfg_options", dest="cfg_options", nargs="+", action=DictAction)
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="pytorch: launched by torchrun (tools/dist_zsqat.sh)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def _build_detector(cfg: Any, seed: int):
    import torch
    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    return MODELS.build(cfg.model)


def _load_weights(model: Any, checkpoint: str, device: str):
    from det_repq_vit.checkpoint import load_detector_checkpoint

    load_detector_checkpoint(model, checkpoint)
    return model.to(device).eval()


def _teacher_mismatch(student: Any, teacher: Any) -> str:
    """'' when teacher and student are the same architecture, else what differs (one line)."""
    from qwt_core.model_io import state_dict_mismatch

    from det_repq_vit.zsqat import block_names_of

    problem = state_dict_mismatch(student.state_dict(), teacher.state_dict())
    if not problem and block_names_of(student) != block_names_of(teacher):
        problem = "different backbone blocks"
    return problem


def _load_cfg(path: str, args: argparse.Namespace):
    from det_repq_vit.tools.test import load_config

    ns = argparse.Namespace(config=path, cfg_options=args.cfg_options, work_dir=args.work_dir)
    return load_config(ns)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from qwt_core.quantizers import validate_bits

    from det_repq_vit.zsqat import ZsqatConfig

    try:
        validate_bits(args.w_bits, "--w_bits")
        validate_bits(args.a_bits, "--a_bits")
        zcfg = ZsqatConfig(mode=args.mode, w_bits=args.w_bits, a_bits=args.a_bits, epochs=args.epochs,
                           iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, step_decay=args.step_decay,
                           warmup_iters=args.warmup_iters, w_det=args.w_det, w_kl=args.w_kl, w_mse=args.w_mse,
                           train_weights=args.train_weights, amp=args.amp, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for path in (args.output, args.plot):
        if path is not None and path == args.resume:
            raise SystemExit("error: --output/--plot must not be the --resume file")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise SystemExit(f"error: --plot {args.plot}: the figure is a PNG, the file name must end in .png")

    from det_repq_vit.tools.test import ROOT as _ROOT, _synth_size, resolve_path

    cfg = _load_cfg(args.config, args)
    if not args.work_dir:
        cfg.work_dir = str(Path("work_dirs") / f"zsqat_{Path(args.config).stem}_{args.mode}")
    work_dir = Path(cfg.work_dir)
    t_cfg = _load_cfg(args.teacher_config, args) if args.teacher_config else cfg
    args.checkpoint = str(resolve_path(args.checkpoint, _ROOT, _ROOT / "det_repq_vit"))
    teacher_ckpt = str(resolve_path(args.teacher_checkpoint, _ROOT, _ROOT / "det_repq_vit")) \
        if args.teacher_checkpoint else args.checkpoint
    for c in {args.checkpoint, teacher_ckpt}:
        if not Path(c).is_file():
            raise SystemExit(f"error: checkpoint not found: {c}. Put the Swin detection checkpoint in "
                             "pretrained_weights/ (see pretrained_weights/README.md).")

    import torch
    import torch.distributed as dist
    from det_repq_vit.runtime import setup_process

    from det_repq_vit import zsqat as Z
    from det_repq_vit.data import (SyntheticCalibrationImages, check_synthetic_teacher, check_test_data, shard,
                                   synthetic_calibration_set)
    from det_repq_vit.synth import num_classes_of
    from qwt_core.distributed import is_dist, is_main_process
    from qwt_core.lsq import set_data_shards

    device, rank, world = setup_process(args.device, args.launcher, args.local_rank)
    zcfg.amp = bool(args.amp and device.startswith("cuda"))

    # ---------------------------------------------------------------- checks (nothing written yet)
    calib = cfg.qwt_calib
    repq_batch = args.calib_batch or calib.repq_batch
    pre = cfg.model.data_preprocessor
    synth = synthetic_calibration_set(args.synth_dir, pre.mean, pre.std,
                                      max(world * args.batch_size, repq_batch if args.mode == "repq" else 1))
    teacher, student = _build_detector(t_cfg, args.seed), _build_detector(cfg, args.seed)
    problem = _teacher_mismatch(student, teacher)
    if problem:
        raise SystemExit(f"error: the teacher config {args.teacher_config or args.config} does not build the same "
                         f"detector as the student config {args.config} ({problem}); distillation needs both")
    teacher = _load_weights(teacher, teacher_ckpt, device)
    student = _load_weights(student, args.checkpoint, device)
    check_synthetic_teacher(synth, teacher, teacher_ckpt)
    Z.check_synthetic_labels(synth, num_classes_of(student))
    if not args.skip_eval:
        check_test_data(cfg)
    resume = args.resume
    if resume == "auto":
        found = Z.latest_checkpoint(work_dir) if work_dir.is_dir() else None
        resume = str(found) if found else None
    identity = {**zcfg.identity(), "world_size": world, "config": Path(args.config).name,
                "learn_zero_point": args.learn_zero_point, "synth_images": len(synth)}
    ck = Z.read_checkpoint(resume, identity) if resume else None  # corrupt / foreign: stop here

    # ---------------------------------------------------------------------------- student
    timings: dict[str, float] = {}
    data = Z.SyntheticDetectionData(synth, rank, world)
    first = data.batch(data.epoch_batches(1, args.seed, args.batch_size, 1)[0], device)
    pad = dict(pad_size_divisor=getattr(student.data_preprocessor, "pad_size_divisor", 1),
               pad_value=getattr(student.data_preprocessor, "pad_value", 0))
    synth_size = _synth_size(calib.pipeline) if args.synth_size is None else (args.synth_size or None)
    qm = None
    init_spread = 0.0
    init_steps: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.mode == "dfq":
        quantized = Z.quantize_backbone_lsq(student, args.w_bits, args.a_bits)
        set_data_shards(student, world)  # before the init: its statistics are all-reduced
        if not resume:
            Z.init_lsq_steps(student, first["inputs"])
            init_spread = Z.rank_spread(Z.step_parameters(student))
            init_steps = Z.lsq_init_steps(student)
    else:
        from det_repq_vit.ptq import calibrate_detector_repq, quantize_detector
        from qwt_core.lsq import make_steps_learnable

        qm = quantize_detector(student, args.w_bits, args.a_bits)
        calib_images = SyntheticCalibrationImages(synth, range(repq_batch), repq_batch, device, synth_size, **pad)
        calibrate_detector_repq(qm, next(iter(calib_images)))
        quantized = make_steps_learnable(student, learn_zero_point=args.learn_zero_point)
        set_data_shards(student, world)
    Z.broadcast_module(student)  # every rank starts from rank 0's steps and weights
    timings["build_student"] = time.perf_counter() - t0
    named = Z.trainable_parameters(student, zcfg)
    params = [p for _, p in named]
    opt = Z.build_optimizer(student, named, zcfg)
    sched = Z.build_scheduler(opt, zcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=zcfg.amp)
    start_epoch, history = 0, []
    if ck is not None:
        Z.check_checkpoint_model(ck, resume, student.state_dict().keys())
        start_epoch, history = Z.restore_checkpoint(ck, student, opt, sched, scaler)
        del ck
        if is_main_process():
            print(f"resumed from {resume} (epoch {start_epoch})")

    # ---------------------------------------------------------------------------- training
    loader = evaluator_fn = None
    evals: dict[str, Any] = {}
    if not args.skip_eval:
        from det_repq_vit.evaluate import build_evaluator, build_test_loader, evaluate_detector

        loader = build_test_loader(cfg)

        def evaluator_fn(stage: str) -> dict[str, float]:
            return evaluate_detector(student, loader, build_evaluator(cfg, args.eval), desc=stage)

    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with Z.DetectionDistiller(student, teacher, zcfg.w_det, zcfg.w_kl, zcfg.w_mse) as distiller:
        for epoch in range(start_epoch + 1, zcfg.epochs + 1):
            rows = Z.train_epoch(student, distiller, data, params, opt, sched, scaler, zcfg, epoch,
                                 history[-1]["iter"] if history else 0, device, progress=args.progress)
            history += rows
            if args.eval_every_epoch and evaluator_fn is not None and epoch < zcfg.epochs:
                evals[f"epoch_{epoch}"] = evaluator_fn(f"epoch {epoch}")
            if rank == 0:
                Z.save_checkpoint(Z.checkpoint_path(work_dir, epoch), student, opt, sched, scaler, epoch,
                                  identity, history)
                Z.prune_checkpoints(work_dir, args.keep_checkpoints)
            if is_dist():
                dist.barrier()
    timings["train"] = time.perf_counter() - t0
    trained_iters = sum(1 for r in history if r["epoch"] > start_epoch)
    timings["seconds_per_iteration"] = timings["train"] / trained_iters if trained_iters else None
    # what a user plans a full run with: peak CUDA memory of this process during training
    timings["peak_cuda_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_cuda else None
    step_spread = Z.rank_spread(Z.step_parameters(student))
    param_spread = Z.rank_spread(params)

    report = None
    if args.mode == "repq":
        from det_repq_vit.ptq import compensate_backbone

        t0 = time.perf_counter()
        calib_size = min(args.calib_size or calib.num_images, len(synth))
        qwt_images = SyntheticCalibrationImages(synth, shard(list(range(calib_size)), rank, world),
                                                calib.get("batch_size", 32), device, synth_size, **pad)
        report = compensate_backbone(qm, qwt_images, start_block=args.start_block, progress=args.progress)
        timings["qwt"] = time.perf_counter() - t0
    if evaluator_fn is not None:
        t0 = time.perf_counter()
        evals["last"] = evaluator_fn("zsqat" if args.mode == "dfq" else "zsqat + QwT")
        timings["eval"] = time.perf_counter() - t0

    def _ap(metrics: dict[str, float]) -> dict[str, Optional[float]]:
        return {k: (None if metrics.get(f"coco/{k}_mAP") is None else round(100 * metrics[f"coco/{k}_mAP"], 2))
                for k in ("bbox", "segm")}

    ap = {k: _ap(v) for k, v in evals.items()}
    per_epoch = {k: v for k, v in ap.items() if k.startswith("epoch_")}
    if per_epoch:
        per_epoch[f"epoch_{zcfg.epochs}"] = ap["last"]
        best = max(per_epoch, key=lambda k: per_epoch[k]["bbox"] or 0.0)
        ap["best_epoch_selected_on_val"] = {"epoch": int(best.split("_")[1]), **per_epoch[best],
                                            "note": "chosen on the evaluation set: model selection, not a "
                                                    "test result; report 'last'"}
    summary: dict[str, Any] = {
        "tool": "det_repq_vit/tools/zsqat.py", "config": str(args.config), "checkpoint": args.checkpoint,
        "teacher_config": args.teacher_config or str(args.config), "teacher_checkpoint": teacher_ckpt,
        "synth_dir": str(args.synth_dir), "synth_images": len(synth), "mode": args.mode,
        "recipe": {**zcfg.identity(), "epochs": zcfg.epochs}, "world_size": world,
        "global_batch": world * args.batch_size, "device": str(device), "resumed_from": resume,
        "start_epoch": start_epoch, "quantized_layers": len(quantized),
        "quantized": ("backbone Linears + patch-embed conv (LSQ, per tensor, symmetric)" if args.mode == "dfq"
                      else "every Conv2d/Linear + attention matmuls (RepQ-ViT, learnable steps)"),
        "steps": Z.step_statistics(student), "lsq_init_rank_spread": init_spread,
        "lsq_init_steps": init_steps,
        "step_rank_spread": step_spread, "param_rank_spread": param_spread,
        "history": history, "epochs": Z.epoch_summary(history),
        "results": evals, "ap": ap, "reported": "last epoch",
        "qwt_report": report.to_dict() if report is not None else None, "seconds": timings,
    }
    if is_main_process():
        from qwt_core.plotting import plot_loss_curves

        out = Path(args.output) if args.output else work_dir / "zsqat_results.json"
        png = args.plot or str(work_dir / "zsqat_losses.png")
        if history:
            summary["plot"] = plot_loss_curves(
                history, png, f"zero-shot QAT ({args.mode}) W{args.w_bits}A{args.a_bits}, "
                f"{Path(str(args.config)).stem}: loss per iteration (global batch {world * args.batch_size})")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)
        summary["output"] = str(out)
        last = Z.epoch_summary(history)[-1] if history else None
        if last:
            print(f"last epoch {last['epoch']}: total {last['total']:.4g} (det {last['det']:.4g}, "
                  f"kl {last['kl']:.4g}, mse {last['mse']:.4g})")
        if "last" in ap:
            print(f"COCO AP (last epoch): box {ap['last']['bbox']}, mask {ap['last']['segm']}")
        print(f"results written to {out}")
    return summary


if __name__ == "__main__":
    main()
