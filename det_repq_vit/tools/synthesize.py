"""Synthesize a data-free calibration set for a Swin Mask / Cascade Mask R-CNN (DFQ Stage I).

    python tools/synthesize.py CONFIG CHECKPOINT --num-images 512 --out synth/swin_t [--labels sampled]
    torchrun --nproc_per_node=8 tools/synthesize.py CONFIG CHECKPOINT --num-images 2048 --out DIR \\
        --launcher pytorch

Images are optimised in the detector's normalised input space against the FP detector:
``det_weight · L_det + pse_weight · L_PSE + tv_weight · L_TV`` (DFQ: 10 / 1 / 0.001 at batch 12, 640²,
Adam (0.5, 0.9), lr 0.2, 100 warm-up iterations + cosine, 2000 iterations). Labels are sampled by the
teacher itself (``--labels sampled``, adaptive label sampling, no real data) or read from the COCO
train annotations (``--labels coco``; synthetic pixels, real labels). The result is a folder of
shards + ``manifest.json`` for ``tools/test.py --calib-source synthetic --synth-dir DIR``. A rerun
with the same arguments resumes; each process makes a disjoint set of batches.
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
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="detector config (configs/swin/*.py)")
    p.add_argument("checkpoint", help="FP detector checkpoint (the teacher)")
    p.add_argument("--num-images", "--num_images", dest="num_images", type=int, required=True,
                   help="images to synthesize (all processes together)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--labels", choices=["sampled", "coco"], default="sampled",
                   help="sampled: adaptive label sampling by the teacher (no data); coco: real train labels")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=640,
                   help="square canvas in pixels, multiple of 32 (DFQ: 640)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=12,
                   help="images optimised together (DFQ: 12)")
    p.add_argument("--iterations", type=int, default=2000, help="image updates per batch (DFQ: 2000)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up iterations (default 5%% = 100 of 2000)")
    p.add_argument("--lr", type=float, default=0.2, help="Adam learning rate on the pixels (DFQ: 0.2)")
    p.add_argument("--det-weight", dest="det_weight", type=float, default=10.0, help="weight of the detector loss")
    p.add_argument("--pse-weight", dest="pse_weight", type=float, default=1.0,
                   help="weight of the patch-similarity entropy prior (0: off)")
    p.add_argument("--tv-weight", dest="tv_weight", type=float, default=0.001,
                   help="TV weight at batch 12, 640² (rescaled by sqrt(12·640²/(B·S²)) for other sizes)")
    p.add_argument("--no-clamp", dest="clamp", action="store_false",
                   help="do not clamp pixels to the valid range after each step (DFQ does not clamp)")
    p.add_argument("--keep-first-token", dest="drop_first_token", action="store_false",
                   help="PSE: keep token 0 of each window (DFQ drops it, a ViT CLS-token quirk)")
    p.add_argument("--amp", action="store_true", help="fp16 autocast for the detector forward (CUDA only)")
    g = p.add_argument_group("adaptive label sampling (--labels sampled)")
    g.add_argument("--label-size", dest="label_size", type=int, default=160,
                   help="canvas of the label-sampling stage (DFQ-YOLO: 160)")
    g.add_argument("--label-iterations", dest="label_iterations", type=int, default=3000,
                   help="image updates of the label-sampling stage (DFQ-YOLO: 3000)")
    g.add_argument("--relabel-every", dest="relabel_every", type=int, default=100)
    g.add_argument("--relabel-start", dest="relabel_start", type=int, default=800)
    g.add_argument("--relabel-end", dest="relabel_end", type=int, default=2800)
    g.add_argument("--conf", type=float, default=0.2, help="teacher confidence for new labels")
    g.add_argument("--overlap-iou", dest="overlap_iou", type=float, default=0.35)
    g.add_argument("--min-area", dest="min_area", type=float, default=0.01, help="normalised area limits")
    g.add_argument("--max-area", dest="max_area", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0, help="base seed (image i uses seed + i)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--cfg-options", "--cfg_options", dest="cfg_options", nargs="+", action=DictAction,
                   help="override config entries, key=value")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="pytorch: launched by torchrun (each process makes a disjoint set of batches)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def build_synth_config(args: argparse.Namespace):
    """:class:`det_repq_vit.synth.DetSynthConfig` from the arguments; one-line SystemExit if invalid."""
    from det_repq_vit.synth import DetSynthConfig

    if args.num_images < 1:
        raise SystemExit("error: --num-images must be >= 1")
    if args.iterations < 1 or args.label_iterations < 1:
        raise SystemExit("error: --iterations and --label-iterations must be >= 1")
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * args.iterations))
    label_warmup = max(1, round(0.05 * args.label_iterations)) if args.warmup is None else min(
        args.warmup, args.label_iterations)
    try:
        return DetSynthConfig(
            image_size=args.image_size, batch_size=args.batch_size, labels=args.labels,
            iterations=args.iterations, lr=args.lr, warmup=min(warmup, args.iterations),
            det_weight=args.det_weight, pse_weight=args.pse_weight, tv_weight=args.tv_weight,
            clamp=args.clamp, pse_drop_first_token=args.drop_first_token, amp=args.amp,
            label_size=args.label_size, label_iterations=args.label_iterations, label_warmup=label_warmup,
            relabel_every=args.relabel_every, relabel_start=args.relabel_start, relabel_end=args.relabel_end,
            conf=args.conf, overlap_iou=args.overlap_iou, min_area=args.min_area, max_area=args.max_area)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    scfg = build_synth_config(args)

    from det_repq_vit.tools.test import load_config, resolve_path

    cfg = load_config(args)
    args.checkpoint = str(resolve_path(args.checkpoint, ROOT, ROOT / "det_repq_vit"))
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint not found: {args.checkpoint}. Put the Swin detection checkpoint "
                         "in pretrained_weights/ (see pretrained_weights/README.md).")

    import torch
    import torch.distributed as dist
    from mmdet.registry import MODELS
    from det_repq_vit.runtime import setup_process

    from det_repq_vit.checkpoint import load_detector_checkpoint
    from det_repq_vit.synth import CocoLabelSource, DetectionSynthesizer
    from qwt_core.distributed import is_dist
    from qwt_core.inversion import synthesize_batches
    from qwt_core.synth_io import SynthManifest, SynthSetError, file_sha256, prepare_folder, state_dict_sha256

    device, rank, world = setup_process(args.device, args.launcher, args.local_rank)

    torch.manual_seed(args.seed)
    model = MODELS.build(cfg.model)
    load_detector_checkpoint(model, args.checkpoint)  # one-line SystemExit when it does not fit
    model.eval()
    pre = cfg.model.data_preprocessor
    mean, std = [float(v) for v in pre.mean], [float(v) for v in pre.std]
    teacher = {"config": str(args.config), "checkpoint": str(args.checkpoint),
               "checkpoint_sha256": file_sha256(args.checkpoint), "weights_sha256": state_dict_sha256(model)}
    model.to(device)
    manifest = SynthManifest(task="detection", seed=args.seed, hparams=scfg.to_dict(), label_source=args.labels,
                             teacher=teacher, mean=mean, std=std, image_size=[scfg.image_size] * 2,
                             num_images=args.num_images, batch_size=scfg.batch_size)
    try:
        prepare_folder(args.out, manifest, rank)  # a foreign folder fails here, before any work
    except SynthSetError as exc:
        raise SystemExit(f"error: {exc}") from None
    coco = None
    if args.labels == "coco":
        coco = CocoLabelSource(cfg.train_dataloader.dataset, scfg.image_size, args.seed)
        if len(coco) < args.num_images:
            raise SystemExit(f"error: --num-images {args.num_images} but the COCO train annotations have "
                             f"{len(coco)} images with objects")
    synth = DetectionSynthesizer(model, scfg, args.seed, mean, std, coco, progress=args.progress and rank == 0)
    t0 = time.perf_counter()
    manifest = synthesize_batches(args.out, manifest, synth.make_batch, rank, world, progress=args.progress,
                                  barrier=dist.barrier if is_dist() else None)
    seconds = time.perf_counter() - t0
    stats = {k: (sum(v) / len(v) if v else None) for k, v in synth.stats.items()}
    summary = {"out": str(args.out), "rank": rank, "world_size": world, "seconds": seconds,
               "batches_made": len(synth.stats["final_s_per_it"]), "device": str(device),
               "final_seconds_per_iteration": stats["final_s_per_it"],
               "label_seconds_per_iteration": stats["label_s_per_it"],
               "images_in_manifest": manifest.images_written if rank == 0 else None}
    if rank == 0:
        print(json.dumps(summary, indent=2))
        if manifest.complete:
            print(f"synthetic set complete: {manifest.images_written} images in {args.out}")
    return summary


if __name__ == "__main__":
    main()
