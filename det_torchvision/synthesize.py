"""Stage I: write a synthetic (data-free) calibration set for a torchvision Mask R-CNN checkpoint.

    python -m det_torchvision.synthesize --checkpoint maskrcnn_resnet50_fpn.pth --coco-root data/coco \\
        --synth-dir work_dirs/synth_r50 --num-images 500 --batch 32 --iterations 300
    torchrun --nproc_per_node=8 -m det_torchvision.synthesize --launcher pytorch ...   # batches split over ranks

DFQ's ResNet objective and schedule (``det_torchvision.synth``); labels from the annotations of
``--label-split`` (no image file is opened). Resumable: rerun the same command after an interruption.
Then ``python -m det_torchvision.ptq ... --calib-source synthetic --synth-dir DIR``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from det_torchvision.model import ARCHS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the FP teacher (torchvision Mask R-CNN checkpoint)")
    p.add_argument("--arch", choices=list(ARCHS), default=None)
    p.add_argument("--coco-root", "--coco_root", dest="coco_root", required=True)
    p.add_argument("--label-split", "--label_split", dest="label_split", default="train2017",
                   help="annotations whose labels the images are synthesized for (default train2017)")
    p.add_argument("--synth-dir", "--synth_dir", dest="synth_dir", required=True, help="output folder")
    p.add_argument("--num-images", "--num_images", dest="num_images", type=int, default=500,
                   help="images (DFQ README: 500)")
    p.add_argument("--batch", type=int, default=32, help="images per generation batch (DFQ README: 32)")
    p.add_argument("--iterations", type=int, default=300, help="Adam steps per batch (DFQ README: 300)")
    p.add_argument("--size", type=int, default=None, help="square canvas (default: the detector's min_size)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="do not flip label sets (p = 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    import torch

    from det_torchvision.cli import fail, seed_everything
    from det_torchvision.data import annotation_path
    from det_torchvision.model import CheckpointError, load_maskrcnn
    from det_torchvision.synth import coco_labels, dfq_resnet_config, synthesize
    from qwt_core.distributed import get_rank, get_world_size, init_distributed_from_env
    from qwt_core.synth_io import SynthSetError

    args = parse_args(argv)
    if not annotation_path(args.coco_root, args.label_split).is_file():
        fail(f"annotation file not found: {annotation_path(args.coco_root, args.label_split)}")
    for flag, v in (("--num-images", args.num_images), ("--batch", args.batch), ("--iterations", args.iterations)):
        if v < 1:
            fail(f"{flag} {v}: use a positive number")
    try:
        model, info = load_maskrcnn(args.checkpoint, args.arch)
    except CheckpointError as err:
        fail(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.launcher != "none":
        init_distributed_from_env(device, args.local_rank)
    if device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    size = args.size or int(model.transform.min_size[0])
    labels = coco_labels(args.coco_root, args.label_split, size, args.seed, args.flip, args.num_images)
    if len(labels) < args.num_images:
        fail(f"{args.label_split} has {len(labels)} non-empty images, {args.num_images} requested")
    barrier = None
    if get_world_size() > 1:
        import torch.distributed as dist

        barrier = dist.barrier
    try:
        manifest = synthesize(model.to(device), labels, args.synth_dir, size, dfq_resnet_config(iterations=args.iterations),
                              args.batch, args.seed, checkpoint=args.checkpoint, arch=info["arch"],
                              rank=get_rank(), world_size=get_world_size(), barrier=barrier)
    except SynthSetError as err:
        fail(str(err))
    if get_rank() == 0:
        print(f"{manifest.images_written} synthetic images in {args.synth_dir}")
    return manifest.to_dict()


if __name__ == "__main__":
    main()
