"""What an adapter hands to the RepQ-ViT / QwT pipeline for one model family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from ..modules import QuantLinear
from ..quantize import LayerBits
from ..qwt import BlockInput, RunBlock, Transition


@dataclass
class QuantizedModel:
    """A model with fake-quant layers in place, plus what RepQ-ViT and QwT need to know about it.

    Attributes:
        model: the model (modified in place by the adapter).
        ln_pairs: (LayerNorm, QuantLinear) pairs to reparameterize after the first calibration pass.
        block_names: qualified names of the blocks QwT compensates, in forward order.
        first_block_input: a batch (images ``(B, 3, H, W)`` for the image adapters) → input of the
            first block (quantized model): a Tensor or a :class:`~qwt_core.qwt.BlockInput`.
        transition: glue between consecutive blocks (e.g. Swin patch merging), or None.
        run_block: how to call a block, ``(i, block, x, **block_kwargs) -> y``, or None for
            ``block(x, **block_kwargs)``.
        form: ``"token"`` (channels-last Linear compensation) or ``"conv"`` (grouped conv).
        meta: free-form description (family, bits) saved with the model.
        qwt_kwargs: the adapter's QwT recipe defaults (e.g. ``{"gate": "insample", "ridge": 1e-3}``),
            passed by :func:`qwt_core.compensate` to :func:`qwt_core.apply_qwt`; explicit arguments
            of ``compensate`` override them.
    """

    model: nn.Module
    ln_pairs: list[tuple[nn.Module, QuantLinear]]
    block_names: list[str]
    first_block_input: Callable[[Any], Union[torch.Tensor, BlockInput]]
    transition: Optional[Transition] = None
    run_block: Optional[RunBlock] = None
    form: Literal["token", "conv"] = "token"
    meta: dict[str, Any] = field(default_factory=dict)
    qwt_kwargs: dict[str, Any] = field(default_factory=dict)


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
