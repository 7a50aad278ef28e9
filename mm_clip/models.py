"""Model names, configs and checkpoints: open_clip model creation for the CLIP task."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch
from torch import nn

from .errors import InputError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
RANDOM_INIT = ("none", "random")


def canonical_model_name(name: str) -> str:
    """OpenAI spelling (``ViT-B/32``) or open_clip spelling (``ViT-B-32``) → the open_clip name."""
    available = open_clip.list_models()
    candidate = name.strip().replace("/", "-")
    if candidate in available:
        return candidate
    by_lower = {m.lower(): m for m in available}
    if candidate.lower() in by_lower:
        return by_lower[candidate.lower()]
    raise InputError(f"unknown model {name!r}: use an open_clip model name such as ViT-B-32 "
                     f"(or the OpenAI spelling ViT-B/32); open_clip.list_models() lists all "
                     f"{len(available)}, or pass --model-config path/to/config.json")


def register_model_config(path: str) -> str:
    """Register a json model config with open_clip; returns its model name (the file stem)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--model-config {path}: no such file; pass an open_clip model config json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"--model-config {path}: not valid json ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise InputError(f"--model-config {path}: needs the keys embed_dim, vision_cfg and text_cfg")
    open_clip.add_model_config(p)
    return p.stem


def _local_weights(weights_dir: Optional[str], model_name: str, tag: Optional[str]) -> Optional[str]:
    """A checkpoint in ``weights_dir`` named ``{model}-{tag}.*``/``{model}_{tag}.*`` (or
    ``{model}.*`` when no tag), if present."""
    if not weights_dir or not os.path.isdir(weights_dir):
        return None
    stems = [f"{model_name}-{tag}", f"{model_name}_{tag}"] if tag else [model_name]
    for stem in stems:
        for suffix in WEIGHT_SUFFIXES:
            path = os.path.join(weights_dir, stem + suffix)
            if os.path.isfile(path):
                return path
    return None


def resolve_pretrained(model_name: str, pretrained: Optional[str],
                       weights_dir: Optional[str]) -> tuple[Optional[str], bool]:
    """Decide where the weights come from.

    Returns ``(source, is_openai)``: ``source`` is None (random init: ``none``/``random``), a local
    checkpoint path, or an open_clip pretrained tag (downloaded by open_clip); ``is_openai`` tells that
    the weights are OpenAI's (QuickGELU activations). ``pretrained=None`` tries ``weights_dir`` for
    ``{model}-openai.*`` then ``{model}.*`` (the name of OpenAI's download; both taken as OpenAI
    weights), then the ``openai`` tag.
    """
    if pretrained is not None and pretrained.lower() in RANDOM_INIT:
        return None, False
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is None:
        local = (_local_weights(weights_dir, model_name, "openai")
                 or _local_weights(weights_dir, model_name, None))
        if local:
            return local, True  # {model}-openai.* or OpenAI's own file name {model}.pt
        if "openai" in tags:
            return "openai", True
        raise InputError(f"no weights for {model_name}: put a checkpoint in {weights_dir} or pass "
                         f"--pretrained TAG|PATH (tags: {', '.join(tags) or 'none'}; 'none' = random init)")
    if os.path.isfile(pretrained):
        return pretrained, False
    if os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        raise InputError(f"--pretrained {pretrained}: no such checkpoint file")
    if pretrained not in tags:
        raise InputError(f"--pretrained {pretrained!r} is not a checkpoint file nor an open_clip tag of "
                         f"{model_name} (tags: {', '.join(tags) or 'none'}; 'none' = random init)")
    local = _local_weights(weights_dir, model_name, pretrained)
    return (local or pretrained), pretrained == "openai"


def load_clip(model_name: str, source: Optional[str], device: torch.device, quick_gelu: bool = False,
              preprocess_cfg: Optional[dict[str, Any]] = None
              ) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    """Create the open_clip model in fp32, eval mode, on ``device``.

    Returns ``(model, preprocess, tokenizer)``: ``preprocess`` maps a PIL image to ``(3, H, W)``,
    ``tokenizer`` a list of strings to ``(N, context_length)`` int64 tokens. A local OpenAI
    checkpoint needs ``quick_gelu=True`` (open_clip sets it itself for the ``openai`` tag).
    ``preprocess_cfg`` (``model.visual.preprocess_cfg`` of a saved model) fixes the eval transform's
    mean / std / interpolation / resize mode when rebuilding a model without its pretrained tag.
    """
    is_file = source is not None and os.path.isfile(source)
    pp = preprocess_cfg or {}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=source, precision="fp32", device=device,
            force_quick_gelu=quick_gelu and (is_file or source is None), image_mean=pp.get("mean"),
            image_std=pp.get("std"), image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"))
    except RuntimeError as e:
        if source is None or is_file:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"could not get the {source!r} weights of {model_name} ({first[:160]}); without "
                         f"network access put the checkpoint at pretrained_weights/{model_name}-{source}.bin "
                         "or pass --pretrained /path/to/checkpoint") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def uses_quick_gelu(model: nn.Module) -> bool:
    """True if the model's residual blocks use QuickGELU (OpenAI weights)."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


def model_record(model_name: str, model: nn.Module) -> dict[str, Any]:
    """What is needed to rebuild the architecture without the original files: name, open_clip config,
    QuickGELU, eval preprocessing."""
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return {"model": model_name, "model_config": open_clip.get_model_config(model_name),
            "quick_gelu": uses_quick_gelu(model),
            "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}}


def register_saved_config(model_name: str, config: Optional[dict[str, Any]]) -> None:
    """Make ``model_name`` known to open_clip with the saved ``config`` (a model saved from a
    ``--model-config`` file reloads without that file). A registered name whose config differs is an
    error naming the conflict."""
    if config is None:
        if model_name not in open_clip.list_models():
            raise InputError(f"the saved model {model_name!r} is not an open_clip model and the file holds "
                             "no config: pass --model-config with its config json")
        return
    if model_name in open_clip.list_models():
        if open_clip.get_model_config(model_name) != config:
            raise InputError(f"open_clip already knows a model {model_name!r} with another config than the "
                             "saved one: rename the saved model's --model-config file")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{model_name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        if model_name not in open_clip.list_models():  # pragma: no cover - open_clip API change
            raise InputError(f"could not register the saved config of {model_name!r} with open_clip")
