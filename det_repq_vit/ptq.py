"""RepQ-ViT and QwT for an mmdet Swin detector, on top of ``qwt_core``.

1. :func:`quantize_detector` - fake-quant layers everywhere (adapter ``qwt_core.adapters.mmdet_swin``);
2. :func:`calibrate_detector_repq` - RepQ-ViT: one seeded batch through the whole detector, LayerNorm
   reparameterization in the backbone, a second pass to re-fit the weight quantizers;
3. :func:`compensate_backbone` - QwT over the Swin backbone blocks on the calibration images.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from qwt_core.adapters.base import QuantizedModel
from qwt_core.adapters.mmdet_swin import quantize_mmdet_swin_detector
from qwt_core.qwt import QwTReport, apply_qwt
from qwt_core.repq import repq_calibrate, uninitialized_quantizers


def quantize_detector(model: nn.Module, w_bits: int, a_bits: int) -> QuantizedModel:
    """Swap every Linear/Conv2d of ``model`` (mmdet detector, Swin backbone) for fake-quant layers."""
    return quantize_mmdet_swin_detector(model, w_bits, a_bits)


@torch.no_grad()
def calibrate_detector_repq(qm: QuantizedModel, batch: dict, integer_zero_point: bool = False) -> None:
    """RepQ-ViT calibration on one preprocessed batch ``{"inputs": (B, 3, H, W), "data_samples": [...]}``.

    Raises ``RuntimeError`` naming quantizers the detector never reached (e.g. a head that got no RoIs).
    """
    model = qm.model
    model.eval()
    # rescale=False: the masks need not be pasted back at the original image size
    repq_calibrate(lambda: model.predict(batch["inputs"], batch["data_samples"], rescale=False),
                   model, qm.ln_pairs, integer_zero_point=integer_zero_point)
    missing = uninitialized_quantizers(model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during RepQ-ViT calibration "
                           f"(e.g. {missing[:3]}); use more or larger calibration images")


@torch.no_grad()
def compensate_backbone(qm: QuantizedModel, batches: Iterable[dict], start_block: int = 0,
                        store_device: Optional[str] = None, progress: bool = True,
                        **qwt_kwargs: Any) -> QwTReport:
    """QwT over the Swin backbone blocks; ``batches`` are preprocessed calibration batches (this rank's
    share; the least-squares moments are all-reduced by ``apply_qwt``). ``qwt_kwargs``: further
    :func:`~qwt_core.qwt.apply_qwt` options, e.g. ``gate="insample"`` (the papers' rule) or ``ridge``."""
    qm.model.eval()
    return apply_qwt(qm.model, qm.block_names, batches,
                     lambda b: qm.first_block_input(b["inputs"]), transition=qm.transition,
                     run_block=qm.run_block, form="token", start_block=start_block,
                     store_device=store_device, progress=progress, **qwt_kwargs)
