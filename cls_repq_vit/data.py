"""ImageNet-style ImageFolder data: eval transform, calibration subset, sharded validation loader.

``data_dir`` must contain ``train/`` (calibration images are drawn from it) and ``val/`` (evaluation),
each with one sub-folder per class, as in ImageNet.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from qwt_core.distributed import ShardSampler  # moved to qwt_core; still importable from here

from .models import ModelSpec


def eval_transform(spec: ModelSpec, img_size: Optional[int] = None) -> transforms.Compose:
    """Resize the short side to ``floor(img_size / crop_pct)``, center-crop ``img_size``, normalise.

    Output per image: ``(3, img_size, img_size)`` float tensor.
    """
    size = img_size or spec.img_size
    return transforms.Compose([
        transforms.Resize(spec.resize_size(size), interpolation=InterpolationMode(spec.interpolation)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def _check_split(data_dir: str, split: str) -> str:
    if not os.path.isdir(data_dir):
        raise SystemExit(f"error: --data_dir {data_dir} does not exist (expected ImageNet-style "
                         f"train/ and val/ folders inside)")
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path} is missing: --data_dir must contain train/ and val/ "
                         f"with one sub-folder per class")
    return path


def image_folder(data_dir: str, split: str, transform) -> datasets.ImageFolder:
    """``ImageFolder`` of ``data_dir/split``; one-line ``SystemExit`` when missing or empty."""
    path = _check_split(data_dir, split)
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"error: {path} has no images in class sub-folders "
                         f"({str(exc).splitlines()[0][:120]})") from None


def calibration_indices(n_images: int, calib_size: int, seed: int) -> list[int]:
    """A seeded random subset of ``calib_size`` indices of ``range(n_images)`` (same on every rank)."""
    if calib_size > n_images:
        raise SystemExit(f"error: --calib_size {calib_size} is larger than the {n_images} training images")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_images, generator=g)[:calib_size].tolist()


def load_images(dataset: Dataset, indices: Sequence[int], batch_size: int, workers: int) -> list[torch.Tensor]:
    """The images of ``dataset[indices]`` as a list of ``(≤batch_size, 3, H, W)`` batches, in order."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=False)
    return [images for images, _ in loader]


class CalibrationSet:
    """Seeded calibration images from ``train/``.

    ``repq_images``: the first ``repq_calib_size`` images of the subset (identical on every rank, so
    all ranks calibrate identical quantizers). ``qwt_indices``: this rank's ``calib_size //
    world_size`` images of the subset for QwT.
    """

    def __init__(self, data_dir: str, spec: ModelSpec, img_size: int, calib_size: int,
                 repq_calib_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if calib_size < world_size:
            raise SystemExit(f"error: --calib_size {calib_size} is smaller than the {world_size} processes")
        self.dataset = image_folder(data_dir, "train", eval_transform(spec, img_size))
        n_total = max(calib_size, repq_calib_size)
        self.indices = calibration_indices(len(self.dataset), n_total, seed)
        self.repq_indices = self.indices[:repq_calib_size]
        per_rank = calib_size // world_size
        self.qwt_indices = self.indices[:calib_size][rank * per_rank:(rank + 1) * per_rank]

    def repq_images(self, workers: int = 0) -> torch.Tensor:
        """``(repq_calib_size, 3, H, W)``."""
        return torch.cat(load_images(self.dataset, self.repq_indices, 64, workers))

    def qwt_batches(self, batch_size: int, workers: int = 0) -> list[torch.Tensor]:
        """This rank's QwT calibration images as batches ``(≤batch_size, 3, H, W)``."""
        return load_images(self.dataset, self.qwt_indices, batch_size, workers)


def val_loader(data_dir: str, spec: ModelSpec, img_size: int, batch_size: int, workers: int,
               rank: int = 0, world_size: int = 1) -> DataLoader:
    """``val/`` loader yielding ``(images (B, 3, H, W), targets (B,))``, this rank's shard only."""
    dataset = image_folder(data_dir, "val", eval_transform(spec, img_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False)


class SyntheticCalibrationSet:
    """Calibration images from a synthetic set (``python -m cls_repq_vit.synthesize``), with the
    interface of :class:`CalibrationSet`. The stored tensors are already normalised for the model.

    Checks (one-line ``SystemExit``): the set exists, is complete and uncorrupted, was made from
    ``model``'s weights (state-dict sha256), with the model's normalisation and ``img_size``, and
    holds enough images.
    """

    def __init__(self, synth_dir: str, spec: ModelSpec, model_name: str, model: torch.nn.Module,
                 img_size: int, calib_size: int, repq_calib_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        from qwt_core.synth_io import SynthSetError, load_synthetic_set, state_dict_sha256

        if calib_size < world_size:
            raise SystemExit(f"error: --calib_size {calib_size} is smaller than the {world_size} processes")
        try:
            self.synth = load_synthetic_set(synth_dir, task="classification", expected_teacher={
                "model": model_name, "weights_sha256": state_dict_sha256(model)})
        except SynthSetError as exc:
            raise SystemExit(f"error: {exc}") from None
        m = self.synth.manifest
        if [round(v, 6) for v in m.mean] != [round(v, 6) for v in spec.mean] or \
                [round(v, 6) for v in m.std] != [round(v, 6) for v in spec.std]:
            raise SystemExit(f"error: {synth_dir} is normalised with mean {m.mean} / std {m.std}, "
                             f"{model_name} with {list(spec.mean)} / {list(spec.std)}")
        if list(m.image_size) != [img_size, img_size]:
            raise SystemExit(f"error: {synth_dir} holds {m.image_size[0]}x{m.image_size[1]} images but "
                             f"--img_size is {img_size}; synthesize at this size")
        n_total = max(calib_size, repq_calib_size)
        if len(self.synth) < n_total:
            raise SystemExit(f"error: calibration needs {n_total} images but {synth_dir} has "
                             f"{len(self.synth)}; lower --calib_size / --repq_calib_size or synthesize more")
        self.indices = list(range(n_total))
        self.repq_indices = self.indices[:repq_calib_size]
        per_rank = calib_size // world_size
        self.qwt_indices = self.indices[:calib_size][rank * per_rank:(rank + 1) * per_rank]

    def repq_images(self, workers: int = 0) -> torch.Tensor:
        """``(repq_calib_size, 3, H, W)``."""
        return self.synth.images(self.repq_indices)

    def qwt_batches(self, batch_size: int, workers: int = 0) -> list[torch.Tensor]:
        """This rank's QwT calibration images as batches ``(≤batch_size, 3, H, W)``."""
        return list(self.synth.batches(batch_size, self.qwt_indices))
