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


class SyntheticCalibrationImages:
    """Batches of a synthetic calibration set (``qwt_core.synth_io``, written by
    ``tools/synthesize.py``) in the form :class:`CalibrationImages` yields:
    ``{"inputs": (B, 3, size, size) float on device, "data_samples": [DetDataSample]}``.

    The stored tensors are already in the detector's normalised input space, so the data preprocessor
    is skipped; they are resized bilinearly to ``size`` (the QwT calibration size, 224 in the
    reference) unless ``size`` is None, then padded (bottom/right, ``pad_value``) to a multiple of
    ``pad_size_divisor`` as the preprocessor pads real images. Labels are not used.
    """

    def __init__(self, synth_set: Any, indices: Sequence[int], batch_size: int, device: Any,
                 size: int | None = None, pad_size_divisor: int = 1, pad_value: float = 0.0) -> None:
        if batch_size < 1:
            raise ValueError("calibration batch size must be >= 1")
        self.synth_set, self.indices = synth_set, list(indices)
        self.batch_size, self.device, self.size = batch_size, device, size
        self.pad_size_divisor, self.pad_value = max(1, int(pad_size_divisor)), float(pad_value)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        from mmdet.structures import DetDataSample

        for s in range(0, len(self.indices), self.batch_size):
            x = self.synth_set.images(self.indices[s:s + self.batch_size]).to(self.device)
            if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                    align_corners=False)
            h, w = x.shape[-2:]
            d = self.pad_size_divisor
            ph, pw = -(-h // d) * d, -(-w // d) * d
            if (ph, pw) != (h, w):
                x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h), value=self.pad_value)
            meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(ph, pw), batch_input_shape=(ph, pw),
                        scale_factor=(1.0, 1.0))
            yield {"inputs": x, "data_samples": [DetDataSample(metainfo=dict(meta)) for _ in range(len(x))]}


def synthetic_calibration_set(synth_dir: str, mean: Sequence[float], std: Sequence[float],
                              needed: int) -> Any:
    """Open a detection synthetic set for calibration; :class:`DataError` (one line) when it is
    missing, corrupt, unfinished, normalised differently from the detector or too small. The
    teacher's weights are checked later, against the built model (:func:`check_synthetic_teacher`)."""
    from qwt_core.synth_io import SynthSetError, load_synthetic_set

    try:
        synth = load_synthetic_set(synth_dir, task="detection")
    except SynthSetError as exc:
        raise DataError(str(exc)) from None
    m = synth.manifest
    if [round(v, 4) for v in m.mean] != [round(float(v), 4) for v in mean] or \
            [round(v, 4) for v in m.std] != [round(float(v), 4) for v in std]:
        raise DataError(f"{synth_dir} is normalised with mean {m.mean} / std {m.std}, the detector "
                        f"with {list(mean)} / {list(std)}; synthesize it with this config")
    if len(synth) < needed:
        raise DataError(f"calibration needs {needed} images but {synth_dir} has {len(synth)}; "
                        "lower --calib_size/--calib_batch or synthesize more")
    return synth


def check_synthetic_teacher(synth: Any, model: nn.Module, checkpoint: str) -> None:
    """:class:`DataError` if ``synth`` was made from other weights than ``model``'s (FP, unquantized,
    loaded from ``checkpoint``): compares the manifest's ``weights_sha256`` (state dict), else its
    ``checkpoint_sha256`` (file)."""
    from qwt_core.synth_io import file_sha256, state_dict_sha256

    teacher = synth.manifest.teacher
    if teacher.get("weights_sha256"):
        same = teacher["weights_sha256"] == state_dict_sha256(model)
    elif teacher.get("checkpoint_sha256"):
        same = teacher["checkpoint_sha256"] == file_sha256(checkpoint)
    else:
        raise DataError(f"{synth.folder}/manifest.json names no teacher hash; synthesize the set again")
    if not same:
        raise DataError(f"{synth.folder} was synthesized from a different model "
                        f"({synth.manifest.teacher.get('checkpoint')}); synthesize a set with this checkpoint")
