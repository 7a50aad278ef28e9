"""ViT and DeiT (incl. distilled) on ImageNet: FP → baseline PTQ → +QwT.

    python cls_repq_vit/qwt_vit_and_deit.py --model NAME --data_dir /path/imagenet --w_bit 4 --a_bit 4
    torchrun --nproc_per_node=8 cls_repq_vit/qwt_vit_and_deit.py --model NAME --data_dir /path/imagenet

See ``--help`` and README.md.
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from cls_repq_vit.cli import main  # noqa: E402
from cls_repq_vit.models import FAMILY_MODELS  # noqa: E402

CHOICES = FAMILY_MODELS["vit"]

if __name__ == "__main__":
    main(sys.argv[1:], choices=CHOICES, description="QwT on top of PTQ: ViT and DeiT (incl. distilled)")
