"""Transitional names: :func:`calibrate_repq` and :func:`compensate` now live in :mod:`qwt_core.api`."""
from __future__ import annotations

from typing import Any

from .adapters.base import QuantizedModel
from .api import _calibrate_adapter, _one_batch, compensate
from .calibrate import CalibrationReport

__all__ = ["calibrate_repq", "compensate"]


def calibrate_repq(qm: QuantizedModel, images: Any, integer_zero_point: bool = False) -> CalibrationReport:
    """RepQ-ViT calibration of ``qm`` on one batch with the adapter's norm pairs
    (``qwt_core.calibrate(qm, images)`` for adapters without their own calibrator)."""
    return _calibrate_adapter(qm, _one_batch(images), integer_zero_point)
