"""A synthetic shapes-detection set: coloured shapes on textured backgrounds, with boxes and masks.

Shared by the detection benchmarks (YOLO, torchvision Mask R-CNN). Small detectors trained on it
reach a mAP clearly above chance within minutes on a CPU, so quantization damage is visible.

    images = make_shapes(n=64, size=160, seed=0)      # list[ShapesImage]
    yaml_path = write_yolo_dataset("data/shapes", n_train=512, n_val=128)
    img_dir, ann = write_coco_dataset("data/shapes_coco", "val", n=128)

Classes: ``CLASSES`` (circle, square, triangle, cross). Every image is drawn from its own seed
(``seed * 1_000_003 + index``), so any subset is reproducible on its own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross")


@dataclass
class ShapesImage:
    """One image: ``image`` (H, W, 3) uint8, ``boxes`` (N, 4) float32 xyxy pixels, ``labels`` (N,)
    int64 in ``range(len(CLASSES))``, ``masks`` (N, H, W) bool (visible part of each instance)."""
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random texture: a few low-frequency sinusoids plus fine noise, (H, W, 3) float in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(3):
        fx, fy = rng.uniform(1, 6, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.05, 0.15, size=3).astype(np.float32)
        img += np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None] * amp
    img += rng.normal(0, 0.04, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _shape_mask(kind: int, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if kind == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if kind == 1:  # square
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    if kind == 2:  # triangle (equilateral, circumradius r)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 2 + k * 2 * np.pi / 3
            nx, ny = np.cos(a), np.sin(a)
            inside &= (dx * nx + dy * ny) <= r * 0.5
        return inside
    # cross: two bars
    w = r * 0.3
    return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))


def make_image(seed: int, size: int = 160, max_objects: int = 4) -> ShapesImage:
    """One image drawn from ``seed``: 1..max_objects shapes, later ones occlude earlier ones."""
    rng = np.random.default_rng(seed)
    img = _background(rng, size)
    n = int(rng.integers(1, max_objects + 1))
    kinds, masks = [], []
    for _ in range(n):
        kind = int(rng.integers(0, len(CLASSES)))
        r = float(rng.uniform(0.08, 0.2) * size)
        cx, cy = rng.uniform(r, size - r, size=2)
        m = _shape_mask(kind, size, float(cx), float(cy), r, float(rng.uniform(0, np.pi)))
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        # keep a visible contrast against the local background
        if np.abs(img[m].mean(0) - colour).sum() < 0.6:
            colour = 1.0 - colour
        img[m] = colour
        for prev in masks:
            prev &= ~m
        kinds.append(kind)
        masks.append(m)
    keep = [i for i, m in enumerate(masks) if m.sum() >= 30]
    masks_a = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), bool)
    boxes = []
    for m in masks_a:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return ShapesImage(image=(img * 255).round().astype(np.uint8),
                       boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                       labels=np.asarray([kinds[i] for i in keep], np.int64),
                       masks=masks_a)


def make_shapes(n: int, size: int = 160, seed: int = 0, max_objects: int = 4) -> list[ShapesImage]:
    """``n`` images; image ``i`` from seed ``seed * 1_000_003 + i``."""
    return [make_image(seed * 1_000_003 + i, size, max_objects) for i in range(n)]


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(image).save(path)


def write_yolo_dataset(root: str, n_train: int = 512, n_val: int = 128, size: int = 160,
                       seed: int = 0) -> str:
    """Write an Ultralytics-format dataset (``images/{train,val}``, ``labels/{train,val}`` with
    ``cls cx cy w h`` normalised) and ``data.yaml``; returns the yaml path. Val uses seed + 1."""
    root = os.path.abspath(root)
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
        for i, im in enumerate(make_shapes(n, size, s)):
            _save_png(os.path.join(root, "images", split, f"{i:06d}.png"), im.image)
            lines = []
            for (x0, y0, x1, y1), c in zip(im.boxes, im.labels):
                lines.append(f"{c} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                             f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
            with open(os.path.join(root, "labels", split, f"{i:06d}.txt"), "w") as f:
                f.write("\n".join(lines) + ("\n" if lines else ""))
    yaml_path = os.path.join(root, "data.yaml")
    with open(yaml_path, "w") as f:
        f.write(f"path: {root}\ntrain: images/train\nval: images/val\n")
        f.write("names:\n" + "".join(f"  {i}: {c}\n" for i, c in enumerate(CLASSES)))
    return yaml_path


def write_coco_dataset(root: str, split: str = "val", n: int = 128, size: int = 160, seed: int = 1,
                       images: Optional[list[ShapesImage]] = None) -> tuple[str, str]:
    """Write ``root/{split}/*.png`` and ``root/annotations/instances_{split}.json`` (COCO format,
    RLE masks via pycocotools, category ids 1..len(CLASSES)); returns (image dir, annotation path)."""
    from pycocotools import mask as mask_utils

    img_dir = os.path.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images = images if images is not None else make_shapes(n, size, seed)
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}
    ann_id = 1
    for i, im in enumerate(images):
        name = f"{i:06d}.png"
        _save_png(os.path.join(img_dir, name), im.image)
        h, w = im.image.shape[:2]
        coco["images"].append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for box, c, m in zip(im.boxes, im.labels, im.masks):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            coco["annotations"].append({"id": ann_id, "image_id": i + 1, "category_id": int(c) + 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()),
                                        "segmentation": rle, "iscrowd": 0})
            ann_id += 1
    ann_path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(ann_path, "w") as f:
        json.dump(coco, f)
    return img_dir, ann_path
