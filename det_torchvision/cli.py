"""Command-line plumbing shared by ``det_torchvision.evaluate`` and ``det_torchvision.ptq``: the common
flags (det_repq_vit/tools/test.py vocabulary), one-line errors with exit status 2, process setup
(``--launcher pytorch`` under torchrun: gloo on CPU, NCCL on GPUs) and JSON writing."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, NoReturn

from det_torchvision.model import ARCHS


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (one line) to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint, COCO data, evaluation, device and launcher flags."""
    p.add_argument("--checkpoint", required=True,
                   help="torchvision Mask R-CNN checkpoint (state_dict or {'model': state_dict, ...})")
    p.add_argument("--arch", choices=list(ARCHS), default=None,
                   help="architecture (default: the checkpoint's 'arch' entry, else maskrcnn_resnet50_fpn)")
    p.add_argument("--coco-root", "--coco_root", "--data-path", dest="coco_root", required=True,
                   help="COCO folder with annotations/instances_{split}.json and {split}/ images")
    p.add_argument("--split", default="val2017", help="evaluation split (default val2017)")
    p.add_argument("--eval", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"],
                   help="COCO metrics to compute")
    p.add_argument("--max-images", "--max_images", dest="max_images", type=int, default=None,
                   help="evaluate the first N images (ascending id) only")
    p.add_argument("--min-size", "--min_size", dest="min_size", type=int, default=None,
                   help="detector input short side (default: the checkpoint's, else torchvision's 800)")
    p.add_argument("--max-size", "--max_size", dest="max_size", type=int, default=None,
                   help="detector input long side limit (default: the checkpoint's, else 1333)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch / numpy / random and of the "
                   "calibration image shuffle")
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="pytorch: launched by torchrun (results sharded over the processes and merged)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)))


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_common(args: argparse.Namespace) -> None:
    """Input checks that need no model: annotation file, image folder, output suffix (one line, exit 2)."""
    from det_torchvision.data import check_split

    try:
        check_split(args.coco_root, args.split)
    except FileNotFoundError as err:
        fail(str(err))
    if not Path(args.checkpoint).is_file():
        fail(f"checkpoint not found: {args.checkpoint}")
    if args.output is not None and not args.output.lower().endswith(".json"):
        fail(f"--output {args.output}: the results file name must end in .json")
    if args.max_images is not None and args.max_images < 1:
        fail(f"--max-images {args.max_images}: use a positive number")


def setup(args: argparse.Namespace) -> tuple[str, int, int]:
    """Checks, seeds, threads, then the process group under ``--launcher pytorch``.
    Returns ``(device, rank, world_size)``."""
    import torch

    from qwt_core.distributed import get_rank, get_world_size, init_distributed_from_env

    check_common(args)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    seed_everything(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.launcher != "none":
        init_distributed_from_env(device, args.local_rank)
    if device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    return device, get_rank(), get_world_size()


def load_model_and_data(args: argparse.Namespace, device: str):
    """``(model on device, load info, CocoImages)``; a bad checkpoint is one line, exit 2."""
    from det_torchvision.data import CocoImages
    from det_torchvision.model import CheckpointError, load_maskrcnn

    try:
        model, info = load_maskrcnn(args.checkpoint, args.arch, min_size=args.min_size,
                                    max_size=args.max_size)
    except CheckpointError as err:
        fail(str(err))
    dataset = CocoImages(args.coco_root, args.split, args.max_images)
    cats = dataset.coco.getCatIds()
    if cats and max(cats) >= info["num_classes"]:
        fail(f"{args.checkpoint} predicts labels 1..{info['num_classes'] - 1} (= COCO category ids) but "
             f"the annotations use category id {max(cats)}")
    return model.to(device).eval(), info, dataset


def write_json(summary: dict[str, Any], path: str) -> str:
    """Write ``summary`` as indented JSON (folder created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return str(out)
