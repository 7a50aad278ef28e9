"""Save and reload a quantized (+ QwT-compensated) model without recalibrating.

The file is a ``torch.save`` dict ``{"format", "meta", "compensations", "state_dict"}``. Reloading
rebuilds the quantized structure with the same adapter (``build(meta)``), re-inserts the
compensation layers listed in ``compensations``, and loads the state dict strictly: quantizer
buffers adopt the saved (per-tensor or per-channel) shapes, and biases created by the
reparameterization are re-created.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from torch import nn

from .compensation import CompensatedBlock

FORMAT = "qwt-quantized-v1"


def state_dict_mismatch(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor],
                        optional_suffixes: tuple[str, ...] = ()) -> str:
    """One line naming what keeps ``loaded`` from fitting ``own`` ('' when it fits).

    Counts missing keys (keys of ``own`` absent from ``loaded``, except those ending in one of
    ``optional_suffixes``, e.g. derived buffers), unexpected keys and keys with another shape, each with
    an example, so a wrong checkpoint stops with a message the user can act on.
    """
    missing = [k for k in own if k not in loaded and not k.endswith(optional_suffixes)]
    unexpected = [k for k in loaded if k not in own]
    wrong = [k for k in loaded if k in own and tuple(loaded[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} keys with other shapes (e.g. {k!r}: "
                     f"{tuple(loaded[k].shape)} vs {tuple(own[k].shape)})")
    return ", ".join(parts)


def _describe(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Conv2d):
        return {"kind": "conv", "in": module.in_channels, "out": module.out_channels,
                "kernel": module.kernel_size[0], "stride": module.stride[0],
                "padding": module.padding[0], "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in": module.in_features, "out": module.out_features}
    raise TypeError(f"cannot save a compensation of type {type(module).__name__}")


def _build_compensation(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "conv":
        return nn.Conv2d(spec["in"], spec["out"], spec["kernel"], stride=spec["stride"],
                         padding=spec["padding"], groups=spec["groups"], bias=True)
    return nn.Linear(spec["in"], spec["out"], bias=True)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``: a
    reader (or a crash) never sees a half-written file; the folder is created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, payload: Any) -> None:
    """``payload`` as indented JSON at ``path``, written through a temporary file and ``os.replace``
    (never half-written; the folder is created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_quantized(model: nn.Module, path: str, meta: dict[str, Any]) -> None:
    """Write ``model`` (quantized, maybe compensated) and ``meta`` (what ``build`` needs) to ``path``.

    The file is written next to ``path`` and renamed into place, so an interrupted save leaves no
    half-written file behind.
    """
    compensations = {name: _describe(m.compensation) for name, m in model.named_modules()
                     if isinstance(m, CompensatedBlock)}
    atomic_torch_save({"format": FORMAT, "meta": dict(meta), "compensations": compensations,
                       "state_dict": model.state_dict()}, path)


def read_quantized(path: str) -> dict[str, Any]:
    """Load and validate the saved dict (clear errors for a missing or foreign file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantized model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means a corrupt file
        raise ValueError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantized model saved by qwt_core.save_quantized")
    return blob


def _recreate_missing_biases(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    own = model.state_dict().keys()
    for key in state_dict:
        if key in own or not key.endswith(".bias"):
            continue
        try:
            module = model.get_submodule(key[: -len(".bias")])
        except AttributeError:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(state_dict[key], device=module.weight.device))


def load_quantized(path: str, build: Callable[[dict[str, Any]], Any]) -> tuple[Any, dict[str, Any]]:
    """Rebuild and load a model saved by :func:`save_quantized`.

    ``build(meta)`` must return the freshly quantized (uncalibrated) structure: an ``nn.Module`` or an
    object with a ``.model`` attribute (e.g. a ``QuantizedModel``). Returns ``(built, meta)``.
    """
    blob = read_quantized(path)
    built = build(blob["meta"])
    model: nn.Module = built.model if hasattr(built, "model") else built
    for name, spec in blob["compensations"].items():
        block = model.get_submodule(name)
        device = next(block.parameters()).device
        model.set_submodule(name, CompensatedBlock(block, _build_compensation(spec).to(device)))
    state_dict = blob["state_dict"]
    _recreate_missing_biases(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return built, blob["meta"]
