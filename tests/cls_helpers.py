"""Shared pieces of the classification-script tests: a small ImageFolder and tiny model settings."""
import os

import numpy as np

N_CLASSES = 3
TRAIN_PER_CLASS = 12   # 36 train images
VAL_PER_CLASS = 7      # 21 val images: not divisible by 2 (distributed test)

#: --model_kwargs for tiny random-init versions of the real timm architectures.
TINY = {
    "deit_small": ["img_size=32", "patch_size=8", "embed_dim=48", "depth=2", "num_heads=3",
                   f"num_classes={N_CLASSES}"],
    "deit_tiny_distilled": ["img_size=32", "patch_size=8", "embed_dim=48", "depth=2", "num_heads=3",
                            f"num_classes={N_CLASSES}"],
    "vit_small": ["img_size=32", "patch_size=8", "embed_dim=48", "depth=2", "num_heads=3",
                  f"num_classes={N_CLASSES}"],
    "swin_tiny": ["img_size=56", "embed_dim=24", "depths=(2,2)", "num_heads=(2,4)",
                  f"num_classes={N_CLASSES}"],
    "resnet18": ["zero_init_last=False", f"num_classes={N_CLASSES}"],
}
IMG_SIZE = {"resnet18": ["--img_size", "64"]}

SCRIPT = {"deit_small": "qwt_vit_and_deit.py", "deit_tiny_distilled": "qwt_vit_and_deit.py",
          "vit_small": "qwt_vit_and_deit.py", "swin_tiny": "qwt_swin.py", "resnet18": "qwt_resnet.py"}


def make_image_folder(root: str, seed: int = 0) -> str:
    """``root/{train,val}/c{k}/*.png``: 40×48 RGB images whose brightness depends on the class.

    In val, every third image of a class is drawn with the next class's brightness, so a brightness
    classifier gets exactly 2/3 of them right (a non-trivial top-1 for the distributed test).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(N_CLASSES):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                level = (c + 1) % N_CLASSES if (split == "val" and i % 3 == 0) else c
                pixels = rng.integers(0, 40, size=(40, 48, 3)) + 30 + 80 * level
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(d, f"{i:03d}.png"))
    return root


def base_argv(model: str, data_dir: str, out_json: str) -> list[str]:
    """A fast command line for the tiny model ``model`` on the test ImageFolder."""
    return ["--model", model, "--data_dir", data_dir, "--random-init", "--calib_size", "24",
            "--repq_calib_size", "8", "--batch_size", "8", "--workers", "0", "--device", "cpu",
            "--no_progress", "--output", out_json, *IMG_SIZE.get(model, []),
            "--model_kwargs", *TINY[model]]
