"""`make demo`: FP → RepQ-ViT → +QwT on a built-in dataset, no download needed.

1. scikit-learn's digits (1797 8×8 images, 10 classes) are upsampled to 32×32 RGB and written as an
   ImageFolder (``train/`` 70 %, ``val/`` 30 %, stratified, seeded) under ``outputs/demo/digits``;
2. a small timm DeiT (the real ``VisionTransformer``: 32×32 input, patch 4, dim 64, depth 4) is trained on CPU
   for a few epochs and cached in ``outputs/demo/`` (a second run skips training);
3. the classification command line (``cls_repq_vit``) runs FP → RepQ-ViT → +QwT at W4A4 and W6A6
   on it, through ``--checkpoint``, exactly as for ImageNet models, and a summary table is printed.

Usage: ``python scripts/demo.py [--epochs N] [--retrain] [--no-w6a6]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cls_repq_vit import cli  # noqa: E402
from cls_repq_vit.data import eval_transform, image_folder  # noqa: E402
from cls_repq_vit.models import get_spec  # noqa: E402

OUT = os.path.join(ROOT, "outputs", "demo")
DATA = os.path.join(OUT, "digits")
MODEL_NAME = "deit_tiny"
#: timm.create_model overrides for the demo DeiT (same names on the command line).
MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2,
                "num_classes": 10}
SEED = 0


def write_digits_imagefolder(root: str = DATA, size: int = 32, seed: int = SEED) -> dict[str, int]:
    """Write digits as ``root/{train,val}/{0..9}/NNNN.png`` (size×size, 3 channels); returns counts."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    marker = os.path.join(root, "done.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=0.3, random_state=seed, stratify=digits.target)
    counts = {}
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            d = os.path.join(root, split, str(int(digits.target[i])))
            os.makedirs(d, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(os.path.join(d, f"{i:04d}.png"))
        counts[split] = int(len(ids))
    with open(marker, "w") as f:
        json.dump(counts, f)
    return counts


def _tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as ``(N, 3, 32, 32)`` images (the model's eval preprocessing) and ``(N,)`` labels."""
    ds = image_folder(DATA, split, eval_transform(get_spec(MODEL_NAME), MODEL_KWARGS["img_size"]))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (pad + crop), per batch."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    return x[:, :, 2 + dy:2 + dy + 32, 2 + dx:2 + dx + 32]


def train_demo_model(path: str, epochs: int, batch_size: int = 64, lr: float = 3e-3) -> dict:
    """Train the demo DeiT on ``train/`` and save its state dict to ``path``; returns a summary."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = get_spec(MODEL_NAME).create(MODEL_KWARGS)
    x_train, y_train = _tensors("train")
    x_val, y_val = _tensors("val")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for k in range(0, len(perm), batch_size):
            idx = perm[k:k + batch_size]
            loss = F.cross_entropy(model(_augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 and epoch + 1 != epochs:
            continue
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(-1) == y_val).float().mean().item() * 100
        print(f"  epoch {epoch + 1:2d}/{epochs}  loss {total / len(x_train):.3f}  val top-1 {acc:5.2f}  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    torch.save({"model": model.state_dict(), "model_kwargs": MODEL_KWARGS, "epochs": epochs}, path)
    return {"val_top1": acc, "seconds": time.perf_counter() - t0}


def run_cli(checkpoint: str, w_bit: int, a_bit: int, eval_fp: bool) -> dict:
    """The classification pipeline on the demo data, through the same entry point as ImageNet runs."""
    argv = ["--model", MODEL_NAME, "--data_dir", DATA, "--checkpoint", checkpoint,
            "--w_bit", str(w_bit), "--a_bit", str(a_bit), "--calib_size", "512", "--batch_size", "128",
            "--workers", "0", "--device", "cpu", "--seed", str(SEED), "--no_progress",
            "--output", os.path.join(OUT, f"results_w{w_bit}a{a_bit}.json"),
            "--model_kwargs", *[f"{k}={v}" for k, v in MODEL_KWARGS.items()]]
    if eval_fp:
        argv.append("--eval_fp")
    print(f"\n$ python cls_repq_vit/qwt_vit_and_deit.py {' '.join(argv)}", flush=True)
    return cli.main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the demo DeiT")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached demo model")
    parser.add_argument("--no-w6a6", dest="w6a6", action="store_false", help="only W4A4")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    os.makedirs(OUT, exist_ok=True)
    counts = write_digits_imagefolder()
    print(f"digits ImageFolder at {DATA}: {counts['train']} train / {counts['val']} val images, 10 classes")
    ckpt = os.path.join(OUT, "deit_digits.pth")
    cached = os.path.isfile(ckpt) and not args.retrain
    if cached:
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
        cached = meta.get("model_kwargs") == MODEL_KWARGS and meta.get("epochs") == args.epochs
    if cached:
        print(f"using the cached demo model {ckpt} (--retrain to train again)")
    else:
        print(f"training a timm DeiT ({MODEL_KWARGS}) on CPU for {args.epochs} epochs ...", flush=True)
        train_demo_model(ckpt, args.epochs)

    results = {(4, 4): run_cli(ckpt, 4, 4, eval_fp=True)}
    if args.w6a6:
        results[(6, 6)] = run_cli(ckpt, 6, 6, eval_fp=False)

    fp = results[(4, 4)]["accuracy"]["fp32"]["top1"]
    print("\n=== demo summary: timm DeiT on digits (val top-1 %, "
          f"{results[(4, 4)]['accuracy']['fp32']['count']} images) ===")
    print(f"{'setting':<8} {'FP32':>7} {'RepQ-ViT':>9} {'+QwT':>7} {'QwT gain':>9}")
    for (w, a), res in results.items():
        base, qwt = res["accuracy"]["baseline"]["top1"], res["accuracy"]["qwt"]["top1"]
        print(f"W{w}A{a:<6} {fp:7.2f} {base:9.2f} {qwt:7.2f} {qwt - base:+9.2f}")
    print(f"(demo took {time.perf_counter() - t0:.0f}s; results JSON in {OUT})")


if __name__ == "__main__":
    main()
