"""CLIP zero-shot ImageNet with RepQ-ViT post-training quantization and QwT compensation.

    python mm_clip/main.py --choice fp32_eval  --model ViT-B/32 --imagenet-val /data/imagenet/val
    python mm_clip/main.py --choice image_only --model ViT-B/32 --pretrained openai \
        --imagenet-val /data/imagenet/val --train-data '/data/cc3m/cc3m-train-{0000..0575}.tar' \
        --dataset-type webdataset --batch-size 32 --wq_params 6 --aq_params 6 --qwerty
    python mm_clip/main.py --choice all_quant ... --qwerty
    torchrun --nproc_per_node=8 mm_clip/main.py --choice image_only ...      # multi-GPU (or CPU/gloo)

``image_only`` quantizes the visual tower and the zero-shot classifier Linear (W/A bits; built from the
fp32 text tower first, so the RepQ-ViT batch calibrates it); ``all_quant`` both towers, and the
zero-shot classifier is then built by the quantized (and compensated) text tower and applied in fp32.
The visual patch embedding ``conv1`` reads its input at 8 bits with weights at W (published recipe).
Calibration pairs are drawn uniformly from all shards (``--iter`` batches of ``--batch-size``, 512
pairs by default); the first ``--repq-size`` (32) are the RepQ-ViT batch (same on every rank), and the
drawn pairs are split across ranks for QwT. ``--save_quantized`` / ``--load_quantized`` write and
re-evaluate the quantized (+ compensated) model without calibration data.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.data import DataLoader

from mm_clip.bundle import ZeroShotCLIP, clip_bit_table, recipe
from mm_clip.errors import InputError
from mm_clip.imagenet_val import check_val_dir, load_imagenet_val
from mm_clip.imagenet_zeroshot_data import OPENAI_IMAGENET_TEMPLATES
from mm_clip.models import (canonical_model_name, load_clip, model_record, register_model_config,
                            register_saved_config, resolve_pretrained)
from mm_clip.ptq import PTQConfig, quantize_text, quantize_visual
from mm_clip.wds_calib import DEFAULT_INDEX_CACHE, draw_samples, expand_shards, index_shards, read_pairs
from mm_clip.zeroshot import build_zero_shot_classifier, evaluate_zero_shot
from qwt_core import load_quantized, save_quantized
from qwt_core.quantizers import validate_bits
from qwt_core.cli_options import (add_qwt_arguments, add_speed_arguments, apply_speed_arguments,
                                  compiled_for_eval, qwt_overrides)
from qwt_core.cli_options import malloc_tunables
from qwt_core.adapters.open_clip import (PATCH_EMBED_INPUT_BITS, ZeroShotHead, quantize_open_clip_text,
                                         quantize_open_clip_visual, quantize_zero_shot_head)
from qwt_core.distributed import (ShardSampler, destroy_distributed, init_distributed_from_env,
                                  is_main_process, rank_slice)
from qwt_core.model_io import atomic_write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CALIB_SIZE = 512  # QwT's calibration set: 512 image-caption pairs
DEFAULT_BITS = 6


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
    p.add_argument("--batch-size", type=int, default=32, help="calibration and evaluation batch size per process")
    p.add_argument("--workers", type=int, default=4, help="data loading workers / shard indexing threads")
    p.add_argument("--iter", type=int, default=None,
                   help=f"calibration batches (samples = iter x batch-size, split across processes); default "
                        f"{DEFAULT_CALIB_SIZE} samples")
    p.add_argument("--calib-size", type=int, default=None,
                   help=f"calibration samples when --iter is not given (default {DEFAULT_CALIB_SIZE})")
    p.add_argument("--repq-size", type=int, default=32,
                   help="samples of the RepQ-ViT calibration batch (the same on every process)")
    p.add_argument("--wq_params", type=int, default=None, help=f"weight bits (default {DEFAULT_BITS})")
    p.add_argument("--aq_params", type=int, default=None, help=f"activation bits (default {DEFAULT_BITS})")
    p.add_argument("--qwerty", action="store_true", help="apply QwT compensation")
    p.add_argument("--quant-attn-matmul", action="store_true",
                   help="also quantize q@k^T and attn@v (the reference keeps them fp32)")
    p.add_argument("--patch-embed-wbits", type=int, default=None,
                   help="weight bits of the visual patch-embedding conv1 (default: --wq_params, as published)")
    p.add_argument("--patch-embed-abits", type=int, default=None,
                   help=f"input bits of conv1 (default: {PATCH_EMBED_INPUT_BITS}, forced in the published code)")
    p.add_argument("--patch-embed-bits", type=int, default=None,
                   help="shortcut: conv1 weight AND input bits (e.g. 8 = W8/A8, the ViT/DeiT convention)")
    p.add_argument("--fp32-classifier", action="store_true",
                   help="keep the zero-shot classifier product fp32 (image_only quantizes it at "
                        "--wq_params/--aq_params by default, as published; all_quant keeps it fp32)")
    p.add_argument("--integer-zero-point", action="store_true",
                   help="round the reparameterized zero point (exact RepQ-ViT reparameterization)")
    p.add_argument("--start_block", type=int, default=0, help="QwT compensates blocks from this index on")
    add_qwt_arguments(p, default_note="holdout; insample reproduces the papers' rule (needs --qwerty)")
    add_speed_arguments(p, compile_model=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--save_quantized", "--save-quantized", dest="save_quantized", default=None, metavar="PATH",
                   help="save the quantized (+ compensated) model and classifier; reload with --load_quantized")
    p.add_argument("--load_quantized", "--load-quantized", dest="load_quantized", default=None, metavar="PATH",
                   help="evaluate a model saved with --save_quantized (no calibration data, no weights needed)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of the per-block output error to FP before / after QwT (needs --qwerty)")
    p.add_argument("--index-cache", default=DEFAULT_INDEX_CACHE,
                   help="directory caching the shard indexes ('none' to disable)")
    p.add_argument("--diagnostics", action="store_true",
                   help="measure per-block and embedding errors to FP on the calibration data")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    return p


def _validate(args: argparse.Namespace) -> None:
    """Every check that needs no model or data; raises :class:`InputError` before anything is done."""
    for flag, value in (("--wq_params", args.wq_params), ("--aq_params", args.aq_params),
                        ("--patch-embed-bits", args.patch_embed_bits),
                        ("--patch-embed-wbits", args.patch_embed_wbits),
                        ("--patch-embed-abits", args.patch_embed_abits)):
        if value is None:
            continue
        try:
            validate_bits(value, flag)
        except ValueError as e:
            raise InputError(str(e)) from None
    if args.patch_embed_bits is not None and (args.patch_embed_wbits is not None
                                              or args.patch_embed_abits is not None):
        raise InputError("--patch-embed-bits sets both conv1 bits: give it alone, or use "
                         "--patch-embed-wbits / --patch-embed-abits")
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
    if args.save_quantized and args.load_quantized:
        raise InputError("--save_quantized and --load_quantized exclude each other: a loaded model is "
                         "already saved")
    if args.choice == "fp32_eval":
        for flag, value in (("--save_quantized", args.save_quantized), ("--load_quantized", args.load_quantized),
                            ("--plot", args.plot)):
            if value:
                raise InputError(f"{flag} needs a quantized model: use --choice image_only or all_quant")
    if args.plot and args.load_quantized:
        raise InputError("--plot draws the QwT calibration errors, which a loaded model does not have: "
                         "pass --plot to the run that calibrates (and --save_quantized there)")
    if args.qwt_gate is not None or args.qwt_ridge is not None or args.qwt_solver is not None:
        if args.load_quantized:
            raise InputError("--qwt_gate/--qwt_ridge/--qwt_solver set the QwT fit, but --load_quantized reuses "
                             "the saved one")
        if not args.qwerty:
            raise InputError("--qwt_gate/--qwt_ridge/--qwt_solver set the QwT fit: add --qwerty")
        try:
            qwt_overrides(args.qwt_gate, args.qwt_ridge, solver=args.qwt_solver)
        except ValueError as e:
            raise InputError(str(e)) from None
    apply_speed_arguments(args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.plot and not args.qwerty:
        raise InputError("--plot draws the per-block error before / after QwT: add --qwerty")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InputError(f"--plot {args.plot}: the figure is a PNG, give a path ending in .png")
    for flag, path in (("--save_quantized", args.save_quantized), ("--output", args.output),
                       ("--plot", args.plot)):
        if path and os.path.isdir(path):
            raise InputError(f"{flag} {path} is a directory: give a file path")
    if args.load_quantized and not os.path.isfile(args.load_quantized):
        raise InputError(f"--load_quantized {args.load_quantized}: no such file; pass a file written by "
                         "--save_quantized")


def _device(name: Optional[str], world: int, local_rank: int) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def calibration_size(args: argparse.Namespace) -> int:
    """Number of calibration pairs (all processes together): ``iter × batch_size``, else
    ``--calib-size`` (default 512)."""
    if args.iter is not None:
        return args.iter * args.batch_size
    return args.calib_size if args.calib_size is not None else DEFAULT_CALIB_SIZE


def load_calibration(args: argparse.Namespace, preprocess: Callable[[Any], torch.Tensor],
                     tokenizer: Callable[[list[str]], torch.Tensor], rank: int = 0, world: int = 1
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Draw the calibration pairs from all shards (same draw on every rank), read what this rank needs.

    Returns tensors ``repq_images`` ``(R, 3, H, W)`` / ``repq_tokens`` ``(R, L)`` (the first
    ``--repq-size`` pairs, identical on every rank) and ``qwt_images`` / ``qwt_tokens`` (this rank's
    contiguous share of all drawn pairs), plus a summary for the results.
    """
    n = calibration_size(args)
    if n < world:
        raise InputError(f"{n} calibration samples cannot be split over {world} processes: raise --iter or "
                         "--calib-size")
    cache = None if str(args.index_cache).lower() == "none" else args.index_cache
    progress = not args.no_progress and is_main_process()
    shards = expand_shards(args.train_data)
    indexes = index_shards(shards, max(1, args.workers), cache, progress)
    refs = draw_samples(indexes, n, args.seed)
    n_repq = min(args.repq_size, n)
    part = rank_slice(n, rank, world)
    needed = sorted(set(range(n_repq)) | set(range(part.start, part.stop)))
    pairs = dict(zip(needed, read_pairs([refs[i] for i in needed], progress)))

    def tensors(idx: range) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([preprocess(pairs[i][0]) for i in idx]),
                tokenizer([pairs[i][1] for i in idx]))

    repq_images, repq_tokens = tensors(range(n_repq))
    qwt_images, qwt_tokens = tensors(range(part.start, part.stop))
    summary = {"samples": n, "available": sum(len(ix) for ix in indexes),
               "shards_used": len({r.shard for r in refs}), "repq_samples": n_repq,
               "batch_size": args.batch_size, "world_size": world,
               "qwt_samples_per_rank": [rank_slice(n, r, world).stop - rank_slice(n, r, world).start
                                        for r in range(world)]}
    return {"repq_images": repq_images, "repq_tokens": repq_tokens, "qwt_images": qwt_images,
            "qwt_tokens": qwt_tokens}, summary


