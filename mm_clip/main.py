"""CLIP zero-shot ImageNet with RepQ-ViT post-training quantization and QwT compensation.

    python mm_clip/main.py --choice fp32_eval  --model ViT-B/32 --imagenet-val /data/imagenet/val
    python mm_clip/main.py --choice image_only --model ViT-B/32 --pretrained openai \
        --imagenet-val /data/imagenet/val --train-data '/data/cc3m/cc3m-train-{0000..0575}.tar' \
        --dataset-type webdataset --batch-size 32 --wq_params 6 --aq_params 6 --qwerty
    python mm_clip/main.py --choice all_quant ... --qwerty

``image_only`` quantizes the visual tower; ``all_quant`` both towers, and the zero-shot classifier
is then built by the quantized (and compensated) text tower. Calibration pairs are drawn uniformly
from all shards (``--iter`` batches of ``--batch-size``, 512 pairs by default); the first
``--repq-size`` (32) initialise the quantizers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.data import DataLoader

from mm_clip.errors import InputError
from mm_clip.imagenet_val import check_val_dir, load_imagenet_val
from mm_clip.imagenet_zeroshot_data import OPENAI_IMAGENET_TEMPLATES
from mm_clip.models import canonical_model_name, load_clip, register_model_config, resolve_pretrained
from mm_clip.ptq import PTQConfig, quantize_text, quantize_visual
from mm_clip.wds_calib import DEFAULT_INDEX_CACHE, expand_shards, sample_calibration_pairs
from mm_clip.zeroshot import build_zero_shot_classifier, evaluate_zero_shot
from qwt_core import validate_bits

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CALIB_SIZE = 512  # QwT's calibration set: 512 image-caption pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--choice", required=True, choices=["fp32_eval", "image_only", "all_quant"])
    p.add_argument("--model", default=None,
                   help="open_clip model (ViT-B-32) or OpenAI spelling (ViT-B/32); default ViT-B-32, or the "
                        "--model-config file's name")
    p.add_argument("--model-config", default=None, help="path to an open_clip model config json")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (e.g. openai), checkpoint path, or 'none' for random init; default: "
                        "pretrained_weights/{model}-openai.* or {model}.*, else the openai tag")
    p.add_argument("--weights-dir", default=os.path.join(REPO_ROOT, "pretrained_weights"))
    p.add_argument("--force-quick-gelu", action="store_true",
                   help="QuickGELU activations (OpenAI weights given as a checkpoint path)")
    p.add_argument("--imagenet-val", default=None, help="ImageNet val folder with WordNet-id class folders")
    p.add_argument("--restrict-classes", action="store_true",
                   help="zero-shot over the classes present in --imagenet-val only (default: all 1000)")
    p.add_argument("--train-data", default=None, help="webdataset shards, e.g. 'cc3m-train-{0000..0575}.tar'")
    p.add_argument("--dataset-type", default="webdataset", choices=["webdataset"])
    p.add_argument("--batch-size", type=int, default=32, help="calibration and evaluation batch size")
    p.add_argument("--workers", type=int, default=4, help="data loading workers / shard indexing threads")
    p.add_argument("--iter", type=int, default=None,
                   help=f"calibration batches (samples = iter x batch-size); default {DEFAULT_CALIB_SIZE} "
                        "samples")
    p.add_argument("--calib-size", type=int, default=None,
                   help=f"calibration samples when --iter is not given (default {DEFAULT_CALIB_SIZE})")
    p.add_argument("--repq-size", type=int, default=32, help="samples of the RepQ-ViT calibration batch")
    p.add_argument("--wq_params", type=int, default=6, help="weight bits")
    p.add_argument("--aq_params", type=int, default=6, help="activation bits")
    p.add_argument("--qwerty", action="store_true", help="apply QwT compensation")
    p.add_argument("--quant-attn-matmul", action="store_true",
                   help="also quantize q@k^T and attn@v (the reference keeps them fp32)")
    p.add_argument("--patch-embed-bits", type=int, default=None,
                   help="weight and input bits of the visual patch-embedding conv (default: as the blocks, "
                        "like the reference CLIP runs; 8 = the ViT/DeiT convention)")
    p.add_argument("--integer-zero-point", action="store_true",
                   help="round the reparameterized zero point (exact RepQ-ViT reparameterization)")
    p.add_argument("--start_block", type=int, default=0, help="QwT compensates blocks from this index on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--index-cache", default=DEFAULT_INDEX_CACHE,
                   help="directory caching the shard indexes ('none' to disable)")
    p.add_argument("--diagnostics", action="store_true",
                   help="measure per-block and embedding errors to FP on the calibration data")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _validate(args: argparse.Namespace) -> None:
    for flag, value in (("--wq_params", args.wq_params), ("--aq_params", args.aq_params),
                        ("--patch-embed-bits", args.patch_embed_bits)):
        if value is None:
            continue
        try:
            validate_bits(value, flag)
        except ValueError as e:
            raise InputError(str(e)) from None
    for flag, value in (("--batch-size", args.batch_size), ("--iter", args.iter),
                        ("--calib-size", args.calib_size), ("--repq-size", args.repq_size)):
        if value is not None and value <= 0:
            raise InputError(f"{flag}={value}: must be a positive integer")
    if args.workers < 0:
        raise InputError(f"--workers={args.workers}: must be >= 0")
    if args.start_block < 0:
        raise InputError(f"--start_block={args.start_block}: must be >= 0")
    if args.iter is not None and args.calib_size is not None:
        raise InputError("give either --iter (batches) or --calib-size (samples), not both")


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def calibration_size(args: argparse.Namespace) -> int:
    """Number of calibration pairs: ``iter × batch_size``, else ``--calib-size`` (default 512)."""
    if args.iter is not None:
        return args.iter * args.batch_size
    return args.calib_size if args.calib_size is not None else DEFAULT_CALIB_SIZE


def load_calibration(args: argparse.Namespace, preprocess: Callable[[Any], torch.Tensor],
                     tokenizer: Callable[[list[str]], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Draw the calibration pairs from all shards and preprocess them.

    Returns images ``(N, 3, H, W)``, caption tokens ``(N, L)`` and a summary for the results.
    """
    n = calibration_size(args)
    cache = None if str(args.index_cache).lower() == "none" else args.index_cache
    pairs, refs, total = sample_calibration_pairs(args.train_data, n, args.seed, args.workers, cache,
                                                  progress=not args.no_progress)
    images = torch.stack([preprocess(img) for img, _ in pairs])
    tokens = tokenizer([caption for _, caption in pairs])
    summary = {"samples": len(pairs), "available": total, "shards_used": len({r.shard for r in refs}),
               "repq_samples": min(args.repq_size, len(pairs)), "batch_size": args.batch_size}
    return images, tokens, summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one ``--choice`` and return the results dictionary (also printed / written as JSON)."""
    _validate(args)
    t_start = time.perf_counter()
    progress = not args.no_progress
    device = _device(args.device)
    seed_everything(args.seed)
    quantize = args.choice != "fp32_eval"
    if args.model_config:
        model_name = register_model_config(args.model_config)
        if args.model and canonical_model_name(args.model) != model_name:
            raise InputError(f"--model {args.model} and --model-config {args.model_config} disagree: "
                             "give only one")
    else:
        model_name = canonical_model_name(args.model or "ViT-B-32")
    # Cheap input checks before anything heavy.
    check_val_dir(args.imagenet_val)
    if quantize:
        expand_shards(args.train_data)
    source, is_openai = resolve_pretrained(model_name, args.pretrained, args.weights_dir)

    model, preprocess, tokenizer = load_clip(model_name, source, device,
                                             quick_gelu=is_openai or args.force_quick_gelu)
    dataset, classnames = load_imagenet_val(args.imagenet_val, preprocess, args.restrict_classes)
    results: dict[str, Any] = {
        "choice": args.choice, "model": model_name, "pretrained": source or "none (random init)",
        "device": str(device), "seed": args.seed, "num_classes": len(classnames),
        "templates": len(OPENAI_IMAGENET_TEMPLATES), "torch": torch.__version__}
    if quantize:
        results.update({"w_bits": args.wq_params, "a_bits": args.aq_params, "qwerty": args.qwerty,
                        "quant_attn_matmul": args.quant_attn_matmul, "start_block": args.start_block,
                        "patch_embed_bits": [args.patch_embed_bits] * 2 if args.patch_embed_bits
                        else [args.wq_params, args.aq_params]})
        images, tokens, results["calibration"] = load_calibration(args, preprocess, tokenizer)
        cfg = PTQConfig(args.wq_params, args.aq_params, qwerty=args.qwerty,
                        quant_attn_matmul=args.quant_attn_matmul, start_block=args.start_block,
                        repq_size=args.repq_size, integer_zero_point=args.integer_zero_point,
                        patch_embed_bits=args.patch_embed_bits, diagnostics=args.diagnostics,
                        progress=progress)
        _, results["visual"] = quantize_visual(model, images, args.batch_size, cfg, device)
        if args.choice == "all_quant":
            _, results["text"] = quantize_text(model, tokens, args.batch_size, cfg, device)

    classifier = build_zero_shot_classifier(model.encode_text, tokenizer, classnames,
                                            OPENAI_IMAGENET_TEMPLATES, device, progress=progress)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    results.update(evaluate_zero_shot(model.encode_image, loader, classifier, device, progress=progress))
    results["seconds"] = time.perf_counter() - t_start

    tag = f" W{args.wq_params}A{args.aq_params}{' +QwT' if args.qwerty else ''}" if quantize else ""
    print(f"[{args.choice}{tag}] {model_name}: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f} "
          f"({results['num_images']} images, {len(classnames)} classes)")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point; bad input ends with a one-line ``SystemExit`` message."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
