"""COCO-layout data for the torchvision Mask R-CNN tools: evaluation images and calibration batches.

Layout (as torchvision's references and ``benchmarks/shapes.write_coco_dataset``)::

    COCO_ROOT/annotations/instances_{split}.json
    COCO_ROOT/{split}/<file_name>

Images reach the detector as float tensors ``(3, H, W)`` in [0, 1] (RGB); the detector's own
``GeneralizedRCNNTransform`` normalises and resizes them.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def annotation_path(coco_root: str, split: str) -> Path:
    """``COCO_ROOT/annotations/instances_{split}.json``."""
    return Path(coco_root) / "annotations" / f"instances_{split}.json"


def check_split(coco_root: str, split: str, need_annotations: bool = True) -> None:
    """One-line ``FileNotFoundError`` for a missing image folder or annotation file."""
    img_dir = Path(coco_root) / split
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_dir}")
    ann = annotation_path(coco_root, split)
    if need_annotations and not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann}")


def load_image(path: str | Path) -> torch.Tensor:
    """RGB image file → ``(3, H, W)`` float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def list_calibration_images(coco_root: str, split: str, n: int, seed: int = 0) -> list[Path]:
    """``n`` image files of ``COCO_ROOT/{split}`` (sorted, then shuffled with ``seed``); ValueError if
    the folder has fewer."""
    folder = Path(coco_root) / split
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < n:
        raise ValueError(f"{folder} has {len(files)} images, {n} requested for calibration")
    random.Random(seed).shuffle(files)
    return files[:n]


def calibration_batches(paths: Sequence[Path | torch.Tensor], batch_size: int, size: int) -> Iterator[torch.Tensor]:
    """Batches ``(B, 3, size, size)`` in [0, 1] of the images (files, or ``(3, size, size)`` tensors
    such as synthetic images), each file resized (bilinear, no aspect ratio kept) to ``size × size``
    so that every QwT batch has one spatial size."""
    import torch.nn.functional as F

    def one(p: Path | torch.Tensor) -> torch.Tensor:
        if isinstance(p, torch.Tensor):
            return p
        return F.interpolate(load_image(p)[None], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0]

    for i in range(0, len(paths), batch_size):
        yield torch.stack([one(p) for p in paths[i:i + batch_size]]).clamp_(0, 1)


class CocoImages(torch.utils.data.Dataset):
    """Images of a COCO split, in ascending image-id order: item ``i`` → ``(image_id, (3, H, W))``.

    ``max_images`` keeps the first ``max_images`` ids (quick runs).
    """

    def __init__(self, coco_root: str, split: str, max_images: Optional[int] = None) -> None:
        import contextlib
        import io

        from pycocotools.coco import COCO

        check_split(coco_root, split)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(annotation_path(coco_root, split)))
        self.ids = sorted(self.coco.getImgIds())
        if max_images is not None:
            self.ids = self.ids[:max_images]
        self.img_dir = Path(coco_root) / split

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        img_id = self.ids[i]
        info = self.coco.loadImgs(img_id)[0]
        return img_id, load_image(self.img_dir / info["file_name"])