def _bits_of(args: argparse.Namespace) -> tuple[int, int, tuple[int, int]]:
    """(W, A, (conv1 W, conv1 A)) from the options and the published defaults."""
    w = args.wq_params if args.wq_params is not None else DEFAULT_BITS
    a = args.aq_params if args.aq_params is not None else DEFAULT_BITS
    if args.patch_embed_bits is not None:
        patch = (args.patch_embed_bits, args.patch_embed_bits)
    else:
        patch = (args.patch_embed_wbits if args.patch_embed_wbits is not None else w,
                 args.patch_embed_abits if args.patch_embed_abits is not None else PATCH_EMBED_INPUT_BITS)
    return w, a, patch


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one ``--choice`` and return the results dictionary (also printed / written as JSON by rank 0).

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (NCCL on GPUs, gloo on
    CPU): RepQ-ViT calibrates on the same batch everywhere, QwT on each rank's share of the pairs with
    all-reduced moments, and the ImageNet evaluation is sharded with summed counts.
    """
    _validate(args)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    wants_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    rank, world, local = init_distributed_from_env("cuda" if wants_cuda else "cpu", args.local_rank)
    try:
        return _run(args, rank, world, _device(args.device, world, local))
    finally:
        destroy_distributed()


def _model_name(args: argparse.Namespace) -> str:
    if args.model_config:
        name = register_model_config(args.model_config)
        if args.model and canonical_model_name(args.model) != name:
            raise InputError(f"--model {args.model} and --model-config {args.model_config} disagree: "
                             "give only one")
        return name
    return canonical_model_name(args.model or "ViT-B-32")


def _check_saved_meta(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """A loaded file must match every option the user gave explicitly."""
    path = args.load_quantized
    if meta.get("choice") != args.choice:
        raise InputError(f"{path} was saved from --choice {meta.get('choice')}, not {args.choice}: pass "
                         f"--choice {meta.get('choice')}")
    pw, pa = meta["patch_embed_bits"]
    given = {"--wq_params": (args.wq_params, meta["w_bits"]), "--aq_params": (args.aq_params, meta["a_bits"]),
             "--patch-embed-wbits": (args.patch_embed_wbits, pw), "--patch-embed-abits": (args.patch_embed_abits, pa),
             "--patch-embed-bits": (None if args.patch_embed_bits is None else [args.patch_embed_bits] * 2,
                                    [pw, pa])}
    for flag, (mine, saved) in given.items():
        if mine is not None and mine != saved:
            raise InputError(f"{path} was saved with {flag} {saved}, not {mine}: drop the option or "
                             "quantize again")
    if args.fp32_classifier and meta.get("classifier_bits") is not None:
        raise InputError(f"{path} holds a quantized classifier: drop --fp32-classifier or quantize again")
    if args.model or args.model_config:
        name = _model_name(args)
        if name != meta["model"]:
            raise InputError(f"{path} holds a quantized {meta['model']}, not {name}: pass --model "
                             f"{meta['model']} or no --model")


def _load(args: argparse.Namespace, device: torch.device
          ) -> tuple[ZeroShotCLIP, dict[str, Any], Callable[[Any], torch.Tensor]]:
    """Rebuild the quantized structure from the file's meta (random init, no calibration) and load it."""
    out: dict[str, Any] = {}

    def build(meta: dict[str, Any]) -> ZeroShotCLIP:
        _check_saved_meta(args, meta)
        register_saved_config(meta["model"], meta.get("model_config"))
        clip, preprocess, _ = load_clip(meta["model"], None, torch.device("cpu"), meta.get("quick_gelu", False),
                                        meta.get("preprocess_cfg"))
        quantize_open_clip_visual(clip.visual, meta["w_bits"], meta["a_bits"], meta["quant_attn_matmul"],
                                  tuple(meta["patch_embed_bits"]))
        if meta["choice"] == "all_quant":
            quantize_open_clip_text(clip, meta["w_bits"], meta["a_bits"], meta["quant_attn_matmul"])
        head = ZeroShotHead(torch.zeros(meta["embed_dim"], len(meta["classnames"])))
        if meta.get("classifier_bits") is not None:
            quantize_zero_shot_head(head, *meta["classifier_bits"])
        out["preprocess"] = preprocess
        return ZeroShotCLIP(clip, head)

    try:
        bundle, meta = load_quantized(args.load_quantized, build)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"--load_quantized {args.load_quantized}: {str(e).splitlines()[0]}") from None
    bundle.to(device).eval()
    return bundle, meta, out["preprocess"]


