"""mAP with Ultralytics' own validator, and calibration images read from a dataset yaml."""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import tempfile
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from . import __name__ as _pkg  # noqa: F401  (YOLO_OFFLINE before Ultralytics is imported)

IMG_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset yaml that cannot be used (missing, unreadable, no images in the split)."""


def check_dataset(data: str) -> dict[str, Any]:
    """Ultralytics' dataset dict for ``data`` (a local yaml), without any download.

    Raises:
        DatasetError: one line, for a missing yaml or one whose splits do not exist.
    """
    if not str(data).endswith((".yaml", ".yml")):
        raise DatasetError(f"--data {data!r}: give a dataset .yaml")
    if not os.path.isfile(data):
        raise DatasetError(f"--data {data!r}: no such file")
    from ultralytics.data.utils import check_det_dataset
    try:
        with _quiet():
            return check_det_dataset(str(data), autodownload=False)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise DatasetError(f"--data {data!r}: {msg[0] if msg else type(e).__name__}") from None


def list_images(split: Any) -> list[str]:
    """Image files of a split (a folder, a ``.txt`` list or a list of those), sorted."""
    paths: list[str] = []
    for p in (split if isinstance(split, (list, tuple)) else [split]):
        p = str(p)
        if os.path.isdir(p):
            paths += [f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                      if f.lower().endswith(IMG_SUFFIXES)]
        elif p.endswith(".txt") and os.path.isfile(p):
            root = os.path.dirname(p)
            with open(p) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        paths.append(line if os.path.isabs(line) else os.path.join(root, line))
    return sorted(paths)


def load_images(paths: list[str], imgsz: int) -> torch.Tensor:
    """Images letterboxed to ``imgsz`` × ``imgsz`` as the validator does (grey 114 padding), RGB,
    ``(N, 3, imgsz, imgsz)`` float in [0, 1]."""
    import cv2
    from ultralytics.data.augment import LetterBox
    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False, scale_fill=False, scaleup=False, stride=32)
    out = []
    for p in paths:
        im = cv2.imread(p)
        if im is None:
            raise DatasetError(f"cannot read image {p!r}")
        im = lb(image=im)
        out.append(torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))))
    return torch.stack(out).float() / 255.0


def calibration_images(data: dict[str, Any], n: int, imgsz: int, seed: int = 0,
                       split: str = "train") -> torch.Tensor:
    """``n`` images drawn (seeded permutation) from the ``split`` of a checked dataset dict;
    ``(n, 3, imgsz, imgsz)`` in [0, 1]. Raises :class:`DatasetError` if the split has fewer."""
    paths = list_images(data.get(split))
    if len(paths) < n:
        raise DatasetError(f"the {split!r} split has {len(paths)} images, {n} calibration images asked")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(paths), generator=g)[:n].tolist()
    return load_images([paths[i] for i in pick], imgsz)


def validate(model: nn.Module, data: str, imgsz: int = 640, batch: int = 16, conf: float = 0.001,
             iou: float = 0.7, device: str = "cpu", split: str = "val",
             save_dir: Optional[str] = None, verbose: bool = False, progress: bool = False) -> dict[str, float]:
    """mAP50-95 / mAP50 of ``model`` on the ``split`` of the dataset yaml ``data``, computed by
    Ultralytics' ``DetectionValidator`` (its dataloader, letterbox, NMS and metrics).

    ``model``: an Ultralytics ``DetectionModel`` (quantized ones carry a no-op ``fuse``, so the
    validator measures them as calibrated) or any module with ``names`` / ``stride`` returning the
    Ultralytics output layout (:class:`yolo_qwt.models.V5View`). ``progress`` shows the validator's
    own progress bar and summary line; ``verbose`` adds its per-class table. Returns
    ``{"map50_95", "map50", "precision", "recall", "images"}`` (mAPs in [0, 1]).
    """
    from ultralytics.models.yolo.detect import DetectionValidator
    tmp = None
    if save_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="yolo_qwt_val_")
        save_dir = tmp.name
    args = dict(data=data, imgsz=imgsz, batch=batch, conf=conf, iou=iou, device=device, split=split,
                plots=False, save_json=False, save_txt=False, verbose=verbose, workers=0, rect=False,
                channels_last=False, mode="val", task="detect")
    threads = torch.get_num_threads()   # Ultralytics' device selection resets it to min(8, cores - 1)
    try:
        from pathlib import Path
        v = DetectionValidator(args=args, save_dir=Path(save_dir))
        was_training = model.training
        with (contextlib.nullcontext() if (verbose or progress) else _quiet()):
            v(model=model)
        model.train(was_training)
        box = v.metrics.box
        return {"map50_95": float(box.map), "map50": float(box.map50), "precision": float(box.mp),
                "recall": float(box.mr), "images": int(v.seen)}
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Ultralytics' logger and progress bars."""
    lg = logging.getLogger("ultralytics")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        lg.setLevel(level)
