"""ImageNet validation folder (one WordNet-id folder per class) → dataset and class names."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from torchvision.datasets import ImageFolder

from .errors import InputError
from .imagenet_zeroshot_data import IMAGENET_CLASSNAMES, IMAGENET_WNIDS

WNID_TO_INDEX = {w: i for i, w in enumerate(IMAGENET_WNIDS)}


def check_val_dir(root: Optional[str]) -> str:
    """Raise :class:`InputError` unless ``root`` names an existing directory; returns it."""
    if not root:
        raise InputError("--imagenet-val is required: point it at the ImageNet val folder "
                         "(one n######## folder of images per class)")
    if not os.path.isdir(root):
        raise InputError(f"--imagenet-val {root}: no such directory; point it at the ImageNet val folder "
                         "(one n######## folder of images per class)")
    return root


def load_imagenet_val(root: Optional[str], transform: Callable[[Any], Any],
                      restrict_to_folders: bool = False) -> tuple[ImageFolder, list[str]]:
    """ImageFolder over ``root`` plus the class names its labels refer to.

    Folders are read in sorted order (like ``ImageFolder``). By default labels are the standard
    ImageNet-1k indices (sorted WordNet ids) and the class names are all 1000, so a folder with every
    class gives the usual 1000-way zero-shot problem. With ``restrict_to_folders`` the labels are the
    folder positions and the class names only those of the folders present (small test folders).
    """
    check_val_dir(root)
    try:
        dataset = ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(f"--imagenet-val {root}: {e}") from None
    unknown = [c for c in dataset.classes if c not in WNID_TO_INDEX]
    if unknown:
        raise InputError(f"--imagenet-val {root}: {len(unknown)} folders are not ImageNet-1k WordNet ids "
                         f"(e.g. {unknown[0]!r}); use the val layout with n######## class folders")
    if restrict_to_folders:
        return dataset, [IMAGENET_CLASSNAMES[WNID_TO_INDEX[c]] for c in dataset.classes]
    remap = [WNID_TO_INDEX[c] for c in dataset.classes]
    dataset.samples = [(path, remap[t]) for path, t in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    return dataset, list(IMAGENET_CLASSNAMES)
