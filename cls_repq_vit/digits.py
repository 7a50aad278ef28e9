"""The digits demo's data and model, shared by ``scripts/demo.py`` and the data-free benchmark.

scikit-learn's digits (1797 8×8 images, 10 classes) upsampled to 16×16 RGB as an ImageFolder
(``train/`` 70 %, ``val/`` 30 %, stratified, fixed split) and a small timm DeiT trained on them
(16×16 input, patch 4, dim 64, depth 4). The models trained with the default recipe for seeds 0-2
ship in ``scripts/demo_models/``; :func:`prepare_model` uses them, a cached one, or trains.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import time
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "outputs", "demo")
RESULTS_JSON = os.path.join(OUT, "demo_results.json")
SHIPPED_MODELS = os.path.join(ROOT, "scripts", "demo_models")
FIGURE = os.path.join(OUT, "demo.png")
MODEL_NAME = "deit_tiny"
IMG_SIZE = 16
#: timm.create_model overrides for the demo DeiT (same names on the command line).
MODEL_KWARGS = {"img_size": IMG_SIZE, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
                "num_classes": 10}
#: training recipe (part of the cache key of the trained models).
TRAIN = {"epochs": 30, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "warmup": 0.15, "shift": 1}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_BITS = ("W4A4", "W3A3", "W2A4", "W2A3")
SPLIT_SEED = 0  # the train/val split is the same for every seed
CALIB_SIZE, REPQ_CALIB_SIZE = 512, 32
THREADS = 1  # per process: fixed, so results do not depend on the machine's core count
METHODS = (("fp32", "FP32"), ("baseline", "RepQ-ViT"), ("qwt", "RepQ-ViT + QwT"))


def data_dir(out: str = OUT) -> str:
    return os.path.join(out, f"digits{IMG_SIZE}")


def write_digits_imagefolder(root: str, size: int = IMG_SIZE) -> dict[str, int]:
    """Write digits as ``root/{train,val}/{0..9}/NNNN.png`` (size×size RGB); returns the counts.

    Idempotent: a ``done.json`` marker with the same size skips the work."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    marker = os.path.join(root, "done.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("size") == size:
            return done
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=0.3, random_state=SPLIT_SEED, stratify=digits.target)
    counts: dict[str, int] = {"size": size}
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            d = os.path.join(root, split, str(int(digits.target[i])))
            os.makedirs(d, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(os.path.join(d, f"{i:04d}.png"))
        counts[split] = int(len(ids))
    from qwt_core.model_io import atomic_write_json

    atomic_write_json(marker, counts)
    return counts


def _tensors(split: str, out: str):
    """The split as ``(N, 3, S, S)`` images (the model's eval preprocessing) and ``(N,)`` labels."""
    import torch

    from cls_repq_vit.data import eval_transform, image_folder
    from cls_repq_vit.models import get_spec

    ds = image_folder(data_dir(out), split, eval_transform(get_spec(MODEL_NAME), IMG_SIZE))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


@contextlib.contextmanager
def deterministic(threads: int = THREADS):
    """``threads`` torch threads and deterministic algorithms inside the block; restored after."""
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def train_demo_model(path: str, seed: int, train: dict, out: str = OUT) -> dict[str, Any]:
    """Train the demo DeiT with ``seed`` on ``train/`` and save ``{"model": state_dict, ...}`` to ``path``.

    Returns ``{"val_top1", "seconds"}``."""
    import torch
    import torch.nn.functional as F

    from cls_repq_vit.models import get_spec

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = get_spec(MODEL_NAME).create(MODEL_KWARGS)
    x_train, y_train = _tensors("train", out)
    x_val, y_val = _tensors("val", out)
    bs, s = train["batch_size"], train["shift"]
    opt = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    steps = train["epochs"] * math.ceil(len(x_train) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train["lr"], total_steps=steps,
                                                pct_start=train["warmup"])
    t0 = time.perf_counter()
    for _ in range(train["epochs"]):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for k in range(0, len(perm), bs):
            idx = perm[k:k + bs]
            dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=g))  # random shift ≤ s px
            x = F.pad(x_train[idx], (s, s, s, s), mode="replicate")[:, :, s + dy:s + dy + IMG_SIZE,
                                                                       s + dx:s + dx + IMG_SIZE]
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(-1) == y_val).float().mean().item() * 100
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"model": model.state_dict(), "model_kwargs": MODEL_KWARGS, "train": train, "seed": seed}, tmp)
    os.replace(tmp, path)
    return {"val_top1": acc, "seconds": time.perf_counter() - t0}


def shipped_model(seed: int) -> str:
    """The model this repository ships for ``seed`` (``scripts/demo_models/``): trained by
    :func:`train_demo_model` with the default recipe, so that ``make demo`` needs no training and
    its numbers do not depend on the machine's training arithmetic. Used only if its recorded
    recipe equals the requested one."""
    return os.path.join(SHIPPED_MODELS, f"deit_digits_seed{seed}.pth")


def _cached(path: str, seed: int, train: dict) -> bool:
    import torch

    if not os.path.isfile(path):
        return False
    meta = torch.load(path, map_location="cpu", weights_only=True)
    return meta.get("model_kwargs") == MODEL_KWARGS and meta.get("train") == train and meta.get("seed") == seed


def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"[Ww](\d)[Aa](\d)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bit setting {text!r} must look like W4A4")
    return int(m.group(1)), int(m.group(2))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; 0 for one value), rounded to 2 decimals."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 2), "std": round(std, 2), "per_seed": [round(v, 2) for v in values]}


def is_cached(path: str, seed: int, train: dict) -> bool:
    """True if ``path`` holds a demo model trained with ``seed`` and ``train``."""
    return _cached(path, seed, train)


def prepare_model(seed: int, folder: str = OUT, train: Optional[dict] = None,
                  retrain: bool = False) -> tuple[str, dict[str, Any]]:
    """The checkpoint for ``seed`` under ``folder/models/`` — cached, copied from the shipped models,
    or trained now (``retrain`` always trains) — and what was done (``{"cached": ..., ...}``)."""
    train = dict(train or TRAIN)
    os.makedirs(os.path.join(folder, "models"), exist_ok=True)
    ckpt = os.path.join(folder, "models", f"deit_digits_seed{seed}.pth")
    shipped = shipped_model(seed)
    if not retrain and _cached(ckpt, seed, train):
        print(f"using the cached model {ckpt}", flush=True)
        return ckpt, {"cached": True}
    if not retrain and _cached(shipped, seed, train):
        shutil.copyfile(shipped, ckpt)
        print(f"using the model shipped as {shipped} (trained by this script with this recipe; "
              "--retrain trains it again)", flush=True)
        return ckpt, {"cached": True, "shipped": True}
    print(f"training {MODEL_KWARGS} with {train}, seed {seed}", flush=True)
    return ckpt, {"cached": False, **train_demo_model(ckpt, seed, train, folder)}
