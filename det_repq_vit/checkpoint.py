"""Detector checkpoints: read them safely and convert the original Swin detection key layout.

The checkpoints of the original Swin detection release (mmdet 2.x fork) name the backbone like the
classification Swin (``backbone.layers.{s}.blocks.{j}.attn.qkv``, ``mlp.fc1``, ``patch_embed.proj``,
``layers.{s}.downsample``); mmdet 3.x's ``SwinTransformer`` uses ``backbone.stages.{s}.blocks.{j}
.attn.w_msa.qkv``, ``ffn.layers.0.0``/``ffn.layers.1``, ``patch_embed.projection``. Both apply the
patch merging at the end of a stage, so ``layers.{s}.downsample`` is ``stages.{s}.downsample``, but
the merging concatenates its 2x2 neighbours in a different channel order: the original takes
``[x(0,0), x(1,0), x(0,1), x(1,1)]`` (row offset first), mmcv's ``nn.Unfold`` takes channel-major
``c·4 + (2·dh + dw)``. The reduction weight columns and the merging LayerNorm are permuted to match.
Neck / RPN / RoI-head keys are the same in mmdet 2.x and 3.x.
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from qwt_core.model_io import state_dict_mismatch

# position k of the original concat for each unfold position p = 2·dh + dw (a self-inverse map)
_UNFOLD_TO_CONCAT = (0, 2, 1, 3)

_LEGACY_RULES = (  # (regex on the key after "backbone.", replacement), applied in order
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.projection."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\."), r"stages.\1.blocks.\2.attn.w_msa."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\."), r"stages.\1.blocks.\2.ffn.layers.0.0."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\."), r"stages.\1.blocks.\2.ffn.layers.1."),
    (re.compile(r"^layers\.(\d+)\."), r"stages.\1."),
)
_NEW_RULES = (
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\."), r"layers.\1.blocks.\2.attn."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\."), r"layers.\1.blocks.\2.mlp.fc1."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\."), r"layers.\1.blocks.\2.mlp.fc2."),
    (re.compile(r"^stages\.(\d+)\."), r"layers.\1."),
)


class CheckpointError(SystemExit):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


def concat_to_unfold_order(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Permute a ``4C`` axis from the original Swin merging order to mmcv's unfold order.

    ``t``: any tensor whose ``dim`` has ``4C`` entries (reduction weight ``(2C, 4C)`` with dim=1,
    merging LayerNorm ``(4C,)``). Old index ``k·C + c`` moves to ``c·4 + p``.
    """
    t = t.movedim(dim, -1)
    c = t.shape[-1] // 4
    blocks = t.reshape(*t.shape[:-1], 4, c)[..., list(_UNFOLD_TO_CONCAT), :]
    return blocks.transpose(-1, -2).reshape(*t.shape[:-1], 4 * c).movedim(-1, dim)


def unfold_to_concat_order(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`concat_to_unfold_order` (mmcv unfold order → original concat order)."""
    t = t.movedim(dim, -1)
    c = t.shape[-1] // 4
    blocks = t.reshape(*t.shape[:-1], c, 4).transpose(-1, -2)[..., list(_UNFOLD_TO_CONCAT), :]
    return blocks.reshape(*t.shape[:-1], 4 * c).movedim(-1, dim)


def is_legacy_swin_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if the backbone keys follow the original Swin detection release."""
    return any(k.startswith(("backbone.layers.", "backbone.patch_embed.proj.")) for k in state_dict)


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def _convert(state_dict: Mapping[str, torch.Tensor], rules, legacy_to_new: bool) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    reorder = concat_to_unfold_order if legacy_to_new else unfold_to_concat_order
    for key, value in state_dict.items():
        if not key.startswith("backbone."):
            out[key] = value
            continue
        sub = key[len("backbone."):]
        new_sub = _rename(sub, rules)
        if ".downsample.reduction.weight" in new_sub:
            value = reorder(value, dim=1)
        elif ".downsample.norm." in new_sub:
            value = reorder(value, dim=0)
        out["backbone." + new_sub] = value
    return out


def convert_legacy_swin_keys(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Original Swin detection (mmdet 2.x) detector state dict → mmdet 3.x layout.

    Non-backbone keys are kept; tensors are not copied unless permuted.
    """
    return _convert(state_dict, _LEGACY_RULES, legacy_to_new=True)


def to_legacy_swin_keys(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """mmdet 3.x detector state dict → original Swin detection layout (inverse of the above)."""
    return _convert(state_dict, _NEW_RULES, legacy_to_new=False)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file onto the CPU.

    Tries ``torch.load(weights_only=True)`` first (torch >= 2.6 default). Checkpoints written by
    mmengine/mmcv pickle extra objects in ``meta``/``message_hub``; those are loaded with
    ``weights_only=False`` after a warning, since the user chose this file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Download it (see pretrained_weights/README.md) "
                              "into pretrained_weights/ or pass the right path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path} holds non-tensor objects (mmengine/mmcv metadata); loading it with "
                      "weights_only=False - only do this for files you trust")
    except Exception as err:  # noqa: BLE001 - any read failure is a user-facing error
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}. "
                              "The file may be truncated or not a PyTorch checkpoint.") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def extract_state_dict(ckpt: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """The model weights inside a checkpoint dict (``state_dict``/``model`` entry or the dict itself),
    without a DistributedDataParallel ``module.`` prefix."""
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError("the checkpoint holds no state dict (expected a 'state_dict' or 'model' "
                              "entry of tensors)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if torch.is_tensor(v):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_detector_checkpoint(model: nn.Module, path: str | Path) -> dict[str, int | bool]:
    """Load detector weights into ``model`` (mmdet 3.x SwinTransformer-based detector).

    Converts the original Swin detection layout on the fly. Raises :class:`CheckpointError` (a
    ``SystemExit`` with a one-line message) if keys are missing, unexpected or of the wrong shape.
    Returns ``{"legacy_layout": bool, "tensors": n}``.
    """
    sd = extract_state_dict(read_checkpoint(path))
    legacy = is_legacy_swin_layout(sd)
    if legacy:
        sd = convert_legacy_swin_keys(sd)
    problem = state_dict_mismatch(model.state_dict(), sd, ("relative_position_index",))
    if problem:
        raise CheckpointError(f"checkpoint {path} does not match the model of this config: "
                              f"{problem}. Use the checkpoint that belongs to the config "
                              "(see pretrained_weights/README.md).")
    model.load_state_dict(sd, strict=False)
    return {"legacy_layout": legacy, "tensors": len(sd)}
