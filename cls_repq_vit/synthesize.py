"""Synthesize a data-free calibration set for an ImageNet-style classifier (no real images).

    python -m cls_repq_vit.synthesize --model deit_small --num-images 512 --out synth/deit_small
    torchrun --nproc_per_node=4 -m cls_repq_vit.synthesize --model swin_tiny --num-images 512 --out DIR

Class-conditional model inversion: image ``i`` is pushed towards class ``(seed + i) mod C``
(balanced classes) with cross-entropy, plus the patch-similarity entropy prior (PSAQ-ViT) for
ViT/DeiT/Swin or BatchNorm statistics matching (DeepInversion) for ResNet, an optional TV prior,
clamped to the valid pixel range. The folder (shards + ``manifest.json``) is then used with
``--calib_source synthetic --synth_dir DIR`` of the classification scripts. Reruns resume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qwt_core.inversion import (BNStatsPrior, InversionConfig, PatchSimilarityPrior, batch_seed,
                                explicit_attention, frozen, init_noise, invert, pixel_bounds)

from .models import MODELS, ModelSpec, get_spec

#: per-family prior defaults: (pse_weight, bn_weight, tv_weight)
FAMILY_PRIORS = {"vit": (1.0, 0.0, 0.0), "swin": (1.0, 0.0, 0.0), "resnet": (0.0, 0.05, 1e-4)}


@dataclass
class ClsSynthConfig:
    """What defines a classification synthetic set (stored as the manifest's ``hparams``)."""

    img_size: int = 224
    batch_size: int = 64
    iterations: int = 500
    lr: float = 0.2
    warmup: int = 25
    ce_weight: float = 1.0
    pse_weight: float = 1.0
    bn_weight: float = 0.0
    tv_weight: float = 0.0
    clamp: bool = True
    pse_drop_first_token: bool = True

    def inversion(self) -> InversionConfig:
        return InversionConfig(iterations=self.iterations, lr=self.lr, betas=(0.5, 0.9), warmup=self.warmup,
                               task_weight=self.ce_weight, pse_weight=self.pse_weight, bn_weight=self.bn_weight,
                               tv_weight=self.tv_weight, clamp=self.clamp,
                               pse_drop_first_token=self.pse_drop_first_token)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_class(index: int, seed: int, num_classes: int) -> int:
    """Class of synthetic image ``index``: ``(seed + index) mod num_classes`` (balanced, rank-independent)."""
    return (int(seed) + int(index)) % int(num_classes)


class ClassificationSynthesizer:
    """Makes one generation batch for :func:`qwt_core.inversion.synthesize_batches`.

    Image ``i`` starts from noise seeded with ``seed + i``; the batch's global RNG is seeded from its
    first index, so a batch is identical whichever process makes it.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, cfg: ClsSynthConfig, seed: int,
                 progress: bool = True) -> None:
        self.model, self.spec, self.cfg, self.seed, self.progress = model, spec, cfg, seed, progress
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        if self.num_classes < 1:
            raise ValueError(f"{type(model).__name__} has no classifier head (num_classes = 0)")
        self.bounds = pixel_bounds(spec.mean, spec.std, 1.0)
        self.device = next(model.parameters()).device
        self.seconds_per_iteration: list[float] = []
        self.last_history: list[dict[str, float]] = []

    def make_batch(self, batch: int, indices: list[int]) -> tuple[torch.Tensor, list[int], list[dict]]:
        cfg, size = self.cfg, self.cfg.img_size
        torch.manual_seed(batch_seed(self.seed, indices))
        labels = [target_class(i, self.seed, self.num_classes) for i in indices]
        y = torch.tensor(labels, device=self.device)
        x0 = init_noise(indices, (3, size, size), self.seed, self.device)
        icfg = cfg.inversion()

        def ce(x: torch.Tensor, it: int) -> torch.Tensor:
            return F.cross_entropy(self.model(x), y)

        with frozen(self.model), explicit_attention(self.model):
            priors = []
            if icfg.pse_weight > 0:
                priors.append(PatchSimilarityPrior(self.model, icfg.pse_drop_first_token, icfg.pse_grid,
                                                   icfg.pse_bandwidth))
            if icfg.bn_weight > 0:
                priors.append(BNStatsPrior(self.model))
            try:
                res = invert(x0, ce, icfg, priors, bounds=self.bounds, progress=self.progress,
                             desc=f"images (batch {batch})")
            finally:
                for p in priors:
                    p.remove()
        self.seconds_per_iteration.append(res.seconds / max(1, len(res.history)))
        self.last_history = res.history
        metas = [{"index": int(i), "target": c} for i, c in zip(indices, labels)]
        return res.images.cpu(), labels, metas


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser

    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="NAME", help="one of: " + ", ".join(MODELS))
    p.add_argument("--checkpoint", default=None, help="teacher weights (default pretrained_weights/, then timm hub)")
    p.add_argument("--random-init", "--random_init", dest="random_init", action="store_true",
                   help="random weights (testing only)")
    p.add_argument("--model_kwargs", "--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model arguments (as for the quantization scripts)")
    p.add_argument("--img_size", "--img-size", dest="img_size", type=int, default=None,
                   help="resolution (default: model_kwargs img_size, else 224)")
    p.add_argument("--num-images", "--num_images", dest="num_images", type=int, required=True,
                   help="images to synthesize (all processes together)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=500, help="image updates per batch (default 500)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5%%)")
    p.add_argument("--lr", type=float, default=0.2, help="Adam learning rate on the pixels")
    p.add_argument("--ce-weight", dest="ce_weight", type=float, default=1.0)
    p.add_argument("--pse-weight", dest="pse_weight", type=float, default=None,
                   help="patch-similarity entropy weight (default 1 for ViT/DeiT/Swin, 0 for ResNet)")
    p.add_argument("--bn-weight", dest="bn_weight", type=float, default=None,
                   help="BatchNorm statistics weight (default 0.05 for ResNet, unavailable otherwise)")
    p.add_argument("--tv-weight", dest="tv_weight", type=float, default=None,
                   help="total-variation weight (default 0 for transformers, 1e-4 for ResNet)")
    p.add_argument("--no-clamp", dest="clamp", action="store_false", help="do not clamp to the pixel range")
    p.add_argument("--keep-first-token", dest="drop_first_token", action="store_false",
                   help="PSE: keep token 0 (the CLS token of a ViT is dropped by default)")
    p.add_argument("--seed", type=int, default=0, help="base seed (image i uses seed + i)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace, spec: ModelSpec) -> ClsSynthConfig:
    """Validated :class:`ClsSynthConfig`; one-line SystemExit on bad values."""
    pse, bn, tv = FAMILY_PRIORS[spec.family]
    pse = pse if args.pse_weight is None else args.pse_weight
    bn = bn if args.bn_weight is None else args.bn_weight
    tv = tv if args.tv_weight is None else args.tv_weight
    if spec.family == "resnet" and pse > 0:
        raise SystemExit(f"error: --pse-weight needs attention blocks; {args.model} is a ResNet (use --bn-weight)")
    if spec.family != "resnet" and bn > 0:
        raise SystemExit(f"error: --bn-weight needs BatchNorm layers; {args.model} has none (use --pse-weight)")
    for name, v in (("--num-images", args.num_images), ("--batch-size", args.batch_size),
                    ("--iterations", args.iterations)):
        if v < 1:
            raise SystemExit(f"error: {name} must be at least 1")
    for name, v in (("--pse-weight", pse), ("--bn-weight", bn), ("--tv-weight", tv), ("--ce-weight", args.ce_weight)):
        if v < 0:
            raise SystemExit(f"error: {name} must be >= 0")
    if args.lr <= 0:
        raise SystemExit("error: --lr must be > 0")
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * args.iterations))
    if not 0 <= warmup <= args.iterations:
        raise SystemExit(f"error: --warmup must be between 0 and --iterations ({args.iterations})")
    return ClsSynthConfig(img_size=args.img_size, batch_size=args.batch_size, iterations=args.iterations,
                          lr=args.lr, warmup=warmup, ce_weight=args.ce_weight, pse_weight=pse, bn_weight=bn,
                          tv_weight=tv, clamp=args.clamp, pse_drop_first_token=args.drop_first_token)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse ``argv`` and synthesize; returns a summary (also printed by rank 0)."""
    import torch.distributed as dist

    from qwt_core.distributed import is_dist
    from qwt_core.inversion import synthesize_batches
    from qwt_core.synth_io import SynthManifest, SynthSetError, file_sha256, prepare_folder, state_dict_sha256

    from .cli import _parse_kwargs
    from .distributed import cleanup, setup

    args = build_parser().parse_args(argv)
    spec = get_spec(args.model)
    if args.checkpoint is not None and args.random_init:
        raise SystemExit("error: --checkpoint and --random-init exclude each other")
    args.model_kwargs = _parse_kwargs(args.model_kwargs)
    if args.img_size is None:
        size = args.model_kwargs.get("img_size", spec.img_size)
        args.img_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    scfg = config_from_args(args, spec)
    rank, world, device = setup(args.device, args.local_rank)
    try:
        torch.manual_seed(args.seed)
        model, source = spec.build(args.checkpoint, pretrained=not args.random_init, model_kwargs=args.model_kwargs)
        model.eval()
        teacher = {"model": args.model, "model_kwargs": args.model_kwargs, "weights": source,
                   "checkpoint": args.checkpoint,
                   "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
                   "weights_sha256": state_dict_sha256(model)}
        model.to(device)
        manifest = SynthManifest(task="classification", seed=args.seed, hparams=scfg.to_dict(),
                                 label_source="uniform_classes", teacher=teacher, mean=spec.mean, std=spec.std,
                                 image_size=[scfg.img_size] * 2, num_images=args.num_images,
                                 batch_size=scfg.batch_size)
        try:
            prepare_folder(args.out, manifest, rank)
        except SynthSetError as exc:
            raise SystemExit(f"error: {exc}") from None
        synth = ClassificationSynthesizer(model, spec, scfg, args.seed,
                                          progress=not args.no_progress and rank == 0)
        t0 = time.perf_counter()
        manifest = synthesize_batches(args.out, manifest, synth.make_batch, rank, world,
                                      progress=not args.no_progress, barrier=dist.barrier if is_dist() else None)
        seconds = time.perf_counter() - t0
        made = len(synth.seconds_per_iteration)
        summary = {"out": args.out, "model": args.model, "weights": source, "rank": rank, "world_size": world,
                   "device": str(device), "seconds": seconds, "batches_made": made,
                   "seconds_per_iteration": (sum(synth.seconds_per_iteration) / made) if made else None,
                   "complete": manifest.complete if rank == 0 else None}
        if rank == 0:
            print(json.dumps(summary, indent=2), flush=True)
        return summary
    finally:
        cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
