"""The way in: ``quantize`` → ``calibrate`` → ``compensate`` (→ ``save_quantized`` / ``export_onnx``).

::

    qm = quantize(model, QuantConfig(w_bits=4, a_bits=4))   # adapter picked by model type ("auto")
    calibrate(qm, images[:32])                               # RepQ-ViT (Percentile for CNNs)
    report = compensate(qm, batches)                         # QwT with the adapter's published config
    report = compensate(qm, batches, qm.qwt_config.replace(gate="insample"))   # the papers' gate

Adapters live in a small registry (:func:`register_adapter`, :func:`list_adapters`); a model no
adapter recognises is wrapped by hand in a :class:`~qwt_core.QuantizedModel` after
:func:`~qwt_core.quantize_layers` (see ``docs/your_model.md``).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .adapters.base import QuantizedModel
from .calibrate import CalibrationReport
from .calibrate import calibrate as _calibrate_generic
from .config import QuantConfig, QwTConfig
from .modules import quantizers
from .qwt import BlockInput, QwTReport, apply_qwt
from .repq import repq_calibrate, uninitialized_quantizers

Build = Callable[[nn.Module, QuantConfig], QuantizedModel]
Matches = Callable[[nn.Module], bool]


@dataclass(frozen=True)
class _Adapter:
    name: str
    build: Build
    matches: Optional[Matches]
    options: tuple[str, ...]
    doc: str


_REGISTRY: dict[str, _Adapter] = {}


def register_adapter(name: str, build: Build, matches: Optional[Matches] = None,
                     options: tuple[str, ...] = (), doc: str = "") -> None:
    """Register an adapter for :func:`quantize`.

    Args:
        name: registry key (``quantize(model, cfg, adapter=name)``).
        build: ``(model, QuantConfig) -> QuantizedModel``.
        matches: ``model -> bool`` for ``adapter="auto"`` (None: only by name).
        options: the :meth:`QuantConfig.adapter_options` this adapter understands.
        doc: one line for :func:`list_adapters`.
    """
    if name in _REGISTRY:
        raise ValueError(f"an adapter named {name!r} is already registered")
    _REGISTRY[name] = _Adapter(name, build, matches, tuple(options), doc)


def list_adapters() -> dict[str, str]:
    """``{name: one-line description}`` of the registered adapters."""
    return {k: a.doc for k, a in _REGISTRY.items()}


def _module_of(model: nn.Module) -> str:
    return type(model).__module__ or ""


def _is_resnet(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc"))


def _builtin_adapters() -> None:
    from .adapters import hf, mmdet_swin, open_clip, timm_resnet, timm_swin, timm_vit, torchvision_rcnn

    register_adapter("timm_vit", lambda m, c: timm_vit.quantize_timm_vit(m, c.w_bits, c.a_bits),
                     lambda m: _module_of(m).startswith("timm.") and hasattr(m, "blocks")
                     and hasattr(m, "patch_embed"), doc="timm ViT / DeiT (incl. distilled): RepQ-ViT")
    register_adapter("timm_swin", lambda m, c: timm_swin.quantize_timm_swin(m, c.w_bits, c.a_bits),
                     lambda m: _module_of(m).startswith("timm.") and type(m).__name__.startswith("Swin"),
                     doc="timm Swin: RepQ-ViT, patch merging between stages")
    register_adapter("resnet", lambda m, c: timm_resnet.quantize_resnet(m, c.w_bits, c.a_bits,
                                                                         **c.adapter_options()),
                     _is_resnet, options=("act_mode", "recipe"),
                     doc="timm / torchvision ResNet: the Percentile baseline, QwT conv form")
    register_adapter("hf", lambda m, c: hf.quantize_hf_model(m, c.w_bits, c.a_bits, **c.adapter_options()),
                     lambda m: hasattr(m, "config") and hasattr(m, "base_model_prefix"), options=("kind",),
                     doc="Hugging Face transformers encoders and decoder LLMs")
    register_adapter("open_clip_visual",
                     lambda m, c: open_clip.quantize_open_clip_visual(m, c.w_bits, c.a_bits, **c.adapter_options()),
                     lambda m: _module_of(m).startswith("open_clip") and type(m).__name__ == "VisionTransformer",
                     options=("quant_attn_matmul",), doc="open_clip visual tower")
    register_adapter("open_clip_text",
                     lambda m, c: open_clip.quantize_open_clip_text(m, c.w_bits, c.a_bits, **c.adapter_options()),
                     None, options=("quant_attn_matmul",), doc="open_clip text tower (give the CLIP model)")
    register_adapter("torchvision_rcnn",
                     lambda m, c: torchvision_rcnn.quantize_torchvision_rcnn(m, c.w_bits, c.a_bits,
                                                                            **c.adapter_options()),
                     lambda m: _module_of(m).startswith("torchvision.models.detection")
                     and hasattr(m, "backbone") and hasattr(m, "roi_heads"), options=("act_mode", "recipe"),
                     doc="torchvision Mask / Faster R-CNN with a ResNet-FPN backbone: the Percentile recipe")
    register_adapter("mmdet_swin",
                     lambda m, c: mmdet_swin.quantize_mmdet_swin_detector(m, c.w_bits, c.a_bits),
                     lambda m: _module_of(m).startswith("mmdet") and hasattr(m, "backbone")
                     and type(m.backbone).__name__ == "SwinTransformer",
                     doc="mmdet detectors with a Swin backbone (Mask / Cascade Mask R-CNN)")


def _registry() -> dict[str, _Adapter]:
    if not _REGISTRY:
        _builtin_adapters()
    return _REGISTRY


def quantize(model: nn.Module, config: Optional[QuantConfig] = None, adapter: str = "auto") -> QuantizedModel:
    """Put fake-quant layers into ``model`` (in place) the way its adapter's published recipe does.

    Args:
        model: a float model (timm ViT/DeiT/Swin/ResNet, torchvision ResNet, transformers, open_clip,
            mmdet Swin detector, or one with a registered adapter).
        config: bits and adapter options (default ``QuantConfig()``: W4A4).
        adapter: a name from :func:`list_adapters`, or ``"auto"`` (picked by model type).
    Returns:
        The :class:`QuantizedModel`; ``qm.quant_config`` is ``config`` and ``qm.qwt_config`` the
        adapter's published QwT config.
    Raises:
        TypeError / ValueError (one line, model untouched): not a module, no adapter recognises it,
        an option the adapter does not take.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qwt_core.QuantConfig, not {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs an nn.Module, got {type(model).__name__}")
    reg = _registry()
    if adapter == "auto":
        found = [a for a in reg.values() if a.matches is not None and a.matches(model)]
        if not found:
            raise ValueError(f"no adapter recognises {type(model).__module__}.{type(model).__name__}: pass "
                             f"adapter= one of {sorted(reg)}, or quantize it with quantize_layers and wrap it in "
                             "a QuantizedModel (docs/your_model.md)")
        chosen = found[0]
    elif adapter in reg:
        chosen = reg[adapter]
    else:
        raise ValueError(f"adapter={adapter!r} is not registered: use 'auto' or one of {sorted(reg)}")
    extra = sorted(set(config.adapter_options()) - set(chosen.options))
    if extra:
        raise ValueError(f"the {chosen.name!r} adapter has no option {', '.join(extra)}: leave it None "
                         f"(options of this adapter: {', '.join(chosen.options) or 'none'})")
    qm = chosen.build(model, config)
    qm.quant_config = config
    qm.meta.setdefault("adapter", chosen.name)
    qm.meta["quant_config"] = config.to_dict()
    return qm


# ------------------------------------------------------------------------------------ calibrate
def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"cannot call the model on a {type(batch).__name__} batch: pass a Tensor, a dict of "
                    "model keyword arguments, or a list of Tensors (concatenated along dim 0)")


