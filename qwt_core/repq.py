"""RepQ-ViT calibration: lazy init pass, post-LayerNorm reparameterization, weight re-fit pass."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .modules import QuantLinear, quantizers, set_quant_state
from .reparam import reparameterize_layernorm


def uninitialized_quantizers(model: nn.Module) -> list[str]:
    """Names of enabled quantizers that have not seen data yet."""
    return [name for name, q in quantizers(model) if q.enabled and not q.is_inited]


@torch.no_grad()
def repq_calibrate(forward: Callable[[], Any], model: nn.Module,
                   ln_pairs: Sequence[tuple[nn.Module, QuantLinear]],
                   integer_zero_point: bool = False) -> None:
    """Run RepQ-ViT's three calibration steps on ``model``.

    1. ``forward()`` with quantization on: every quantizer initialises lazily, in forward order, on
       already-quantized inputs;
    2. each (LayerNorm, Linear) pair is reparameterized (channel-wise → per-tensor input quantizer,
       the Linear's weight quantizer is reset);
    3. ``forward()`` again to re-fit the reset weight quantizers.

    ``forward`` runs the model on the calibration batch (e.g. ``lambda: model(images)``).
    """
    set_quant_state(model, weight=True, act=True)
    forward()
    for norm, linear in ln_pairs:
        reparameterize_layernorm(norm, linear, integer_zero_point=integer_zero_point)
    forward()
