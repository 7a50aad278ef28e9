"""What an adapter hands to the RepQ-ViT / QwT pipeline for one model family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from ..modules import QuantLinear
from ..quantize import LayerBits
from ..qwt import RunBlock, Transition


@dataclass
class QuantizedModel:
    """A model with fake-quant layers in place, plus what RepQ-ViT and QwT need to know about it.

    Attributes:
        model: the model (modified in place by the adapter).
        ln_pairs: (LayerNorm, QuantLinear) pairs to reparameterize after the first calibration pass.
        block_names: qualified names of the blocks QwT compensates, in forward order.
        first_block_input: images ``(B, 3, H, W)`` → input of the first block (quantized model).
        transition: glue between consecutive blocks (e.g. Swin patch merging), or None.
        run_block: how to call a block, or None for ``block(x)``.
        form: ``"token"`` (channels-last Linear compensation) or ``"conv"`` (grouped conv).
        meta: free-form description (family, bits) saved with the model.
    """

    model: nn.Module
    ln_pairs: list[tuple[nn.Module, QuantLinear]]
    block_names: list[str]
    first_block_input: Callable[[torch.Tensor], torch.Tensor]
    transition: Optional[Transition] = None
    run_block: Optional[RunBlock] = None
    form: Literal["token", "conv"] = "token"
    meta: dict[str, Any] = field(default_factory=dict)


def transformer_layer_rule(w_bits: int, a_bits: int, eight_bit: tuple[str, ...],
                           channel_wise_suffixes: tuple[str, ...]):
    """Bit rule shared by the ViT-style adapters.

    Layers whose name starts with one of ``eight_bit`` (patch embedding, heads) get W8/A8; layers whose
    name ends with one of ``channel_wise_suffixes`` (inputs coming from a LayerNorm) get a channel-wise
    input quantizer (reparameterized later); every other Linear/Conv2d gets ``w_bits/a_bits``.
    """

    def rule(name: str, module: nn.Module) -> Optional[LayerBits]:
        if any(name == p or name.startswith(p + ".") for p in eight_bit):
            return LayerBits(8, 8)
        if isinstance(module, nn.Linear) and name.endswith(channel_wise_suffixes):
            return LayerBits(w_bits, a_bits, act_channel_wise=True)
        return LayerBits(w_bits, a_bits)

    return rule