def _one_batch(images: Any) -> Any:
    """RepQ-ViT calibrates on one batch: a Tensor, a dict (``model(**batch)``) or a list of Tensors."""
    if isinstance(images, (torch.Tensor, Mapping)):
        return images
    if isinstance(images, (list, tuple)) and images and all(isinstance(t, torch.Tensor) for t in images):
        return torch.cat(list(images), dim=0)
    if isinstance(images, (list, tuple)) and not images:
        raise ValueError("calibrate got an empty list of calibration batches")
    raise TypeError(f"calibrate takes a Tensor, a dict of model inputs or a list of Tensors, not "
                    f"{type(images).__name__} (RepQ-ViT calibrates on one batch: merge yours first)")


def _check_quantized(model: nn.Module, what: str) -> None:
    if not any(True for _ in quantizers(model)):
        raise ValueError(f"{what}: the model has no quantized layer; call qwt_core.quantize(model, config) "
                         "(or quantize_layers) first")


@torch.no_grad()
def _calibrate_adapter(qm: QuantizedModel, batch: Any, integer_zero_point: bool) -> CalibrationReport:
    """The adapters' RepQ-ViT calibration: one forward, the adapter's norm pairs, refit (the
    published protocol, bit for bit)."""
    import time

    t0 = time.perf_counter()
    qm.model.eval()
    repq_calibrate(lambda: _call_model(qm.model, batch), qm.model, qm.ln_pairs, integer_zero_point)
    missing = uninitialized_quantizers(qm.model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during calibration, e.g. {missing[:3]}")
    return CalibrationReport(quantizers=sum(1 for _ in quantizers(qm.model)), seconds=time.perf_counter() - t0)


def calibrate(target: Union[QuantizedModel, nn.Module], data: Any, ln_pairs: Any = "adapter",
              row_mask: Any = None, integer_zero_point: Optional[bool] = None) -> CalibrationReport:
    """RepQ-ViT calibration (the Percentile baseline for CNNs): quantizers initialise on ``data``.

    Args:
        target: a :class:`QuantizedModel` (from :func:`quantize`) or any model with quant layers in
            place (:func:`~qwt_core.quantize_layers`).
        data: one calibration batch (a Tensor ``(B, ...)``, a dict of model keyword arguments, or a
            list of Tensors concatenated along dim 0; 32 images in the papers), or a callable that
            runs the model on the calibration data (several batches: give ``row_mask`` as a callable).
        ln_pairs: ``"adapter"`` (the adapter's norm → Linear pairs; for a bare model ``"auto"``),
            ``"auto"`` (found during the first pass), an explicit list, or None (no reparameterization).
        row_mask: ``(B, L)`` real-token mask (or a callable returning the current batch's).
        integer_zero_point: round the folded zero points; None = ``qm.quant_config``'s (else False).
    Returns:
        A :class:`CalibrationReport`.
    Raises:
        TypeError / ValueError before anything runs (no quant layers, already calibrated, bad data);
        RuntimeError if a quantizer saw no data.
    """
    if isinstance(target, QuantizedModel):
        model = target.model
        izp = target.quant_config.integer_zero_point if integer_zero_point is None and target.quant_config \
            else bool(integer_zero_point)
        _check_quantized(model, "calibrate")
        if target.calibrator is not None:
            return target.calibrator(target, data, ln_pairs=ln_pairs, row_mask=row_mask, integer_zero_point=izp)
        if ln_pairs == "adapter" and row_mask is None and not callable(data):
            done = [n for n, q in quantizers(model) if q.enabled and q.is_inited]
            if done:
                raise ValueError(f"calibrate: {len(done)} quantizers are already calibrated (e.g. {done[0]!r}); "
                                 "calibrate a freshly quantized model")
            return _calibrate_adapter(target, _one_batch(data), izp)
        pairs = target.ln_pairs if ln_pairs == "adapter" else ln_pairs
    elif isinstance(target, nn.Module):
        model, izp = target, bool(integer_zero_point)
        pairs = "auto" if ln_pairs == "adapter" else ln_pairs
    else:
        raise TypeError(f"calibrate needs a QuantizedModel or an nn.Module, got {type(target).__name__}")
    if callable(data) and not isinstance(data, nn.Module):
        forward = data
    else:
        batch = _one_batch(data)
        forward = lambda: _call_model(model, batch)  # noqa: E731
    with torch.no_grad():
        return _calibrate_generic(model, forward, ln_pairs=pairs, row_mask=row_mask, integer_zero_point=izp)


# ----------------------------------------------------------------------------------- compensate
def _check_run_block(run_block: Any) -> None:
    if run_block is None:
        return
    if not callable(run_block):
        raise TypeError("run_block must be a callable (i, block, x, **block_kwargs) -> output tensor")
    try:
        params = list(inspect.signature(run_block).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError("run_block must take (i, block, x, **block_kwargs) and return the block's output "
                        f"tensor; its signature is {inspect.signature(run_block)}")


def _check_blocks(model: nn.Module, names: list[str]) -> None:
    from .modules import QuantConv2d, QuantLinear, QuantMatMul

    for n in names:
        try:
            blk = model.get_submodule(n)
        except AttributeError:
            continue  # the engine names it with close matches
        if isinstance(blk, (QuantLinear, QuantConv2d, QuantMatMul, nn.Linear, nn.Conv2d)):
            raise ValueError(f"QwT block {n!r} is a {type(blk).__name__} layer, not a block: give the blocks "
                             "that contain the quantized layers (e.g. 'blocks.0', 'layer1.0')")


def _check_store_device(store_device: Any) -> None:
    if store_device is None:
        return
    try:
        torch.zeros(1, device=torch.device(store_device)).cpu()  # a meta device holds no data
    except Exception as e:  # noqa: BLE001 - any device error becomes one line
        raise ValueError(f"store_device={store_device!r} cannot hold tensors here ({type(e).__name__}): "
                         "use 'cpu' or an available device") from None


def compensate(qm: QuantizedModel, batches: Any, config: Optional[QwTConfig] = None,
               select: Optional[Callable[[Any], Any]] = None, progress: bool = True,
               store_device: Optional[Union[torch.device, str]] = None, **changes: Any) -> QwTReport:
    """QwT: add a closed-form linear compensation to each block of a calibrated quantized model.

    Args:
        qm: a calibrated :class:`QuantizedModel` (:func:`quantize` + :func:`calibrate`, or one you
            built with ``block_names``, ``first_block_input`` and optionally ``run_block`` /
            ``transition``).
        batches: an iterable of batches of what ``qm.first_block_input`` takes (images
            ``(B, 3, H, W)`` for the image adapters; 512 images in the papers; in distributed runs
            the rank's share); a single Tensor, dict or :class:`BlockInput` is one batch.
        config: a :class:`QwTConfig`; None = ``qm.qwt_config`` (the adapter's published settings).
        select: maps each item of ``batches`` to such a batch (e.g. ``lambda b: b[0]``).
        progress: a progress bar (main process only).
        store_device: where block features wait between blocks (default: the model's device).
        changes: :class:`QwTConfig` fields applied on top of the config (``compensate(qm, b,
            gate="insample")`` is ``compensate(qm, b, qm.qwt_config.replace(gate="insample"))``).
    Returns:
        A :class:`QwTReport` (per block: applied, R², λ, solver); ``report.config`` is the config used.
    Raises:
        TypeError / ValueError (one line, before the model is changed): not a QuantizedModel, no
        quantized layer, not calibrated, a block that is a single layer, a bad ``run_block`` or
        ``store_device``; ValueError naming the block for NaN/Inf.
    """
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"compensate needs a QuantizedModel (from qwt_core.quantize, or QuantizedModel(model, "
                        f"ln_pairs, block_names, first_block_input)), not {type(qm).__name__}")
    config = config if config is not None else qm.qwt_config
    if not isinstance(config, QwTConfig):
        raise TypeError(f"config must be a qwt_core.QwTConfig, not {type(config).__name__}")
    if changes:
        config = config.replace(**changes)
    _check_quantized(qm.model, "compensate")
    missing = uninitialized_quantizers(qm.model)
    if missing:
        raise ValueError(f"compensate: {len(missing)} quantizers are not calibrated (e.g. {missing[0]!r}): "
                         "call qwt_core.calibrate(qm, batch) before QwT")
    _check_blocks(qm.model, list(qm.block_names))
    _check_run_block(qm.run_block)
    _check_store_device(store_device)
    if isinstance(batches, (torch.Tensor, Mapping, BlockInput)):
        batches = [batches]
    if select is not None:
        batches = (select(b) for b in batches)
    qm.model.eval()
    report = apply_qwt(qm.model, qm.block_names, batches, qm.first_block_input, transition=qm.transition,
                       run_block=qm.run_block, form=qm.form, store_device=store_device, progress=progress,
                       **config.engine_kwargs())
    report.config = config.to_dict()
    qm.meta["qwt_config"] = report.config  # saved with the model (save_quantized(qm.model, path, qm.meta))
    return report
