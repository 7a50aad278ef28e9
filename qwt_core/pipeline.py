"""One-call RepQ-ViT and QwT steps on a :class:`~qwt_core.adapters.base.QuantizedModel`."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .adapters.base import QuantizedModel
from .qwt import QwTReport, apply_qwt
from .repq import repq_calibrate, uninitialized_quantizers


@torch.no_grad()
def calibrate_repq(qm: QuantizedModel, images: torch.Tensor, integer_zero_point: bool = False) -> None:
    """RepQ-ViT calibration of ``qm.model`` on one batch ``images`` ``(B, 3, H, W)`` (32 in the paper).

    Raises ``RuntimeError`` if a quantizer was never reached by the forward pass.
    """
    qm.model.eval()
    repq_calibrate(lambda: qm.model(images), qm.model, qm.ln_pairs, integer_zero_point)
    missing = uninitialized_quantizers(qm.model)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers saw no data during calibration, e.g. {missing[:3]}")


def compensate(qm: QuantizedModel, calib_batches: Iterable[torch.Tensor], start_block: int = 0,
               store_device: Optional[torch.device | str] = None, progress: bool = True,
               **kwargs) -> QwTReport:
    """QwT over ``qm.block_names`` with the adapter's input/transition functions.

    ``calib_batches`` are image tensors ``(B, 3, H, W)`` (the rank's share of the 512 images).
    Extra keyword arguments go to :func:`qwt_core.qwt.apply_qwt` (``conv_kernel`` etc.).
    """
    qm.model.eval()
    return apply_qwt(qm.model, qm.block_names, calib_batches, qm.first_block_input,
                     transition=qm.transition, run_block=qm.run_block, form=qm.form,
                     start_block=start_block, store_device=store_device, progress=progress, **kwargs)