def _plot(path: str, towers: dict[str, dict[str, Any]], title: str) -> str:
    """One figure with the QwT blocks of every quantized tower (visual first, then text)."""
    from qwt_core.plotting import plot_block_errors

    blocks = []
    for tower, report in towers.items():
        for b in (report.get("qwt") or {}).get("blocks", []):
            name = b["name"].replace("transformer.resblocks.", "")
            blocks.append(dict(b, index=len(blocks), name=f"{tower} {name}"))
    return plot_block_errors(blocks, path, title)


@dataclass
class Prepared:
    """The evaluated model and what the evaluation needs: ``bundle`` (CLIP + zero-shot head, quantized
    / compensated / loaded as asked), the results so far, the val dataset and its class names."""

    bundle: ZeroShotCLIP
    results: dict[str, Any]
    dataset: Any
    classnames: list[str]
    tag: str = ""  # " W6A6 +QwT" for the log line


def _prepare(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Prepared:
    """Everything before the ImageNet evaluation: build or load, quantize + calibrate + QwT, save."""
    progress = not args.no_progress
    seed_everything(args.seed)
    quantize = args.choice != "fp32_eval"
    check_val_dir(args.imagenet_val)
    results: dict[str, Any] = {"choice": args.choice, "device": str(device), "world_size": world,
                               "seed": args.seed, "templates": len(OPENAI_IMAGENET_TEMPLATES),
                               "fused_fake_quant": bool(args.fused_fake_quant),
                               "compile_model": bool(args.compile_model), "malloc_tunables": malloc_tunables(),
                               "torch": torch.__version__}

    if args.load_quantized:
        bundle, meta, preprocess = _load(args, device)
        model_name, model, head = meta["model"], bundle.clip, bundle.head
        w, a, patch = meta["w_bits"], meta["a_bits"], tuple(meta["patch_embed_bits"])
        qwerty, quant_attn_matmul = meta.get("qwt", False), meta["quant_attn_matmul"]
        dataset, classnames = load_imagenet_val(args.imagenet_val, preprocess, args.restrict_classes)
        if list(classnames) != list(meta["classnames"]):
            raise InputError(f"{args.load_quantized} holds a classifier over {len(meta['classnames'])} classes, "
                             f"but --imagenet-val gives {len(classnames)} other ones: use the same "
                             "--imagenet-val / --restrict-classes as when saving")
        if args.pretrained or args.train_data:
            _log("--load_quantized: weights and calibration come from the file; --pretrained / --train-data "
                 "are not used")
        args.start_block = meta.get("start_block", 0)
        if meta.get("qwt_gate") is not None:
            results.update(qwt_gate=meta["qwt_gate"], qwt_ridge=meta.get("qwt_ridge"))
        results.update({"model": model_name, "pretrained": meta.get("pretrained"),
                        "loaded_from": os.path.abspath(args.load_quantized),
                        "loaded_meta": {k: v for k, v in meta.items() if k not in ("classnames", "model_config")}})
    else:
        model_name = _model_name(args)
        if quantize:
            expand_shards(args.train_data)  # cheap input check before anything heavy
        source, is_openai = resolve_pretrained(model_name, args.pretrained, args.weights_dir)
        model, preprocess, tokenizer = load_clip(model_name, source, device,
                                                 quick_gelu=is_openai or args.force_quick_gelu)
        dataset, classnames = load_imagenet_val(args.imagenet_val, preprocess, args.restrict_classes)
        w, a, patch = _bits_of(args)
        qwerty, quant_attn_matmul = args.qwerty, args.quant_attn_matmul
        results.update({"model": model_name, "pretrained": source or "none (random init)"})
    classifier_quantized = (head.quantized if args.load_quantized
                            else args.choice == "image_only" and not args.fp32_classifier)
    results["num_classes"] = len(classnames)
    if quantize:
        results.update({"w_bits": w, "a_bits": a, "qwerty": qwerty, "quant_attn_matmul": quant_attn_matmul,
                        "start_block": args.start_block, "patch_embed_bits": list(patch),
                        "classifier": [w, a] if classifier_quantized else "fp32"})
    results["recipe"] = recipe(args.choice, w, a, patch, classifier_quantized, quant_attn_matmul)

    def classifier_from(encode_text: Callable[[torch.Tensor], torch.Tensor]) -> ZeroShotHead:
        emb = build_zero_shot_classifier(encode_text, tokenizer, classnames, OPENAI_IMAGENET_TEMPLATES, device,
                                         progress=progress)
        return ZeroShotHead(emb)

    if not args.load_quantized:
        towers: dict[str, dict[str, Any]] = {}
        if quantize:
            calib, results["calibration"] = load_calibration(args, preprocess, tokenizer, rank, world)
            cfg = PTQConfig(w, a, patch, qwerty=qwerty, quant_attn_matmul=quant_attn_matmul,
                            start_block=args.start_block, integer_zero_point=args.integer_zero_point,
                            diagnostics=args.diagnostics, progress=progress and is_main_process(),
                            qwt_gate=args.qwt_gate, qwt_ridge=args.qwt_ridge, qwt_solver=args.qwt_solver)
            if args.choice == "image_only":
                # Published order: classifier from the fp32 text tower first, so that the RepQ-ViT
                # batch (visual tower → normalised features → classifier) initialises its quantizers.
                head = classifier_from(model.encode_text)
                if classifier_quantized:
                    quantize_zero_shot_head(head, w, a)
                _, towers["visual"] = quantize_visual(model, calib["repq_images"], calib["qwt_images"],
                                                      args.batch_size, cfg, device,
                                                      head=head if classifier_quantized else None)
            else:
                _, towers["visual"] = quantize_visual(model, calib["repq_images"], calib["qwt_images"],
                                                      args.batch_size, cfg, device)
                _, towers["text"] = quantize_text(model, calib["repq_tokens"], calib["qwt_tokens"],
                                                  args.batch_size, cfg, device)
                head = classifier_from(model.encode_text)  # quantized (+ compensated) text tower, fp32 product
            for tower, report in towers.items():
                report["qwt_samples"] = results["calibration"]["samples"]
                results[tower] = report
                if report.get("qwt"):  # the effective gate and ridge (the same for both towers)
                    results["qwt_gate"], results["qwt_ridge"] = report["qwt"]["gate"], report["qwt"]["ridge"]
        else:
            head = classifier_from(model.encode_text)
        bundle = ZeroShotCLIP(model, head).to(device).eval()

    results["bit_table"] = clip_bit_table(bundle.clip, bundle.head)
    if args.save_quantized and is_main_process():
        meta = dict(model_record(model_name, bundle.clip), choice=args.choice, w_bits=w, a_bits=a,
                    patch_embed_bits=list(patch), quant_attn_matmul=quant_attn_matmul,
                    classifier_bits=[w, a] if classifier_quantized else None, qwt=qwerty,
                    start_block=args.start_block, integer_zero_point=args.integer_zero_point,
                    qwt_gate=results.get("qwt_gate"), qwt_ridge=results.get("qwt_ridge"),
                    seed=args.seed, pretrained=results["pretrained"], calibration=results.get("calibration"),
                    embed_dim=bundle.head.fc.in_features, classnames=list(classnames))
        tmp = f"{args.save_quantized}.tmp{os.getpid()}"
        save_quantized(bundle, tmp, meta)
        os.replace(tmp, args.save_quantized)
        results["saved_quantized"] = os.path.abspath(args.save_quantized)
        _log(f"saved the quantized model to {args.save_quantized}")
    tag = f" W{w}A{a}{' +QwT' if qwerty else ''}" if quantize else ""
    return Prepared(bundle, results, dataset, list(classnames), tag)


def prepare(argv: Sequence[str], device: str = "cpu") -> Prepared:
    """Single-process :func:`_prepare` from a command line (validated as by :func:`main`): the
    quantized (or loaded) model without the ImageNet evaluation, for scripts and tests."""
    args = build_parser().parse_args(list(argv) + ["--device", device])
    try:
        _validate(args)
        prepared = _prepare(args, 0, 1, _device(args.device, 1, 0))
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    return prepared


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    t_start = time.perf_counter()
    progress = not args.no_progress
    prepared = _prepare(args, rank, world, device)
    bundle, results, dataset, classnames = (prepared.bundle, prepared.results, prepared.dataset,
                                            prepared.classnames)
    tag = prepared.tag
    model_name = results["model"]
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        sampler=ShardSampler(len(dataset), rank, world), pin_memory=device.type == "cuda")
    results.update(evaluate_zero_shot(compiled_for_eval(bundle, args.compile_model), loader, device,
                                      progress=progress))
    results["seconds"] = time.perf_counter() - t_start

    if args.plot and is_main_process():
        title = (f"CLIP {model_name} {args.choice} W{results['w_bits']}A{results['a_bits']}: per-block "
                 "output MSE to FP, RepQ-ViT vs + QwT")
        results["plot"] = os.path.abspath(_plot(args.plot, {k: results[k] for k in ("visual", "text")
                                                            if k in results}, title))
    _log(f"[{args.choice}{tag}{' (loaded)' if args.load_quantized else ''}] {model_name}: top-1 "
         f"{results['top1']:.2f}  top-5 {results['top5']:.2f} ({results['num_images']} images, "
         f"{len(classnames)} classes, {world} process(es))")
    if args.output and is_main_process():
        atomic_write_json(args.output, results)
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
