"""RepQ-ViT and QwT for an mmdet Swin detector: thin glue over ``qwt_core``'s public functions.

1. :func:`quantize_detector` - fake-quant layers everywhere (adapter ``mmdet_swin``);
2. :func:`calibrate_detector_repq` - RepQ-ViT: one seeded batch through the whole detector, LayerNorm
   reparameterization in the backbone, a second pass to re-fit the weight quantizers;
3. :func:`compensate_backbone` - QwT over the Swin backbone blocks on the calibration images.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

import qwt_core
from qwt_core import QuantConfig, QuantizedModel, QwTConfig, QwTReport


def quantize_detector(model: nn.Module, w_bits: int, a_bits: int) -> QuantizedModel:
    """Swap every Linear/Conv2d of ``model`` (mmdet detector, Swin backbone) for fake-quant layers."""
    return qwt_core.quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits), adapter="mmdet_swin")


def calibrate_detector_repq(qm: QuantizedModel, batch: dict, integer_zero_point: bool = False) -> None:
    """RepQ-ViT calibration on one preprocessed batch ``{"inputs": (B, 3, H, W), "data_samples": [...]}``.

    Raises ``RuntimeError`` naming quantizers the detector never reached (e.g. a head that got no RoIs).
    """
    qwt_core.calibrate(qm, batch, integer_zero_point=integer_zero_point)


@torch.no_grad()
def compensate_backbone(qm: QuantizedModel, batches: Iterable[dict], start_block: int = 0,
                        store_device: Optional[str] = None, progress: bool = True,
                        config: Optional[QwTConfig] = None, **changes: Any) -> QwTReport:
    """QwT over the Swin backbone blocks; ``batches`` are preprocessed calibration batches (this rank's
    share; the least-squares moments are all-reduced). ``config`` (default: the adapter's) with
    ``start_block`` and any further :class:`~qwt_core.QwTConfig` field in ``changes`` applied
    (e.g. ``gate="insample"``, the papers' rule)."""
    config = (config or qm.qwt_config).replace(start_block=start_block, **changes)
    return qwt_core.compensate(qm, batches, config, progress=progress, store_device=store_device)
