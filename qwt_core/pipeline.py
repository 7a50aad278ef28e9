"""One-call RepQ-ViT and QwT steps on a :class:`~qwt_core.adapters.base.QuantizedModel`."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Union

import torch

from .adapters.base import QuantizedModel
from .qwt import BlockInput, QwTReport, apply_qwt
from .repq import repq_calibrate, uninitialized_quantizers

#: apply_qwt parameters that ``QuantizedModel.qwt_kwargs`` and ``compensate(**kwargs)`` may set.
_OWN = ("model", "block_names", "calib_batches", "first_block_input", "transition", "run_block", "form")
QWT_OPTIONS = tuple(p for p in inspect.signature(apply_qwt).parameters if p not in _OWN)


def _call_model(model: torch.nn.Module, batch: Any) -> Any:
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
        raise ValueError("calibrate_repq got an empty list of calibration batches")
    raise TypeError(f"calibrate_repq takes a Tensor, a dict of model inputs or a list of Tensors, not "
                    f"{type(images).__name__} (RepQ-ViT calibrates on one batch: merge yours first)")


@torch.no_grad()
def calibrate_repq(qm: QuantizedModel, images: Union[torch.Tensor, Mapping, list, tuple],
                   integer_zero_point: bool = False) -> None:
    """RepQ-ViT calibration of ``qm.model`` on one batch (32 images in the paper).

    ``images``: a Tensor ``(B, ...)`` (``model(images)``), a dict of model keyword arguments
    (``model(**images)``), or a list/tuple of Tensors, concatenated along dim 0 into one batch.
    Raises ``RuntimeError`` if a quantizer was never reached by the forward pass.
    """
    batch = _one_batch(images)
    qm.model.eval()
    repq_calibrate(lambda: _call_model(qm.model, batch), qm.model, qm.ln_pairs, integer_zero_point)
    missing = uninitialized_quantizers(qm.model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during calibration, e.g. {missing[:3]}")


def qwt_options(qm: QuantizedModel, **overrides: Any) -> dict[str, Any]:
    """``qm.qwt_kwargs`` updated with the explicit ``overrides`` (None values ignored), checked by name."""
    opts = dict(qm.qwt_kwargs or {})
    opts.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(opts) - set(QWT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown QwT option(s) {unknown} (from QuantizedModel.qwt_kwargs or compensate); "
                        f"valid: {', '.join(QWT_OPTIONS)}")
    return opts


def compensate(qm: QuantizedModel, calib_batches: Any, start_block: Optional[int] = None,
               store_device: Optional[torch.device | str] = None, progress: bool = True,
               select: Optional[Callable[[Any], Any]] = None, **kwargs: Any) -> QwTReport:
    """QwT over ``qm.block_names`` with the adapter's input/transition/run functions.

    ``calib_batches``: an iterable of batches of what ``qm.first_block_input`` takes (for the image
    adapters, tensors ``(B, 3, H, W)``: the rank's share of the 512 images); a single Tensor, dict or
    :class:`BlockInput` is taken as one batch. ``select`` maps each item to such a batch (e.g.
    ``lambda b: b[0]`` for a DataLoader of ``(images, labels)``). Options: ``qm.qwt_kwargs`` (the
    adapter's recipe defaults), overridden by ``start_block``/``store_device`` when given and by extra
    keyword arguments of :func:`qwt_core.qwt.apply_qwt` (``gate``, ``ridge``, ``conv_kernel`` ...).
    """
    opts = qwt_options(qm, start_block=start_block, store_device=store_device, **kwargs)
    opts["progress"] = progress
    if isinstance(calib_batches, (torch.Tensor, Mapping, BlockInput)):
        calib_batches = [calib_batches]
    if select is not None:
        calib_batches = (select(b) for b in calib_batches)
    qm.model.eval()
    return apply_qwt(qm.model, qm.block_names, calib_batches, qm.first_block_input,
                     transition=qm.transition, run_block=qm.run_block, form=qm.form, **opts)
