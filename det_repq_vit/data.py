"""Data for detection PTQ: the COCO test loader and the QwT/RepQ-ViT calibration images.

The calibration set (``qwt_calib`` in the dataset config) is a folder of images (COCO train2017; no
annotations needed), sorted, shuffled with a seed, cut to ``num_images``, passed through a pipeline
(224x224 resize) and collated into batches that the detector's data preprocessor turns into model
inputs.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qwt_core.distributed import is_main_process

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DataError(SystemExit):
    """A missing data file or folder; the message names it and the config key to fix."""


def check_test_data(cfg: Any) -> None:
    """Raise :class:`DataError` if the test annotation file or image folder of ``cfg`` is missing."""
    ds = cfg.test_dataloader.dataset
    root = Path(ds.get("data_root", "") or "")
    ann = root / ds.ann_file
    img_dir = root / ds.get("data_prefix", {}).get("img", "")
    if not root.is_dir():
        raise DataError(f"COCO data_root not found: {root}. Set data_root in "
                        "configs/_base_/datasets/coco_instance.py (or link your COCO folder there).")
    if not ann.is_file():
        raise DataError(f"annotation file not found: {ann}. Put instances_val2017.json under "
                        f"{root / 'annotations'} or fix test_dataloader.dataset.ann_file.")
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}. Put the val2017 images there or fix "
                        "test_dataloader.dataset.data_prefix.")
    evaluator = cfg.get("test_evaluator", {})
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for m in metrics:
        if m.get("ann_file") and not Path(m["ann_file"]).is_file():
            raise DataError(f"evaluator annotation file not found: {m['ann_file']}. Fix data_root in "
                            "configs/_base_/datasets/coco_instance.py.")


def list_calibration_images(img_dir: str | Path, num_images: int, seed: int) -> list[Path]:
    """``num_images`` image paths from ``img_dir``: sorted, shuffled with ``seed``, truncated."""
    folder = Path(img_dir)
    if not folder.is_dir():
        raise DataError(f"calibration image folder not found: {folder}. Set data_root in "
                        "configs/_base_/datasets/coco_instance.py (qwt_calib.img_dir uses train2017/).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images (.jpg/.png) in calibration folder {folder}")
    random.Random(seed).shuffle(files)
    if len(files) < num_images:
        raise DataError(f"calibration needs {num_images} images but {folder} has {len(files)}; "
                        "lower --calib_size or point qwt_calib.img_dir at COCO train2017.")
    return files[:num_images]


class CalibrationImages:
    """Batches of preprocessed calibration images for one detector.

    Each batch is the detector data preprocessor's output ``{"inputs": (B, 3, H, W) float,
    "data_samples": [DetDataSample]}`` on the model's device. The pipeline runs once per image on
    first use; the raw collated batches are kept (uint8, small at 224x224).
    """

    def __init__(self, paths: Sequence[Path], pipeline: Sequence[dict], batch_size: int,
                 preprocessor: nn.Module, progress: bool = True) -> None:
        from mmengine.dataset import Compose, pseudo_collate

        if batch_size < 1:
            raise ValueError("calibration batch size must be >= 1")
        self.paths = list(paths)
        self.batch_size = batch_size
        self.preprocessor = preprocessor
        transform = Compose(list(pipeline))
        items = []
        bar = tqdm(self.paths, desc="calibration images", disable=not (progress and is_main_process()))
        for i, path in enumerate(bar):
            item = transform(dict(img_path=str(path), img_id=i))
            if item is None:
                raise DataError(f"calibration pipeline dropped image {path}")
            items.append(item)
        self._raw = [pseudo_collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[dict]:
        for raw in self._raw:
            with torch.no_grad():
                yield self.preprocessor(raw, False)


def shard(paths: Sequence[Path], rank: int, world_size: int) -> list[Path]:
    """This rank's share of ``paths`` (``paths[rank::world_size]``, equal sizes by truncation)."""
    per_rank = len(paths) // world_size
    return list(paths[rank::world_size])[:per_rank]
